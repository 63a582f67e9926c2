"""Experiment: one writer per host, so that a group commit spans every worker's events.

    .venv/bin/python bench/host_writer.py                   # 4 workers, 3 alternating rounds of 8 s

With 16 connections over 4 workers, each worker has about 4 requests in flight, and its group commit
averages 2.4 events: the fixed cost per transaction dominates (docs/performance.md). Here the workers
(``bench/host_writer_app.py``) hand each verified event over a Unix socket to one single-threaded
writer process (``--serve``), which takes every event waiting on any socket into one
``EventStore.record_many`` and answers each after the commit. The runner drives the minimal receiver
and this arrangement alternately with wrk, like ``bench/ingest.py``, and prints the ratio per round
and the writer's mean group size and CPU time.

Not the product: there is no supervision of the writer, no one-by-one fallback for a refused event and
no deadline per request. It measures whether the design would pay, before it is built.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from bench.host_writer_app import FRAME
from bench.ingest import connector_receiver, measure, minimal_receiver


def serve(path: str) -> None:
    """The writer: a loop over the workers' sockets; every message ready joins one transaction."""
    from connector.config import load_config
    from connector.db.engine import create_engine_for
    from connector.db.store import EventStore
    from connector.errors import DatabaseUnavailable
    from connector.events import event_from_document

    config = load_config()
    store = EventStore(create_engine_for(config))
    selector = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(512)
    selector.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytearray] = {}
    groups = events = 0
    while True:
        waiting: list[tuple[socket.socket, dict]] = []
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                buffers[conn] = bytearray()
                selector.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            data = conn.recv(1 << 16)
            if not data:
                selector.unregister(conn)
                conn.close()
                del buffers[conn]
                continue
            buffer = buffers[conn]
            buffer += data
            while len(buffer) >= FRAME.size and len(buffer) >= FRAME.size + (size := FRAME.unpack_from(buffer)[0]):
                waiting.append((conn, json.loads(bytes(buffer[FRAME.size : FRAME.size + size]))))
                del buffer[: FRAME.size + size]
        if not waiting:
            continue
        deliveries = [(event_from_document(m["event"]), datetime.fromisoformat(m["received_at"])) for _, m in waiting]
        try:
            replies = [{"outcome": outcome.value} for outcome in store.record_many(deliveries)]
        except DatabaseUnavailable as exc:
            replies = [{"error": str(exc)}] * len(waiting)
        for (conn, _), reply in zip(waiting, replies, strict=True):
            body = json.dumps(reply).encode()
            conn.sendall(FRAME.pack(len(body)) + body)
        groups, events = groups + 1, events + len(waiting)
        if groups % 1000 == 0:
            print(f"writer: {groups} groups, mean {events / groups:.1f} events", flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", metavar="SOCKET", help="run as the writer on this Unix socket")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    common.require_wrk()
    common.banner(f"host-writer experiment: {args.workers} workers, {args.rounds} rounds of {args.seconds:g} s")
    with (
        common.bench_database("writer_connector") as connector_url,
        common.bench_database("writer_minimal") as minimal_url,
        tempfile.TemporaryDirectory(prefix="coherent_bench_") as directory,
    ):
        common.migrate(connector_url)
        events_file = Path(directory) / "events.tsv"
        common.write_signed_events(events_file, common.EventFactory().take(int(8000 * args.seconds)))
        sock = str(Path(directory) / "writer.sock")
        env = {
            "CONNECTOR_DATABASE_URL": connector_url,
            "CONNECTOR_WEBHOOK_SECRETS": common.SECRET,
            "CONNECTOR_LOG_LEVEL": "warning",
            "HOST_WRITER_SOCKET": sock,
        }
        writer = subprocess.Popen([sys.executable, __file__, "--serve", sock], env={**os.environ, **env})
        while not os.path.exists(sock):
            time.sleep(0.05)
        connector = connector_receiver(connector_url)
        connector.app, connector.pythonpath, connector.env = "host_writer_app:app", common.BENCH_DIR, env
        minimal = minimal_receiver(minimal_url)
        try:
            connector.start(args.workers)
            minimal.start(args.workers)
            measure(connector, events_file, 2)
            measure(minimal, events_file, 2)
            ratios = []
            for _ in range(args.rounds):
                base, ours = measure(minimal, events_file, args.seconds), measure(connector, events_file, args.seconds)
                ratios.append(ours["events_per_second"] / base["events_per_second"])
                print(
                    f"minimal {base['events_per_second']:6.0f} events/s p99 {base['p99_ms']:5.1f} ms | "
                    f"host writer {ours['events_per_second']:6.0f} events/s p99 {ours['p99_ms']:5.1f} ms "
                    f"non-2xx {ours['non2xx']} stored {ours['stored']} | ratio {ratios[-1]:.2f}  load {ours['load']}",
                    flush=True,
                )
            print(
                f"== workers={args.workers}: median ratio {statistics.median(ratios):.2f}; writer CPU {cpu_seconds(writer.pid):.1f} s"
            )
        finally:
            connector.stop()
            minimal.stop()
            writer.terminate()
            writer.wait()


if __name__ == "__main__":
    main()
