"""What a batch of deliveries writes: pure planning, shared by every write path of the store.

No I/O here. The store reads and locks the rows, :func:`fold` applies the ordering rules to them, and
:func:`state_writes` and :func:`log_row` say what to write; ``connector.db.store`` writes it through
SQLAlchemy on any database, and ``connector.db.pipeline`` through libpq's pipeline on PostgreSQL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from connector.db.schema import child_tables
from connector.events import Event, Outcome, RowState, apply_event
from connector.resources import RESOURCES, group_members, message_reactions, typed_columns

_CHILD_ROWS = {"group": group_members, "message": message_reactions}


class LostRace(Exception):
    """Run the transaction again: another one wrote the same event id or created the same row
    first, or (the pipelined path) the connection's prepared statements were dropped."""


def state_row(
    resource: str, resource_id: str, state: RowState, synced_at: datetime, child_error: str | None = None
) -> dict[str, Any]:
    """The full current-state row for ``state``: typed columns plus the underscore columns.

    ``child_error`` is what deriving the child rows from ``state.raw`` reported, kept in ``_errors``.
    """
    values, errors = typed_columns(RESOURCES[resource], state.raw)
    if child_error:
        errors[child_tables[resource][0].name] = child_error
    return {
        "id": resource_id,
        **values,
        "_raw": state.raw,
        "_deleted_at": state.deleted_at,
        "_event_id": state.event_id,
        "_last_action": state.last_action,
        "_synced_at": synced_at,
        "_errors": errors or None,
    }


@dataclasses.dataclass
class StateWrites:
    """What one resource's changed rows turn into: the rows to insert, to overwrite, and child rows."""

    new: list[dict[str, Any]]  # rows this transaction creates; a concurrent creator means LostRace
    existing: list[dict[str, Any]]  # rows it holds locked, overwritten whole
    clear_children_of: list[str]  # ids whose child rows are replaced (only rows that existed)
    children: list[dict[str, Any]]


def state_writes(resource: str, changed: dict[str, RowState], existing: set[str], synced_at: datetime) -> StateWrites:
    """The writes for ``resource``'s ``changed`` rows; ``existing`` are the ids that had a row."""
    writes = StateWrites([], [], [], [])
    for rid, state in changed.items():
        child_rows, child_error = _CHILD_ROWS[resource](state.raw) if resource in _CHILD_ROWS else ([], None)
        row = state_row(resource, rid, state, synced_at, child_error)
        if rid in existing:
            writes.existing.append(row)
        else:
            writes.new.append(row)
        if child_rows:
            parent_key = child_tables[resource][1]
            writes.children.extend({parent_key: rid, **child_row} for child_row in child_rows)
    # New rows go in id order, as rows are locked: two transactions inserting the same new ids in
    # opposite orders would wait on each other's index entries.
    writes.new.sort(key=lambda row: row["id"])
    # Only rows that existed before this transaction can have child rows to replace; a row it
    # creates has none yet (and if a concurrent writer created it first, LostRace is raised).
    if resource in child_tables:
        writes.clear_children_of = sorted(rid for rid in changed if rid in existing)
    return writes


def ids_to_lock(deliveries: Sequence[tuple[Event, datetime]]) -> dict[str, list[str]]:
    """The row ids ``deliveries`` touch, by resource, each list sorted so that writers lock alike."""
    by_resource: dict[str, set[str]] = {}
    for event, _ in deliveries:
        if event.known:
            by_resource.setdefault(event.resource, set()).add(event.resource_id)
    return {resource: sorted(ids) for resource, ids in sorted(by_resource.items())}


def fold(
    deliveries: Sequence[tuple[Event, datetime]], states: dict[str, dict[str, RowState]]
) -> tuple[list[Outcome], dict[str, dict[str, RowState]]]:
    """Apply ``deliveries`` in order to the locked rows in ``states`` (updated in place).

    Pure: returns each delivery's outcome, and the rows that changed, by resource.
    """
    changed: dict[str, dict[str, RowState]] = {resource: {} for resource in states}
    outcomes: list[Outcome] = []
    for event, received_at in deliveries:
        if event.known:
            current = states[event.resource].get(event.resource_id)
            outcome, new_state = apply_event(current, event, received_at)
            if new_state is not None:
                states[event.resource][event.resource_id] = new_state
                changed[event.resource][event.resource_id] = new_state
        else:
            outcome = Outcome.UNKNOWN_TYPE
        outcomes.append(outcome)
    return outcomes, changed


def fresh_deliveries(deliveries: Sequence[tuple[Event, datetime]], seen: set[str]) -> list[tuple[Event, datetime]]:
    """``deliveries`` without event ids in ``seen`` or earlier in the batch (those are duplicates)."""
    seen = set(seen)
    fresh: list[tuple[Event, datetime]] = []
    for event, received_at in deliveries:
        if event.event_id not in seen:
            seen.add(event.event_id)
            fresh.append((event, received_at))
    return fresh


def log_row(event: Event, received_at: datetime, outcome: Outcome) -> dict[str, Any]:
    """The change-log row recording ``event``."""
    return {
        "event_id": event.event_id,
        "type": event.type,
        "resource": event.resource,
        "action": event.action,
        "resource_id": event.resource_id,
        "payload": event.payload,
        "received_at": received_at,
        "outcome": outcome.value,
    }


def outcomes_in_order(
    deliveries: Sequence[tuple[Event, datetime]], fresh: Sequence[tuple[Event, datetime]], outcomes: list[Outcome]
) -> list[Outcome]:
    """One outcome per delivery: the fresh ones' own, ``duplicate`` for the rest."""
    outcome_of = {event.event_id: outcome for (event, _), outcome in zip(fresh, outcomes, strict=True)}
    return [outcome_of.pop(event.event_id, Outcome.DUPLICATE) for event, _ in deliveries]
