"""Where an ingested event's time goes: the connector's WSGI app in-process, without HTTP or gunicorn.

    .venv/bin/python bench/profile_ingest.py                 # 3,000 events, cProfile top 30
    .venv/bin/python bench/profile_ingest.py --events 5000 --no-profile

Prints the CPU time and wall time per event in this process (CPU time is what a worker spends, and
is far less disturbed by other load on the machine than wall time), and the statements sent to the
database per event. Runs on a PostgreSQL database of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from falcon import testing

from bench import common
from connector.app import create_app
from connector.config import Config
from connector.db.engine import create_engine_for
from connector.db.store import EventStore
from connector.signing import sign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--no-profile", action="store_true", help="only time it")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort", default="cumulative", help="pstats sort key: cumulative, tottime, ...")
    args = parser.parse_args()

    common.banner(f"in-process ingest profile: {args.events} events, one at a time (groups of one)")
    bodies = [common.encode(envelope) for envelope in common.EventFactory(seed=7).take(args.events + 200)]
    requests = [(body, {"x-protocol-signature": sign(body, common.SECRET)}) for body in bodies]
    with common.bench_database("profile") as url:
        common.migrate(url)
        config = Config(database_url=url, webhook_secrets=(common.SECRET,))
        engine = create_engine_for(config)
        client = testing.TestClient(create_app(config, EventStore(engine)))
        for body, headers in requests[:200]:  # warm up pools and statement caches
            client.simulate_post("/webhooks", body=body, headers=headers)

        profiler = None if args.no_profile else cProfile.Profile()
        with common.postgres_statements() as sent:
            wall, cpu = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            for body, headers in requests[200:]:
                result = client.simulate_post("/webhooks", body=body, headers=headers)
                assert result.status_code == 200, result.text
            if profiler:
                profiler.disable()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        engine.dispose()
        statements = Counter(statement.split(None, 1)[0].upper() for statement, _, _ in sent.statements)

    per_event = {name: count / args.events for name, count in statements.most_common()}
    print(f"wall {wall / args.events * 1000:.2f} ms/event, CPU in this process {cpu / args.events * 1000:.2f} ms/event")
    print("statements per event (COMMIT aside): " + ", ".join(f"{name} {n:.2f}" for name, n in per_event.items()))
    print(
        f"round trips per event: {sent.round_trips / args.events:.2f} "
        "(the pipelined path: BEGIN and the read-and-lock statement, then the writes and COMMIT)"
    )
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
