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
- One event the database refuses for what it is (not a transient error) cannot fail the others:
  a group that fails that way is run again one event per transaction.
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
        if follow:
            # Woken once: when the group holding this event has ended, or when the leader before
            # hands over to this request, the first of the next group.
            pending.wake.wait()
        if not pending.done:
            self._lead()
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        return pending.outcome

    def _lead(self) -> None:
        """Commit everything queued (this request's event included), then hand over to the next."""
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
            if len(live) > 1 and (isinstance(exc, WriteRefused) or not isinstance(exc, DatabaseUnavailable)):
                # One event the database refuses, or that sets off a fault in the connector, must
                # not fail the others: run them alone, so only its own request gets the error.
                self._commit_one_by_one(live)
            else:
                # Busy or unreachable: every event waits for the sender's retry. Each request raises
                # an exception of its own; one object raised in many threads would collect all their
                # tracebacks.
                for pending in live:
                    pending.settle(error=exc if len(live) == 1 else type(exc)(str(exc)))
        else:
            for pending, outcome in zip(live, outcomes, strict=True):
                pending.settle(outcome)

    def _commit_one_by_one(self, group: list[_Pending]) -> None:
        for pending in group:
            try:
                [outcome] = self.store.record_many([(pending.event, pending.received_at)], deadline=pending.deadline)
            except Exception as exc:
                pending.settle(error=exc)
            else:
                pending.settle(outcome)
