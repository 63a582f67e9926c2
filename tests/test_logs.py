"""One structured log line per request, as JSON or logfmt, never with a body or a secret."""

import json
import logging
import re

import pytest

from connector.logs import configure_logging
from tests.conftest import SECRET, Gunicorn, encode, envelope, make_config, signed_headers

_LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
BODY_MARKER = "body-text-that-must-not-be-logged"


def parse_logfmt(line: str) -> dict[str, str]:
    fields = {}
    for name, raw in _LOGFMT_PAIR.findall(line):
        fields[name] = json.loads(raw) if raw.startswith('"') else raw
    assert " ".join(f"{k}={v}" for k, v in _LOGFMT_PAIR.findall(line)) == line  # nothing but pairs
    return fields


PARSERS = {"json": json.loads, "logfmt": parse_logfmt}


@pytest.fixture
def restore_logging():
    logger = logging.getLogger("connector")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def request_lines(text: str, log_format: str) -> list[dict]:
    lines = [PARSERS[log_format](line) for line in text.splitlines() if "connector.requests" in line]
    return [line for line in lines if line["logger"] == "connector.requests"]


@pytest.mark.parametrize("log_format", ["json", "logfmt"])
def test_each_request_gets_one_line_with_its_event_and_outcome(client, capsys, restore_logging, log_format, db_url):
    configure_logging(make_config(db_url, log_format=log_format))
    body = encode(envelope("message.created", {"id": "m1", "message": BODY_MARKER}, "evt-1"))
    headers = signed_headers(body)
    client.simulate_post("/webhooks", body=body, headers=headers)
    client.simulate_post("/webhooks", body=body, headers=headers)
    client.simulate_post("/webhooks", body=body, headers={"x-protocol-signature": "0" * 64})
    client.simulate_get('/no\nwhere" level=error')
    output = capsys.readouterr().err

    lines = request_lines(output, log_format)
    assert len(lines) == 4 and len(output.splitlines()) == 4
    applied, duplicate, refused, hostile = lines
    assert applied["msg"] == "request" and applied["level"] == "info"
    assert {k: applied[k] for k in ("method", "path", "event_id", "type", "outcome")} == {
        "method": "POST", "path": "/webhooks", "event_id": "evt-1", "type": "message.created", "outcome": "applied",
    }  # fmt: skip
    assert str(applied["status"]) == "200" and float(applied["latency_ms"]) > 0
    assert duplicate["outcome"] == "duplicate"
    assert str(refused["status"]) == "401" and refused["reason"] == "bad_signature" and "event_id" not in refused
    # A hostile path stays one line and cannot forge a field.
    assert hostile["path"] == '/no\nwhere" level=error' and hostile["level"] == "info"
    assert hostile["reason"] == "not_found" and hostile["route"] == "unmatched"
    for secret_or_body in (SECRET, BODY_MARKER, headers["x-protocol-signature"]):
        assert secret_or_body not in output


@pytest.mark.gunicorn
@pytest.mark.parametrize("log_format", ["json", "logfmt"])
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_gunicorn_workers_write_the_configured_format(db_url, log_format):
    server = Gunicorn(db_url, workers=2, CONNECTOR_LOG_FORMAT=log_format).start()
    try:
        body = encode(envelope("contact.created", {"id": "c1", "username": BODY_MARKER}, "evt-9"))
        assert server.post(body)[0] == 200
        output = server.output()  # the line is written before the answer is sent
    finally:
        server.stop()
    webhook_lines = [line for line in request_lines(output, log_format) if line.get("route") == "/webhooks"]
    assert [(line["event_id"], line["outcome"]) for line in webhook_lines] == [("evt-9", "applied")]
    assert BODY_MARKER not in output and SECRET not in output
