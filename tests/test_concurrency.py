"""Many workers and several receivers writing one database at once, through real gunicorn processes.

Two separate gunicorn receivers (standing in for hosts behind a load balancer), two workers each, share
each database. Deliveries are spread over both; every check is made in the database afterwards.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from connector.db import migrate
from connector.db.engine import create_engine_for
from connector.db.rebuild import rebuild
from connector.db.schema import events, state_tables
from connector.db.store import EventStore
from connector.errors import DatabaseUnavailable
from connector.events import Outcome, parse_event
from tests.conftest import DATABASES, Gunicorn, empty_tables, encode, envelope, make_config
from tests.test_rebuild import snapshot

pytestmark = pytest.mark.gunicorn

messages, contacts = state_tables["message"], state_tables["contact"]


@pytest.fixture(scope="module", params=DATABASES)
def database(request: pytest.FixtureRequest) -> Iterator[tuple[str, Engine]]:
    """A migrated database of each kind, shared by this module's tests."""
    url = request.getfixturevalue(f"{request.param}_url")
    engine = create_engine_for(make_config(url))
    migrate.upgrade(engine)
    yield url, engine
    engine.dispose()


@pytest.fixture(scope="module")
def receivers(database) -> Iterator[list[Gunicorn]]:
    """Two separate gunicorn receivers with two workers each, on the same database."""
    started: list[Gunicorn] = []
    try:
        for _ in range(2):
            started.append(Gunicorn(database[0], workers=2).start())
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def db(database) -> Engine:
    """The shared engine, on emptied tables."""
    empty_tables(database[1])
    return database[1]


def deliver_concurrently(receivers: list[Gunicorn], bodies: list[bytes]) -> list[tuple[int, Any]]:
    """POST every body at once from 24 threads, alternating between the receivers."""
    jobs = [(receivers[i % len(receivers)], body) for i, body in enumerate(bodies)]
    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(lambda job: job[0].post(job[1]), jobs))
    return [(status, body) for status, _, body in answers]


def log_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(select(events).order_by(events.c.seq)).mappings()]


def assert_log_replays_to_the_live_tables(engine: Engine) -> None:
    """``seq`` order is the order events were applied in: replaying the log gives the same tables."""
    live = snapshot(engine)
    rebuild(engine, progress=False)
    assert snapshot(engine) == live


def test_a_hundred_deliveries_of_one_event_store_it_once(receivers, db):
    body = encode(envelope("contact.created", {"id": "c1", "username": "kevin"}, "the-one-event"))

    answers = deliver_concurrently(receivers, [body] * 100)

    assert [status for status, _ in answers] == [200] * 100
    assert sorted({answer["outcome"] for _, answer in answers}) == ["applied", "duplicate"]
    assert [answer["outcome"] for _, answer in answers].count("applied") == 1
    assert [row["event_id"] for row in log_rows(db)] == ["the-one-event"]
    with db.connect() as conn:
        assert conn.execute(select(contacts.c.id, contacts.c.username)).all() == [("c1", "kevin")]


def test_sixty_versions_of_a_message_in_random_order_leave_the_newest(receivers, db):
    versions = [
        envelope(
            "message.updated",
            {"id": "m1", "conversation_id": "conv", "message": f"version {n}", "updated_at": 700_000_000 + n},
            f"version-{n}",
        )
        for n in range(60)
    ]
    random.Random(60).shuffle(versions)

    answers = deliver_concurrently(receivers, [encode(version) for version in versions])

    assert {status for status, _ in answers} == {200}
    with db.connect() as conn:
        row = conn.execute(select(messages)).mappings().one()
    assert (row["message"], row["_event_id"], row["updated_at"].timestamp()) == (
        "version 59",
        "version-59",
        700_000_059,
    )
    assert len(log_rows(db)) == 60
    assert_log_replays_to_the_live_tables(db)


def test_creates_updates_and_a_delete_racing_end_deleted_and_stay_deleted(receivers, db):
    bodies = []
    for n in range(8):
        contact_id = f"c{n}"
        bodies.append(encode(envelope("contact.created", {"id": contact_id, "username": "first"})))
        bodies += [encode(envelope("contact.updated", {"id": contact_id, "username": f"u{k}"})) for k in range(10)]
        delete_payload = {"id": contact_id} if n % 2 else {"id": contact_id, "username": "last"}
        bodies.append(encode(envelope("contact.deleted", delete_payload)))
    random.Random(8).shuffle(bodies)

    answers = deliver_concurrently(receivers, bodies)

    assert {status for status, _ in answers} == {200}
    with db.connect() as conn:
        assert conn.scalar(select(func.count()).where(contacts.c._deleted_at.is_(None))) == 0
        assert conn.scalar(select(func.count()).select_from(contacts)) == 8
        full_deletes = conn.execute(
            select(contacts.c.username).where(contacts.c.id.in_(["c0", "c2", "c4", "c6"]))
        ).scalars()
        assert set(full_deletes) == {"last"}
    before = snapshot(db)

    # Redeliveries and stragglers after the delete change nothing.
    late = [
        encode(envelope(f"contact.{action}", {"id": f"c{n}", "username": "zombie"}))
        for n in range(8)
        for action in ("created", "updated")
    ]
    answers = deliver_concurrently(receivers, late + bodies)

    assert {status for status, _ in answers} == {200}
    assert {answer["outcome"] for _, answer in answers[: len(late)]} == {"after_delete"}
    assert {answer["outcome"] for _, answer in answers[len(late) :]} == {"duplicate"}
    assert snapshot(db) == before
    assert_log_replays_to_the_live_tables(db)


