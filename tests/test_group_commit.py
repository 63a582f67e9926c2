"""Group commit on real SQLite, PostgreSQL and MariaDB: threads share transactions, never outcomes.

Each test makes a group form deterministically: another connection holds the database (SQLite) or a
row lock, so the first event's transaction waits, and the events sent meanwhile queue behind it.
When the lock is released they are committed together, in one transaction.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, func, select, text

from connector.db.schema import events, state_tables
from connector.db.store import EventStore
from connector.errors import DatabaseUnavailable, WriteRefused
from connector.events import Event, Outcome, parse_event
from connector.group_commit import GroupCommit
from tests.conftest import encode, envelope


def contact(contact_id: str, username: str, event_id: str | None = None, action: str = "created") -> Event:
    return parse_event(encode(envelope(f"contact.{action}", {"id": contact_id, "username": username}, event_id)))


class Transactions:
    """Counts the store's transactions by the batches handed to it (the store itself is real)."""

    def __init__(self, store: EventStore) -> None:
        self.batches: list[int] = []
        record_many = store.record_many

        def counted(deliveries, **kwargs):
            self.batches.append(len(deliveries))
            return record_many(deliveries, **kwargs)

        store.record_many = counted  # type: ignore[method-assign]


@contextlib.contextmanager
def database_held(engine: Engine, contact_id: str) -> Iterator[Callable[[], None]]:
    """Hold what a write of ``contact_id`` needs; yields a function that lets go early."""
    conn = engine.connect()
    if engine.dialect.name == "sqlite":
        conn.begin()  # the engine begins SQLite transactions IMMEDIATE: this takes its one writer lock
    else:
        table = state_tables["contact"]
        conn.execute(select(table.c.id).where(table.c.id == contact_id).with_for_update()).one()
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            conn.rollback()
            conn.close()

    try:
        yield release
    finally:
        release()


def in_threads(group_commit: GroupCommit, batch: list[Event]) -> tuple[list[threading.Thread], list]:
    """Record each event of ``batch`` from a thread of its own; the results fill in by position."""
    results: list[Outcome | Exception | None] = [None] * len(batch)

    def send(position: int, event: Event) -> None:
        try:
            results[position] = group_commit.record(event)
        except Exception as exc:
            results[position] = exc

    threads = [threading.Thread(target=send, args=item) for item in enumerate(batch)]
    for thread in threads:
        thread.start()
    return threads, results


def wait_until_leading(group_commit: GroupCommit) -> None:
    """Until a leader has taken its group (the queue is empty again) and is in its transaction."""
    deadline = time.monotonic() + 5
    while not (group_commit._leading and not group_commit._queue):
        assert time.monotonic() < deadline, "no leader took its group"
        time.sleep(0.01)


def wait_until_queued(group_commit: GroupCommit, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(group_commit._queue) < count:
        assert time.monotonic() < deadline, f"only {len(group_commit._queue)} of {count} events queued"
        time.sleep(0.01)


def log_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(events.c.event_id).order_by(events.c.seq)))


def usernames(engine: Engine) -> dict[str, str]:
    table = state_tables["contact"]
    with engine.connect() as conn:
        return dict(conn.execute(select(table.c.id, table.c.username)).all())


def test_events_queued_behind_a_transaction_commit_together_each_with_its_own_outcome(engine):
    store = EventStore(engine)
    store.record(contact("held", "first"))
    transactions = Transactions(store)
    group_commit = GroupCommit(store)

    with database_held(engine, "held") as release:
        leader, leader_results = in_threads(group_commit, [contact("held", "second", "lead", "updated")])
        wait_until_leading(group_commit)  # its transaction now waits for the lock
        queued = [contact(f"c{n}", f"user{n}", f"e{n}") for n in range(8)]
        threads, results = in_threads(group_commit, queued)
        wait_until_queued(group_commit, len(queued))
        # Queued last, so that they follow the originals: a redelivery and an update.
        late, late_results = in_threads(
            group_commit, [contact("c0", "late", "e0"), contact("c1", "new", "u1", "updated")]
        )
        wait_until_queued(group_commit, len(queued) + 2)
        release()
        for thread in leader + threads + late:
            thread.join(10)

    assert transactions.batches == [1, len(queued) + 2]  # the leader's own, then all the others together
    assert leader_results == [Outcome.APPLIED] and results == [Outcome.APPLIED] * 8
    assert late_results == [Outcome.DUPLICATE, Outcome.APPLIED]
    names = usernames(engine)
    assert names["held"] == "second" and names["c0"] == "user0" and names["c1"] == "new"
    assert log_ids(engine)[1:] == ["lead", *(f"e{n}" for n in range(8)), "u1"]


