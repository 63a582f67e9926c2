"""The store: records events in the change log and applies them to current-state tables.

Every event is recorded and applied in one transaction, so a change-log row exists exactly when
its state change does. Concurrent writers of the same resource id serialise on that row's lock,
taken before the change-log row is inserted, so ``seq`` order per resource is the order in which
events were applied.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from alembic.migration import MigrationContext
from sqlalchemy import ColumnElement, Connection, Delete, Engine, Select, any_, bindparam, delete, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from connector.db import dialects, pipeline
from connector.db.plan import (
    LostRace,
    StateWrites,
    fold,
    fresh_deliveries,
    ids_to_lock,
    log_row,
    outcomes_in_order,
    state_writes,
)
from connector.db.schema import child_tables, events, state_tables
from connector.errors import DatabaseUnavailable, WriteRefused
from connector.events import Event, Outcome, RowState
from connector.metrics import DATABASE_ERRORS, DATABASE_RETRIES

log = logging.getLogger(__name__)

T = TypeVar("T")

# Ids per ``IN (...)`` list when loading and locking rows.
_ID_CHUNK = 500

# Errors that a fresh attempt can get past: deadlocks, serialization failures, lock and busy
# timeouts, and connections dropped by a restarting server.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57014", "57P01", "08000", "08003", "08006"}
_TRANSIENT_MYSQL_CODES = {1205, 1213, 2006, 2013}

# Of those, the ones that mean a whole lock or busy timeout was waited out: the lock is held by a
# long transaction, so another attempt would likely wait that long again.
_LOCK_WAIT_SQLSTATES = {"55P03", "57014"}
_LOCK_WAIT_MYSQL_CODES = {1205}

# MySQL and MariaDB refusals that PyMySQL reports as OperationalError: a failed CHECK constraint.
_REFUSED_MYSQL_CODES = {3819, 4025}

# The longest back-off between two attempts.
_MAX_PAUSE = 0.2


def _matches(exc: DBAPIError, sqlstates: set[str], mysql_codes: set[int], messages: tuple[str, ...]) -> bool:
    """Whether the driver error under ``exc`` has one of these PostgreSQL states, MySQL codes or texts."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in sqlstates:
        return True
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in mysql_codes:
        return True
    message = str(orig).lower()
    return any(text in message for text in messages)


def is_transient(exc: DBAPIError) -> bool:
    """Whether ``exc`` is worth retrying in a new transaction."""
    return exc.connection_invalidated or _matches(
        exc, _TRANSIENT_SQLSTATES, _TRANSIENT_MYSQL_CODES, ("database is locked", "database is busy")
    )


def waited_out_a_lock(exc: DBAPIError) -> bool:
    """Whether ``exc`` ended a whole lock wait (as opposed to a deadlock or a dropped connection)."""
    return _matches(exc, _LOCK_WAIT_SQLSTATES, _LOCK_WAIT_MYSQL_CODES, ("database is locked",))


def _unavailable(exc: DBAPIError) -> DatabaseUnavailable:
    """The 503 for ``exc``, of the kind that tells group commit whether to try each event alone."""
    if isinstance(exc, (IntegrityError, DataError)) or _matches(exc, set(), _REFUSED_MYSQL_CODES, ()):
        return WriteRefused(_describe(exc))
    return DatabaseUnavailable(_describe(exc))


def _describe(exc: DBAPIError) -> str:
    """A short, safe description of a database error: its kind, never its SQL or parameters."""
    if exc.connection_invalidated or "connect" in str(exc.orig).lower():
        return "cannot connect to the database"
    if is_transient(exc):
        return "the database is busy or locked"
    return f"the database refused the write ({type(exc.orig or exc).__name__})"


# The hot path's statements are built once per dialect: building them for every event cost more CPU
# than executing them. PostgreSQL takes an id list as one array parameter (``= ANY``); elsewhere it is
# an expanding ``IN (...)``, which SQLAlchemy renders, and the driver parses, for every list length.
def _ids(column: ColumnElement[Any], dialect: str) -> ColumnElement[bool]:
    if dialect == "postgresql":
        return column == any_(bindparam("ids", type_=postgresql.ARRAY(column.type)))
    return column.in_(bindparam("ids", expanding=True))


