"""Growth: ingest throughput with a change log of 0, 100,000 and 1,000,000 rows, and the query plans.

    .venv/bin/python bench/growth.py                          # 3 rounds of 10 s at each size
    .venv/bin/python bench/growth.py --sizes 0,20000 --rounds 1 --seconds 3    # a quick check

One database per size gets a generated change log and the current-state rows it leaves (built inside
PostgreSQL, see ``common.fill_change_log``). A connector with ``--workers`` gunicorn workers serves
each; wrk (16 connections, distinct signed events) drives them in turn, round after round, so a
change in the machine's load hits every size alike. After each run the rows it added are deleted,
so every run starts from the same log.

Then, on the largest database, the statements the store sends for one event of each of the fifteen
types (new ids, and updates and deletes of ids already in the log) are run again under
``EXPLAIN (ANALYZE)`` inside a transaction that is rolled back, and their plans printed: for the
statements the pipelined path prepares, the generic plans it made and keeps. A sequential scan on
this hot path would make ingest slow down as the log grows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psycopg import pq
from sqlalchemy import create_engine, text

from bench import common
from bench.ingest import EVENTS_PER_SECOND_CEILING, connector_receiver
from connector.db import pipeline
from connector.db.schema import child_tables, state_tables
from connector.events import parse_event


def prefilled(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {"max_seq": conn.execute(text("SELECT coalesce(max(seq), 0) FROM coherent_events")).scalar_one()}
    finally:
        engine.dispose()


def reset(url: str, max_seq: int, since: datetime) -> None:
    """Delete what the last run added: log rows past ``max_seq``, state rows written since ``since``."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM coherent_events WHERE seq > :seq"), {"seq": max_seq})
            for table in state_tables.values():
                conn.execute(text(f"DELETE FROM {table.name} WHERE _synced_at >= :since"), {"since": since})  # noqa: S608
            for table, _ in child_tables.values():
                conn.execute(text(f"TRUNCATE {table.name}"))
    finally:
        engine.dispose()


def sample_events(url: str) -> list[bytes]:
    """One event of each type for new ids, then an update and a delete of ids already in the log."""
    factory = common.EventFactory(seed=99)
    bodies = []
    for resource in common.RESOURCE_WEIGHTS:
        payload = factory._payload(resource, factory._id())
        bodies.append(common.encode({"id": factory._id(), "type": f"{resource}.created", "payload": payload}))
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            for resource in common.RESOURCE_WEIGHTS:
                existing = conn.execute(
                    text("SELECT resource_id FROM coherent_events WHERE resource = :r AND action = 'created' LIMIT 2"),
                    {"r": resource},
                ).scalars()
                for resource_id, action in zip(existing, ("updated", "deleted"), strict=False):
                    payload = factory._payload(resource, resource_id)
                    envelope = {"id": factory._id(), "type": f"{resource}.{action}", "payload": payload}
                    bodies.append(common.encode(envelope))
    finally:
        engine.dispose()
    return bodies


def explain_hot_path(url: str) -> list[tuple[str, str]]:
    """The plans of the statements the store sends for the sample events, each (statement, plan).

    The store sends them through libpq's pipeline, around SQLAlchemy, so they are caught there (see
    ``common.postgres_statements``); its COMMIT is held back, so every sample event is rolled back.
    """
    from connector.config import Config
    from connector.db.engine import create_engine_for

    engine = create_engine_for(Config(database_url=url))
    plans = []
    samples = sample_events(url)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")  # SQLAlchemy's own first-connect queries, before capturing
    with common.postgres_statements(hold_commit=True) as sent, engine.connect() as conn:
        for body in samples:
            with conn.begin() as transaction:
                pipeline.record_events(conn, [(parse_event(body), datetime.now(UTC))])
                transaction.rollback()
    try:
        with engine.connect() as conn, conn.begin() as transaction:
            conn.exec_driver_sql("SELECT 1")  # psycopg's BEGIN: libpq's own statements below then run inside it
            driver = conn.connection.driver_connection
            # The plans the hot path runs: the generic ones the pipeline made on this connection
            # (the only one in the pool), under the setting it plans them with.
            libpq(driver.pgconn, pipeline._PLAN_ONCE.sql.encode())
            escaping = pq.Escaping(driver.pgconn)
            options = "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF)"
            for statement, parameters, placeholders in sent.statements:
                if statement == pipeline._PLAN_ONCE.sql:  # the settings themselves: no table
                    continue
                if placeholders == "libpq":
                    # EXECUTE takes no bound parameters: they go as literals, typed by the statement.
                    name = pipeline.Statement(statement, ()).name
                    literals = b", ".join(b"NULL" if p is None else escaping.escape_literal(p) for p in parameters)
                    result = libpq(driver.pgconn, b"%s EXECUTE %s(%s)" % (options.encode(), name, literals))
                    lines = [result.get_value(row, 0).decode() for row in range(result.ntuples)]
                else:
                    lines = [row[0] for row in driver.execute(f"{options} {statement}", parameters).fetchall()]
                plans.append((statement, "\n".join(lines)))
            transaction.rollback()
    finally:
        engine.dispose()
    return plans


