"""Generated histories, delivered at least once and out of order, end in the state the rules promise.

Each example builds a plausible history of all five resources (creates, updates, deletes, message
edits with rising ``updated_at``, group membership changes, reactions, deletes carrying the whole
object or only the id), delivers it with duplicates and late arrivals, and checks the database against
a reference fold of the change log written here from the README's rules, independently of
``connector.events``; and checks that fold against the true order wherever the rules can recover it.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from connector.db.schema import events, group_members, message_reactions, state_tables
from connector.db.store import EventStore
from connector.events import parse_event
from tests.conftest import empty_tables, encode, envelope

# --- What a plausible Coherent history looks like -------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=8)
TIMESTAMP = st.integers(600_000_000, 800_000_000)
NAMES = st.sampled_from(["kevin", "kate", "peter", "buzz", "fuller", "marv", "harry"])
MEMBERS = st.lists(
    st.one_of(
        st.builds(lambda n: {"id": f"contact-{n}", "username": n}, NAMES),
        st.builds(lambda n: {"username": n}, NAMES),  # the guide's examples show members without an id
    ),
    max_size=4,
)
REACTIONS = st.lists(
    st.dictionaries(st.sampled_from(["smile", "red_angry_face", "tada"]), st.lists(NAMES, max_size=3)), max_size=3
)

# The typed fields each resource's history sets, with what its column holds: "ts" columns hold the
# UTC datetime of the Unix seconds, everything else the value itself.
FIELDS: dict[str, dict[str, tuple[st.SearchStrategy, str]]] = {
    "contact": {
        "username": (NAMES, "value"),
        "phone_number": (TEXT, "value"),
        "display_name": (st.one_of(st.none(), TEXT), "value"),
        "conversation_id": (st.sampled_from(["conv-0", "conv-1"]), "value"),
        "last_active_at": (TIMESTAMP, "ts"),
        "created_at": (TIMESTAMP, "ts"),
    },
    "conversation": {
        "contact_id": (st.sampled_from(["contact-0", "contact-1"]), "value"),
        "group_id": (st.one_of(st.none(), st.just("group-0")), "value"),
        "is_pinned": (st.booleans(), "value"),
        "is_muted": (st.booleans(), "value"),
        "last_opened_at": (st.one_of(st.none(), TIMESTAMP), "ts"),
        "created_at": (TIMESTAMP, "ts"),
    },
    "message": {
        "conversation_id": (st.sampled_from(["conv-0", "conv-1"]), "value"),
        "contact": (st.builds(lambda n: {"id": f"contact-{n}", "username": n}, NAMES), "value"),
        "message": (TEXT, "value"),
        "reactions": (REACTIONS, "value"),
        "attachments": (st.just([]), "value"),
        "read_at": (st.one_of(st.none(), TIMESTAMP), "ts"),
        "created_at": (TIMESTAMP, "ts"),
    },
    "group": {
        "name": (TEXT, "value"),
        "description": (st.one_of(st.none(), TEXT), "value"),
        "contacts": (MEMBERS, "value"),
        "created_at": (TIMESTAMP, "ts"),
    },
    "attachment": {
        "message_id": (st.sampled_from(["message-0", "message-1"]), "value"),
        "filename": (TEXT, "value"),
        "file_type": (st.sampled_from(["image/png", "application/pdf"]), "value"),
        "file_size": (st.integers(0, 2**40), "value"),
        "created_at": (TIMESTAMP, "ts"),
    },
}

# What a message edit or a group membership change touches.
MESSAGE_EDITS = ["message", "reactions", "read_at"]


@dataclasses.dataclass
class Delivery:
    """One event as Coherent sends it; ``true_position`` is where it belongs in the true order."""

    event_id: str
    type: str
    payload: dict[str, Any]
    true_position: int = 0


@dataclasses.dataclass
class Entity:
    """One resource id's true history, and whether its delete carries the whole object."""

    resource: str
    resource_id: str
    history: list[Delivery]
    full_delete: bool | None  # None: never deleted


