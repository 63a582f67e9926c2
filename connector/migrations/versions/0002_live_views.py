"""Views of the live rows: coherent_<resource>_live leaves out deleted rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ["contacts", "conversations", "messages", "groups", "attachments"]


def upgrade() -> None:
    for name in TABLES:
        op.execute(f"CREATE VIEW coherent_{name}_live AS SELECT * FROM coherent_{name} WHERE _deleted_at IS NULL")


def downgrade() -> None:
    for name in reversed(TABLES):
        op.execute(f"DROP VIEW coherent_{name}_live")