def test_one_event_the_database_refuses_fails_alone(engine):
    store = EventStore(engine)
    store.record(contact("held", "first"))
    transactions = Transactions(store)
    group_commit = GroupCommit(store)
    with refusing_username(engine, "evil"), database_held(engine, "held") as release:
        leader, _ = in_threads(group_commit, [contact("held", "second", "lead", "updated")])
        wait_until_leading(group_commit)
        queued = [contact("a", "alice", "ea"), contact("e", "evil", "ee"), contact("b", "bob", "eb")]
        threads, results = in_threads(group_commit, queued)
        wait_until_queued(group_commit, len(queued))
        release()
        for thread in leader + threads:
            thread.join(10)

    assert transactions.batches == [1, 3, 1, 1, 1]  # the leader's; the group, refused; each event alone
    assert results[0] is Outcome.APPLIED and results[2] is Outcome.APPLIED
    assert isinstance(results[1], WriteRefused)  # a 503: the sender retries it, and may meet a fixed database
    assert "ee" not in log_ids(engine) and "e" not in usernames(engine)
    assert {"ea", "eb"} <= set(log_ids(engine))


def test_an_event_that_waited_its_whole_budget_gets_its_503_without_a_write(engine):
    store = EventStore(engine, retry_budget_seconds=0.3)
    store.record(contact("held", "first"))
    group_commit = GroupCommit(store)
    with database_held(engine, "held") as release:
        leader, leader_results = in_threads(group_commit, [contact("held", "second", "lead", "updated")])
        wait_until_leading(group_commit)
        threads, results = in_threads(group_commit, [contact("q", "queued", "eq")])
        wait_until_queued(group_commit, 1)
        time.sleep(0.4)  # past the queued event's budget, while the leader still waits for the lock
        release()
        for thread in leader + threads:
            thread.join(10)

    assert isinstance(results[0], DatabaseUnavailable)
    assert "eq" not in log_ids(engine)
    assert leader_results == [Outcome.APPLIED]  # the leader's own budget had started before it waited


def test_a_lone_event_is_committed_at_once_as_a_group_of_one(store, engine):
    transactions = Transactions(store)
    assert GroupCommit(store).record(contact("solo", "one", "s1")) is Outcome.APPLIED
    assert transactions.batches == [1] and log_ids(engine) == ["s1"]


@contextlib.contextmanager
def refusing_username(engine: Engine, username: str) -> Iterator[None]:
    """Make the database itself refuse a contact row with ``username`` (a CHECK, or a trigger on SQLite)."""
    table = state_tables["contact"].name
    if engine.dialect.name == "sqlite":
        create = (
            f"CREATE TRIGGER test_refuse BEFORE INSERT ON {table} WHEN NEW.username = '{username}' "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
        drop = "DROP TRIGGER test_refuse"
    else:
        create = f"ALTER TABLE {table} ADD CONSTRAINT test_refuse CHECK (username IS NULL OR username <> '{username}')"
        drop = f"ALTER TABLE {table} DROP CONSTRAINT test_refuse"
    with engine.begin() as conn:
        conn.execute(text(create))
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(text(drop))


@pytest.mark.parametrize("count", [40])
def test_many_threads_at_once_each_get_their_own_answer(store, engine, count):
    """No lock held: whatever groups form, every event is recorded once and answered with its outcome."""
    group_commit = GroupCommit(store)
    batch = [contact(f"p{n % 10}", f"v{n}", f"p-{n}", "created" if n < 10 else "updated") for n in range(count)]
    batch += batch[:5]  # redeliveries racing their originals
    threads, results = in_threads(group_commit, batch)
    for thread in threads:
        thread.join(30)
    assert all(isinstance(result, Outcome) for result in results), results
    assert results.count(Outcome.DUPLICATE) == 5  # of each original and its redelivery, whichever came second
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(events)) == count
    assert sorted(log_ids(engine)) == sorted(f"p-{n}" for n in range(count))


def test_a_leader_lets_the_requests_ready_to_run_join_its_group(store, engine):
    """Two requests at once, neither waiting on the database: the first to lead yields Python's lock
    before it takes the queue, so the other's event, ready a moment later, shares its transaction.

    Whether the other thread is ready in time is up to the OS's scheduler, so the pair is sent 20
    times; without the yield, Python's lock never changes hands in time, and no pair shares.
    """
    transactions = Transactions(store)
    group_commit = GroupCommit(store)
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def send(event: Event) -> None:
        try:
            start.wait(timeout=10)  # the last to arrive runs on; the other is woken, to wait for the lock
            ready = time.perf_counter() + 0.02
            while time.perf_counter() < ready:  # hold the lock while the OS wakes the other thread
                pass
            group_commit.record(event)
        except BaseException as exc:
            errors.append(exc)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # longer than a pair takes: the lock changes hands only when let go
    try:
        for pair in range(20):
            threads = [
                threading.Thread(target=send, args=(contact(f"r{pair}-{n}", "ready", f"r{pair}-{n}"),))
                for n in range(2)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            assert not any(thread.is_alive() for thread in threads) and not errors, errors
    finally:
        sys.setswitchinterval(switch)
    assert sum(transactions.batches) == 40 and len(log_ids(engine)) == 40
    assert transactions.batches.count(2) >= 4, transactions.batches
