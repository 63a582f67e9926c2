"""The statements that differ between databases, each behind one function switching on dialect.

PostgreSQL and SQLite share ``INSERT ... ON CONFLICT``; MySQL and MariaDB have ``ON DUPLICATE KEY``
and statement-level rollback; any other SQLAlchemy dialect gets a portable path built from plain
INSERT, UPDATE and savepoints. ``portable=True`` forces that path, so it is tested on real databases.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import JSON, Connection, Insert, Table, bindparam, insert, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError

from connector.db.plan import LostRace
from connector.db.schema import events, state_tables
from connector.db.types import json_dumps

# Rows per multi-row statement: well under SQLite's 32,766 bound parameters and PostgreSQL's 65,535.
CHUNK_ROWS = 500

# From this many rows on, PostgreSQL gets them by COPY: straight into the table, or through a staging
# table for an upsert. Per-row statements, even pipelined, cost the client more CPU than the database's
# work; one COPY stream does not.
COPY_MIN_ROWS = 16

_MYSQL_DUPLICATE_KEY = 1062

_UNIQUE_VIOLATION = "23505"
# The unique keys a concurrent writer can take first: an event id, or a new row's id. A unique
# violation on anything else (a child row's key, say) is not a race, and retrying would not help.
_RACE_CONSTRAINTS = frozenset([f"uq_{events.name}_event_id", *(f"pk_{table.name}" for table in state_tables.values())])


def lost_race(error: Any) -> bool:
    """Whether the PostgreSQL driver error ``error`` is a concurrent writer's key taken first."""
    if getattr(error, "sqlstate", None) != _UNIQUE_VIOLATION:
        return False
    return getattr(getattr(error, "diag", None), "constraint_name", None) in _RACE_CONSTRAINTS


def _native(conn: Connection, portable: bool) -> str:
    return "portable" if portable else conn.dialect.name


def _chunks(rows: Sequence[dict[str, Any]]) -> list[Sequence[dict[str, Any]]]:
    return [rows[i : i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)]


# Statements are built once per table: building one costs more CPU than executing it.
@functools.cache
def _insert_or_skip(table: Table, dialect: str) -> Insert:
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing().execution_options(preserve_rowcount=True)
    return sqlite.insert(table).on_conflict_do_nothing().returning(next(iter(table.primary_key.columns)))


@functools.cache
def _insert_or_overwrite(table: Table, dialect: str, others: tuple[str, ...]) -> Insert:
    statement = (postgresql if dialect == "postgresql" else sqlite).insert(table)
    key = [column.name for column in table.primary_key.columns]
    return statement.on_conflict_do_update(index_elements=key, set_={name: statement.excluded[name] for name in others})


@functools.cache
def json_columns(table: Table) -> frozenset[str]:
    """The columns of ``table`` holding JSON: a write that bypasses the engine serializes them itself,
    with :func:`connector.db.types.json_dumps`, as the engine would."""
    return frozenset(column.name for column in table.columns if isinstance(column.type, JSON))


def _copy(conn: Connection, target: str, table: Table, names: list[str], rows: Sequence[dict[str, Any]]) -> None:
    """PostgreSQL: COPY ``rows`` (the columns ``names`` of ``table``) into ``target``, numbering them."""
    columns = ", ".join(f'"{name}"' for name in names)
    values_of = operator.itemgetter(*names)
    # The engine's JSON serializer is bypassed here, so serialize as it would.
    documents = [index for index, name in enumerate(names) if name in json_columns(table)]
    numbered = target != table.name
    statement = f"COPY {target} ({columns}{', stage_order' if numbered else ''}) FROM STDIN"
    with driver_errors(conn, statement):
        cursor = conn.connection.driver_connection.cursor()
        with cursor, cursor.copy(statement) as copy:
            for order, row in enumerate(rows):
                values = list(values_of(row)) if len(names) > 1 else [values_of(row)]
                for index in documents:
                    if values[index] is not None:
                        values[index] = json_dumps(values[index])
                if numbered:
                    values.append(order)
                copy.write_row(values)


@contextlib.contextmanager
def driver_errors(conn: Connection, statement: str) -> Iterator[None]:
    """Wrap errors of statements sent around SQLAlchemy (COPY, the libpq pipeline) as SQLAlchemy would.

    The store's retries and its mapping to 503 then treat them like any other statement's, and a
    dropped connection is invalidated so the pool replaces it.
    """
    dbapi = conn.dialect.loaded_dbapi
    try:
        yield
    except dbapi.Error as exc:
        invalidated = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, None)
        if invalidated:
            conn.invalidate()
        raise DBAPIError.instance(
            statement, None, exc, dbapi.Error, connection_invalidated=invalidated, dialect=conn.dialect
        ) from exc


def _copy_through_stage(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], on_conflict: str) -> int:
    """PostgreSQL: COPY ``rows`` into a session-local staging table, then INSERT them in their order.

    The INSERT assigns ``seq`` (where the table has one) in the order of ``rows``. Returns how many
    rows it inserted or updated.
    """
    names = list(rows[0])
    columns = ", ".join(f'"{name}"' for name in names)
    # One staging table per table and column list, kept for the session and emptied at each commit.
    stage = f"coherent_stage_{table.name}_{zlib.crc32(columns.encode()):08x}"
    conn.exec_driver_sql(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "  # noqa: S608 - our own names
        f"SELECT {columns}, 0 AS stage_order FROM {table.name} WITH NO DATA"
    )
    _copy(conn, stage, table, names, rows)
    result = conn.exec_driver_sql(
        f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {stage} ORDER BY stage_order {on_conflict}",  # noqa: S608
        execution_options={"preserve_rowcount": True},
    )
    conn.exec_driver_sql(f"DELETE FROM {stage}")  # noqa: S608
    return result.rowcount


