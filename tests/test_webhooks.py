"""The HTTP surface through Falcon's test client, on every database."""

import json
import socket
import time

import pytest
from falcon import testing
from sqlalchemy import func, select

from connector.app import create_app
from connector.db.engine import create_engine_for
from connector.db.schema import events, state_tables
from connector.db.store import EventStore
from tests.conftest import SECRET, encode, envelope, make_config, signed_headers


def count_events(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(events))


def post(client, body: bytes, **headers):
    return client.simulate_post("/webhooks", body=body, headers={**signed_headers(body), **headers})


def test_the_seed_example_delivered_verbatim_is_stored(client, engine, seed_body):
    response = post(client, seed_body)
    assert response.status_code == 200
    assert response.json == {"event_id": "a056V7R7NmNRjl70", "outcome": "applied"}
    table = state_tables["message"]
    with engine.connect() as conn:
        message = conn.execute(select(table)).mappings().one()
    assert message["id"] == "SIuAFUNKdSYHZF2w" and message["contact_id"] == "WAz8eIbvDR60rouK"


def test_a_redelivery_gets_2xx_and_adds_no_row(client, engine, seed_body):
    assert post(client, seed_body).status_code == 200
    response = post(client, seed_body)
    assert response.status_code == 200 and response.json["outcome"] == "duplicate"
    assert count_events(engine) == 1


def test_every_event_type_is_accepted(client, engine):
    for resource in ("contact", "conversation", "message", "group", "attachment"):
        for action in ("created", "updated", "deleted"):
            body = encode(envelope(f"{resource}.{action}", {"id": f"{resource}-1"}))
            assert post(client, body).status_code == 200
    assert count_events(engine) == 15


def test_an_unknown_type_is_recorded_with_2xx(client, engine):
    response = post(client, encode(envelope("reaction.created", {"id": "r1"})))
    assert response.status_code == 200 and response.json["outcome"] == "unknown_type"
    assert count_events(engine) == 1


@pytest.mark.parametrize(
    "headers",
    [{}, {"x-protocol-signature": ""}, {"x-protocol-signature": "0" * 64}, {"x-protocol-signature": "zz"}],
)
def test_a_missing_or_wrong_signature_gets_401_and_stores_nothing(client, engine, seed_body, headers):
    response = client.simulate_post("/webhooks", body=seed_body, headers=headers)
    assert response.status_code == 401
    assert response.json["error"] in ("missing_signature", "bad_signature", "malformed_signature")
    assert "x-protocol-signature" in response.json["message"]
    assert count_events(engine) == 0


def test_a_rotated_secret_is_accepted(db_url, store, seed_body):
    client = testing.TestClient(create_app(make_config(db_url, webhook_secrets=("new-secret", SECRET)), store))
    assert (
        client.simulate_post("/webhooks", body=seed_body, headers=signed_headers(seed_body, "new-secret")).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"type": "contact.created", "payload": {"id": "c"}}, "'id'"),
        ({"id": "e1", "payload": {"id": "c"}}, "'type'"),
        ({"id": "e1", "type": "contact", "payload": {"id": "c"}}, "resource.action"),
        ({"id": "e1", "type": "contact.created"}, "'payload'"),
        ({"id": "e1", "type": "contact.created", "payload": {"name": "no id"}}, "payload 'id'"),
    ],
)
def test_a_signed_malformed_envelope_gets_400_naming_the_problem(client, engine, document, message):
    response = post(client, encode(document))
    assert response.status_code == 400
    assert response.json["error"] == "invalid_envelope" and message in response.json["message"]
    assert count_events(engine) == 0


def test_a_body_over_the_limit_gets_413_before_it_is_read(db_url, store):
    client = testing.TestClient(create_app(make_config(db_url, max_body_bytes=100), store))
    body = encode(envelope("contact.created", {"id": "c", "bio": "x" * 200}))
    response = client.simulate_post("/webhooks", body=body, headers=signed_headers(body))
    assert response.status_code == 413 and response.json["error"] == "body_too_large"


def test_a_compressed_body_gets_415(client, seed_body):
    response = post(client, seed_body, **{"Content-Encoding": "gzip"})
    assert response.status_code == 415 and response.json["error"] == "unsupported_encoding"


def test_other_methods_get_405_in_the_error_shape(client):
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
        response = client.simulate_request(method, "/webhooks")
        assert response.status_code == 405, method
        assert response.json["error"] == "method_not_allowed"
        allowed = {method.strip() for method in response.headers["Allow"].split(",")}
        assert "POST" in allowed and not allowed & {"GET", "PUT", "DELETE", "PATCH"}


def test_unknown_paths_get_404_in_the_error_shape(client):
    response = client.simulate_get("/nope")
    assert response.status_code == 404 and response.json["error"] == "not_found" and response.json["message"]


def test_healthz_answers_while_the_process_is_up(client):
    assert client.simulate_get("/healthz").json == {"status": "ok"}


def test_readyz_answers_200_when_migrated_to_head(client):
    response = client.simulate_get("/readyz")
    assert response.status_code == 200 and response.json["status"] == "ready"


def test_readyz_answers_503_on_an_unmigrated_database(tmp_path):
    config = make_config(f"sqlite:///{tmp_path / 'empty.db'}")
    client = testing.TestClient(create_app(config))
    response = client.simulate_get("/readyz")
    assert response.status_code == 503 and "Retry-After" in response.headers
    assert "connector migrate" in response.json["message"]


def test_readyz_answers_503_when_the_database_is_unreachable():
    config = make_config("postgresql+psycopg://nobody@127.0.0.1:1/none")
    store = EventStore(create_engine_for(config), retry_attempts=1)
    client = testing.TestClient(create_app(config, store))
    assert client.simulate_get("/readyz").status_code == 503


def test_an_unreachable_database_gets_503_with_retry_after_and_no_trace(seed_body):
    config = make_config("postgresql+psycopg://nobody@127.0.0.1:1/none")
    store = EventStore(create_engine_for(config), retry_attempts=1)
    client = testing.TestClient(create_app(config, store))
    response = client.simulate_post("/webhooks", body=seed_body, headers=signed_headers(seed_body))
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert response.json["error"] == "database_unavailable"
    assert "cannot connect to the database" in response.json["message"]
    assert "Traceback" not in json.dumps(response.json)


def test_the_app_refuses_to_start_without_a_secret(db_url):
    from connector.config import Config
    from connector.errors import ConfigError

    with pytest.raises(ConfigError, match="no webhook secret"):
        create_app(Config(database_url=db_url))


def test_a_database_that_accepts_but_never_answers_gets_503_not_a_hang(seed_body):
    # PostgreSQL only: PyMySQL's connect_timeout covers the TCP connect but not the server greeting,
    # and a read timeout long enough for a rebuild's statements would not beat gunicorn's timeout.
    # The kernel completes the handshake for a listening socket's backlog; nobody ever answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        config = make_config(f"postgresql+psycopg://nobody@127.0.0.1:{silent.getsockname()[1]}/none")
        client = testing.TestClient(create_app(config))
        started = time.monotonic()
        response = client.simulate_post("/webhooks", body=seed_body, headers=signed_headers(seed_body))
        elapsed = time.monotonic() - started
    assert response.status_code == 503 and response.json["error"] == "database_unavailable"
    # Bounded by the connect timeout (2 s by default), far from gunicorn's 30-second worker kill.
    assert elapsed < 20
