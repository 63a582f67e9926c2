"""PostgreSQL's fast path for small batches: a whole transaction in two round trips and two sends.

The webhook receiver records a few events per transaction (one, or a group; see
``connector.group_commit``). Through SQLAlchemy that takes a round trip per statement, and the
client's CPU per statement outweighs the database's work. Here the same plan (``connector.db.plan``)
goes through libpq's pipeline mode on the connection SQLAlchemy holds:

1. ``BEGIN``, the transaction's plan settings (``_PLAN_ONCE``), and one statement that reads the
   seen event ids and locks every touched row (``SELECT ... FOR UPDATE``, in id order);
2. the ordering rules, in Python, exactly as on every other path;
3. every write, and ``COMMIT``.

Steps 1 and 3 each leave in one ``send()`` and are answered after one wait. psycopg's own pipeline
sends every statement, and every row of an ``executemany``, the moment it is queued, and a
transaction's ``BEGIN`` in a round trip of its own: a group of two events took 15 sends and three
waits, and each send woke the database's backend again. The statements are prepared once per
connection (named ``coherent_*``; psycopg prepares none of its own here) and planned once, and every
parameter goes as text in the form PostgreSQL reads for its column's type.

A row or event id that a concurrent writer created first makes a plain INSERT fail with a unique
violation; that aborts the rest of the pipeline, ``COMMIT`` included, so nothing is half written,
and the store runs the transaction again (:class:`~connector.db.plan.LostRace`). Any other error
is raised as psycopg raises it and wrapped as SQLAlchemy would wrap it, so retries and 503s work as
on every other path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import select
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import pq
from psycopg.errors import DuplicatePreparedStatement, InvalidSqlStatementName, error_from_result
from sqlalchemy import Boolean, Connection, Integer, Table

from connector.db.dialects import driver_errors, json_columns, lost_race
from connector.db.plan import (
    LostRace,
    fold,
    fresh_deliveries,
    ids_to_lock,
    log_row,
    outcomes_in_order,
    state_writes,
)
from connector.db.schema import child_tables, events, state_tables
from connector.db.types import UTCDateTime, json_dumps
from connector.events import Event, Outcome, RowState

Encode = Callable[[Any], bytes]


# --- Parameters as text -------------------------------------------------------------------------


def _text(value: str) -> bytes:
    if "\x00" in value:  # libpq reads a text parameter up to its first NUL
        raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    return value.encode()


def _timestamp(value: datetime) -> bytes:
    return value.astimezone(UTC).isoformat().encode()


def _boolean(value: bool) -> bytes:
    return b"t" if value else b"f"


def _integer(value: int) -> bytes:
    return b"%d" % value


def _document(value: Any) -> bytes:
    return json_dumps(value).encode()  # ASCII-only: a NUL character stays the escape \u0000


def _text_array(values: Iterable[str]) -> bytes:
    """A ``text[]`` literal: every element quoted, backslashes and quotes escaped."""
    quoted = ('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values)
    return _text("{" + ",".join(quoted) + "}")


def _encoder(table: Table, name: str) -> Encode:
    if name in json_columns(table):
        return _document
    column_type = table.c[name].type
    if isinstance(column_type, UTCDateTime):
        return _timestamp
    if isinstance(column_type, Boolean):
        return _boolean
    if isinstance(column_type, Integer):
        return _integer
    return _text


# --- Statements ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Statement:
    """A statement this path prepares once per connection, and how to send each of its parameters."""

    sql: str
    encoders: tuple[Encode, ...]

    @functools.cached_property
    def name(self) -> bytes:
        return b"coherent_" + hashlib.sha256(self.sql.encode()).hexdigest()[:24].encode()

    def values(self, params: Sequence[Any]) -> list[bytes | None]:
        return [None if value is None else encode(value) for encode, value in zip(self.encoders, params, strict=True)]


# The resources in the order the read statement takes (and locks) them.
_RESOURCES = sorted(state_tables)


# One statement reads what a batch needs: the event ids already in the log, and every row it touches,
# locked, one resource after another in a fixed order and in id order within each (so that concurrent
# writers lock alike). A resource the batch does not touch gets an empty list, so the statement is
# always the same one.
def _read_statement() -> Statement:
    # The deletion time goes as ISO 8601 in UTC, whatever the session's DateStyle and time zone.
    deleted_at = "to_char(_deleted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"
    ctes = [
        f"locked_{resource} AS (SELECT id, _raw, _last_action, _event_id, {deleted_at} "
        f"FROM {state_tables[resource].name} WHERE id = ANY(${position}::text[]) ORDER BY id FOR UPDATE)"
        for position, resource in enumerate(_RESOURCES, start=2)
    ]
    seen = f"SELECT '', event_id, NULL::json, NULL, NULL, NULL FROM {events.name} WHERE event_id = ANY($1::text[])"
    rows = [f"SELECT '{resource}', * FROM locked_{resource}" for resource in _RESOURCES]
    sql = f"WITH {', '.join(ctes)} {' UNION ALL '.join([seen, *rows])}"
    return Statement(sql, (_text_array,) * (1 + len(_RESOURCES)))


_READ = _read_statement()

# Every statement here finds its rows by key, and planning them at every execution was 40% of the
# database's CPU per webhook. So within this path's transactions (LOCAL: the session, and with it
# every other path, keeps planning for the parameters at every execution, see connector.db.engine),
# each statement keeps one generic plan per connection, made at its first execution and again
# whenever PostgreSQL invalidates it, for instance after autovacuum analyzed a table. A plan made
# while a table is empty or small would be a sequential scan, and stay one as the table grows:
# without sequential scans, the plan uses the index at every size.
_PLAN_ONCE = Statement(
    "SELECT set_config('plan_cache_mode', 'force_generic_plan', true), set_config('enable_seqscan', 'off', true)", ()
)


@functools.cache
def _delete_children(resource: str) -> Statement:
    child, parent_key = child_tables[resource]
    return Statement(f"DELETE FROM {child.name} WHERE {parent_key} = ANY($1::text[])", (_text_array,))


@functools.cache
def _insert(table: Table, names: tuple[str, ...], overwrite: bool) -> Statement:
    columns = ", ".join(f'"{name}"' for name in names)
    values = ", ".join(f"${position}" for position in range(1, len(names) + 1))
    sql = f"INSERT INTO {table.name} ({columns}) VALUES ({values})"
    if overwrite:
        key = [column.name for column in table.primary_key.columns]
        assignments = ", ".join(f'"{name}" = EXCLUDED."{name}"' for name in names if name not in key)
        sql += f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {assignments}"
    return Statement(sql, tuple(_encoder(table, name) for name in names))


# --- libpq's pipeline ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Session:
    """What this module knows of one connection's server session."""

    prepared: set[bytes] = dataclasses.field(default_factory=set)  # the statements prepared on it
    # Set when the server turned out to hold other statements than ``prepared`` (something ran
    # DEALLOCATE, or a pooler switched sessions): the next pipeline starts with DEALLOCATE ALL.
    stale: bool = False


