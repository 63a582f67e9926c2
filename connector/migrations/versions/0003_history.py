"""History views: coherent_<resource>_history, one row per applied version, derived from the change log.

Like Fivetran's history mode, but nothing extra is written when an event arrives: each view reads
``coherent_events``. A version row holds the whole state of the resource as of that version (a
field an event did not carry keeps the value of the last applied event that did, as rule 5 merges
it), typed as in the state table, plus ``_payload`` (what that event carried), ``valid_from``,
``valid_to`` and ``is_current``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out, not imported, so that this revision keeps describing what it created.
RESOURCES = {
    "contact": (
        "contacts",
        {
            "username": "text",
            "phone_number": "text",
            "avatar_url": "text",
            "display_name": "text",
            "conversation_id": "text",
            "last_active_at": "ts",
            "created_at": "ts",
        },
    ),
    "conversation": (
        "conversations",
        {
            "contact_id": "text",
            "group_id": "text",
            "pinned_message_id": "text",
            "is_pinned": "bool",
            "is_muted": "bool",
            "last_active_at": "ts",
            "last_opened_at": "ts",
            "created_at": "ts",
            "archived_at": "ts",
        },
    ),
    "message": (
        "messages",
        {
            "conversation_id": "text",
            "contact": "object",
            "message": "text",
            "reactions": "array",
            "attachments": "array",
            "read_at": "ts",
            "created_at": "ts",
            "updated_at": "ts",
        },
    ),
    "group": (
        "groups",
        {
            "name": "text",
            "description": "text",
            "avatar_url": "text",
            "conversation_id": "text",
            "contacts": "array",
            "created_at": "ts",
            "archived_at": "ts",
        },
    ),
    "attachment": (
        "attachments",
        {
            "message_id": "text",
            "filename": "text",
            "file_url": "text",
            "file_type": "text",
            "file_size": "int",
            "created_at": "ts",
        },
    ),
}

# The years 1000 to 9999, as the state tables (resources.MIN_TIMESTAMP, MAX_TIMESTAMP).
MIN_TS, MAX_TS = -30_610_224_000, 253_402_300_799


# The JSON escapes that PostgreSQL and MariaDB cannot decode into text: \u0000, and a surrogate
# escape without its partner (\ud83d\ude00 is a valid pair, an emoji). Both are replaced by the
# escape of U+FFFD before a document is read, as the state tables' text columns have them.
NUL = r"\u0000"
FFFD = r"\ufffd"
FFFD_REPLACEMENT = r"\\ufffd"  # in a regexp replacement a backslash must be doubled
LONE_HIGH = r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
LONE_LOW = r"(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"


class Postgres:
    def doc(self, alias):
        text = f"replace({alias}.payload::text, '{NUL}', '{FFFD}')"
        text = f"regexp_replace(regexp_replace({text}, '{LONE_HIGH}', '{FFFD_REPLACEMENT}', 'g'), '{LONE_LOW}', '{FFFD_REPLACEMENT}', 'g')"
        return f"({text})::json"

    def carried(self, doc, field):
        return f"({doc} -> '{field}') IS NOT NULL"

    def number(self, doc, field):
        return f"CASE WHEN json_typeof({doc} -> '{field}') = 'number' THEN ({doc} ->> '{field}')::double precision END"

    def typed(self, doc, field, kind):
        kind_of = f"json_typeof({doc} -> '{field}')"
        value = f"({doc} ->> '{field}')"
        if kind == "text":
            return f"CASE WHEN {kind_of} = 'string' THEN {value} END"
        if kind == "ts":
            return f"CASE WHEN {kind_of} = 'number' AND {value}::numeric BETWEEN {MIN_TS} AND {MAX_TS} THEN to_timestamp({value}::double precision) END"
        if kind == "bool":
            return f"CASE WHEN {kind_of} = 'boolean' THEN {value}::boolean END"
        if kind == "int":
            return f"CASE WHEN {kind_of} = 'number' AND {value} ~ '^-?[0-9]{{1,19}}$' AND {value}::numeric BETWEEN -9223372036854775808 AND 9223372036854775807 THEN {value}::bigint END"
        return f"CASE WHEN {kind_of} = '{kind}' THEN {doc} -> '{field}' END"

    def contact_id(self, doc):
        return f"CASE WHEN json_typeof({doc} -> 'contact' -> 'id') = 'string' THEN {doc} -> 'contact' ->> 'id' END"


class SQLite:
    def doc(self, alias):
        # json_extract would cut a text value short at \u0000; U+FFFD instead, as the state tables have.
        return f"replace({alias}.payload, '{NUL}', '{FFFD}')"

    def carried(self, doc, field):
        return f"json_type({doc}, '$.{field}') IS NOT NULL"

    def number(self, doc, field):
        return (
            f"CASE WHEN json_type({doc}, '$.{field}') IN ('integer', 'real') THEN json_extract({doc}, '$.{field}') END"
        )

    def _text(self, doc, path):
        # json_extract decodes an unpaired surrogate into bytes that are not UTF-8 (0xED 0xA0-0xBF),
        # which no client can read; such a value is NULL here and exact in _payload.
        value = f"json_extract({doc}, '{path}')"
        unreadable = " OR ".join(f"instr(CAST({value} AS BLOB), X'ED{byte:02X}') > 0" for byte in range(0xA0, 0xC0))
        return f"CASE WHEN json_type({doc}, '{path}') = 'text' AND NOT ({unreadable}) THEN {value} END"

    def typed(self, doc, field, kind):
        kind_of = f"json_type({doc}, '$.{field}')"
        value = f"json_extract({doc}, '$.{field}')"
        if kind == "text":
            return self._text(doc, f"$.{field}")
        if kind == "ts":
            return f"CASE WHEN {kind_of} IN ('integer', 'real') AND {value} BETWEEN {MIN_TS} AND {MAX_TS} THEN strftime('%Y-%m-%d %H:%M:%f', {value}, 'unixepoch') END"
        if kind == "bool":
            return f"CASE {kind_of} WHEN 'true' THEN 1 WHEN 'false' THEN 0 END"
        if kind == "int":
            # An integer past 64 bits is extracted as a real number.
            return f"CASE WHEN {kind_of} = 'integer' AND typeof({value}) = 'integer' THEN {value} END"
        return f"CASE WHEN {kind_of} = '{kind}' THEN {value} END"

    def contact_id(self, doc):
        return self._text(doc, "$.contact.id")


def _mariadb_text(value):
    """A MariaDB string expression for ``value`` that means the same whatever the sql_mode says of backslashes."""
    pieces = [f"'{piece}'" for piece in value.split("\\")]
    return f"CONCAT({', CHAR(92 USING utf8mb4), '.join(pieces)})"


class MariaDB:
    def doc(self, alias):
        # Unreplaced, one unpaired surrogate makes JSON_EXTRACT give NULL for every field.
        text = f"REPLACE({alias}.payload, {_mariadb_text(NUL)}, {_mariadb_text(FFFD)})"
        replacement = _mariadb_text(FFFD_REPLACEMENT)
        return f"REGEXP_REPLACE(REGEXP_REPLACE({text}, {_mariadb_text(LONE_HIGH)}, {replacement}), {_mariadb_text(LONE_LOW)}, {replacement})"

    def carried(self, doc, field):
        return f"JSON_CONTAINS_PATH({doc}, 'one', '$.{field}')"

    def number(self, doc, field):
        return f"CASE WHEN JSON_TYPE(JSON_EXTRACT({doc}, '$.{field}')) IN ('INTEGER', 'DOUBLE') THEN CAST(JSON_EXTRACT({doc}, '$.{field}') AS DOUBLE) END"

    def typed(self, doc, field, kind):
        value = f"JSON_EXTRACT({doc}, '$.{field}')"
        kind_of = f"JSON_TYPE({value})"
        if kind == "text":
            return f"CASE WHEN {kind_of} = 'STRING' THEN JSON_VALUE({doc}, '$.{field}') END"
        if kind == "ts":
            seconds = f"CAST({value} AS DECIMAL(30, 6))"
            return f"CASE WHEN {kind_of} IN ('INTEGER', 'DOUBLE') AND {seconds} BETWEEN {MIN_TS} AND {MAX_TS} THEN CAST('1970-01-01' AS DATETIME(6)) + INTERVAL {seconds} SECOND END"
        if kind == "bool":
            return f"CASE WHEN {kind_of} = 'BOOLEAN' THEN {value} = 'true' END"
        if kind == "int":
            in_range = f"CAST({value} AS DECIMAL(65, 0)) BETWEEN -9223372036854775808 AND 9223372036854775807"
            return f"CASE WHEN {kind_of} = 'INTEGER' AND {in_range} THEN CAST({value} AS SIGNED) END"
        return f"CASE WHEN {kind_of} = '{kind.upper()}' THEN {value} END"

    def contact_id(self, doc):
        return f"CASE WHEN JSON_TYPE(JSON_EXTRACT({doc}, '$.contact.id')) = 'STRING' THEN JSON_VALUE({doc}, '$.contact.id') END"


def view_sql(dialect, resource, fields):
    """The SELECT behind coherent_<resource>_history."""
    window = "PARTITION BY m.resource_id ORDER BY m.seq"
    carried_from = {field: f"{field}__seq" for field in fields}
    # Rule 4: a delete older than the stored updated_at still deletes, but its values do not merge.
    older_delete = (
        f"e.action = 'deleted' AND {dialect.number('e.doc', 'updated_at')} < "
        f"MAX({dialect.number('e.doc', 'updated_at')}) OVER (PARTITION BY e.resource_id ORDER BY e.seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"
    )
    versions = (
        f"SELECT e.seq, e.event_id, e.resource_id, e.action, e.received_at, e.payload, "
        f"CASE WHEN {older_delete} THEN 0 ELSE 1 END AS merges "
        f"FROM (SELECT ev.*, {dialect.doc('ev')} AS doc FROM coherent_events ev "
        f"WHERE ev.resource = '{resource}' AND ev.outcome = 'applied') e"
    )
    carried = ", ".join(
        f"MAX(CASE WHEN m.merges = 1 AND {dialect.carried(dialect.doc('m'), field)} THEN m.seq END) OVER ({window} ROWS UNBOUNDED PRECEDING) AS {carried_from[field]}"
        for field in fields
    )
    # Delivery times can cross under concurrency; the running maximum keeps every version's interval forward.
    valid = (
        f"MAX(m.received_at) OVER ({window} ROWS UNBOUNDED PRECEDING) AS valid_from, "
        f"MAX(m.received_at) OVER ({window} ROWS BETWEEN UNBOUNDED PRECEDING AND 1 FOLLOWING) AS valid_until_next, "
        f"LEAD(m.seq) OVER ({window}) AS next_seq"
    )
    columns = [f"{dialect.typed(dialect.doc(f'f_{field}'), field, kind)} AS {field}" for field, kind in fields.items()]
    joins = [f"LEFT JOIN coherent_events f_{field} ON f_{field}.seq = v.{carried_from[field]}" for field in fields]
    if resource == "message":
        columns.append(f"{dialect.contact_id(dialect.doc('f_contact'))} AS contact_id")
    return (
        f"SELECT v.resource_id AS id, {', '.join(columns)}, v.payload AS _payload, v.seq AS _seq, "
        "v.event_id AS _event_id, v.action AS _action, v.valid_from, "
        "CASE WHEN v.next_seq IS NOT NULL THEN v.valid_until_next END AS valid_to, "
        "(v.next_seq IS NULL) AS is_current, "
        "CASE WHEN v.action = 'deleted' THEN v.received_at END AS _deleted_at "
        f"FROM (SELECT m.*, {carried}, {valid} FROM ({versions}) m) v {' '.join(joins)}"
    )


def upgrade() -> None:
    name = op.get_bind().dialect.name
    dialect = Postgres() if name == "postgresql" else SQLite() if name == "sqlite" else MariaDB()
    for resource, (table, fields) in RESOURCES.items():
        op.execute(f"CREATE VIEW coherent_{table}_history AS {view_sql(dialect, resource, fields)}")


def downgrade() -> None:
    for _, (table, _) in reversed(RESOURCES.items()):
        op.execute(f"DROP VIEW coherent_{table}_history")
