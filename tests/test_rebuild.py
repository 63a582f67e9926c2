"""``connector rebuild``: the state tables recomputed from the change log equal the live ones."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, create_engine, delete, func, select, update

from connector.cli import cli
from connector.db.rebuild import rebuild
from connector.db.schema import events, group_members, message_reactions, state_tables
from connector.db.store import EventStore
from connector.errors import DatabaseUnavailable
from connector.events import Event, parse_event
from tests.conftest import encode, envelope

ALL_TABLES = [*state_tables.values(), group_members, message_reactions]


def history(seed: int, count: int = 150) -> list[Event]:
    """A mixed history of all five resources, with redeliveries and late, stale and unknown events."""
    rng = random.Random(seed)
    names = ["kevin", "kate", "peter", "buzz"]
    made: list[Event] = []
    for n in range(count):
        resource = rng.choice(["contact", "conversation", "message", "group", "attachment", "reaction"])
        action = rng.choices(["created", "updated", "deleted"], weights=[3, 5, 1])[0]
        payload: dict[str, Any] = {"id": f"{resource}-{rng.randrange(6)}"}
        if resource == "message":
            payload.update(
                message=f"text {n}",
                updated_at=700_000_000 + rng.randrange(1000),  # versions arrive in any order
                contact={"id": f"contact-{rng.randrange(3)}", "username": rng.choice(names)},
                reactions=[{"smile": rng.sample(names, rng.randrange(3))}],
            )
        elif resource == "group":
            payload["contacts"] = [
                {"id": f"contact-{i}", "username": name} for i, name in enumerate(rng.sample(names, 2))
            ]
        elif action != "deleted" or rng.random() < 0.5:
            payload.update(username=rng.choice(names), created_at=690_000_000 + n, file_size=n, is_muted=n % 2 == 0)
        made.append(parse_event(encode(envelope(f"{resource}.{action}", payload, f"evt-{seed}-{n}"))))
    return made + rng.sample(made, count // 5)  # redeliveries


def snapshot(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every state and child row, in key order, without the wall-clock ``_synced_at``."""
    with engine.connect() as conn:
        return {
            table.name: [
                {k: v for k, v in row.items() if k != "_synced_at"}
                for row in conn.execute(select(table).order_by(*table.primary_key.columns)).mappings()
            ]
            for table in ALL_TABLES
        }


def record_all(engine: Engine, deliveries: list[Event]) -> None:
    store = EventStore(engine)
    for event in deliveries:
        store.record(event)


def test_rebuilding_yields_exactly_the_live_tables(engine):
    record_all(engine, history(seed=1))
    live = snapshot(engine)
    assert live["coherent_messages"] and live["coherent_group_members"] and live["coherent_message_reactions"]
    with engine.begin() as conn:  # damage the tables: rows lost, values changed, a row that should not be
        conn.execute(delete(state_tables["contact"]).where(state_tables["contact"].c.id == "contact-1"))
        conn.execute(update(state_tables["message"]).values(message="tampered", _deleted_at=None))
        conn.execute(delete(group_members))
        conn.execute(
            state_tables["attachment"]
            .insert()
            .values(id="bogus", _raw={}, _event_id="x", _last_action="created", _synced_at=func.now())
        )
    assert snapshot(engine) != live

    report = rebuild(engine, batch_size=7, progress=False)

    assert snapshot(engine) == live
    with engine.connect() as conn:
        assert report.events == conn.scalar(select(func.count()).select_from(events))
    assert report.outcome_changes == 0


def test_the_rebuild_command_reports_what_it_replayed(db_url, engine):
    record_all(engine, history(seed=2, count=40))
    live = snapshot(engine)
    with engine.begin() as conn:
        for table in ALL_TABLES:
            conn.execute(delete(table))

    result = CliRunner().invoke(cli, ["--database-url", db_url, "rebuild", "--batch-size", "5"])

    assert result.exit_code == 0, result.output
    assert "rebuilt the state tables from 40 change-log events" in result.stdout
    assert "event" in result.stderr  # tqdm's progress bar
    assert snapshot(engine) == live


def _counts(conn) -> tuple:
    """Row counts of every table in one statement, so they come from one snapshot."""
    return tuple(
        conn.execute(select(*(select(func.count()).select_from(t).scalar_subquery() for t in ALL_TABLES))).one()
    )


def test_readers_never_see_half_built_tables(db_url, engine):
    record_all(engine, history(seed=3))
    with engine.connect() as conn:
        full = _counts(conn)
    # An analyst's plain connection: no write lock taken for reads, as the receiver's SQLite engine does.
    reader = create_engine(db_url)
    rebuilding = threading.Thread(target=rebuild, args=(engine,), kwargs={"batch_size": 1, "progress": False})
    seen_during = []
    try:
        rebuilding.start()
        deadline = time.monotonic() + 120
        while rebuilding.is_alive() and time.monotonic() < deadline:
            with reader.connect() as conn:
                seen_during.append(_counts(conn))
        rebuilding.join(timeout=120)
    finally:
        reader.dispose()
    assert seen_during, "the reader never ran while the rebuild did"
    assert set(seen_during) == {full}


def test_deliveries_during_a_rebuild_wait_and_are_neither_lost_nor_doubled(engine):
    record_all(engine, history(seed=4))
    late = history(seed=5, count=60)
    store = EventStore(engine)
    errors: list[BaseException] = []

    def rebuild_repeatedly() -> None:
        try:
            for _ in range(3):
                rebuild(engine, batch_size=5, progress=False)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    rebuilding = threading.Thread(target=rebuild_repeatedly)
    rebuilding.start()
    for event in late:
        for _attempt in range(20):  # a sender retries a 503
            try:
                store.record(event)
                break
            except DatabaseUnavailable:
                time.sleep(0.1)
        else:
            pytest.fail(f"{event.event_id} was refused 20 times")
    rebuilding.join(timeout=300)
    assert not errors and not rebuilding.is_alive()

    with engine.connect() as conn:
        logged = set(conn.scalars(select(events.c.event_id)))
    assert logged == {event.event_id for event in history(seed=4) + late}
    live = snapshot(engine)
    rebuild(engine, progress=False)
    assert snapshot(engine) == live


def test_the_rebuild_command_refuses_an_unmigrated_database(tmp_path):
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{tmp_path / 'empty.db'}", "rebuild"])
    assert result.exit_code == 1
    assert "run `connector migrate`" in result.output