# Forgotten with the connection.
_SESSIONS: weakref.WeakKeyDictionary[psycopg.Connection[Any], _Session] = weakref.WeakKeyDictionary()

_SYNC, _ABORTED = pq.ExecStatus.PIPELINE_SYNC, pq.ExecStatus.PIPELINE_ABORTED
_SUCCEEDED = frozenset([pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK])


class _Pipeline:
    """Statements queued in libpq's output buffer, sent together and answered at each :meth:`sync`."""

    def __init__(self, driver: psycopg.Connection[Any]) -> None:
        self.pgconn = driver.pgconn
        self.session = _SESSIONS.setdefault(driver, _Session())
        self.queued: list[bytes | None] = []  # per answer to come: the statement it prepares, if it is a Parse

    def command(self, sql: bytes) -> None:
        self.pgconn.send_query_params(sql, None)
        self.queued.append(None)

    def execute(self, statement: Statement, params: Sequence[Any]) -> None:
        values = statement.values(params)
        if statement.name not in self.session.prepared:
            self.pgconn.send_prepare(statement.name, statement.sql.encode())
            self.session.prepared.add(statement.name)
            self.queued.append(statement.name)
        self.pgconn.send_query_prepared(statement.name, values)
        self.queued.append(None)

    def reset_if_stale(self) -> None:
        """Drop every prepared statement of a session whose statements are not the ones recorded."""
        if self.session.stale:
            self.command(b"DEALLOCATE ALL")
            self.sync()
            self.session.prepared.clear()
            self.session.stale = False

    def sync(self) -> list[pq.abc.PGresult]:
        """Send everything queued and wait for the answers: each execution's result, or the first error."""
        queued, self.queued = self.queued, []
        self.pgconn.pipeline_sync()
        self._flush()
        answers = []
        while (answer := self._next()) is None or answer.status != _SYNC:
            if answer is not None:
                answers.append(answer)
        if len(answers) != len(queued):
            self.session.stale = True
            raise psycopg.InternalError(f"expected {len(queued)} answers from the pipeline, got {len(answers)}")
        error = None
        results = []
        for prepares, answer in zip(queued, answers, strict=True):
            if answer.status not in _SUCCEEDED:
                if prepares is not None:
                    self.session.prepared.discard(prepares)
                if answer.status != _ABORTED and error is None:  # aborted: by the error before it
                    error = error_from_result(answer, encoding="utf-8")  # usable() admits no other
            if prepares is None:
                results.append(answer)
        if isinstance(error, InvalidSqlStatementName | DuplicatePreparedStatement):
            self.session.stale = True
        if error is not None:
            raise error
        return results

    def _flush(self) -> None:
        # Non-blocking, as psycopg keeps every connection: send the rest as the socket takes it,
        # reading meanwhile so that the server is never stuck writing answers nobody reads.
        while self.pgconn.flush():
            if self._wait(select.POLLIN | select.POLLOUT) & select.POLLIN:
                self.pgconn.consume_input()

    def _next(self) -> pq.abc.PGresult | None:
        while self.pgconn.is_busy():
            self._wait(select.POLLIN)
            self.pgconn.consume_input()
        return self.pgconn.get_result()

    def _wait(self, events: int) -> int:
        poller = select.poll()
        poller.register(self.pgconn.socket, events)
        return poller.poll()[0][1]

    def close(self) -> None:
        """Leave pipeline mode with nothing in flight; a connection that cannot is closed."""
        try:
            if self.queued:  # an error between queueing and syncing: run them, for the rollback to undo
                with contextlib.suppress(psycopg.DatabaseError):
                    self.sync()
            self.pgconn.exit_pipeline_mode()
        except psycopg.Error:
            self.pgconn.finish()  # the pool then discards it


