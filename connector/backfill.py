"""Reading a backfill file: checking every line, and planning its load. No database here.

A line is one Coherent webhook envelope ``{"id", "type", "payload"}``, optionally with
``"received_at"``: an ISO 8601 instant with a UTC offset. Every line is checked before anything is
written, a large file in parts, one process per core. The check also plans the load: each line gets
a bucket by its resource id, so all events of one row share a bucket; a loader takes whole buckets
(``connector.db.transfer``), and so applies each row's events in file order. The check keeps each
line's CRC-32 too: a loader reads only lines unchanged since, with a faster decoder.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import dataclasses
import gc
import itertools
import multiprocessing
import os
import signal
import sys
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from connector.errors import FileChanged, ImportFailed, InvalidEnvelope
from connector.events import Event, decode_json, event_from_document

RECEIVED_AT = "received_at"


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


def parse_line(number: int, text: bytes, decode: Callable[[bytes], Any] = decode_json) -> Line:
    """Parse one line as an envelope with an optional ``received_at``; a bad line names its problem."""
    try:
        document = decode(text)
        event = event_from_document(document)
        received_at = _received_at(document[RECEIVED_AT]) if RECEIVED_AT in document else None
    except InvalidEnvelope as exc:
        return Line(number, problem=str(exc))
    return Line(number, event, received_at)


# A load plan gives each line one of BUCKETS buckets by its resource id, or SKIP: a blank or bad line.
BUCKETS = 254
SKIP = 255
MAX_LOADERS = BUCKETS


def bucket_of(event: Event) -> int:
    """The plan's bucket for ``event``: all of one resource id's events share one."""
    return zlib.crc32(event.resource_id.encode()) % BUCKETS


def loader_of(bucket: int, loaders: int) -> int:
    """Which of ``loaders`` processes loads the lines of ``bucket``: each takes whole buckets."""
    return bucket % loaders


@dataclasses.dataclass
class Check:
    """What checking a file found: how many non-blank lines it has, its bad ones, and its load plan."""

    lines: int = 0
    bad: int = 0
    first_bad: list[Line] = dataclasses.field(default_factory=list)  # up to ``keep``, in file order
    # One byte per line of the file, blank ones included: its bucket, or SKIP.
    plan: bytearray = dataclasses.field(default_factory=bytearray)
    # The CRC-32 of every line of the file, blank ones included: a loader reads only what was checked.
    crcs: array.array[int] = dataclasses.field(default_factory=lambda: array.array("I"))


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


def _check_range(path: Path, start: int, end: int, keep: int) -> tuple[int, Check]:
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
            check.crcs.append(zlib.crc32(text))
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
                check.plan.append(bucket_of(line.event))
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


def cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity`` exists on Linux only)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Loaders and checkers are forked where the platform can: they start at once, with this process's
# modules already imported, and each opens its own connections.
FORK = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


# A file is checked in parallel parts of at least this many bytes each (about 30,000 events).
_PART_BYTES = 8 << 20


def check_file(
    path: Path,
    *,
    keep: int = 20,
    part_bytes: int = _PART_BYTES,
    processes: int | None = None,
    meanwhile: Callable[[], None] = lambda: None,
) -> Check:
    """Check every non-blank line of ``path`` with :func:`parse_line`, in ``processes`` processes at once
    (default: one per core), each taking a part of at least ``part_bytes``, and plan its load.

    Keeps the first ``keep`` bad lines, with their line numbers in the file. Runs ``meanwhile`` in
    this process while the parts are checked (before, for a file of one part).
    """
    processes = processes or cores()
    path = path.resolve()  # a process pool's workers may not share this one's working directory
    parts = max(1, min(processes, path.stat().st_size // part_bytes))
    starts = _line_starts(path, parts)
    ranges = [(path, start, end, keep) for start, end in itertools.pairwise(starts)]
    if parts == 1:
        meanwhile()
        results = [_check_range(*ranges[0])]
    else:
        try:
            with ProcessPoolExecutor(
                parts, mp_context=FORK, initializer=die_with_parent, initargs=(os.getpid(),)
            ) as pool:
                pending = pool.map(_check_range, *zip(*ranges, strict=True))
                meanwhile()
                results = list(pending)
        except BrokenProcessPool:
            raise ImportFailed(PROCESS_DIED) from None
    check, offset = Check(), 0
    for count, part in results:
        check.lines += part.lines
        check.bad += part.bad
        room = keep - len(check.first_bad)
        check.first_bad += [dataclasses.replace(line, number=line.number + offset) for line in part.first_bad[:room]]
        check.plan += part.plan
        check.crcs += part.crcs
        offset += count
    return check


# orjson reads an integer beyond 64 bits as a float; Python's decoder keeps it exact. A line with a run
# of 19 digits anywhere (an id, say) goes to Python's decoder: rare, and then merely slower. The run is
# found by turning every digit into "0" and every other byte into a space (a regex took 3 us a line).
_DIGITS_ONLY = bytes(ord("0") if chr(byte) in "0123456789" else ord(" ") for byte in range(256))
_LONG_DIGITS = b"0" * 19


def decode_checked(text: bytes) -> Any:
    """Decode a line that :func:`decode_json` has accepted, to the same value, in about half the time.

    orjson reads every document the strict check accepts as Python's decoder does, except an integer
    beyond 64 bits (a float to orjson) and a lone surrogate (which it refuses): those lines go to
    Python's decoder. orjson would not notice a duplicate key, so this is only for lines already
    checked, byte for byte.
    """
    if _LONG_DIGITS not in text.translate(_DIGITS_ONLY):
        with contextlib.suppress(orjson.JSONDecodeError):
            return orjson.loads(text)
    return decode_json(text)


def planned_lines(path: Path, check: Check, loader: int, loaders: int) -> Iterator[Line]:
    """The lines of ``path`` whose buckets in ``check.plan`` fall to ``loader`` of ``loaders``, in file order.

    Raises :class:`FileChanged` if the file no longer holds what checking it found: any line whose
    CRC-32 differs (a blank or bad line too, which may have become an event), or more or fewer lines.
    """
    number, plan, crcs = 0, check.plan, check.crcs
    with path.open("rb") as fh:
        for number, text in enumerate(fh, start=1):
            if number > len(plan) or zlib.crc32(text) != crcs[number - 1]:
                break
            bucket = plan[number - 1]
            if bucket != SKIP and loader_of(bucket, loaders) == loader:
                # Checked already, and unchanged since: decoded by the fast decoder.
                line = parse_line(number, text, decode_checked)
                if line.event is None or bucket_of(line.event) != bucket:
                    break
                yield line
        else:
            if number == len(plan):
                return
    raise FileChanged(
        f"{path} changed while it was imported (at line {number}); the batches committed so far stay: "
        "rerun the import to complete it"
    )


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel end this process when the import's own process ends, however it ends.

    A worker left behind would go on writing unseen, and then wait for work for ever. An uncommitted
    batch is rolled back by the server when the connection drops; the import is idempotent.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it ended before that took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1

PROCESS_DIED = (
    "a process of the import ended without finishing (killed, or out of memory?); the batches committed "
    "so far stay: rerun the import to complete it"
)