# --- Lock conflicts --------------------------------------------------------------------------------
# A receiver with short lock timeouts, and a blocker transaction that holds the very lock an event
# needs: the change-log key of its event id, taken by inserting that id without committing. The
# receiver has by then already written the state row, so a rollback that left it behind would show.


@pytest.fixture(scope="module")
def impatient(database) -> Iterator[Gunicorn]:
    """One receiver that gives up waiting for a lock after 200 ms (1 s on MariaDB) and retries."""
    server = Gunicorn(
        database[0],
        workers=1,
        CONNECTOR_LOCK_TIMEOUT_MS="200",
        CONNECTOR_SQLITE_BUSY_TIMEOUT_MS="200",
        CONNECTOR_RETRY_ATTEMPTS="10",
    ).start()
    yield server
    server.stop()


BALLAST = {
    "type": "x.y",
    "resource": "x",
    "action": "y",
    "resource_id": "x",
    "payload": {},
    "received_at": datetime.now(UTC),
    "outcome": "applied",
}


class Blocker(threading.Thread):
    """Holds the change-log key of ``event_id`` in an open transaction until released, then rolls back."""

    def __init__(self, engine: Engine, event_id: str, then_lock_contact: str | None = None) -> None:
        super().__init__(daemon=True)
        self.engine, self.event_id, self.then_lock_contact = engine, event_id, then_lock_contact
        self.holding, self.release = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.engine.connect() as conn, conn.begin() as transaction:
                conn.execute(
                    events.insert().values(
                        event_id=self.event_id,
                        type="x.y",
                        resource="x",
                        action="y",
                        resource_id="x",
                        payload={},
                        received_at=func.now(),
                        outcome="applied",
                    )
                )
                if self.then_lock_contact:
                    # Weight: InnoDB rolls back the deadlocked transaction that changed fewer rows, and
                    # the receiver's must be the one, to show that it retries.
                    conn.execute(events.insert(), [{**BALLAST, "event_id": f"ballast-{n}"} for n in range(50)])
                self.holding.set()
                if self.then_lock_contact:
                    time.sleep(0.5)  # let the receiver lock the contact and queue behind our key
                    conn.execute(select(contacts.c.id).where(contacts.c.id == self.then_lock_contact).with_for_update())
                self.release.wait(timeout=60)
                transaction.rollback()
        except BaseException as exc:  # a deadlock victim, say; the test looks at the receiver's answer
            self.error = exc
        finally:
            self.holding.set()


def applied_exactly_when_logged(engine: Engine, event_id: str, contact_id: str, value: str) -> bool:
    """Whether the log row for ``event_id`` exists, checking that the state change exists exactly then."""
    with engine.connect() as conn:
        logged = conn.scalar(select(func.count()).where(events.c.event_id == event_id)) == 1
        state = conn.execute(select(contacts.c.username, contacts.c._event_id).where(contacts.c.id == contact_id)).one()
    assert ((state.username, state._event_id) == (value, event_id)) == logged
    return logged


def seed_contact(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            contacts.insert().values(
                id="c1",
                username="before",
                _raw={"id": "c1", "username": "before"},
                _event_id="seed",
                _last_action="created",
                _synced_at=func.now(),
            )
        )


def hold_event_key(engine: Engine, event_id: str, then_lock_contact: str | None = None) -> tuple[bytes, Blocker]:
    """Seed contact c1 and start a blocker on ``event_id``; return the body of an update of c1 with that id."""
    seed_contact(engine)
    blocker = Blocker(engine, event_id, then_lock_contact)
    blocker.start()
    blocker.holding.wait(timeout=30)
    return encode(envelope("contact.updated", {"id": "c1", "username": "after"}, event_id)), blocker


