"""The change log, the five current-state tables and their child tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from connector.db.types import JSONText, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out here rather than imported from the schema, so that this revision keeps describing
# what it created even after the schema moves on. tests/test_migrations.py checks they agree.
ID = sa.String(length=255)
TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
JSON = sa.JSON().with_variant(JSONText(), "mysql", "mariadb")
TS = UTCDateTime()
MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}

STATE_TABLES = {
    "coherent_contacts": [
        sa.Column("username", TEXT),
        sa.Column("phone_number", TEXT),
        sa.Column("avatar_url", TEXT),
        sa.Column("display_name", TEXT),
        sa.Column("conversation_id", ID),
        sa.Column("last_active_at", TS),
        sa.Column("created_at", TS),
    ],
    "coherent_conversations": [
        sa.Column("contact_id", ID),
        sa.Column("group_id", ID),
        sa.Column("pinned_message_id", ID),
        sa.Column("is_pinned", sa.Boolean()),
        sa.Column("is_muted", sa.Boolean()),
        sa.Column("last_active_at", TS),
        sa.Column("last_opened_at", TS),
        sa.Column("created_at", TS),
        sa.Column("archived_at", TS),
    ],
    "coherent_messages": [
        sa.Column("conversation_id", ID),
        sa.Column("contact", JSON),
        sa.Column("message", TEXT),
        sa.Column("reactions", JSON),
        sa.Column("attachments", JSON),
        sa.Column("read_at", TS),
        sa.Column("created_at", TS),
        sa.Column("updated_at", TS),
        sa.Column("contact_id", ID),
    ],
    "coherent_groups": [
        sa.Column("name", TEXT),
        sa.Column("description", TEXT),
        sa.Column("avatar_url", TEXT),
        sa.Column("conversation_id", ID),
        sa.Column("contacts", JSON),
        sa.Column("created_at", TS),
        sa.Column("archived_at", TS),
    ],
    "coherent_attachments": [
        sa.Column("message_id", ID),
        sa.Column("filename", TEXT),
        sa.Column("file_url", TEXT),
        sa.Column("file_type", TEXT),
        sa.Column("file_size", sa.BigInteger()),
        sa.Column("created_at", TS),
    ],
}

INDEXES = [
    ("ix_coherent_events_resource_id", "coherent_events", ["resource", "resource_id", "seq"]),
    ("ix_coherent_events_received_at", "coherent_events", ["received_at"]),
    ("ix_coherent_messages_conversation_id", "coherent_messages", ["conversation_id"]),
    ("ix_coherent_messages_contact_id", "coherent_messages", ["contact_id"]),
    ("ix_coherent_messages_created_at", "coherent_messages", ["created_at"]),
    ("ix_coherent_attachments_message_id", "coherent_attachments", ["message_id"]),
    ("ix_coherent_conversations_contact_id", "coherent_conversations", ["contact_id"]),
    ("ix_coherent_conversations_group_id", "coherent_conversations", ["group_id"]),
    ("ix_coherent_group_members_contact_id", "coherent_group_members", ["contact_id"]),
    ("ix_coherent_message_reactions_emoji", "coherent_message_reactions", ["emoji"]),
]


def upgrade() -> None:
    op.create_table(
        "coherent_events",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("event_id", ID, nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("resource", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("resource_id", ID, nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_coherent_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_coherent_events_event_id")),
        **MYSQL,
    )
    for table, columns in STATE_TABLES.items():
        op.create_table(
            table,
            sa.Column("id", ID, autoincrement=False, nullable=False),
            *columns,
            sa.Column("_raw", JSON, nullable=False),
            sa.Column("_deleted_at", TS),
            sa.Column("_event_id", ID, nullable=False),
            sa.Column("_last_action", sa.String(length=16), nullable=False),
            sa.Column("_synced_at", TS, nullable=False),
            sa.Column("_errors", JSON),
            sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
            **MYSQL,
        )
    op.create_table(
        "coherent_group_members",
        sa.Column("group_id", ID, nullable=False),
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("contact_id", ID),
        sa.Column("username", TEXT),
        sa.PrimaryKeyConstraint("group_id", "position", name=op.f("pk_coherent_group_members")),
        **MYSQL,
    )
    op.create_table(
        "coherent_message_reactions",
        sa.Column("message_id", ID, nullable=False),
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("emoji", ID, nullable=False),
        sa.Column("username", TEXT, nullable=False),
        sa.PrimaryKeyConstraint("message_id", "position", name=op.f("pk_coherent_message_reactions")),
        **MYSQL,
    )
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
    for table in [
        "coherent_message_reactions",
        "coherent_group_members",
        *reversed(STATE_TABLES),
        "coherent_events",
    ]:
        op.drop_table(table)
