"""The history views: one row per applied version, derived from the change log, on every database."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Boolean, Column, Engine, MetaData, String, Table, and_, or_, select

from connector.db.schema import events, state_tables
from connector.db.store import EventStore
from connector.db.types import Document, UTCDateTime
from connector.events import parse_event
from connector.resources import RESOURCES
from tests.conftest import encode, envelope
from tests.test_rebuild import history, record_all

_views = MetaData()
HISTORY = {
    resource: Table(
        f"{table.name}_history",
        _views,
        *(Column(name, table.c[name].type) for name in ["id", *RESOURCES[resource].columns]),
        Column("_payload", Document),
        Column("_seq", BigInteger),
        Column("_event_id", String(255)),
        Column("_action", String(16)),
        Column("valid_from", UTCDateTime()),
        Column("valid_to", UTCDateTime()),
        Column("is_current", Boolean),
        Column("_deleted_at", UTCDateTime()),
    )
    for resource, table in state_tables.items()
}
DAY = datetime(2026, 3, 1, tzinfo=UTC)


def versions(engine: Engine, resource: str, **where: Any) -> list[dict[str, Any]]:
    view = HISTORY[resource]
    with engine.connect() as conn:
        query = select(view).where(*(view.c[k] == v for k, v in where.items())).order_by(view.c.id, view.c._seq)
        return [dict(row) for row in conn.execute(query).mappings()]


def deliver(engine: Engine, *events: tuple[str, dict[str, Any], int]) -> None:
    """Record (type, payload, day) in order, each received at noon on DAY plus ``day`` days."""
    EventStore(engine).record_many(
        [(parse_event(encode(envelope(t, p))), DAY + timedelta(days=d, hours=12)) for t, p, d in events]
    )


def test_the_current_versions_equal_the_state_tables(engine):
    record_all(engine, history(seed=11, count=200))
    for resource, table in state_tables.items():
        typed = ["id", *RESOURCES[resource].columns, "_event_id", "_deleted_at"]
        with engine.connect() as conn:
            live = [
                dict(row) for row in conn.execute(select(*(table.c[n] for n in typed)).order_by(table.c.id)).mappings()
            ]
        current = [{n: row[n] for n in typed} for row in versions(engine, resource, is_current=True)]
        assert current == live, resource

        rows = versions(engine, resource)
        with engine.connect() as conn:
            applied = conn.scalars(
                select(events.c.event_id).where(events.c.resource == resource, events.c.outcome == "applied")
            )
            assert sorted(applied) == sorted(r["_event_id"] for r in rows)
        for before, after in itertools.pairwise(rows):  # intervals chain without gaps
            if before["id"] == after["id"]:
                assert before["valid_to"] == after["valid_from"] and not before["is_current"]
                assert before["_seq"] < after["_seq"]


def test_an_analyst_sees_what_a_conversation_looked_like_on_a_given_day(engine):
    deliver(
        engine,
        ("conversation.created", {"id": "conv", "contact_id": "kevin", "is_muted": False, "is_pinned": False}, 0),
        ("conversation.updated", {"id": "conv", "is_pinned": True}, 2),  # a partial update
        ("conversation.created", {"id": "conv", "contact_id": "late", "is_muted": True}, 3),  # late: stale
        ("conversation.updated", {"id": "conv", "is_muted": True, "archived_at": 1_772_000_000}, 5),
        ("conversation.deleted", {"id": "conv"}, 7),
    )

    def as_of(day: int) -> list[dict[str, Any]]:
        view, moment = HISTORY["conversation"], DAY + timedelta(days=day)
        with engine.connect() as conn:
            query = select(
                view.c.contact_id, view.c.is_pinned, view.c.is_muted, view.c.archived_at, view.c._deleted_at
            ).where(
                view.c.id == "conv",
                view.c.valid_from <= moment,
                or_(view.c.valid_to > moment, view.c.valid_to.is_(None)),
            )
            return [dict(row) for row in conn.execute(query).mappings()]

    assert as_of(-1) == []
    assert as_of(1) == [
        {"contact_id": "kevin", "is_pinned": False, "is_muted": False, "archived_at": None, "_deleted_at": None}
    ]
    assert as_of(4) == [
        {"contact_id": "kevin", "is_pinned": True, "is_muted": False, "archived_at": None, "_deleted_at": None}
    ]
    archived = datetime.fromtimestamp(1_772_000_000, UTC)
    assert as_of(6) == [
        {"contact_id": "kevin", "is_pinned": True, "is_muted": True, "archived_at": archived, "_deleted_at": None}
    ]
    deleted = DAY + timedelta(days=7, hours=12)
    assert as_of(30) == [
        {"contact_id": "kevin", "is_pinned": True, "is_muted": True, "archived_at": archived, "_deleted_at": deleted}
    ]

    rows = versions(engine, "conversation")
    assert [r["_action"] for r in rows] == [
        "created",
        "updated",
        "updated",
        "deleted",
    ]  # the stale create is no version
    assert [r["is_current"] for r in rows] == [False, False, False, True]
    assert rows[1]["_payload"] == {"id": "conv", "is_pinned": True}  # what that version's event carried
    assert rows[-1]["valid_to"] is None


def test_message_versions_follow_updated_at_and_an_older_delete_keeps_the_newer_values(engine):
    deliver(
        engine,
        ("message.updated", {"id": "m", "message": "v2", "updated_at": 200, "reactions": [{"tada": ["kate"]}]}, 0),
        ("message.created", {"id": "m", "message": "v1", "updated_at": 100}, 1),  # late and older: stale
        ("message.updated", {"id": "m", "message": "v1.5", "updated_at": 150}, 2),  # older: stale
        ("message.deleted", {"id": "m", "message": "v1", "updated_at": 100}, 3),  # older: deletes, keeps v2
    )
    rows = versions(engine, "message")
    assert [(r["_action"], r["message"], r["updated_at"]) for r in rows] == [
        ("updated", "v2", datetime.fromtimestamp(200, UTC)),
        ("deleted", "v2", datetime.fromtimestamp(200, UTC)),
    ]
    assert rows[1]["reactions"] == [{"tada": ["kate"]}] and rows[1]["_deleted_at"] is not None


def test_awkward_values_never_break_a_query_of_the_history(engine):
    deliver(
        engine,
        (
            "contact.created",
            {"id": "c1", "username": "nul\u0000here", "display_name": "lone \ud800", "created_at": "yesterday"},
            0,
        ),
        ("contact.updated", {"id": "c1", "phone_number": "emoji \U0001f600", "last_active_at": 10**15}, 1),
        ("attachment.created", {"id": "a1", "file_size": 2**70, "filename": 5}, 0),
        ("message.created", {"id": "m1", "message": "long \u00e9" * 20_000, "updated_at": 1}, 0),
    )
    [message] = versions(engine, "message")
    assert message["message"] == "long \u00e9" * 20_000
    [first, second] = versions(engine, "contact")
    assert second["phone_number"] == "emoji \U0001f600"
    assert second["created_at"] is None and second["last_active_at"] is None  # wrong type, out of range
    assert second["_payload"]["last_active_at"] == 10**15
    assert first["_payload"]["username"] == "nul\u0000here"  # exact in _payload
    assert first["username"] == "nul\ufffdhere"  # as in the state table
    # SQLite cannot decode an unpaired surrogate into text: NULL there, U+FFFD as in the state table elsewhere.
    assert first["display_name"] == (None if engine.dialect.name == "sqlite" else "lone \ufffd")
    [attachment] = versions(engine, "attachment")
    assert attachment["file_size"] is None and attachment["filename"] is None
    view = HISTORY["contact"]
    with engine.connect() as conn:  # filtering on the text columns works too
        assert conn.scalar(select(view.c.id).where(and_(view.c.phone_number.like("emoji%")))) == "c1"
