"""End to end through a real gunicorn with four workers, on every database."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func, select

from connector.db.schema import events, state_tables
from tests.conftest import encode, envelope


def test_four_workers_take_concurrent_deliveries_and_store_each_once(gunicorn, engine, seed_body):
    bodies = [seed_body] + [
        encode(envelope("contact.updated", {"id": f"c{i % 10}", "username": f"user{i}"}, f"evt-{i}")) for i in range(80)
    ]
    with ThreadPoolExecutor(max_workers=16) as pool:
        first = list(pool.map(gunicorn.post, bodies))
        again = list(pool.map(gunicorn.post, bodies))  # every event redelivered
    assert [status for status, _, _ in first + again] == [200] * (2 * len(bodies))
    assert {body["outcome"] for _, _, body in again} == {"duplicate"}

    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(events)) == len(bodies)
        contacts = state_tables["contact"]
        assert conn.scalar(select(func.count()).select_from(contacts)) == 10
        message = conn.execute(select(state_tables["message"])).mappings().one()
    assert message["contact_id"] == "WAz8eIbvDR60rouK"


def test_bad_requests_get_their_4xx_through_gunicorn(gunicorn, engine):
    body = encode(envelope("contact.created", {"id": "c1"}))
    status, _, answer = gunicorn.post(body, headers={"x-protocol-signature": "0" * 64})
    assert status == 401 and answer["error"] == "bad_signature"
    status, _, answer = gunicorn.post(b"not json")
    assert status == 400 and answer["error"] == "invalid_envelope"
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(events)) == 0


def test_the_receiver_refuses_to_start_without_a_secret(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")}
    env["CONNECTOR_DATABASE_URL"] = f"sqlite:///{tmp_path / 'c.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "connector.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "no webhook secret is configured" in result.stderr
    assert json.dumps(result.stderr)  # it said so in words, not a traceback
    assert "Traceback" not in result.stderr
