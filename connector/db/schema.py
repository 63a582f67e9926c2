"""The connector's tables, as SQLAlchemy Core.

The migrations in ``connector/migrations`` create exactly this; ``tests/test_migrations.py`` fails
when the two drift apart.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, MetaData, String, Table

from connector.db.types import Document, Identifier, LongText, Sequence, UTCDateTime
from connector.resources import RESOURCES, Kind

# Named constraints can be dropped by name on every database (Alembic's naming advice).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# utf8mb4 for 4-byte characters such as emoji; a binary collation because Coherent ids are
# case-sensitive ("WAz8e..." and "waz8e..." are two contacts) and so is every other database here;
# NO PAD, so that "e1" and "e1 " differ too (migration 0004). MySQL 8 names its own utf8mb4_0900_bin,
# which migration 0004 picks there; the tables are made by the migrations, not from these models.
MYSQL_TABLE_ARGS = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_nopad_bin"}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

_COLUMN_TYPES = {
    Kind.ID: Identifier,
    Kind.TEXT: LongText,
    Kind.TIMESTAMP: UTCDateTime(),
    Kind.BOOLEAN: Boolean(),
    Kind.INTEGER: BigInteger(),  # file sizes can pass 2 GiB
    Kind.OBJECT: Document,
    Kind.ARRAY: Document,
}

events = Table(
    "coherent_events",
    metadata,
    Column("seq", Sequence, primary_key=True, autoincrement=True),
    Column("event_id", Identifier, nullable=False, unique=True),
    Column("type", String(100), nullable=False),
    Column("resource", String(100), nullable=False),
    Column("action", String(100), nullable=False),
    Column("resource_id", Identifier, nullable=False),
    Column("payload", Document, nullable=False),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("outcome", String(32), nullable=False),
    Index("ix_coherent_events_resource_id", "resource", "resource_id", "seq"),
    Index("ix_coherent_events_received_at", "received_at"),
    **MYSQL_TABLE_ARGS,
)


def _state_table(name: str, typed: dict[str, Kind]) -> Table:
    return Table(
        name,
        metadata,
        Column("id", Identifier, primary_key=True, autoincrement=False),
        *(Column(field, _COLUMN_TYPES[kind]) for field, kind in typed.items()),
        Column("_raw", Document, nullable=False),
        Column("_deleted_at", UTCDateTime()),
        Column("_event_id", Identifier, nullable=False),
        Column("_last_action", String(16), nullable=False),
        Column("_synced_at", UTCDateTime(), nullable=False),
        Column("_errors", Document),
        **MYSQL_TABLE_ARGS,
    )


state_tables: dict[str, Table] = {
    resource.name: _state_table(resource.table, dict(resource.columns)) for resource in RESOURCES.values()
}

# Indexes an analyst's joins and date filters need.
Index("ix_coherent_messages_conversation_id", state_tables["message"].c.conversation_id)
Index("ix_coherent_messages_contact_id", state_tables["message"].c.contact_id)
Index("ix_coherent_messages_created_at", state_tables["message"].c.created_at)
Index("ix_coherent_attachments_message_id", state_tables["attachment"].c.message_id)
Index("ix_coherent_conversations_contact_id", state_tables["conversation"].c.contact_id)
Index("ix_coherent_conversations_group_id", state_tables["conversation"].c.group_id)

group_members = Table(
    "coherent_group_members",
    metadata,
    Column("group_id", Identifier, primary_key=True),
    # Position in the group's ``contacts`` array: members may lack an id or repeat, so it is the key.
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("contact_id", Identifier),
    Column("username", LongText),
    Index("ix_coherent_group_members_contact_id", "contact_id"),
    **MYSQL_TABLE_ARGS,
)

message_reactions = Table(
    "coherent_message_reactions",
    metadata,
    Column("message_id", Identifier, primary_key=True),
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("emoji", Identifier, nullable=False),
    Column("username", LongText, nullable=False),
    Index("ix_coherent_message_reactions_emoji", "emoji"),
    **MYSQL_TABLE_ARGS,
)

# Child tables, keyed by the resource whose payload they are derived from.
child_tables: dict[str, tuple[Table, str]] = {
    "group": (group_members, "group_id"),
    "message": (message_reactions, "message_id"),
}