@functools.cache
def _seen_query(dialect: str) -> Select:
    return select(events.c.event_id).where(_ids(events.c.event_id, dialect))


@functools.cache
def _lock_query(resource: str, dialect: str) -> Select:
    table = state_tables[resource]
    return (
        select(table.c.id, table.c._raw, table.c._last_action, table.c._event_id, table.c._deleted_at)
        .where(_ids(table.c.id, dialect))
        .order_by(table.c.id)
        .with_for_update()
    )


@functools.cache
def _delete_children(resource: str, dialect: str) -> Delete:
    child, parent_key = child_tables[resource]
    return delete(child).where(_ids(child.c[parent_key], dialect))


def _in_chunks(ids: Sequence[str], dialect: str) -> Iterator[Sequence[str]]:
    """``ids`` in slices short enough for one ``IN (...)`` list; PostgreSQL takes them all as one array."""
    size = max(1, len(ids)) if dialect == "postgresql" else _ID_CHUNK
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _load_states(conn: Connection, resource: str, ids: Sequence[str]) -> dict[str, RowState]:
    """Lock and read the rows for ``ids`` (sorted and distinct, as :func:`ids_to_lock` gives them), in
    that order, so that concurrent writers lock alike."""
    states: dict[str, RowState] = {}
    for chunk in _in_chunks(ids, conn.dialect.name):
        for row in conn.execute(_lock_query(resource, conn.dialect.name), {"ids": chunk}).mappings():
            states[row["id"]] = RowState(row["_raw"], row["_last_action"], row["_event_id"], row["_deleted_at"])
    return states


def _write_states(conn: Connection, resource: str, writes: StateWrites, portable: bool) -> None:
    table = state_tables[resource]
    dialects.insert_new(conn, table, writes.new, portable=portable)
    # These rows are locked by this transaction, so overwriting them is safe.
    dialects.upsert(conn, table, writes.existing, portable=portable)
    if resource in child_tables:
        for chunk in _in_chunks(writes.clear_children_of, conn.dialect.name):
            conn.execute(_delete_children(resource, conn.dialect.name), {"ids": chunk})
        dialects.insert_rows(conn, child_tables[resource][0], writes.children, portable=portable)


def apply_events(
    conn: Connection, deliveries: Sequence[tuple[Event, datetime]], *, portable: bool = False
) -> list[Outcome]:
    """Apply ``deliveries`` to the state and child tables in order, inside the caller's transaction.

    Returns one outcome per delivery. The change log is not touched: :func:`record_events` writes it,
    and ``connector rebuild`` replays it through here.
    """
    states = {resource: _load_states(conn, resource, ids) for resource, ids in ids_to_lock(deliveries).items()}
    existing = {resource: set(loaded) for resource, loaded in states.items()}
    outcomes, changed = fold(deliveries, states)
    synced_at = datetime.now(UTC)
    for resource, rows in changed.items():
        if rows:
            _write_states(conn, resource, state_writes(resource, rows, existing[resource], synced_at), portable)
    return outcomes


def record_events(
    conn: Connection, deliveries: Sequence[tuple[Event, datetime]], *, portable: bool = False
) -> list[Outcome]:
    """Record and apply ``deliveries`` (event, received_at) in order, inside the caller's transaction.

    Returns one outcome per delivery. An event id already in the log, or earlier in the same batch,
    is a ``duplicate`` and writes nothing.
    """
    seen: set[str] = set()
    for chunk in _in_chunks([event.event_id for event, _ in deliveries], conn.dialect.name):
        seen.update(conn.scalars(_seen_query(conn.dialect.name), {"ids": chunk}))
    fresh = fresh_deliveries(deliveries, seen)
    outcomes = apply_events(conn, fresh, portable=portable)
    log_rows = [
        log_row(event, received_at, outcome) for (event, received_at), outcome in zip(fresh, outcomes, strict=True)
    ]
    dialects.insert_new(conn, events, log_rows, portable=portable)
    return outcomes_in_order(deliveries, fresh, outcomes)


