"""GET /metrics: what it counts, in one process on every database and across real gunicorn workers."""

import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from falcon import testing
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from connector.app import create_app
from connector.db.engine import create_engine_for
from connector.db.store import EventStore
from tests.conftest import Gunicorn, encode, envelope, http, make_config, signed_headers

ROOT = Path(__file__).parent.parent
EXPLICIT_CONFIG = {"GUNICORN_CMD_ARGS": "--config python:connector.gunicorn_conf"}


def samples(text: str) -> dict[tuple, float]:
    """Every sample of a Prometheus text exposition, keyed by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: dict[tuple, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(client) -> dict[tuple, float]:
    response = client.simulate_get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def post(client, body: bytes, headers=None):
    return client.simulate_post("/webhooks", body=body, headers=signed_headers(body) if headers is None else headers)


def test_metrics_count_events_by_type_and_outcome_rejections_by_reason_and_latency(client):
    before = scrape(client)
    body = encode(envelope("contact.created", {"id": "c1"}))
    assert post(client, body).status_code == 200
    assert post(client, body).status_code == 200  # a duplicate
    assert post(client, encode(envelope("reaction.created", {"id": "r1"}))).json["outcome"] == "unknown_type"
    assert post(client, body, {"x-protocol-signature": "0" * 64}).status_code == 401
    assert post(client, b"[]").status_code == 400
    assert client.simulate_get("/nowhere").status_code == 404
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("coherent_events_received_total", type="contact.created", outcome="applied") == 1
    assert delta("coherent_events_received_total", type="contact.created", outcome="duplicate") == 1
    assert delta("coherent_events_received_total", type="other", outcome="unknown_type") == 1
    assert delta("coherent_requests_rejected_total", reason="bad_signature") == 1
    assert delta("coherent_requests_rejected_total", reason="invalid_envelope") == 1
    assert delta("coherent_requests_rejected_total", reason="not_found") == 1
    webhook_ok = {"method": "POST", "route": "/webhooks", "status": "200"}
    assert delta("coherent_request_duration_seconds_count", **webhook_ok) == 3
    assert delta("coherent_request_duration_seconds_bucket", le="+Inf", **webhook_ok) == 3
    assert delta("coherent_request_duration_seconds_sum", **webhook_ok) > 0
    assert delta("coherent_request_duration_seconds_count", method="POST", route="/webhooks", status="401") == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_locked_database_shows_as_errors_retries_and_a_503_rejection(db_url):
    # A writer that holds SQLite's lock makes every attempt fail fast with "database is locked".
    config = make_config(db_url, sqlite_busy_timeout_ms=20)
    engine = create_engine_for(config)
    client = testing.TestClient(create_app(config, EventStore(engine, retry_attempts=3)))
    blocker = sqlite3.connect(make_url(db_url).database, isolation_level=None)
    try:
        before = scrape(client)
        blocker.execute("BEGIN IMMEDIATE")
        response = post(client, encode(envelope("contact.created", {"id": "c1"})))
        assert response.status_code == 503 and response.json["error"] == "database_unavailable"
        blocker.execute("ROLLBACK")
        after = scrape(client)
    finally:
        blocker.close()
        engine.dispose()
    assert value(after, "coherent_database_errors_total", error="OperationalError") - value(
        before, "coherent_database_errors_total", error="OperationalError"
    ) == 3  # fmt: skip
    assert value(after, "coherent_database_retries_total") - value(before, "coherent_database_retries_total") == 2
    assert value(after, "coherent_requests_rejected_total", reason="database_unavailable") - value(
        before, "coherent_requests_rejected_total", reason="database_unavailable"
    ) == 1  # fmt: skip


def worker_pids(master: int) -> set[int]:
    """The gunicorn master's child processes, read from /proc."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            children.add(int(stat.parent.name))
    return children


def scrape_events(server: Gunicorn) -> float:
    status, _, body = http("GET", f"{server.url}/metrics")
    assert status == 200
    metrics = samples(body.decode())
    return sum(v for (name, _), v in metrics.items() if name == "coherent_events_received_total")


@pytest.mark.gunicorn
@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_metrics_sum_every_worker_and_keep_the_counts_of_a_worker_that_died(db_url):
    server = Gunicorn(db_url, workers=4, **EXPLICIT_CONFIG).start()
    try:
        bodies = [encode(envelope("message.created", {"id": f"m{i}"})) for i in range(24)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            assert {status for status, _, _ in pool.map(server.post, bodies)} == {200}
        # Each scrape is answered by whichever worker accepts it; every one must see all 24.
        assert [scrape_events(server) for _ in range(8)] == [24.0] * 8

        workers = worker_pids(server.process.pid)
        assert len(workers) == 4
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            current = worker_pids(server.process.pid)
            if victim not in current and len(current) == 4:
                break
            time.sleep(0.1)
        else:
            pytest.fail("gunicorn did not replace the killed worker within 30 s")
        assert server.post(encode(envelope("message.created", {"id": "after"})))[0] == 200
        assert [scrape_events(server) for _ in range(8)] == [25.0] * 8
    finally:
        server.stop()


@pytest.mark.gunicorn
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_plain_gunicorn_from_the_checkout_cleans_a_named_metrics_dir_at_startup(db_url, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # where ./gunicorn.conf.py is found
    metrics_dir = tmp_path / "metrics"
    first = Gunicorn(db_url, workers=2, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)).start()
    try:
        for i in range(3):
            assert first.post(encode(envelope("contact.created", {"id": f"c{i}"})))[0] == 200
        assert scrape_events(first) == 3.0
    finally:
        first.stop()
    assert list(metrics_dir.glob("*.db"))  # what the first run left behind

    second = Gunicorn(db_url, workers=2, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)).start()
    try:
        assert scrape_events(second) == 0.0  # a fresh start counts from zero, not from the last run
        assert second.post(encode(envelope("contact.created", {"id": "c9"})))[0] == 200
        assert scrape_events(second) == 1.0
    finally:
        second.stop()
    assert metrics_dir.is_dir()  # a directory the operator named is emptied, never removed