def libpq(pgconn: pq.abc.PGconn, sql: bytes) -> pq.abc.PGresult:
    """Run ``sql`` on ``pgconn`` through libpq; its result, or an error with the server's message."""
    result = pgconn.exec_(sql)
    if result.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        raise RuntimeError(result.error_message.decode())
    return result


def shorten(statement: str) -> str:
    """A statement on one line, its long column and placeholder lists elided."""
    one_line = " ".join(statement.split())
    if " ON CONFLICT" in one_line:
        head, _, tail = one_line.partition(" VALUES ")
        one_line = f"{head[:120]}... VALUES (...) ON CONFLICT{tail.partition(' ON CONFLICT')[2][:120]}"
    return one_line[:400]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,100000,1000000", help="comma-separated change-log sizes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--json", type=Path, help="also write every figure and plan to this file")
    args = parser.parse_args()
    common.require_wrk()
    sizes = [int(s) for s in args.sizes.split(",")]

    common.banner(f"ingest as the change log grows: {args.workers} workers, wrk -t2 -c16, {args.rounds} rounds")
    runs: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
    with tempfile.TemporaryDirectory(prefix="coherent_bench_") as directory, contextlib.ExitStack() as stack:
        events_file = Path(directory) / "events.tsv"
        common.write_signed_events(
            events_file, common.EventFactory(seed=8).take(int(EVENTS_PER_SECOND_CEILING * args.seconds))
        )
        databases = {}
        for size in sizes:
            url = stack.enter_context(common.bench_database(f"growth_{size}"))
            common.migrate(url)
            seconds = common.fill_change_log(url, size, with_state=True)
            print(f"# change log of {size} rows generated in {seconds:.0f} s", flush=True)
            receiver = connector_receiver(url)
            stack.callback(receiver.stop)
            receiver.start(args.workers)
            databases[size] = (url, prefilled(url)["max_seq"], receiver)
        for url, max_seq, receiver in databases.values():  # warm up each server
            since = datetime.now(UTC)
            common.run_wrk(receiver.server.url, events_file, seconds=args.warmup)
            reset(url, max_seq, since)
        for round_number in range(args.rounds):
            order = sizes[round_number % len(sizes) :] + sizes[: round_number % len(sizes)]
            for size in order:
                url, max_seq, receiver = databases[size]
                since = datetime.now(UTC)
                figures = common.run_wrk(receiver.server.url, events_file, seconds=args.seconds)
                reset(url, max_seq, since)
                figures["load"] = common.machine_load()
                runs[size].append(figures)
                print(
                    f"log {size:>9} rows: {figures['events_per_second']:6.0f} events/s  p50 {figures['p50_ms']:5.1f} ms  "
                    f"p99 {figures['p99_ms']:6.1f} ms  non-2xx {figures['non2xx']}  load {figures['load']}",
                    flush=True,
                )
        plans = explain_hot_path(databases[sizes[-1]][0])

    medians = {size: statistics.median(r["events_per_second"] for r in figures) for size, figures in runs.items()}
    base = medians[sizes[0]]
    print(
        "== median events/s: "
        + ", ".join(f"{size} rows {rate:.0f} ({rate / base:.2f}x)" for size, rate in medians.items())
        + " (target: within 10%)"
    )
    print(f"\n== query plans on the {sizes[-1]}-row change log (EXPLAIN ANALYZE, rolled back)")
    seen: set[str] = set()
    for statement, plan in plans:
        key = statement  # placeholders, not values: one plan per distinct statement
        if key in seen:
            continue
        seen.add(key)
        print(f"\n{shorten(statement)}\n{plan}")
    scans = [statement for statement, plan in plans if "Seq Scan" in plan]
    print(f"\n== {len(plans)} statements explained, {len(scans)} with a sequential scan")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "plans": plans}, indent=2, default=str))


if __name__ == "__main__":
    main()