def insert_rows(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], *, portable: bool = False) -> None:
    """Insert ``rows``, none of which may exist yet (a duplicate key raises IntegrityError)."""
    if not rows:
        return
    if _native(conn, portable) == "postgresql" and len(rows) >= COPY_MIN_ROWS:
        _copy(conn, table.name, table, list(rows[0]), rows)
        return
    for chunk in _chunks(rows):
        conn.execute(table.insert(), list(chunk))


def insert_new(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], *, portable: bool = False) -> None:
    """Insert ``rows``, whose keys this transaction found free; raise :class:`LostRace` if a concurrent
    writer has taken one since.

    On PostgreSQL, many rows go by one COPY straight into ``table`` (in their order, so ``seq``
    follows it): a taken key fails the COPY with a unique violation, which aborts the transaction
    and is the lost race. Elsewhere the rows are inserted skipping taken keys, and any shortfall is it.
    """
    if not rows:
        return
    if _native(conn, portable) == "postgresql" and len(rows) >= COPY_MIN_ROWS:
        try:
            insert_rows(conn, table, rows)
        except IntegrityError as exc:
            if lost_race(exc.orig):
                raise LostRace(f"a concurrent writer took a key of {table.name} first") from exc
            raise
        return
    if _insert_ignore(conn, table, rows, portable=portable) != len(rows):
        raise LostRace(f"a concurrent writer took a key of {table.name} first")


def _insert_ignore(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], *, portable: bool = False) -> int:
    """Insert ``rows``, skipping any whose key already exists; return how many were inserted.

    On MySQL and in the portable path a multi-row statement is all or nothing: one existing key
    skips its whole chunk, and the count says so.
    """
    inserted = 0
    dialect = _native(conn, portable)
    for chunk in _chunks(rows):
        if dialect == "postgresql":
            # psycopg's executemany sends the rows in one pipeline, one statement text for all, and
            # its rowcount is the sum over the rows: 1 for each inserted, 0 for each skipped. A
            # multi-row INSERT ... RETURNING would make psycopg parse a query with thousands of
            # placeholders for every batch, which cost more than the database's work.
            inserted += conn.execute(_insert_or_skip(table, dialect), list(chunk)).rowcount
        elif dialect == "sqlite":
            # RETURNING counts what was inserted; rowcount is not reliable for this statement. The
            # rows go as parameters, not inlined with .values(), so the statement is compiled once
            # and cached; SQLAlchemy still sends one multi-row INSERT per batch ("insertmanyvalues").
            inserted += len(conn.execute(_insert_or_skip(table, dialect), list(chunk)).all())
        elif dialect in ("mysql", "mariadb"):
            # Not INSERT IGNORE: that also turns truncation and other data errors into warnings.
            # A duplicate key rolls back only the statement in InnoDB, so the transaction goes on.
            try:
                conn.execute(insert(table).values(list(chunk)))
                inserted += len(chunk)
            except IntegrityError as exc:
                if exc.orig is None or exc.orig.args[0] != _MYSQL_DUPLICATE_KEY:
                    raise
        else:
            try:
                with conn.begin_nested():
                    conn.execute(insert(table), list(chunk))
                inserted += len(chunk)
            except IntegrityError:
                pass
    return inserted


def upsert(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], *, portable: bool = False) -> None:
    """Insert ``rows`` or, where the primary key exists, overwrite every other column."""
    if not rows:
        return
    key = [column.name for column in table.primary_key.columns]
    others = [name for name in rows[0] if name not in key]
    dialect = _native(conn, portable)
    if dialect == "postgresql" and len(rows) >= COPY_MIN_ROWS:
        assignments = ", ".join(f'"{name}" = EXCLUDED."{name}"' for name in others)
        target = ", ".join(f'"{name}"' for name in key)
        _copy_through_stage(conn, table, rows, f"ON CONFLICT ({target}) DO UPDATE SET {assignments}")
        return
    for chunk in _chunks(rows):
        if dialect in ("postgresql", "sqlite"):
            conn.execute(_insert_or_overwrite(table, dialect, tuple(others)), list(chunk))
        elif dialect in ("mysql", "mariadb"):
            statement = mysql.insert(table).values(list(chunk))
            conn.execute(statement.on_duplicate_key_update({name: statement.inserted[name] for name in others}))
        else:
            statement = (
                update(table)
                .where(*(table.c[name] == bindparam(f"k_{name}") for name in key))
                .values({name: bindparam(f"v_{name}") for name in others})
            )
            params = [{**{f"k_{n}": row[n] for n in key}, **{f"v_{n}": row[n] for n in others}} for row in chunk]
            conn.execute(statement, params)
            # Rows the UPDATE found nothing for are new; executemany gives no per-row count, so
            # insert whatever is still missing.
            missing = [row for row in chunk if not _exists(conn, table, key, row)]
            if missing:
                conn.execute(insert(table), missing)


def _exists(conn: Connection, table: Table, key: list[str], row: dict[str, Any]) -> bool:
    clause = [table.c[name] == row[name] for name in key]
    return conn.execute(table.select().with_only_columns(table.c[key[0]]).where(*clause)).first() is not None
