"""Bulk import: the connector's batch path against dlt, loading the same events into PostgreSQL.

    .venv/bin/python bench/bulk_import.py                    # 100,000 events, one run each
    .venv/bin/python bench/bulk_import.py --events 20000 --rounds 2

The events (a realistic mix of the five resources and three actions) are written once to a JSON-lines
file of envelopes, the format ``connector import`` reads. Each run loads that file into a database of
its own, end to end: reading and parsing the file, creating the tables, loading, committing.

- connector: ``connector migrate`` then ``connector import FILE`` in a subprocess when the installed
  connector has that command; otherwise ``EventStore.record_many`` in batches in this process (the
  path ``connector import`` is built on). Either way every ordering rule is honoured.
- dlt: one pipeline run with an append table for the events and a ``merge`` table per resource with
  primary key ``id`` (dlt keeps the last row per id of a load and knows no ordering rules).

With ``--rounds`` above 1 the two alternate (connector, dlt, dlt, connector, ...) and the median of
each is taken. Run time is bounded by ``--timeout`` per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# dlt reports anonymous usage over the network unless told not to; this machine has no network.
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")

from sqlalchemy import text
from sqlalchemy.engine import make_url

from bench import common

BATCH_SIZE = 1000
CONNECTOR = Path(sys.executable).parent / "connector"


def has_import_command() -> bool:
    """Whether the installed ``connector`` has the ``import`` command (issue 5)."""
    result = subprocess.run([str(CONNECTOR), "import", "--help"], capture_output=True, timeout=60, check=False)
    return result.returncode == 0


def read_envelopes(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as fh:
        for line in fh:
            yield json.loads(line)


def load_with_connector_command(url: str, path: Path, timeout: float, batch_size: int | None) -> str:
    timings = []
    for args in (["migrate"], ["import", str(path)]):
        if args[0] == "import" and batch_size:
            args += ["--batch-size", str(batch_size)]
        started = time.perf_counter()
        result = subprocess.run(
            [str(CONNECTOR), "--database-url", url, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        timings.append(f"{args[0]} {time.perf_counter() - started:.1f} s")
        if result.returncode != 0:
            raise RuntimeError(f"connector {args[0]} failed ({result.returncode}): {result.stderr[-2000:]}")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return f"{', '.join(timings)}; {summary.split(': ', 1)[-1]}"


def load_with_record_many(url: str, path: Path) -> str:
    from connector.config import Config
    from connector.db.engine import create_engine_for
    from connector.db.store import EventStore
    from connector.events import parse_event

    common.migrate(url)
    engine = create_engine_for(Config(database_url=url))
    store = EventStore(engine)
    outcomes: dict[str, int] = {}
    try:
        with path.open("rb") as fh:
            batch = []
            for line in fh:
                batch.append((parse_event(line), datetime.now(UTC)))
                if len(batch) == BATCH_SIZE:
                    for outcome in store.record_many(batch):
                        outcomes[outcome.value] = outcomes.get(outcome.value, 0) + 1
                    batch = []
            if batch:
                for outcome in store.record_many(batch):
                    outcomes[outcome.value] = outcomes.get(outcome.value, 0) + 1
    finally:
        engine.dispose()
    return ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items()))


def load_with_dlt(url: str, path: Path, pipelines_dir: Path) -> str:
    import dlt

    def events() -> Iterator[dict[str, Any]]:
        for envelope in read_envelopes(path):
            resource, _, action = envelope["type"].partition(".")
            yield {
                "event_id": envelope["id"],
                "type": envelope["type"],
                "resource": resource,
                "action": action,
                "resource_id": envelope["payload"]["id"],
                "payload": envelope["payload"],
                "received_at": datetime.now(UTC),
            }

    def state(resource: str) -> Any:
        def rows() -> Iterator[dict[str, Any]]:
            for envelope in read_envelopes(path):
                name, _, action = envelope["type"].partition(".")
                if name == resource:
                    yield {**envelope["payload"], "_last_action": action, "_event_id": envelope["id"]}

        return dlt.resource(rows, name=resource, write_disposition="merge", primary_key="id")

    @dlt.source
    def coherent() -> list[Any]:
        log = dlt.resource(
            events, name="events", write_disposition="append", columns={"payload": {"data_type": "json"}}
        )
        return [log, *(state(resource) for resource in common.RESOURCE_WEIGHTS)]

    parsed = make_url(url)
    # dlt insists on a password; the local server trusts loopback and ignores it.
    credentials = f"postgresql://{parsed.username}:{parsed.password or 'unused'}@{parsed.host}:{parsed.port or 5432}/{parsed.database}"
    pipeline = dlt.pipeline(
        pipeline_name=f"bench_{parsed.database}",
        destination=dlt.destinations.postgres(credentials=credentials),
        dataset_name="coherent",
        pipelines_dir=str(pipelines_dir),
    )
    info = pipeline.run(coherent())
    info.raise_on_failed_jobs()
    return f"{len(info.load_packages)} load package(s)"


def count_rows(url: str, tool: str) -> str:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    tables = ["coherent_events", *(f"coherent_{r}s" for r in common.RESOURCE_WEIGHTS)]
    if tool == "dlt":
        tables = ["coherent.events", *(f"coherent.{r}" for r in common.RESOURCE_WEIGHTS)]
    try:
        with engine.connect() as conn:
            counts = [conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in tables]  # noqa: S608
    finally:
        engine.dispose()
    return f"events {counts[0]}, state rows {sum(counts[1:])}"


def run_once(
    tool: str, path: Path, events: int, use_command: bool, timeout: float, batch_size: int | None
) -> dict[str, Any]:
    with common.bench_database(f"bulk_{tool}") as url, tempfile.TemporaryDirectory() as pipelines_dir:
        started = time.perf_counter()
        if tool == "dlt":
            detail = load_with_dlt(url, path, Path(pipelines_dir))
        elif use_command:
            detail = load_with_connector_command(url, path, timeout, batch_size)
        else:
            detail = load_with_record_many(url, path)
        seconds = time.perf_counter() - started
        rows = count_rows(url, tool)
    figures = {"tool": tool, "seconds": seconds, "events_per_second": events / seconds, "load": common.machine_load()}
    print(
        f"{tool:9} {seconds:7.1f} s  {events / seconds:8.0f} events/s  ({rows}; {detail})  load {figures['load']}",
        flush=True,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed for one run")
    parser.add_argument(
        "--connector-path",
        choices=("auto", "command", "record_many"),
        default="auto",
        help="auto: `connector import` when it exists, else EventStore.record_many",
    )
    parser.add_argument("--batch-size", type=int, help="passed to `connector import` (default: its own)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()

    use_command = args.connector_path == "command" or (args.connector_path == "auto" and has_import_command())
    how = "connector import FILE" if use_command else f"EventStore.record_many, batches of {BATCH_SIZE}"
    common.banner(f"bulk import of {args.events} events: connector ({how}) against dlt")
    with tempfile.TemporaryDirectory(prefix="coherent_bench_") as directory:
        path = Path(directory) / "events.jsonl"
        with path.open("wb") as fh:
            for envelope in common.EventFactory(seed=5).take(args.events):
                fh.write(common.encode(envelope) + b"\n")
        runs: dict[str, list[dict[str, Any]]] = {"connector": [], "dlt": []}
        for round_number in range(args.rounds):
            order = ("connector", "dlt") if round_number % 2 == 0 else ("dlt", "connector")
            for tool in order:
                runs[tool].append(run_once(tool, path, args.events, use_command, args.timeout, args.batch_size))
    medians = {tool: statistics.median(r["seconds"] for r in figures) for tool, figures in runs.items()}
    print(
        f"== connector {args.events / medians['connector']:.0f} events/s, dlt {args.events / medians['dlt']:.0f} "
        f"events/s: the connector is {medians['dlt'] / medians['connector']:.1f}x as fast (target: 5x)"
    )
    if args.json:
        args.json.write_text(json.dumps({"events": args.events, "connector_path": how, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
