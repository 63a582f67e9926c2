"""Backfill and export: the change log as JSON lines, in and out.

A line is one Coherent webhook envelope ``{"id", "type", "payload"}``, optionally with
``"received_at"``: an ISO 8601 instant with a UTC offset. ``export`` writes every event with the
``received_at`` it was recorded with, and ``import`` honours it, because the ordering rules use it
(a delete's ``_deleted_at`` is its ``received_at``). A line without one is taken as received at the
moment its batch is imported.

Import goes through :meth:`EventStore.record_many`, so a backfilled event obeys the same ordering
rules and writes the same change-log row as a live delivery, and an event id already in the log is a
duplicate that writes nothing. That makes an import idempotent: every batch commits whole or not at
all, so rerunning a file, or running it again after a crash, skips what was already committed and
applies the rest.

A file is loaded by several processes at once on a server database. The check that reads every line
first also assigns each line to a loader by its resource id, so all events of one row go to one
loader and are applied in file order; only rows, and their ``seq`` order, are interleaved.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import itertools
import multiprocessing
import os
import queue
import signal
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError

from connector.config import Config
from connector.db.engine import create_engine_for, normalize_url
from connector.db.schema import events
from connector.db.store import EventStore
from connector.db.types import json_dumps
from connector.errors import ConnectorError, DatabaseUnavailable, FileChanged, ImportFailed, InvalidEnvelope
from connector.events import Event, decode_json, event_from_document

RECEIVED_AT = "received_at"
# Events per transaction. Each batch has a fixed cost (its statements, staging tables and commit), so
# larger batches load faster (docs/performance.md has the figures).
DEFAULT_BATCH_SIZE = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    """One non-blank line of a JSON-lines file: its event, or the problem that stops it being one."""

    number: int
    event: Event | None = None
    received_at: datetime | None = None
    problem: str | None = None


def _received_at(value: Any) -> datetime:
    if not isinstance(value, str):
        raise InvalidEnvelope("'received_at' must be an ISO 8601 string")
    try:
        instant = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidEnvelope(f"'received_at' is not an ISO 8601 instant: {value[:40]!r}") from exc
    if instant.tzinfo is None:
        raise InvalidEnvelope("'received_at' must carry a UTC offset, e.g. +00:00")
    return instant.astimezone(UTC)


def parse_line(number: int, text: bytes) -> Line:
    """Parse one line as an envelope with an optional ``received_at``; a bad line names its problem."""
    try:
        document = decode_json(text)
        event = event_from_document(document)
        received_at = _received_at(document[RECEIVED_AT]) if RECEIVED_AT in document else None
    except InvalidEnvelope as exc:
        return Line(number, problem=str(exc))
    return Line(number, event, received_at)


def read_lines(path: Path) -> Iterator[Line]:
    """Every non-blank line of ``path``, numbered from 1 as an editor numbers them."""
    with path.open("rb") as fh:
        for number, text in enumerate(fh, start=1):
            if text.strip():
                yield parse_line(number, text)


# In a load plan, a line no loader takes: a blank or bad one.
SKIP = 255
MAX_LOADERS = SKIP - 1


def loader_of(event: Event, loaders: int) -> int:
    """Which of ``loaders`` processes loads ``event``: one resource id's events all go to the same one."""
    return zlib.crc32(event.resource_id.encode()) % loaders


