"""Rebuilding every current-state and child table from the change log, in one transaction.

The log is replayed in ``seq`` order through the same code the receiver uses
(:func:`connector.db.store.apply_events`), a batch at a time, so memory stays bounded however long
the log is. Everything happens in one transaction that first empties the tables and then refills
them, so the swap is atomic on every database: readers keep seeing the old rows (PostgreSQL's and
InnoDB's MVCC, SQLite's WAL snapshot) until the commit shows them the new ones all at once.

Writers are shut out for the duration instead, so no event can slip between the replay and the
commit: on PostgreSQL an EXCLUSIVE lock on the tables (plain SELECTs still pass), on MariaDB/MySQL
the next-key locks that a REPEATABLE READ ``DELETE`` takes on every row and gap, on SQLite the
``BEGIN IMMEDIATE`` write lock. A receiver's transaction waits for that lock; past its lock timeout
it answers 503 and the sender retries later, so nothing is lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import Connection, Engine, Table, delete, func, select, text
from sqlalchemy.exc import DBAPIError
from tqdm import tqdm

from connector.db.schema import child_tables, events, state_tables
from connector.db.store import apply_events
from connector.errors import DatabaseUnavailable
from connector.events import Event

# Log rows per batch. Larger batches pay each batch's fixed cost less often: a 1M-event rebuild took
# 115 s at 10,000 against 177 s at 2,000, with memory flat at 123 MiB (docs/performance.md).
DEFAULT_BATCH_SIZE = 10_000

# How long the rebuild itself waits for in-flight webhook transactions to finish before it gives up.
_LOCK_WAIT_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class RebuildReport:
    """What a rebuild did: events replayed, and how many got another outcome than the log records."""

    events: int
    outcome_changes: int


def _tables_in_lock_order() -> list[Table]:
    # The receiver locks state rows in resource-name order and then writes their child rows, so
    # taking the tables in that same order cannot deadlock against it.
    tables: list[Table] = []
    for resource in sorted(state_tables):
        tables.append(state_tables[resource])
        if resource in child_tables:
            tables.append(child_tables[resource][0])
    return tables


def _shut_out_writers(conn: Connection) -> None:
    dialect = conn.dialect.name
    tables = _tables_in_lock_order()
    if dialect == "postgresql":
        conn.execute(text(f"SET LOCAL lock_timeout = '{_LOCK_WAIT_SECONDS}s'"))
        names = ", ".join(conn.dialect.identifier_preparer.format_table(table) for table in tables)
        conn.execute(text(f"LOCK TABLE {names} IN EXCLUSIVE MODE"))
    # Emptying the tables inside the transaction is what locks them on MariaDB (every row and gap,
    # under REPEATABLE READ); on SQLite the transaction already holds the only write lock. Not
    # TRUNCATE: PostgreSQL's would block readers too, and MariaDB's commits at once.
    for table in tables:
        conn.execute(delete(table))


def _log_batches(conn: Connection, batch_size: int) -> Iterator[list[tuple[Event, datetime, str]]]:
    """The change log in ``seq`` order, ``batch_size`` rows at a time, by keyset so each query is cheap."""
    last_seq = None
    while True:
        query = select(events).order_by(events.c.seq).limit(batch_size)
        if last_seq is not None:
            query = query.where(events.c.seq > last_seq)
        rows = conn.execute(query).mappings().all()
        if not rows:
            return
        last_seq = rows[-1]["seq"]
        yield [
            (
                Event(row["event_id"], row["type"], row["resource"], row["action"], row["resource_id"], row["payload"]),
                row["received_at"],
                row["outcome"],
            )
            for row in rows
        ]


def rebuild(engine: Engine, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> RebuildReport:
    """Recompute every state and child table from the change log and swap the result in atomically."""
    try:
        return _rebuild(engine, batch_size, progress)
    except DBAPIError as exc:
        raise DatabaseUnavailable(
            f"the rebuild rolled back, nothing changed: {type(exc.orig or exc).__name__}"
        ) from exc


def _rebuild(engine: Engine, batch_size: int, progress: bool) -> RebuildReport:
    with engine.connect() as conn:
        if conn.dialect.name in ("mysql", "mariadb"):
            # One snapshot for the whole replay, and locks on gaps so that no new row appears.
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            previous_wait = conn.scalar(text("SELECT @@SESSION.innodb_lock_wait_timeout"))
            conn.execute(text(f"SET SESSION innodb_lock_wait_timeout = {_LOCK_WAIT_SECONDS}"))
            conn.commit()
            try:
                return _replay(conn, batch_size, progress)
            finally:
                # The connection goes back to the pool; later users keep the configured lock wait.
                conn.execute(text(f"SET SESSION innodb_lock_wait_timeout = {int(previous_wait)}"))
                conn.commit()
        return _replay(conn, batch_size, progress)


def _replay(conn: Connection, batch_size: int, progress: bool) -> RebuildReport:
    """Empty the tables and replay the log into them, all in one transaction."""
    replayed = changes = 0
    with conn.begin():
        _shut_out_writers(conn)
        total = conn.scalar(select(func.count()).select_from(events))
        analyzed_at = batch_size
        with tqdm(total=total, unit="event", desc="rebuild", disable=not progress) as bar:
            for batch in _log_batches(conn, batch_size):
                if conn.dialect.name == "postgresql" and replayed >= 2 * analyzed_at:
                    # The tables are emptied and refilled in this one transaction, so their statistics
                    # go stale and the planner soon scans a whole growing table for every batch's
                    # `id IN (...)` lookup: the rebuild went quadratic. ANALYZE sees this transaction's
                    # own rows; redone each time the log read doubles, it costs O(log n) runs.
                    conn.execute(text(f"ANALYZE {', '.join(table.name for table in _tables_in_lock_order())}"))
                    analyzed_at = replayed
                outcomes = apply_events(conn, [(event, received_at) for event, received_at, _ in batch])
                changes += sum(outcome.value != logged for (_, _, logged), outcome in zip(batch, outcomes, strict=True))
                replayed += len(batch)
                bar.update(len(batch))
    return RebuildReport(replayed, changes)
