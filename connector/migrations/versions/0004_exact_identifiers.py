"""MySQL and MariaDB: compare text exactly, trailing spaces included (a NO PAD binary collation).

``utf8mb4_bin`` is a PAD SPACE collation: it compares ``'e1'`` and ``'e1 '`` as equal. The store
looks an id up in the database but compares it in Python, where the two differ, so an event whose id
differed from a recorded one only by trailing spaces clashed on insert as if it had lost a race, and
was retried until its budget ran out: a 503 at every delivery, for ever. Every other database here
compares exactly; after this revision MySQL and MariaDB do too, so two such ids are two events (or
two rows), as they are everywhere else.

Downgrading fails if the tables hold two ids that differ only by trailing spaces.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out, not imported, so that this revision keeps describing what it changed.
TABLES = [
    "coherent_events",
    "coherent_contacts",
    "coherent_conversations",
    "coherent_messages",
    "coherent_groups",
    "coherent_attachments",
    "coherent_group_members",
    "coherent_message_reactions",
]
# MariaDB 10.2+ has the first, MySQL 8.0.17+ the second.
NO_PAD_BINARY = ("utf8mb4_nopad_bin", "utf8mb4_0900_bin")
PAD_SPACE_BINARY = "utf8mb4_bin"


def _convert(collation: str) -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 COLLATE {collation}")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name not in ("mysql", "mariadb"):
        return
    available = set(
        bind.scalars(
            text("SELECT COLLATION_NAME FROM information_schema.COLLATIONS WHERE CHARACTER_SET_NAME = 'utf8mb4'")
        )
    )
    collation = next((name for name in NO_PAD_BINARY if name in available), None)
    if collation is None:
        raise RuntimeError(
            "this server has no NO PAD binary collation (MariaDB 10.2+ and MySQL 8.0.17+ have one); "
            "upgrade the server, or run the connector on PostgreSQL or SQLite"
        )
    _convert(collation)


def downgrade() -> None:
    if op.get_bind().dialect.name in ("mysql", "mariadb"):
        _convert(PAD_SPACE_BINARY)