@dataclasses.dataclass
class Check:
    """What checking a file found: how many non-blank lines it has, its bad ones, and its load plan."""

    lines: int = 0
    bad: int = 0
    first_bad: list[Line] = dataclasses.field(default_factory=list)  # up to ``keep``, in file order
    # One byte per line of the file, blank ones included: the loader that takes it, or SKIP.
    plan: bytearray = dataclasses.field(default_factory=bytearray)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Collect reference cycles less often while bulk work runs, and never look at what exists already.

    A batch keeps tens of thousands of parsed documents alive, and Python's collector, run every 700
    new objects, kept walking them and every module's objects: 15-20% of an import's CPU. Parsed JSON
    holds no cycles, so reference counting frees it all the same.
    """
    threshold, frozen_already = gc.get_threshold(), gc.get_freeze_count() > 0
    if not frozen_already:
        gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        if not frozen_already:  # a caller's own freeze is theirs to undo
            gc.unfreeze()


def _check_range(path: Path, start: int, end: int, keep: int, loaders: int) -> tuple[int, Check]:
    """Check the lines that begin in bytes ``[start, end)`` of ``path`` (``start`` begins a line).

    Returns how many lines the range holds, blank ones included, and what checking found, with line
    numbers counted from the range's first line as 1.
    """
    check = Check()
    number = 0
    with fewer_collections(), path.open("rb") as fh:
        fh.seek(start)
        position = start
        while position < end and (text := fh.readline()):
            position += len(text)
            number += 1
            if not text.strip():
                check.plan.append(SKIP)
                continue
            check.lines += 1
            line = parse_line(number, text)
            if line.event is None:
                check.plan.append(SKIP)
                check.bad += 1
                if len(check.first_bad) < keep:
                    check.first_bad.append(line)
            else:
                check.plan.append(loader_of(line.event, loaders))
    return number, check


def _line_starts(path: Path, parts: int) -> list[int]:
    """``parts`` + 1 byte offsets, each the start of a line (or the end), cutting ``path`` evenly."""
    size = path.stat().st_size
    starts = [0]
    with path.open("rb") as fh:
        for part in range(1, parts):
            cut = size * part // parts
            if cut > starts[-1]:
                fh.seek(cut)
                fh.readline()  # on to the start of the next line
                starts.append(fh.tell())
            else:  # the line read for an earlier cut runs past this one: this part is empty
                starts.append(starts[-1])
    return [*starts, size]


def _cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity`` exists on Linux only)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Loaders and checkers are forked where the platform can: they start at once, with this process's
# modules already imported, and each opens its own connections.
_FORK = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


# A file is checked in parallel parts of at least this many bytes each (about 30,000 events).
_PART_BYTES = 8 << 20


def check_file(
    path: Path,
    *,
    keep: int = 20,
    part_bytes: int = _PART_BYTES,
    processes: int | None = None,
    loaders: int = 1,
) -> Check:
    """Check every line of ``path`` as :func:`read_lines` parses it, in ``processes`` processes at once
    (default: one per core), each taking a part of at least ``part_bytes``, and plan its load by
    ``loaders`` processes.

    Keeps the first ``keep`` bad lines, with their line numbers in the file.
    """
    if not 1 <= loaders <= MAX_LOADERS:
        raise ValueError(f"loaders must be from 1 to {MAX_LOADERS}")
    processes = processes or _cores()
    path = path.resolve()  # a process pool's workers may not share this one's working directory
    parts = max(1, min(processes, path.stat().st_size // part_bytes))
    starts = _line_starts(path, parts)
    ranges = [(path, start, end, keep, loaders) for start, end in itertools.pairwise(starts)]
    if parts == 1:
        results = [_check_range(*ranges[0])]
    else:
        try:
            with ProcessPoolExecutor(
                parts, mp_context=_FORK, initializer=_die_with_parent, initargs=(os.getpid(),)
            ) as pool:
                results = list(pool.map(_check_range, *zip(*ranges, strict=True)))
        except BrokenProcessPool:
            raise ImportFailed(_DIED) from None
    check, offset = Check(), 0
    for count, part in results:
        check.lines += part.lines
        check.bad += part.bad
        room = keep - len(check.first_bad)
        check.first_bad += [dataclasses.replace(line, number=line.number + offset) for line in part.first_bad[:room]]
        check.plan += part.plan
        offset += count
    return check


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


def planned_lines(path: Path, plan: bytes, loader: int, loaders: int) -> Iterator[Line]:
    """The lines of ``path`` that ``plan`` (made for ``loaders``) gives to ``loader``, in file order.

    Raises :class:`FileChanged` if the file no longer holds what checking it found.
    """
    number = 0
    with path.open("rb") as fh:
        for number, text in enumerate(fh, start=1):
            if number > len(plan):
                break
            if plan[number - 1] == loader:
                line = parse_line(number, text)
                if line.event is None or loader_of(line.event, loaders) != loader:
                    break
                yield line
        else:
            if number == len(plan):
                return
    raise FileChanged(
        f"{path} changed while it was imported (at line {number}); the batches committed so far stay: "
        "rerun the import to complete it"
    )


class _Stopped(Exception):
    """Another loader failed: this one stops after the batches it has committed."""


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel end this process when the import's own process ends, however it ends.

    A worker left behind would go on writing unseen, and then wait for work for ever. An uncommitted
    batch is rolled back by the server when the connection drops; the import is idempotent.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it ended before that took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1

# Set in each loader process by _start_loader: where it reports progress, and the signal to stop.
_progress: Any = None
_stop: Any = None


def _start_loader(parent: int, progress: Any, stop: Any) -> None:
    global _progress, _stop  # one process's own channel to its parent
    _die_with_parent(parent)
    _progress, _stop = progress, stop


def _report(size: int) -> None:
    _progress.put(size)
    if _stop.is_set():
        raise _Stopped


def _load(
    config: Config,
    path: Path,
    plan: bytes,
    loader: int,
    loaders: int,
    batch_size: int,
    on_batch: Callable[[int], None],
) -> Counter[str]:
    """Load ``loader``'s lines of ``path`` through a store of its own."""
    store = EventStore(create_engine_for(config), retry_attempts=config.retry_attempts)
    outcomes: Counter[str] = Counter()
    lines = planned_lines(path, plan, loader, loaders)
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


