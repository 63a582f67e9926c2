"""HTTP ingest: the connector against a minimal durable receiver, under wrk, in alternating runs.

    .venv/bin/python bench/ingest.py                      # 1, 2 and 4 workers, 3 rounds of 10 s each
    .venv/bin/python bench/ingest.py --workers 2 --rounds 1 --seconds 3     # a quick check
    .venv/bin/python bench/ingest.py --database sqlite --workers 4          # the SQLite default

For each worker count both receivers run under gunicorn on their own PostgreSQL database, and wrk
(16 connections, distinct pre-signed events of a realistic mix) drives them in turn: minimal,
connector, connector, minimal, ... so that a change in the machine's load hits both alike. Each run
starts on emptied tables. The ratio connector/minimal is taken per round; its median is reported.
Total run time is bounded: about workers x rounds x 2 x (seconds + 3) seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from sqlalchemy import text

from bench import common
from bench.minimal_receiver import TABLE, create_table
from connector.config import Config
from connector.db.engine import create_engine_for
from connector.db.schema import metadata

# Fast enough for any receiver on two cores, so that no event is sent twice within a run.
EVENTS_PER_SECOND_CEILING = 8000


class Receiver:
    """One receiver under test: how to start it, empty its tables and count what it stored."""

    def __init__(
        self,
        name: str,
        app: str,
        env: dict[str, str],
        database_url: str,
        pythonpath: Path | None = None,
        threads: int = 1,
    ):
        self.name, self.app, self.env, self.pythonpath, self.threads = name, app, env, pythonpath, threads
        self.engine = create_engine_for(Config(database_url=database_url))
        self.server: common.Server | None = None

    def start(self, workers: int) -> None:
        self.server = common.Server(self.app, workers, self.env, self.pythonpath, self.threads)

    def stop(self) -> None:
        if self.server:
            self.server.stop()
        self.engine.dispose()

    def empty(self) -> None:
        with self.engine.begin() as conn:
            if self.name == "minimal":
                conn.execute(text(f"TRUNCATE {TABLE}"))
            elif conn.dialect.name == "postgresql":
                names = ", ".join(table.name for table in metadata.sorted_tables)
                conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))
            else:
                for table in reversed(metadata.sorted_tables):
                    conn.execute(table.delete())

    def stored(self) -> int:
        table = TABLE if self.name == "minimal" else "coherent_events"
        with self.engine.connect() as conn:
            return conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()  # noqa: S608


def connector_receiver(url: str, threads: int = Config.threads) -> Receiver:
    env = {"CONNECTOR_DATABASE_URL": url, "CONNECTOR_WEBHOOK_SECRETS": common.SECRET, "CONNECTOR_LOG_LEVEL": "warning"}
    return Receiver("connector", "connector.wsgi:app", env, url, threads=threads)


def minimal_receiver(url: str, round_trips: int = 1, threads: int = 1) -> Receiver:
    dsn = common.libpq_dsn(url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_table(conn)
    env = {"BENCH_SECRET": common.SECRET, "BENCH_DSN": dsn, "BENCH_ROUND_TRIPS": str(round_trips)}
    return Receiver("minimal", "minimal_receiver:app", env, url, pythonpath=common.BENCH_DIR, threads=threads)


def measure(receiver: Receiver, events_file: Path, seconds: float) -> dict[str, Any]:
    receiver.empty()
    assert receiver.server is not None
    figures = common.run_wrk(receiver.server.url, events_file, seconds=seconds)
    figures["stored"] = receiver.stored()
    figures["load"] = common.machine_load()
    return figures


def describe(name: str, workers: int, figures: dict[str, Any]) -> str:
    return (
        f"{name:9} workers={workers}  {figures['events_per_second']:7.0f} events/s  "
        f"p50 {figures['p50_ms']:6.1f} ms  p99 {figures['p99_ms']:6.1f} ms  "
        f"non-2xx {figures['non2xx']}  socket errors {figures['socket_errors']}  "
        f"stored {figures['stored']}  wrapped {figures['wrapped']}  load {figures['load']}"
    )


def run_postgresql(args: argparse.Namespace, events_file: Path) -> list:
    rounds, seconds, warmup = args.rounds, args.seconds, args.warmup
    results = []
    for workers in args.workers:
        with (
            common.bench_database("ingest_connector") as connector_url,
            common.bench_database("ingest_minimal") as minimal_url,
        ):
            common.migrate(connector_url)
            receivers = [
                minimal_receiver(minimal_url, args.minimal_round_trips, args.minimal_threads),
                connector_receiver(connector_url, args.threads),
            ]
            try:
                for receiver in receivers:
                    receiver.start(workers)
                    measure(receiver, events_file, warmup)  # warm up imports, pools and caches
                runs: dict[str, list[dict[str, Any]]] = {"minimal": [], "connector": []}
                for round_number in range(rounds):
                    # ABBA order: neither receiver always runs first after the other.
                    order = receivers if round_number % 2 == 0 else receivers[::-1]
                    for receiver in order:
                        figures = measure(receiver, events_file, seconds)
                        runs[receiver.name].append(figures)
                        print(describe(receiver.name, workers, figures), flush=True)
            finally:
                for receiver in receivers:
                    receiver.stop()
        ratios = [
            c["events_per_second"] / m["events_per_second"]
            for c, m in zip(runs["connector"], runs["minimal"], strict=True)
        ]
        summary = {"workers": workers, "ratio_median": statistics.median(ratios), "ratios": ratios, "runs": runs}
        for name, figures in runs.items():
            summary[name] = {
                key: statistics.median(run[key] for run in figures) for key in ("events_per_second", "p50_ms", "p99_ms")
            } | {"non2xx": sum(run["non2xx"] for run in figures)}
        results.append(summary)
        print(
            f"== workers={workers}: connector {summary['connector']['events_per_second']:.0f} events/s "
            f"(p50 {summary['connector']['p50_ms']:.1f} ms, p99 {summary['connector']['p99_ms']:.1f} ms), "
            f"minimal {summary['minimal']['events_per_second']:.0f} events/s "
            f"(p50 {summary['minimal']['p50_ms']:.1f} ms, p99 {summary['minimal']['p99_ms']:.1f} ms), "
            f"ratio {summary['ratio_median']:.2f} (per round: {', '.join(f'{r:.2f}' for r in ratios)})",
            flush=True,
        )
    return results


def run_sqlite(args: argparse.Namespace, events_file: Path) -> list:
    rounds, seconds, warmup = args.rounds, args.seconds, args.warmup
    results = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix="coherent_bench_sqlite_") as directory:
            url = f"sqlite:///{directory}/coherent.db"
            common.migrate(url)
            receiver = connector_receiver(url, args.threads)
            try:
                receiver.start(workers)
                measure(receiver, events_file, warmup)
                runs = []
                for _ in range(rounds):
                    figures = measure(receiver, events_file, seconds)
                    runs.append(figures)
                    print(describe("sqlite", workers, figures), flush=True)
            finally:
                receiver.stop()
        summary = {
            "workers": workers,
            "events_per_second": statistics.median(run["events_per_second"] for run in runs),
            "p50_ms": statistics.median(run["p50_ms"] for run in runs),
            "p99_ms": statistics.median(run["p99_ms"] for run in runs),
            "non2xx": sum(run["non2xx"] for run in runs),
            "runs": runs,
        }
        results.append(summary)
        print(
            f"== sqlite workers={workers}: {summary['events_per_second']:.0f} events/s, p50 {summary['p50_ms']:.1f} ms, "
            f"p99 {summary['p99_ms']:.1f} ms, non-2xx {summary['non2xx']}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument(
        "--workers",
        type=lambda v: [int(w) for w in v.split(",")],
        default=[1, 2, 4],
        help="comma-separated worker counts",
    )
    parser.add_argument(
        "--threads", type=int, default=Config.threads, help="the connector's threads per worker (default: its default)"
    )
    parser.add_argument(
        "--minimal-threads",
        type=int,
        default=1,
        help="the minimal receiver's threads per worker (default 1: sync workers; above 1, a connection per thread)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per worker count")
    parser.add_argument("--seconds", type=float, default=10, help="length of each measured run")
    parser.add_argument("--warmup", type=float, default=2, help="length of the unmeasured first run")
    parser.add_argument(
        "--minimal-round-trips",
        type=int,
        default=1,
        help="an experiment: pad the minimal receiver's INSERT to this many round trips (default 1, the baseline)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    common.require_wrk()

    common.banner(
        f"ingest on {args.database}: wrk -t2 -c16, {args.rounds} rounds of {args.seconds:g} s; "
        f"threads per worker: connector {args.threads}, minimal {args.minimal_threads}"
    )
    with tempfile.TemporaryDirectory(prefix="coherent_bench_") as directory:
        events_file = Path(directory) / "events.tsv"
        count = int(EVENTS_PER_SECOND_CEILING * max(args.seconds, args.warmup))
        started = time.monotonic()
        common.write_signed_events(events_file, common.EventFactory().take(count))
        print(f"# {count} distinct signed events written in {time.monotonic() - started:.1f} s", flush=True)
        run = run_postgresql if args.database == "postgresql" else run_sqlite
        results = run(args, events_file)
    if args.json:
        args.json.write_text(json.dumps({"database": args.database, "results": results}, indent=2))


if __name__ == "__main__":
    main()
