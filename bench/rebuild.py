"""Rebuild: ``connector rebuild`` of a large change log, its time and its peak memory.

    .venv/bin/python bench/rebuild.py                        # logs of 100,000 and 1,000,000 events
    .venv/bin/python bench/rebuild.py --sizes 20000,100000   # a quick check

For each size a database of its own gets a generated change log (built inside PostgreSQL, see
``common.fill_change_log``) and empty current-state tables; then ``connector rebuild`` runs as a
subprocess. The figures are its wall time and its peak resident memory (``ru_maxrss`` of that one
process, from wait4). Memory that stays flat from the smallest to the largest log means the rebuild
streams the log rather than holding it. Each run is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, text

from bench import common
from connector.db.schema import child_tables, state_tables

CONNECTOR = Path(sys.executable).parent / "connector"


def has_rebuild_command() -> bool:
    """Whether the installed ``connector`` has the ``rebuild`` command (issue 3)."""
    result = subprocess.run([str(CONNECTOR), "rebuild", "--help"], capture_output=True, timeout=60, check=False)
    return result.returncode == 0


def state_counts(url: str) -> int:
    engine = create_engine(url)
    tables = [table.name for table in state_tables.values()] + [table.name for table, _ in child_tables.values()]
    try:
        with engine.connect() as conn:
            return sum(conn.execute(text(f"SELECT count(*) FROM {name}")).scalar_one() for name in tables)  # noqa: S608
    finally:
        engine.dispose()


def rebuild(url: str, extra_args: list[str], timeout: float) -> dict[str, float]:
    """Run ``connector rebuild``; return its wall seconds and peak RSS in MiB."""
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [str(CONNECTOR), "--database-url", url, "rebuild", *extra_args], stdout=log, stderr=log
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"connector rebuild took longer than {timeout} s")
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"connector rebuild failed ({process.returncode}): {log.read().decode()[-2000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated change-log sizes")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed for one rebuild")
    parser.add_argument("--rebuild-args", default="", help="extra arguments for `connector rebuild`")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    if not has_rebuild_command():
        sys.exit(
            "`connector rebuild` is not in this checkout yet (issue 3 adds it); this benchmark runs "
            "`connector --database-url URL rebuild` once it exists"
        )

    common.banner("connector rebuild of a generated change log")
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        with common.bench_database("rebuild") as url:
            common.migrate(url)
            fill_seconds = common.fill_change_log(url, size)
            figures = rebuild(url, args.rebuild_args.split(), args.timeout)
            figures |= {"events": size, "rows_after": state_counts(url), "load": common.machine_load()}
        results.append(figures)
        print(
            f"{size:>9} events: rebuild {figures['seconds']:6.1f} s ({size / figures['seconds']:7.0f} events/s), "
            f"peak RSS {figures['peak_rss_mib']:6.1f} MiB, {figures['rows_after']} state and child rows "
            f"(log generated in {fill_seconds:.0f} s)  load {figures['load']}",
            flush=True,
        )
    if len(results) > 1:
        print(
            f"== peak RSS {results[0]['peak_rss_mib']:.0f} MiB at {results[0]['events']} events, "
            f"{results[-1]['peak_rss_mib']:.0f} MiB at {results[-1]['events']} "
            f"({results[-1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.2f}x)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
