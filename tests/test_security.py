"""Security: nothing secret in the logs, no stack trace in an answer, and the least-privilege role works."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

from connector.db import migrate
from connector.db.engine import create_engine_for
from connector.signing import sign
from tests.conftest import SECRET, Gunicorn, encode, envelope, http, make_config, signed_headers

pytestmark = pytest.mark.gunicorn

ROLE_SCRIPT = Path(__file__).parent.parent / "docs" / "receiver_role_postgresql.sql"
MARKER = "sensitive-body-text-7f3a"


def _deliver_sensitive_requests(database_url: str) -> tuple[list[tuple[int, object]], str]:
    """Send authentic, forged, malformed and compressed requests carrying MARKER; return the answers and the log."""
    server = Gunicorn(database_url, workers=1, CONNECTOR_LOG_LEVEL="info").start()
    try:
        body = encode(envelope("contact.created", {"id": "c1", "username": MARKER}))
        answers = [
            server.post(body),
            server.post(body, headers={"x-protocol-signature": sign(body, "a-guess")}),
            server.post(MARKER.encode()),
            server.post(body, headers={**signed_headers(body), "content-encoding": "gzip"}),
        ]
        return [(status, answer) for status, _, answer in answers], server.output()
    finally:
        server.stop()


def test_logs_at_info_hold_no_secret_signature_or_body_and_answers_no_trace(tmp_path):
    working = f"sqlite:///{tmp_path / 'migrated.db'}"
    engine = create_engine_for(make_config(working))
    migrate.upgrade(engine)
    engine.dispose()
    answers, log = _deliver_sensitive_requests(working)
    assert [status for status, _ in answers] == [200, 401, 400, 415]
    # An unmigrated database: the authentic delivery fails in the database, and that is logged.
    broken_answers, broken_log = _deliver_sensitive_requests(f"sqlite:///{tmp_path / 'unmigrated.db'}")
    assert [status for status, _ in broken_answers] == [503, 401, 400, 415]
    assert "database unavailable" in broken_log  # the failure is logged, at WARNING

    body = encode(envelope("contact.created", {"id": "c1", "username": MARKER}))
    for status, answer in answers + broken_answers:
        rendered = str(answer)
        assert "Traceback" not in rendered and 'File "' not in rendered and "coherent_events" not in rendered
        assert MARKER not in rendered and SECRET not in rendered, (status, rendered)
    for output in (log, broken_log):
        assert "Booting worker" in output  # gunicorn's own INFO lines are in what we read
        assert SECRET not in output and MARKER not in output
        assert sign(body, SECRET) not in output and sign(MARKER.encode(), SECRET) not in output
        assert not re.search(r"[0-9a-f]{64}", output)  # no signature-shaped value at all


def _role_statements(role: str) -> list[str]:
    script = "\n".join(line for line in ROLE_SCRIPT.read_text().splitlines() if not line.lstrip().startswith("--"))
    return [
        statement.strip() for statement in script.replace("coherent_receiver", role).split(";") if statement.strip()
    ]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_receiver_runs_as_the_least_privilege_role_and_cannot_rewrite_the_log(db_url, engine):
    role = f"coherent_receiver_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        for statement in _role_statements(role):
            conn.exec_driver_sql(statement)
    role_url = make_url(db_url).set(username=role, password=None).render_as_string(hide_password=False)
    role_engine = create_engine(role_url)
    try:
        server = Gunicorn(role_url, workers=2).start()
        try:
            deliveries = [
                (envelope("contact.created", {"id": "c1", "username": "ann"}, "e1"), "applied"),
                (envelope("contact.updated", {"id": "c1", "username": "bob"}, "e2"), "applied"),
                (envelope("contact.created", {"id": "c1", "username": "old"}, "e3"), "stale"),
                (envelope("group.created", {"id": "g1", "contacts": [{"id": "c1", "username": "a"}]}, "e4"), "applied"),
                (envelope("group.updated", {"id": "g1", "contacts": [{"id": "c2", "username": "b"}]}, "e5"), "applied"),
                (envelope("message.created", {"id": "m1", "reactions": [{"smile": ["ann"]}]}, "e6"), "applied"),
                (envelope("message.deleted", {"id": "m1"}, "e7"), "applied"),
                (envelope("message.updated", {"id": "m1"}, "e8"), "after_delete"),
                (envelope("reaction.created", {"id": "r1"}, "e9"), "unknown_type"),
                (envelope("contact.updated", {"id": "c1", "username": "bob"}, "e2"), "duplicate"),
            ]
            for document, outcome in deliveries:
                status, _, answer = server.post(encode(document))
                assert (status, answer["outcome"]) == (200, outcome), answer
            assert http("GET", f"{server.url}/readyz")[0] == 200
        finally:
            server.stop()

        with role_engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM coherent_events")) == 9
            assert conn.scalar(text("SELECT contact_id FROM coherent_group_members")) == "c2"
        for statement in (
            "UPDATE coherent_events SET outcome = 'applied'",
            "DELETE FROM coherent_events",
            "TRUNCATE coherent_events",
            "DELETE FROM coherent_contacts",
            "DROP TABLE coherent_messages",
            "CREATE TABLE sneaky (id int)",
        ):
            with (
                role_engine.connect() as conn,
                pytest.raises(ProgrammingError, match=r"permission denied|must be owner"),
            ):
                conn.execute(text(statement))
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM coherent_events")) == 9
    finally:
        role_engine.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
            conn.exec_driver_sql(f'DROP ROLE "{role}"')