@contextlib.contextmanager
def _pipeline(driver: psycopg.Connection[Any]) -> Iterator[_Pipeline]:
    with driver.lock:
        pipeline = _Pipeline(driver)
        driver.pgconn.enter_pipeline_mode()
        try:
            pipeline.reset_if_stale()
            yield pipeline
        finally:
            pipeline.close()


def _begin(driver: psycopg.Connection[Any]) -> bytes:
    """The BEGIN psycopg would send: with the connection's isolation level, read-only and deferrable settings."""
    parts = ["BEGIN"]
    if driver.isolation_level is not None:
        parts.append(f"ISOLATION LEVEL {driver.isolation_level.name.replace('_', ' ')}")
    if driver.read_only is not None:
        parts.append("READ ONLY" if driver.read_only else "READ WRITE")
    if driver.deferrable is not None:
        parts.append("DEFERRABLE" if driver.deferrable else "NOT DEFERRABLE")
    return " ".join(parts).encode()


# --- The transaction ------------------------------------------------------------------------------


def usable(conn: Connection) -> bool:
    """Whether ``conn`` is a PostgreSQL connection through psycopg 3, which has pipeline mode, that
    speaks UTF-8 (this path encodes and decodes text itself)."""
    return (
        conn.dialect.name == "postgresql"
        and conn.dialect.driver == "psycopg"
        and conn.connection.driver_connection.info.encoding == "utf-8"
    )