# Loaders by default: one per core, up to this many (each holds a database connection).
_DEFAULT_MAX_LOADERS = 8


def loaders_for(config: Config, requested: int | None = None) -> int:
    """How many processes load a file: ``requested``, or one per core up to 8; on SQLite, whose
    writers take turns at one lock, always one."""
    if normalize_url(config.database_url).get_backend_name() == "sqlite":
        return 1
    return max(1, min(requested or min(_cores(), _DEFAULT_MAX_LOADERS), MAX_LOADERS))


def import_file(
    config: Config,
    path: Path,
    check: Check,
    loaders: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] = lambda size: None,
) -> Counter[str]:
    """Load the good lines of ``path`` by ``loaders`` processes, as ``check.plan`` (made by
    :func:`check_file` for as many loaders) assigns them; return the count per outcome.

    If a loader fails or dies, the others stop after their current batch and the failure is raised
    (:class:`ImportFailed` for a loader that died): what was committed stays, and a rerun completes it.
    """
    if loaders == 1:
        return _load(config, path, check.plan, 0, 1, batch_size, on_batch)
    context = _FORK or multiprocessing.get_context()
    progress, stop = context.Queue(), context.Event()
    outcomes: Counter[str] = Counter()
    reported = 0
    initargs = (os.getpid(), progress, stop)
    with ProcessPoolExecutor(loaders, mp_context=_FORK, initializer=_start_loader, initargs=initargs) as pool:
        futures = [
            pool.submit(_load_apart, config, path, check.plan, n, loaders, batch_size, _report) for n in range(loaders)
        ]
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
            raise ImportFailed(_DIED) from None
    loaded = sum(outcomes.values())
    if loaded > reported:  # the last reports may still be in the queue's pipe
        on_batch(loaded - reported)
    return outcomes


_DIED = (
    "a process of the import ended without finishing (killed, or out of memory?); the batches committed "
    "so far stay: rerun the import to complete it"
)


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