@st.composite
def entity_histories(draw: st.DrawFn, resource: str, index: int) -> Entity:
    """A create, some updates and maybe a delete of one id, in the order they really happened."""
    resource_id = f"{resource}-{index}"
    fields = FIELDS[resource]
    state = {"id": resource_id, **{name: draw(strategy) for name, (strategy, _) in fields.items()}}
    updated_at = draw(TIMESTAMP)
    if resource == "message":
        state["updated_at"] = updated_at
    prefix = f"{resource_id}-e"
    history = [Delivery(f"{prefix}0", f"{resource}.created", dict(state))]
    for n in range(1, draw(st.integers(0, 4)) + 1):
        if resource == "message":
            # Coherent sends a message's whole object on each edit, with a rising updated_at.
            for name in draw(st.sets(st.sampled_from(MESSAGE_EDITS), min_size=1)):
                state[name] = draw(fields[name][0])
            updated_at += draw(st.integers(1, 10_000))
            state["updated_at"] = updated_at
            payload = dict(state)
        elif resource == "group" and draw(st.booleans()):
            state["contacts"] = draw(MEMBERS)  # a membership change carries only the members
            payload = {"id": resource_id, "contacts": state["contacts"]}
        else:
            changed = draw(st.sets(st.sampled_from(sorted(fields)), min_size=1))
            for name in changed:
                state[name] = draw(fields[name][0])
            partial = draw(st.booleans())
            payload = {"id": resource_id, **{name: state[name] for name in changed}} if partial else dict(state)
        history.append(Delivery(f"{prefix}{n}", f"{resource}.updated", payload))
    full_delete = draw(st.one_of(st.none(), st.booleans()))
    if full_delete is not None:
        payload = dict(state) if full_delete else {"id": resource_id}
        history.append(Delivery(f"{prefix}{len(history)}", f"{resource}.deleted", payload))
    return Entity(resource, resource_id, history, full_delete)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Entity], list[Delivery], list[list[Delivery]]]:
    """Entities, their events in true order, and the batches in which they are delivered."""
    entities = [
        draw(entity_histories(resource, index))
        for resource in FIELDS
        for index in range(draw(st.integers(0 if resource != "message" else 1, 2)))
    ]
    # An authentic event of a type the connector does not know yet.
    extras = [
        Delivery(f"unknown-{n}", "reaction.created", {"id": f"r{n}", "emoji": "tada"})
        for n in range(draw(st.integers(0, 1)))
    ]

    # Interleave the entities' histories into one true order.
    queues = [list(entity.history) for entity in entities] + [[extra] for extra in extras]
    picks = draw(st.permutations([i for i, queue in enumerate(queues) for _ in queue]))
    true_order = [queues[i].pop(0) for i in picks]
    for position, delivery in enumerate(true_order):
        delivery.true_position = position

    # Late arrivals: some events are held back by a few places; then some are delivered again.
    delays = draw(
        st.lists(
            st.one_of(st.just(0), st.integers(0, len(true_order))), min_size=len(true_order), max_size=len(true_order)
        )
    )
    arrival = [
        d
        for _, d in sorted(
            zip(
                (d.true_position + delay for d, delay in zip(true_order, delays, strict=True)), true_order, strict=True
            ),
            key=lambda pair: pair[0],
        )
    ]
    for repeat in draw(st.lists(st.sampled_from(true_order), max_size=len(true_order) // 2)):
        arrival.insert(draw(st.integers(0, len(arrival))), repeat)

    sizes = draw(st.lists(st.integers(1, 6), min_size=len(arrival), max_size=len(arrival)))
    batches, start = [], 0
    for size in sizes:
        if start < len(arrival):
            batches.append(arrival[start : start + size])
            start += size
    return entities, true_order, batches


# --- The rules, restated from the README as a fold over the change log ------------------------------


@dataclasses.dataclass
class Expected:
    """A row as the README's rules say it must be."""

    raw: dict[str, Any]
    last_action: str
    event_id: str
    deleted_at: datetime | None


def _updated_at(payload: dict[str, Any]) -> int | None:
    value = payload.get("updated_at")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def reference_fold(log: list[dict[str, Any]]) -> tuple[dict[tuple[str, str], Expected], dict[str, str]]:
    """Fold change-log rows in ``seq`` order into rows by (resource, id), and each event's outcome."""
    rows: dict[tuple[str, str], Expected] = {}
    outcomes: dict[str, str] = {}
    for entry in log:
        resource, _, action = entry["type"].partition(".")
        key, payload = (resource, entry["payload"]["id"]), entry["payload"]
        current = rows.get(key)
        if resource not in FIELDS or action not in ("created", "updated", "deleted"):
            outcome = "unknown_type"
        elif current is not None and current.deleted_at is not None:  # rule 2: deleted is terminal
            outcome = "after_delete"
        elif current is None:
            deleted_at = entry["received_at"] if action == "deleted" else None
            rows[key] = Expected(dict(payload), action, entry["event_id"], deleted_at)
            outcome = "applied"
        else:
            new, old = _updated_at(payload), _updated_at(current.raw)
            older = new is not None and old is not None and new < old  # rule 4
            if action == "deleted":  # an older delete still deletes, but keeps the newer values
                raw = current.raw if older else {**current.raw, **payload}
                rows[key] = Expected(raw, action, entry["event_id"], entry["received_at"])
                outcome = "applied"
            elif (action == "created" and current.last_action != "created") or older:  # rules 3 and 4
                outcome = "stale"
            else:  # rule 5: the later arrival wins, field by field
                rows[key] = Expected({**current.raw, **payload}, action, entry["event_id"], None)
                outcome = "applied"
        outcomes[entry["event_id"]] = outcome
    return rows, outcomes


def expected_state_row(resource: str, expected: Expected) -> dict[str, Any]:
    """The typed columns and underscore columns the state table must hold for ``expected``."""
    table = state_tables[resource]
    row: dict[str, Any] = dict.fromkeys(table.c.keys())
    for name, (_, kind) in FIELDS[resource].items():
        value = expected.raw.get(name)
        row[name] = datetime.fromtimestamp(value, UTC) if kind == "ts" and value is not None else value
    if resource == "message":
        row["updated_at"] = (
            datetime.fromtimestamp(expected.raw["updated_at"], UTC) if "updated_at" in expected.raw else None
        )
        contact = expected.raw.get("contact")
        row["contact_id"] = contact["id"] if contact else None
    row.update(
        id=expected.raw["id"],
        _raw=expected.raw,
        _deleted_at=expected.deleted_at,
        _event_id=expected.event_id,
        _last_action=expected.last_action,
        _errors=None,
    )
    del row["_synced_at"]
    return row


def expected_children(rows: dict[tuple[str, str], Expected]) -> tuple[set[tuple], set[tuple]]:
    """Group members and message reactions, as (parent id, position, ...) tuples."""
    members, reactions = set(), set()
    for (resource, resource_id), expected in rows.items():
        if resource == "group":
            for position, member in enumerate(expected.raw.get("contacts") or []):
                members.add((resource_id, position, member.get("id"), member["username"]))
        if resource == "message":
            flat = [
                (emoji, user)
                for reaction in expected.raw.get("reactions") or []
                for emoji, users in reaction.items()
                for user in users
            ]
            reactions.update((resource_id, position, emoji, user) for position, (emoji, user) in enumerate(flat))
    return members, reactions


def recoverable(entity: Entity, first_arrival: list[str]) -> str:
    """How much of the true final state the rules can recover from this arrival order.

    "all": the whole row; "deleted": only that it is deleted; "none": the rules make no promise.
    """
    if entity.full_delete is not None:
        # A delete that carries the whole object restores the true last values whatever came before.
        return "all" if entity.full_delete else "deleted"
    if entity.resource == "message":
        return "all"  # each edit is the whole message, and the newest updated_at wins
    ids = [delivery.event_id for delivery in entity.history]
    arrived = [event_id for event_id in first_arrival if event_id in ids]
    updates_in_order = [event_id for event_id in arrived if event_id != ids[0]] == ids[1:]
    create_first = arrived[0] == ids[0]
    # A late create is stale; nothing is lost if some update re-sent every field it carried.
    covered = create_first or any(set(d.payload) >= set(entity.history[0].payload) for d in entity.history[1:])
    return "all" if updates_in_order and covered else "none"


# --- The property ----------------------------------------------------------------------------------


def read_table(engine: Engine, table) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(select(table)).mappings()]


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios(), portable=st.booleans())
def test_state_equals_the_rules_applied_to_the_change_log(engine, scenario, portable):
    entities, true_order, batches = scenario
    empty_tables(engine)
    store = EventStore(engine, portable=portable)  # each database's native upserts, or the portable path
    first_arrival: list[str] = []
    for batch in batches:
        received_at = datetime.now(UTC)
        store.record_many([(parse_event(encode(envelope(d.type, d.payload, d.event_id))), received_at) for d in batch])
        first_arrival.extend(d.event_id for d in batch if d.event_id not in first_arrival)

    # The change log holds each distinct event id once, in the order each first arrived.
    with engine.connect() as conn:
        log = [dict(row) for row in conn.execute(select(events).order_by(events.c.seq)).mappings()]
    assert [entry["event_id"] for entry in log] == first_arrival
    assert {entry["event_id"] for entry in log} == {d.event_id for d in true_order}

    # The state tables equal the rules applied to the log in seq order, typed columns and all.
    rows, outcomes = reference_fold(log)
    assert {entry["event_id"]: entry["outcome"] for entry in log} == outcomes
    for resource, table in state_tables.items():
        stored = {row["id"]: {k: v for k, v in row.items() if k != "_synced_at"} for row in read_table(engine, table)}
        wanted = {rid: expected_state_row(resource, exp) for (res, rid), exp in rows.items() if res == resource}
        assert stored == wanted, resource
    members, reactions = expected_children(rows)
    assert {tuple(r.values()) for r in read_table(engine, group_members)} == members
    assert {tuple(r.values()) for r in read_table(engine, message_reactions)} == reactions

    # Where the rules can recover the true order, the fold equals the true-order result.
    truth, _ = reference_fold(
        [{"event_id": d.event_id, "type": d.type, "payload": d.payload, "received_at": "t"} for d in true_order]
    )
    for entity in entities:
        key = (entity.resource, entity.resource_id)
        promise = recoverable(entity, first_arrival)
        if promise != "none":
            assert (rows[key].deleted_at is not None) == (truth[key].deleted_at is not None), key
        if promise == "all":
            assert rows[key].raw == truth[key].raw, key
