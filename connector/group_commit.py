"""Group commit: the webhook requests in flight in one worker share a transaction.

A gunicorn worker with threads has several requests in flight at once. Each hands its verified
event to :class:`GroupCommit` and waits. The first to find no transaction running becomes the
leader: it takes every event queued so far, records and applies them in arrival order in one
transaction (:meth:`EventStore.record_many`, the same code ``connector import`` uses), and gives
each waiting request its own outcome once that transaction has committed. Events that arrive
meanwhile queue for the next group, led by one of their own requests.

Nothing waits on a timer: a lone event is a group of one, committed at once, and under load a group
holds what arrived during the previous commit. Round trips, statements and WAL flushes per event
fall with the size of the group, which is where a receiver on a busy database spends its time.

What does not change:

- No request is answered before its event is committed, or after its group failed (503). A failed
  group rolled back whole, so the sender's retry of each event is applied exactly once.
- ``seq`` order per resource is apply order: a group takes its row locks and writes like any batch.
- A request that has waited its whole retry budget in the queue gets its 503 without a write.
- One event's data cannot fail the others: a group that fails on a write the database refuses for
  what it holds, or on a fault in the connector, is run again one event per transaction, each within
  its own retry budget. Any other failure (the database unreachable, read-only or full; a row locked
  elsewhere past the lock timeout) fails the group at once with 503, and the sender retries each.
- A request never waits without bound: if the database call under way hangs, the requests behind
  it get 503 once they have waited longer than any group can take.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from datetime import UTC, datetime

from connector.db.store import EventStore
from connector.errors import DatabaseUnavailable, WriteRefused
from connector.events import Event, Outcome
from connector.metrics import GROUP_SIZE

_WAITED_TOO_LONG = "the database is busy: the event waited too long to be written"


@dataclasses.dataclass(eq=False)
class _Pending:
    """One request's event, waiting for its group's transaction to end or for its turn to lead."""

    event: Event
    received_at: datetime
    deadline: float
    wake: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: bool = False
    outcome: Outcome | None = None
    error: Exception | None = None

    def settle(self, outcome: Outcome | None = None, error: Exception | None = None) -> None:
        self.outcome, self.error, self.done = outcome, error, True
        self.wake.set()


class GroupCommit:
    """Records events like :meth:`EventStore.record`, sharing transactions between threads."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._queue: deque[_Pending] = deque()
        self._leading = False
        self._lock = threading.Lock()

    def record(self, event: Event, received_at: datetime | None = None) -> Outcome:
        """Record and apply ``event``; return its outcome once the transaction holding it committed."""
        pending = _Pending(event, received_at or datetime.now(UTC), time.monotonic() + self.store.retry_budget_seconds)
        with self._lock:
            self._queue.append(pending)
            follow, self._leading = self._leading, True
        if follow and not pending.wake.wait(self._patience()):
            self._give_up(pending)
        if not pending.done:
            self._lead()
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        return pending.outcome

    def _patience(self) -> float:
        # Long enough for the group before this one and this one's own, each ending within its retry
        # budget plus one lock wait already under way, as they do unless a database call hangs.
        return self.store.retry_budget_seconds * 2 + self.store.lock_timeout_seconds + 1

    def _give_up(self, pending: _Pending) -> None:
        """A follower waited past all patience (the leader is stuck in a database call): answer 503.

        Woken meanwhile, it carries on as usual. Still queued, it leaves the queue unwritten. Taken
        into the stuck group, its event may yet be committed; the sender's retry is then a duplicate.
        """
        with self._lock:
            if pending.wake.is_set():
                return
            if pending in self._queue:
                self._queue.remove(pending)
        raise DatabaseUnavailable("the database did not answer in time")

    def _lead(self) -> None:
        """Commit everything queued (this request's event included), then hand over to the next."""
        # Let the threads of this worker that are ready to run (a request read, about to queue its
        # event) go first: the group then takes their events too. Under wrk with 4 workers, groups of
        # one fell from half of all transactions to a fifth, and the mean group grew from 2.1 to 2.9
        # events (docs/performance.md). A lone event loses only a system call.
        time.sleep(0)
        with self._lock:
            group = list(self._queue)
            self._queue.clear()
        try:
            self._commit(group)
        finally:
            for pending in group:
                if not pending.done:  # an error in flight: never leave a request waiting
                    pending.settle(error=DatabaseUnavailable("the write was interrupted"))
            with self._lock:
                if self._queue:
                    self._queue[0].wake.set()  # still leading: the turn passes to that request
                else:
                    self._leading = False

    def _commit(self, group: list[_Pending]) -> None:
        """Record ``group`` in one transaction and settle every request in it, whatever happens."""
        now = time.monotonic()
        live = []
        for pending in group:
            if pending.deadline <= now:
                pending.settle(error=DatabaseUnavailable(_WAITED_TOO_LONG))
            else:
                live.append(pending)
        if not live:
            return
        GROUP_SIZE.observe(len(live))
        try:
            outcomes = self.store.record_many(
                [(p.event, p.received_at) for p in live], deadline=min(p.deadline for p in live)
            )
        except Exception as exc:
            if len(live) > 1 and _may_be_one_events(exc):
                # One event the database refuses, or that sets off a fault in the connector, must
                # not fail the others: run them one at a time.
                self._commit_one_by_one(live)
            else:
                # The database as a whole is down or busy: every event waits for the sender's retry.
                for pending in live:
                    pending.settle(error=exc if len(live) == 1 else _copy(exc))
        else:
            for pending, outcome in zip(live, outcomes, strict=True):
                pending.settle(outcome)

    def _commit_one_by_one(self, group: list[_Pending]) -> None:
        for position, pending in enumerate(group):
            if pending.deadline <= time.monotonic():
                pending.settle(error=DatabaseUnavailable(_WAITED_TOO_LONG))
                continue
            try:
                [outcome] = self.store.record_many([(pending.event, pending.received_at)], deadline=pending.deadline)
            except Exception as exc:
                pending.settle(error=exc)
                if not _may_be_one_events(exc):  # the database as a whole: the rest would fail alike
                    for rest in group[position + 1 :]:
                        rest.settle(error=_copy(exc))
                    return
            else:
                pending.settle(outcome)


def _may_be_one_events(exc: Exception) -> bool:
    """Whether ``exc`` may be down to one event of a group rather than the database as a whole."""
    return isinstance(exc, WriteRefused) or not isinstance(exc, DatabaseUnavailable)


def _copy(exc: Exception) -> Exception:
    """An exception like ``exc`` for another request: one object raised in many threads would
    collect all their tracebacks."""
    copy = type(exc)(str(exc))
    copy.__cause__ = exc.__cause__
    return copy