def test_a_lock_held_briefly_is_waited_out_and_never_reaches_the_sender(impatient, db):
    body, blocker = hold_event_key(db, "held-briefly")
    # Longer than one lock wait (200 ms, or MariaDB's minimum of 1 s), so the receiver must retry.
    threading.Timer(1.5 if db.dialect.name in ("mysql", "mariadb") else 0.6, blocker.release.set).start()

    status, _, answer = impatient.post(body)
    blocker.join(timeout=60)

    assert blocker.error is None
    assert (status, answer["outcome"]) == (200, "applied")
    assert applied_exactly_when_logged(db, "held-briefly", "c1", "after")


def test_when_retries_run_out_the_sender_gets_503_and_nothing_was_half_applied(impatient, db):
    body, blocker = hold_event_key(db, "held-long")
    try:
        status, headers, answer = impatient.post(body)
    finally:
        blocker.release.set()
        blocker.join(timeout=60)

    assert blocker.error is None
    assert status == 503 and int(headers["Retry-After"]) > 0
    assert answer["error"] == "database_unavailable"
    assert not applied_exactly_when_logged(db, "held-long", "c1", "after")
    with db.connect() as conn:
        assert conn.scalar(select(contacts.c.username)) == "before"

    status, _, answer = impatient.post(body)  # the sender's retry applies it, once
    assert (status, answer["outcome"]) == (200, "applied")
    assert applied_exactly_when_logged(db, "held-long", "c1", "after")


@pytest.mark.parametrize("database", ["postgresql", "mariadb"], indirect=True)
def test_a_deadlock_with_another_transaction_is_retried_not_answered_5xx(database, db):
    # A normal receiver: its lock wait outlasts the database's deadlock check, so the deadlock happens.
    server = Gunicorn(database[0], workers=1).start()
    try:
        body, blocker = hold_event_key(db, "deadlocked", then_lock_contact="c1")
        # The receiver locks c1 and waits for the blocker's key; the blocker then asks for c1.
        threading.Timer(2, blocker.release.set).start()
        status, _, answer = server.post(body)
        blocker.join(timeout=60)
    finally:
        server.stop()
    assert blocker.error is None  # the receiver was the deadlock's victim, and retried
    assert (status, answer["outcome"]) == (200, "applied")
    assert applied_exactly_when_logged(db, "deadlocked", "c1", "after")


def test_the_receivers_agree_with_a_rebuild_after_mixed_concurrent_traffic(receivers, db):
    rng = random.Random(3)
    bodies = []
    for n in range(120):
        resource = rng.choice(["contact", "message", "group"])
        payload: dict[str, Any] = {"id": f"{resource}-{rng.randrange(4)}", "username": f"v{n}"}
        if resource == "message":
            payload.update(updated_at=700_000_000 + rng.randrange(50), reactions=[{"smile": [f"v{n}"]}])
        if resource == "group":
            payload["contacts"] = [{"id": f"contact-{k}", "username": f"v{n}"} for k in range(rng.randrange(3))]
        action = rng.choices(["created", "updated", "deleted"], weights=[2, 6, 1])[0]
        bodies.append(encode(envelope(f"{resource}.{action}", payload)))
    answers = deliver_concurrently(receivers, bodies + rng.sample(bodies, 30))
    assert {status for status, _ in answers} == {200}
    assert len(log_rows(db)) == 120
    assert_log_replays_to_the_live_tables(db)


@pytest.mark.parametrize("database", ["postgresql", "mariadb"], indirect=True)
def test_serialization_failures_under_serializable_isolation_are_retried_inside_the_connector(database, db):
    # Under SERIALIZABLE, PostgreSQL fails a writer whose row a concurrent transaction changed (40001)
    # and InnoDB's shared read locks deadlock (1213); the store must retry both, not give up.
    serializable = create_engine_for(make_config(database[0]), isolation_level="SERIALIZABLE")
    store = EventStore(serializable, retry_attempts=10)
    deliveries: list = []
    outcomes: list = []
    refused = []

    def deliver(event):
        for _attempt in range(20):  # a sender retries a 503
            try:
                return store.record(event)
            except DatabaseUnavailable:
                refused.append(event.event_id)
        raise AssertionError(f"{event.event_id} was refused 20 times")

    try:
        # Whether concurrent transactions collide depends on timing; another batch is sent until they
        # have (nearly always in the first).
        for _batch in range(5):
            batch = [
                parse_event(encode(envelope("contact.updated", {"id": f"c{n % 2}", "username": f"u{n}"})))
                for n in range(60)
            ]
            with ThreadPoolExecutor(max_workers=8) as pool:
                outcomes += list(pool.map(deliver, batch))
            deliveries += batch
            if store.retries:
                break
    finally:
        serializable.dispose()
    assert store.retries > 0  # the failures happened, and were retried
    assert set(outcomes) == {Outcome.APPLIED}
    assert sorted(row["event_id"] for row in log_rows(db)) == sorted(event.event_id for event in deliveries)
    assert_log_replays_to_the_live_tables(db)