class EventStore:
    """Records events durably: each call commits before it returns, or raises DatabaseUnavailable."""

    def __init__(
        self,
        engine: Engine,
        *,
        retry_attempts: int = 5,
        retry_budget_seconds: float = 2.8,
        lock_timeout_seconds: float = 2.0,
        portable: bool = False,
    ) -> None:
        self.engine = engine
        self.retry_attempts = retry_attempts
        self.retry_budget_seconds = retry_budget_seconds
        self.lock_timeout_seconds = lock_timeout_seconds
        self.portable = portable
        self.retries = 0  # read by metrics

    def record(self, event: Event, received_at: datetime | None = None) -> Outcome:
        """Record and apply one event; return its outcome once the transaction has committed."""
        return self.record_many([(event, received_at or datetime.now(UTC))])[0]

    def record_many(
        self, deliveries: Sequence[tuple[Event, datetime]], *, deadline: float | None = None
    ) -> list[Outcome]:
        """Record and apply a batch of (event, received_at) in one transaction, in order.

        ``deadline`` (a ``time.monotonic()`` value) ends the retries instead of the retry budget.
        """

        def work(conn: Connection) -> list[Outcome]:
            if not self.portable and len(deliveries) < dialects.COPY_MIN_ROWS and pipeline.usable(conn):
                # A few events, as the webhook receiver sends: two round trips, not one per statement.
                # This path COMMITs the transaction itself (its COMMIT is pipelined with the writes).
                return pipeline.record_events(conn, deliveries)
            return record_events(conn, deliveries, portable=self.portable)

        return self.run_in_transaction(work, deadline=deadline)

    def run_in_transaction(self, work: Callable[[Connection], T], *, deadline: float | None = None) -> T:
        """Run ``work`` in a transaction, retrying lost races and transient database errors.

        A deadlock, serialization failure or busy database is normal under concurrent writers and is
        retried here with jittered back-off, within a time budget kept under the sender's patience.
        Once that budget or the attempts run out, the error becomes :class:`DatabaseUnavailable`
        (HTTP 503): the transaction rolled back, so nothing was half applied, and the sender retries.

        After a lock wait timed out, a retry starts only if it could wait out a whole lock timeout
        again and still end within the budget. Without that rule, a lock held elsewhere cost one lock
        timeout per attempt (2 s, then 4 s, ...), and a request on a locked row could run into
        gunicorn's worker timeout instead of getting its 503. A deadlock, serialization failure or
        dropped connection is different: the other party has moved on, so a retry is likely to
        succeed at once and is tried whenever any of the budget is left.
        """
        if deadline is None:
            deadline = time.monotonic() + self.retry_budget_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except LostRace:
                if attempt >= self.retry_attempts * 4 or time.monotonic() + _MAX_PAUSE > deadline:
                    raise DatabaseUnavailable("kept losing races to concurrent writers") from None
            except DBAPIError as exc:
                DATABASE_ERRORS.labels(type(exc.orig or exc).__name__).inc()
                if not is_transient(exc) or attempt >= self.retry_attempts or not self._retry_fits(exc, deadline):
                    log.warning("database unavailable: %s: %s", _describe(exc), type(exc.orig or exc).__name__)
                    raise _unavailable(exc) from exc
            self.retries += 1
            DATABASE_RETRIES.inc()
            time.sleep(min(_MAX_PAUSE, 0.01 * 2**attempt) * random.random())

    def _retry_fits(self, exc: DBAPIError, deadline: float) -> bool:
        wait = self.lock_timeout_seconds if waited_out_a_lock(exc) else 0.0
        return time.monotonic() + _MAX_PAUSE + wait <= deadline

    def current_revision(self) -> tuple[str, ...]:
        """The Alembic revisions the database is at (empty when it was never migrated)."""
        try:
            with self.engine.connect() as conn:
                return tuple(MigrationContext.configure(conn).get_current_heads())
        except DBAPIError as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc
