"""Backfill and export: the change log as JSON lines, in and out.

``export`` writes every event with the ``received_at`` it was recorded with, and ``import`` honours
it, because the ordering rules use it (a delete's ``_deleted_at`` is its ``received_at``). A line
without one is taken as received at the moment its batch is imported.

Import goes through :meth:`EventStore.record_many`, so a backfilled event obeys the same ordering
rules and writes the same change-log row as a live delivery, and an event id already in the log is a
duplicate that writes nothing. That makes an import idempotent: every batch commits whole or not at
all, so rerunning a file, or running it again after a crash, skips what was already committed and
applies the rest.

On a server database a file is loaded by several processes at once, each taking whole buckets of the
plan that :func:`connector.backfill.check_file` made: all events of one row go to one loader and are
applied in file order; only rows, and their ``seq`` order, are interleaved.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError

from connector.backfill import (
    FORK,
    MAX_LOADERS,
    PROCESS_DIED,
    RECEIVED_AT,
    Check,
    Line,
    cores,
    die_with_parent,
    fewer_collections,
    planned_lines,
)
from connector.config import Config
from connector.db.engine import create_engine_for, normalize_url
from connector.db.schema import events
from connector.db.store import EventStore
from connector.db.types import json_dumps
from connector.errors import ConnectorError, DatabaseUnavailable, ImportFailed

# Events per transaction. Each batch has a fixed cost (its statements, staging tables and commit), so
# larger batches load faster (docs/performance.md has the figures).
DEFAULT_BATCH_SIZE = 10_000


def import_lines(
    store: EventStore,
    lines: Iterable[Line],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] = lambda size: None,
    into: Counter[str] | None = None,
) -> Counter[str]:
    """Record the good lines in batches of ``batch_size``, in file order; return the count per outcome
    (added to ``into`` as each batch commits, where given).

    Bad lines are left out; the caller decides beforehand whether any may be.
    """
    outcomes: Counter[str] = Counter() if into is None else into
    batch: list[Line] = []

    def flush() -> None:
        now = datetime.now(UTC)
        deliveries = [(line.event, line.received_at or now) for line in batch if line.event is not None]
        outcomes.update(outcome.value for outcome in store.record_many(deliveries))
        on_batch(len(batch))
        batch.clear()

    for line in lines:
        batch.append(line)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return outcomes


class _Stopped(Exception):
    """Another loader failed: this one stops after the batches it has committed."""


# Set in each loader process by _start_loader: where it reports progress, and the signal to stop.
_progress: Any = None
_stop: Any = None
# The file's check (its plan and a CRC-32 per line: 5 bytes a line), given to each loader process when
# it starts: where processes fork, the loader shares the parent's copy instead of unpickling its own.
_check: Check | None = None


def _start_loader(parent: int, progress: Any, stop: Any, check: Check) -> None:
    global _progress, _stop, _check  # one process's own channel to its parent, and the file's check
    die_with_parent(parent)
    _progress, _stop, _check = progress, stop, check


def _report(size: int) -> None:
    _progress.put(size)
    if _stop.is_set():
        raise _Stopped


def _load(
    config: Config,
    path: Path,
    check: Check,
    loader: int,
    loaders: int,
    batch_size: int,
    on_batch: Callable[[int], None],
) -> Counter[str]:
    """Load ``loader``'s lines of ``path`` through a store of its own."""
    store = EventStore(create_engine_for(config), retry_attempts=config.retry_attempts)
    outcomes: Counter[str] = Counter()
    lines = planned_lines(path, check, loader, loaders)
    try:
        with fewer_collections():
            import_lines(store, lines, batch_size=batch_size, on_batch=on_batch, into=outcomes)
    except _Stopped:
        pass
    finally:
        store.engine.dispose()
    return outcomes


def _load_apart(*args: Any) -> Counter[str]:
    """:func:`_load` in a loader process, whose errors must reach the parent: the connector's own
    pickle, anything else (a driver's error holding a lock, say) is passed on by name."""
    try:
        return _load(*args)
    except ConnectorError:
        raise
    except Exception as exc:
        raise ImportFailed(f"a loader failed: {type(exc).__name__}: {exc}"[:500]) from None


def _load_started(config: Config, path: Path, loader: int, *args: Any) -> Counter[str]:
    """:func:`_load_apart` with the check this loader process was started with."""
    assert _check is not None, "a loader process starts with _start_loader"
    return _load_apart(config, path, _check, loader, *args)


# Loaders by default: one per core, up to this many (each holds a database connection).
_DEFAULT_MAX_LOADERS = 8


def loaders_for(config: Config, requested: int | None = None) -> int:
    """How many processes load a file: ``requested``, or one per core up to 8; on SQLite, whose
    writers take turns at one lock, always one."""
    if normalize_url(config.database_url).get_backend_name() == "sqlite":
        return 1
    return max(1, min(requested or min(cores(), _DEFAULT_MAX_LOADERS), MAX_LOADERS))


def import_file(
    config: Config,
    path: Path,
    check: Check,
    loaders: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] = lambda size: None,
) -> Counter[str]:
    """Load the good lines of ``path`` by ``loaders`` processes, each taking whole buckets of
    ``check.plan`` (made by :func:`check_file`); return the count per outcome.

    If a loader fails or dies, the others stop after their current batch and the failure is raised
    (:class:`ImportFailed` for a loader that died): what was committed stays, and a rerun completes it.
    """
    if loaders == 1:
        return _load(config, path, check, 0, 1, batch_size, on_batch)
    context = FORK or multiprocessing.get_context()
    progress, stop = context.Queue(), context.Event()
    outcomes: Counter[str] = Counter()
    reported = 0
    initargs = (os.getpid(), progress, stop, check)
    with ProcessPoolExecutor(loaders, mp_context=context, initializer=_start_loader, initargs=initargs) as pool:
        futures = [pool.submit(_load_started, config, path, n, loaders, batch_size, _report) for n in range(loaders)]
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
                if any(future.exception() for future in done):
                    stop.set()
                with contextlib.suppress(queue.Empty):
                    while True:
                        size = progress.get_nowait()
                        reported += size
                        on_batch(size)
        finally:
            stop.set()
        try:
            for future in futures:
                outcomes.update(future.result())
        except BrokenProcessPool:
            raise ImportFailed(PROCESS_DIED) from None
    loaded = sum(outcomes.values())
    if loaded > reported:  # the last reports may still be in the queue's pipe
        on_batch(loaded - reported)
    return outcomes


def export_lines(engine: Engine, out: TextIO, *, since: datetime | None = None) -> int:
    """Write the change log (events received at or after ``since``) in ``seq`` order; return the count."""
    query = select(events.c.event_id, events.c.type, events.c.payload, events.c.received_at).order_by(events.c.seq)
    if since is not None:
        query = query.where(events.c.received_at >= since)
    written = 0
    try:
        with engine.connect() as conn:
            for row in conn.execution_options(yield_per=1000).execute(query):
                document = {
                    "id": row.event_id,
                    "type": row.type,
                    "payload": row.payload,
                    RECEIVED_AT: row.received_at.isoformat(),
                }
                out.write(json_dumps(document) + "\n")
                written += 1
    except DBAPIError as exc:
        raise DatabaseUnavailable(type(exc.orig or exc).__name__) from exc
    return written
