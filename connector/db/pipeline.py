"""PostgreSQL's fast path for small batches: a whole transaction in two round trips.

The webhook receiver records a few events per transaction (one, or a group; see
``connector.group_commit``). Through SQLAlchemy that takes a round trip per statement, and the
client's CPU per statement outweighs the database's work. Here the same plan (``connector.db.plan``)
goes through psycopg's pipeline mode on the connection SQLAlchemy holds:

1. one statement: the seen-id check and the row locks (``SELECT ... FOR UPDATE``, in id order);
2. the ordering rules, in Python, exactly as on every other path;
3. every write, and ``COMMIT``, pipelined, then one sync.

A row or event id that a concurrent writer created first makes a plain INSERT fail with a unique
violation; that aborts the rest of the pipeline, ``COMMIT`` included, so nothing is half written,
and the store runs the transaction again (:class:`~connector.db.plan.LostRace`). Any other error
is wrapped as SQLAlchemy would wrap it, so retries and 503s work as on every other path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table

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
from connector.db.types import json_dumps
from connector.events import Event, Outcome, RowState


# One statement reads what a batch needs: the event ids already in the log, and every row it touches,
# locked, one resource after another in a fixed order and in id order within each (so that concurrent
# writers lock alike). A resource the batch does not touch gets an empty list, so the statement is
# always the same one and psycopg prepares it once.
def _read_statement() -> str:
    locked = {resource: f"locked_{resource}" for resource in sorted(state_tables)}
    ctes = [
        f"{cte} AS (SELECT id, _raw, _last_action, _event_id, _deleted_at FROM {state_tables[resource].name} "
        f"WHERE id = ANY(%({resource})s) ORDER BY id FOR UPDATE)"
        for resource, cte in locked.items()
    ]
    seen = (
        f"SELECT '', event_id, NULL::json, NULL, NULL, NULL::timestamptz FROM {events.name} "
        "WHERE event_id = ANY(%(seen)s)"
    )
    rows = [f"SELECT '{resource}', * FROM {cte}" for resource, cte in locked.items()]
    return f"WITH {', '.join(ctes)} {' UNION ALL '.join([seen, *rows])}"


_READ = _read_statement()


def usable(conn: Connection) -> bool:
    """Whether ``conn`` is a PostgreSQL connection through psycopg 3, which has pipeline mode."""
    return conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg"


@functools.cache
def _delete_children(resource: str) -> str:
    child, parent_key = child_tables[resource]
    return f"DELETE FROM {child.name} WHERE {parent_key} = ANY(%(ids)s)"


@functools.cache
def _insert(table: Table, names: tuple[str, ...], overwrite: bool) -> str:
    columns = ", ".join(f'"{name}"' for name in names)
    values = ", ".join(f"%({name})s" for name in names)
    statement = f"INSERT INTO {table.name} ({columns}) VALUES ({values})"
    if overwrite:
        key = [column.name for column in table.primary_key.columns]
        assignments = ", ".join(f'"{name}" = EXCLUDED."{name}"' for name in names if name not in key)
        statement += f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET {assignments}"
    return statement


def _write(cursor: Any, table: Table, rows: Sequence[dict[str, Any]], *, overwrite: bool = False) -> None:
    """Queue ``rows`` for ``table``: a plain INSERT, or with ``overwrite`` an upsert on the key."""
    if not rows:
        return
    names = tuple(rows[0])
    # The engine's JSON serializer is bypassed here, so serialize as it would.
    json_names = json_columns(table).intersection(names)
    params = [{**row, **{name: json_dumps(row[name]) for name in json_names if row[name] is not None}} for row in rows]
    cursor.executemany(_insert(table, names, overwrite), params)


def record_events(conn: Connection, deliveries: Sequence[tuple[Event, datetime]]) -> list[Outcome]:
    """Record and apply ``deliveries`` in order, then COMMIT the caller's transaction.

    The same outcomes, rows and errors as :func:`connector.db.store.record_events`, which instead
    leaves the transaction to its caller.
    """
    driver = conn.connection.driver_connection
    try:
        locks = ids_to_lock(deliveries)
        params = {resource: locks.get(resource, []) for resource in state_tables}
        with driver_errors(conn, "pipelined transaction"), driver.pipeline() as pipeline, driver.cursor() as cursor:
            # The transaction's BEGIN goes in the same round trip as the read.
            cursor.execute(_READ, {"seen": [event.event_id for event, _ in deliveries], **params})
            pipeline.sync()
            seen: set[str] = set()
            states: dict[str, dict[str, RowState]] = {resource: {} for resource in locks}
            for resource, rid, raw, last_action, event_id, deleted_at in cursor:
                if resource:
                    states[resource][rid] = RowState(
                        raw, last_action, event_id, deleted_at and deleted_at.astimezone(UTC)
                    )
                else:
                    seen.add(rid)

            fresh = fresh_deliveries(deliveries, seen)
            existing = {resource: set(rows) for resource, rows in states.items()}
            outcomes, changed = fold(fresh, states)
            synced_at = datetime.now(UTC)
            for resource, rows in changed.items():
                if rows:
                    writes = state_writes(resource, rows, existing[resource], synced_at)
                    _write(cursor, state_tables[resource], writes.new)
                    _write(cursor, state_tables[resource], writes.existing, overwrite=True)
                    if writes.clear_children_of:
                        cursor.execute(_delete_children(resource), {"ids": writes.clear_children_of})
                    if resource in child_tables:
                        _write(cursor, child_tables[resource][0], writes.children)
            log_rows = [log_row(event, at, outcome) for (event, at), outcome in zip(fresh, outcomes, strict=True)]
            _write(cursor, events, log_rows)
            cursor.execute("COMMIT")
    except Exception as exc:
        if lost_race(getattr(exc, "orig", None)):
            raise LostRace("a concurrent writer created the same row or event id first") from exc
        raise
    return outcomes_in_order(deliveries, fresh, outcomes)