def _read(result: pq.abc.PGresult, resources: Iterable[str]) -> tuple[set[str], dict[str, dict[str, RowState]]]:
    """The seen event ids and the locked rows, by resource, from the read statement's text rows."""
    seen: set[str] = set()
    states: dict[str, dict[str, RowState]] = {resource: {} for resource in resources}
    value = result.get_value
    for row in range(result.ntuples):
        resource, rid = value(row, 0), value(row, 1).decode()
        if not resource:
            seen.add(rid)
            continue
        deleted_at = value(row, 5)
        states[resource.decode()][rid] = RowState(
            json.loads(value(row, 2)),
            value(row, 3).decode(),
            value(row, 4).decode(),
            deleted_at and datetime.fromisoformat(deleted_at.decode()).replace(tzinfo=UTC),
        )
    return seen, states


def _queue(pipeline: _Pipeline, table: Table, rows: Sequence[dict[str, Any]], *, overwrite: bool = False) -> None:
    """Queue ``rows`` for ``table``: a plain INSERT each, or with ``overwrite`` an upsert on the key."""
    if not rows:
        return
    names = tuple(rows[0])
    statement = _insert(table, names, overwrite)
    for row in rows:
        pipeline.execute(statement, [row[name] for name in names])


def record_events(conn: Connection, deliveries: Sequence[tuple[Event, datetime]]) -> list[Outcome]:
    """Record and apply ``deliveries`` in order, then COMMIT the caller's transaction.

    The same outcomes, rows and errors as :func:`connector.db.store.record_events`, which instead
    leaves the transaction to its caller.
    """
    driver = conn.connection.driver_connection
    locks = ids_to_lock(deliveries)
    read = [[event.event_id for event, _ in deliveries], *(locks.get(resource, ()) for resource in _RESOURCES)]
    try:
        with driver_errors(conn, "pipelined transaction"), _pipeline(driver) as pipeline:
            if driver.pgconn.transaction_status == pq.TransactionStatus.IDLE:
                pipeline.command(_begin(driver))
            pipeline.execute(_PLAN_ONCE, ())
            pipeline.execute(_READ, read)
            seen, states = _read(pipeline.sync()[-1], locks)

            fresh = fresh_deliveries(deliveries, seen)
            existing = {resource: set(rows) for resource, rows in states.items()}
            outcomes, changed = fold(fresh, states)
            synced_at = datetime.now(UTC)
            for resource, rows in changed.items():
                if rows:
                    writes = state_writes(resource, rows, existing[resource], synced_at)
                    _queue(pipeline, state_tables[resource], writes.new)
                    _queue(pipeline, state_tables[resource], writes.existing, overwrite=True)
                    if writes.clear_children_of:
                        pipeline.execute(_delete_children(resource), [writes.clear_children_of])
                    if resource in child_tables:
                        _queue(pipeline, child_tables[resource][0], writes.children)
            log_rows = [log_row(event, at, outcome) for (event, at), outcome in zip(fresh, outcomes, strict=True)]
            _queue(pipeline, events, log_rows)
            pipeline.command(b"COMMIT")
            pipeline.sync()
    except Exception as exc:
        if lost_race(getattr(exc, "orig", None)):
            raise LostRace("a concurrent writer created the same row or event id first") from exc
        if isinstance(getattr(exc, "orig", None), InvalidSqlStatementName | DuplicatePreparedStatement):
            raise LostRace("the session's prepared statements were not the ones recorded: prepare them again") from exc
        raise
    return outcomes_in_order(deliveries, fresh, outcomes)
