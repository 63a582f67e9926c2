"""Hostile and awkward input through a real gunicorn, on every database.

Every bad request gets a deliberate 4xx with a JSON body and stores nothing; every authentic event,
however awkward, gets a 2xx and is stored the same way on SQLite, PostgreSQL and MariaDB. One server
per database serves the whole module, so the cases cost requests, not server start-ups.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import socket
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from connector.db.engine import create_engine_for
from connector.db.schema import events, state_tables
from connector.resources import REPLACEMENT
from connector.signing import SIGNATURE_HEADER, sign
from tests.conftest import DATABASES, SECRET, Gunicorn, encode, envelope, make_config, migrated_url

MAX_BODY_BYTES = 1024 * 1024  # the default of Config.max_body_bytes, which the server runs with


@dataclasses.dataclass
class Served:
    backend: str
    server: Gunicorn
    engine: Engine

    def logged(self) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(events))


@pytest.fixture(scope="module", params=DATABASES)
def served(request: pytest.FixtureRequest):
    url = migrated_url(request, request.param)
    server = Gunicorn(url, workers=2).start()
    engine = create_engine_for(make_config(url))
    yield Served(request.param, server, engine)
    server.stop()
    engine.dispose()


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _parse_response(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


def raw_request(
    port: int,
    method: bytes,
    headers: list[tuple[bytes, bytes]],
    body_parts: list[bytes] = (),
    path: bytes = b"/webhooks",
) -> Answer:
    """Send exactly these bytes (header values may be any bytes) and read the answer to the close.

    The body is sent part by part; if the server answers and closes before the last part, sending
    stops there and its answer is read all the same.
    """
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" % (method, path)
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # the server closed with our unread body still queued; what it answered is in `received`
    return _parse_response(received)


def post_raw(port: int, body: bytes, *extra: tuple[bytes, bytes], signed: bool = True) -> Answer:
    """POST ``body`` with a Content-Length and ``extra`` headers, and its signature if ``signed``."""
    headers = [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(body)).encode())]
    if signed:
        headers.append((SIGNATURE_HEADER.encode(), sign(body, SECRET).encode()))
    return raw_request(port, b"POST", headers + list(extra), [body])


def chunked(body: bytes, size: int) -> list[bytes]:
    """``body`` in HTTP/1.1 chunked framing, ``size`` bytes a chunk."""
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return [*parts, b"0\r\n\r\n"]


def assert_rejected(answer: Answer, status: int, errors: set[str]) -> dict[str, Any]:
    assert answer.status == status, answer.body[:300]
    assert answer.headers["content-type"].startswith("application/json")
    document = answer.json()
    assert document["error"] in errors and document["message"]
    assert b"Traceback" not in answer.body
    return document


def good_body(resource_id: str = "c1") -> bytes:
    return encode(envelope("contact.created", {"id": resource_id, "username": "ann"}))


# --- signatures --------------------------------------------------------------------------------------

_BODY = good_body()
_SIGNATURE = sign(_BODY, SECRET).encode()
_ALTERED = _BODY.replace(b"ann", b"anN")

SIGNATURE_CASES = {
    "missing": (_BODY, []),
    "empty": (_BODY, [(b"x-protocol-signature", b"")]),
    "wrong length": (_BODY, [(b"x-protocol-signature", _SIGNATURE[:-2])]),
    "too long by one": (_BODY, [(b"x-protocol-signature", _SIGNATURE + b"0")]),
    "uppercase hex": (_BODY, [(b"x-protocol-signature", _SIGNATURE.upper())]),
    "of a different body": (_BODY, [(b"x-protocol-signature", sign(good_body("c2"), SECRET).encode())]),
    "under another secret": (_BODY, [(b"x-protocol-signature", sign(_BODY, "not-the-secret").encode())]),
    "non-ASCII bytes": (_BODY, [(b"x-protocol-signature", _SIGNATURE[:60] + "é€".encode())]),
    "Latin-1 bytes of the right length": (_BODY, [(b"x-protocol-signature", b"\xe9" * 64)]),
    "10 KB long": (_BODY, [(b"x-protocol-signature", b"a" * 10240)]),
    "sent twice": (_BODY, [(b"x-protocol-signature", _SIGNATURE), (b"x-protocol-signature", _SIGNATURE)]),
    "body altered by one byte": (_ALTERED, [(b"x-protocol-signature", _SIGNATURE)]),
}


@pytest.mark.parametrize("case", list(SIGNATURE_CASES))
def test_a_bad_signature_gets_401_and_stores_nothing(served, case):
    body, headers = SIGNATURE_CASES[case]
    before = served.logged()
    answer = post_raw(served.server.port, body, *headers, signed=False)
    assert_rejected(answer, 401, {"missing_signature", "malformed_signature", "bad_signature"})
    assert served.logged() == before


def test_a_header_beyond_even_the_raised_limit_gets_gunicorns_4xx(served):
    answer = post_raw(served.server.port, _BODY, (b"x-protocol-signature", b"a" * 64 * 1024), signed=False)
    assert 400 <= answer.status < 500


# --- bodies --------------------------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    return b'{"id": "e1", "type": "contact.created", "payload": {"id": "c", "x": ' + b"[" * depth + b"]" * depth + b"}}"


def _with(**fields: Any) -> bytes:
    document = {"id": "e-body", "type": "contact.created", "payload": {"id": "c-body"}}
    for name, value in fields.items():
        if name.startswith("payload_"):
            document["payload"][name.removeprefix("payload_")] = value
        elif value is None:
            document.pop(name)
        else:
            document[name] = value
    return encode(document)


BODY_CASES = {
    "empty": b"",
    "not JSON": b"hello",
    "truncated JSON": good_body()[:-5],
    "invalid UTF-8": b'{"id": "e1", "type": "contact.created", "payload": {"id": "c\xff\xfe"}}',
    "UTF-16": json.dumps(envelope("contact.created", {"id": "c"})).encode("utf-16"),
    "UTF-8 with a byte-order mark": b"\xef\xbb\xbf" + good_body(),
    "a JSON array": b'[{"id": "e1", "type": "contact.created", "payload": {"id": "c"}}]',
    "a JSON string": b'"contact.created"',
    "nested 100,000 levels deep": _nested(100_000),
    # Near Python's recursion limit: parsed at one stack depth and not at another, before the limit.
    "nested 980 levels deep": _nested(980),
    "nested 101 levels deep": _nested(99),  # the envelope and the payload are two of them
    "a 5,000-digit integer": b'{"id": "e1", "type": "contact.created", "payload": {"id": "c", "n": '
    + b"9" * 5000
    + b"}}",
    "NaN": b'{"id": "e1", "type": "contact.created", "payload": {"id": "c", "n": NaN}}',
    "Infinity": b'{"id": "e1", "type": "contact.created", "payload": {"id": "c", "n": -Infinity}}',
    "an overflowing float": b'{"id": "e1", "type": "contact.created", "payload": {"id": "c", "n": 1e999}}',
    "duplicate keys": b'{"id": "e1", "id": "e2", "type": "contact.created", "payload": {"id": "c"}}',
    "duplicate keys in the payload": b'{"id": "e1", "type": "contact.created", "payload": {"id": "c", "id": "d"}}',
    "a numeric event id": _with(id=12345),
    "an empty event id": _with(id=""),
    "a 10,000-character event id": _with(id="e" * 10_000),
    "an event id with a NUL": _with(id="e\x00"),
    "a missing event id": _with(id=None),
    "a numeric resource id": _with(payload_id=12345),
    "an empty resource id": _with(payload_id=""),
    "a 10,000-character resource id": _with(payload_id="c" * 10_000),
    "a resource id with a lone surrogate": _with(payload_id="c\ud800"),
    "a missing type": _with(type=None),
    "a type without a dot": _with(type="contact"),
    "a numeric type": _with(type=7),
    "a missing payload": _with(payload=None),
    "a payload that is a list": _with(payload=[{"id": "c"}]),
}


@pytest.mark.parametrize("case", list(BODY_CASES))
def test_a_signed_but_malformed_body_gets_400_and_stores_nothing(served, case):
    before = served.logged()
    assert_rejected(post_raw(served.server.port, BODY_CASES[case]), 400, {"invalid_envelope"})
    assert served.logged() == before


def test_a_10_mib_body_is_refused_on_its_declared_length_before_a_byte_is_sent(served):
    body = good_body()
    headers = [
        (b"Content-Length", str(10 * 1024 * 1024).encode()),
        (SIGNATURE_HEADER.encode(), sign(body, SECRET).encode()),
    ]
    # No body bytes at all: the answer can only come from the declared length, not from reading.
    assert_rejected(raw_request(served.server.port, b"POST", headers, []), 413, {"body_too_large"})


def test_a_10_mib_body_gets_413_although_the_client_sends_only_a_fraction_of_it(served):
    headers = [(b"Content-Length", str(10 * 1024 * 1024).encode()), (SIGNATURE_HEADER.encode(), b"0" * 64)]
    first_64_kib = [b"x" * 65536]
    assert_rejected(raw_request(served.server.port, b"POST", headers, first_64_kib), 413, {"body_too_large"})


def test_a_chunked_body_without_content_length_is_read_whole_and_stored(served):
    body = encode(envelope("contact.created", {"id": "c-chunked", "username": "ann" * 5000}, "e-chunked"))
    headers = [(b"Transfer-Encoding", b"chunked"), (SIGNATURE_HEADER.encode(), sign(body, SECRET).encode())]
    answer = raw_request(served.server.port, b"POST", headers, chunked(body, 1000))
    assert answer.status == 200, answer.body
    assert answer.json() == {"event_id": "e-chunked", "outcome": "applied"}
    with served.engine.connect() as conn:
        payload = conn.scalar(select(events.c.payload).where(events.c.event_id == "e-chunked"))
    assert payload == json.loads(body)["payload"]


def test_an_empty_chunked_body_is_not_stored_as_an_empty_event(served):
    before = served.logged()
    headers = [(b"Transfer-Encoding", b"chunked"), (SIGNATURE_HEADER.encode(), sign(b"", SECRET).encode())]
    assert_rejected(raw_request(served.server.port, b"POST", headers, [b"0\r\n\r\n"]), 400, {"invalid_envelope"})
    assert served.logged() == before


def test_a_chunked_body_over_the_limit_gets_413(served):
    before = served.logged()
    body = b'{"id": "e-huge", "type": "contact.created", "payload": {"id": "c", "x": "' + b"x" * MAX_BODY_BYTES + b'"}}'
    headers = [(b"Transfer-Encoding", b"chunked"), (SIGNATURE_HEADER.encode(), sign(body, SECRET).encode())]
    assert_rejected(raw_request(served.server.port, b"POST", headers, chunked(body, 65536)), 413, {"body_too_large"})
    assert served.logged() == before


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate", b"br", b"GZIP", b"identity, gzip"])
def test_a_compressed_body_gets_415_and_is_not_decompressed(served, encoding):
    before = served.logged()
    body = gzip.compress(good_body())
    answer = post_raw(served.server.port, body, (b"Content-Encoding", encoding))
    assert_rejected(answer, 415, {"unsupported_encoding"})
    assert served.logged() == before


# --- methods ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [b"GET", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"TRACE"])
def test_any_method_but_post_gets_405_with_a_json_body(served, method):
    answer = raw_request(served.server.port, method, [(b"Content-Length", b"0")])
    assert_rejected(answer, 405, {"method_not_allowed"})
    assert "POST" in answer.headers["allow"]


def test_head_gets_405_without_a_body(served):
    answer = raw_request(served.server.port, b"HEAD", [])
    assert answer.status == 405 and answer.body == b""


def test_a_made_up_method_gets_a_json_4xx(served):
    answer = raw_request(served.server.port, b"BREW", [(b"Content-Length", b"0")])
    assert_rejected(answer, 400, {"bad_request"})


def test_an_unknown_path_gets_a_json_404(served):
    answer = raw_request(served.server.port, b"POST", [(b"Content-Length", b"0")], path=b"/webhooks/x")
    assert_rejected(answer, 404, {"not_found"})


# --- authentic but awkward events ------------------------------------------------------------------------

AWKWARD = {
    "NUL characters": envelope(
        "contact.created", {"id": "aw-nul", "username": "a\x00b", "display_name": "\x00"}, "aw-1"
    ),
    "lone surrogates": envelope(
        "contact.created",
        {"id": "aw-surrogate", "username": "x\ud800y", "phone_number": "\udfff", "x": "\udbff"},
        "aw-2",
    ),
    "4-byte emoji": envelope(
        "message.created",
        {
            "id": "aw-emoji",
            "message": "🦀 🏳️‍🌈 \U0001d54f",
            "reactions": [{"😀": ["ann", "\U0001d4b7ob"]}],
            "contact": {"id": "🦀"},
        },
        "aw-3",
    ),
    "right-to-left overrides": envelope(
        "contact.created",
        {"id": "aw-rtl\u202e", "username": "\u202eevil\u202c", "display_name": "\u2067x\u2069"},
        "aw-4",
    ),
    "SQL in text": envelope(
        "group.created",
        {
            "id": "aw-sql'; DROP TABLE coherent_events; --",
            "name": "Robert'); DROP TABLE coherent_groups;--",
            "description": '" OR 1=1 -- \\',
            "contacts": [{"id": "x' OR '1'='1", "username": "%_\\%"}],
        },
        "aw-5' OR '1'='1",
    ),
    "fields of the wrong type": envelope(
        "conversation.created",
        {
            "id": "aw-types",
            "is_pinned": "yes",
            "is_muted": 1,
            "created_at": "yesterday",
            "contact_id": 42,
            "group_id": [],
        },
        "aw-6",
    ),
    "a wrong-typed integer": envelope(
        "attachment.created",
        {"id": "aw-size", "file_size": "big", "filename": ["a"], "message_id": {"id": "m"}},
        "aw-7",
    ),
    "timestamps that do not fit a datetime": envelope(
        "message.created",
        {"id": "aw-time", "created_at": 10**15, "read_at": -(10**13), "updated_at": 1.5e300, "contact": {"id": "c"}},
        "aw-8",
    ),
    "an integer beyond 64 bits": envelope("attachment.created", {"id": "aw-big", "file_size": 2**70}, "aw-9"),
    "an unknown event type": envelope("reaction.created", {"id": "aw-unknown", "emoji": "👍"}, "aw-10"),
    "an unknown action": envelope("contact.merged", {"id": "aw-merged"}, "aw-11"),
    "unknown extra fields": envelope(
        "contact.created",
        {"id": "aw-extra", "username": "u", "shoe_size": 44, "nested": {"a": [1, {"b": None}], "ok": True}},
        "aw-12",
    ),
}

# Expected typed columns and _errors keys, for the state tables the cases above write.
EXPECTED_COLUMNS = {
    ("contact", "aw-nul"): {"username": f"a{REPLACEMENT}b", "display_name": REPLACEMENT},
    ("contact", "aw-surrogate"): {"username": f"x{REPLACEMENT}y", "phone_number": REPLACEMENT},
    ("message", "aw-emoji"): {"message": "🦀 🏳️‍🌈 \U0001d54f", "contact_id": "🦀"},
    ("contact", "aw-rtl\u202e"): {"username": "\u202eevil\u202c", "display_name": "\u2067x\u2069"},
    ("group", "aw-sql'; DROP TABLE coherent_events; --"): {
        "name": "Robert'); DROP TABLE coherent_groups;--",
        "description": '" OR 1=1 -- \\',
    },
    ("contact", "aw-extra"): {"username": "u"},
}
EXPECTED_ERRORS = {
    ("conversation", "aw-types"): {"is_pinned", "is_muted", "created_at", "contact_id", "group_id"},
    ("attachment", "aw-size"): {"file_size", "filename", "message_id"},
    ("message", "aw-time"): {"created_at", "read_at", "updated_at"},
    ("attachment", "aw-big"): {"file_size"},
}

# What each database returned, to compare them with each other.
_SNAPSHOTS: dict[str, Any] = {}


def _body(document: dict[str, Any], ascii_only: bool) -> bytes:
    # Both forms a sender may use: \u escapes, and raw UTF-8 (which cannot carry a lone surrogate).
    try:
        return json.dumps(document, ensure_ascii=ascii_only).encode()
    except UnicodeEncodeError:
        return json.dumps(document).encode()


def _snapshot(engine: Engine) -> dict[str, Any]:
    """Everything the database returns for the awkward events, comparable across databases."""

    def plain(value: Any) -> Any:
        return value.isoformat() if hasattr(value, "isoformat") else value

    snapshot: dict[str, Any] = {}
    with engine.connect() as conn:
        rows = conn.execute(select(events).where(events.c.event_id.like("aw-%")).order_by(events.c.event_id))
        for row in rows.mappings():
            snapshot[f"log:{row['event_id']}"] = {
                key: plain(value) for key, value in row.items() if key not in ("seq", "received_at")
            }
        for resource, table in state_tables.items():
            for row in conn.execute(select(table).where(table.c.id.like("aw-%")).order_by(table.c.id)).mappings():
                snapshot[f"{resource}:{row['id']}"] = {
                    key: plain(value) for key, value in row.items() if key not in ("_synced_at",)
                }
    return snapshot


@pytest.mark.parametrize("ascii_only", [True, False], ids=["escaped", "raw-utf8"])
def test_authentic_awkward_events_are_kept_and_stored_alike_on_every_database(served, ascii_only):
    for name, document in AWKWARD.items():
        document = {**document, "id": f"{document['id']}-{ascii_only}"}
        answer = post_raw(served.server.port, _body(document, ascii_only))
        assert answer.status == 200, (name, answer.body)
        resource, _, action = document["type"].partition(".")
        known = resource in state_tables and action in ("created", "updated", "deleted")
        assert answer.json()["outcome"] == ("applied" if known else "unknown_type"), name

    snapshot = _snapshot(served.engine)
    for document in AWKWARD.values():
        event_id = f"{document['id']}-{ascii_only}"
        logged = snapshot[f"log:{event_id}"]
        assert logged["payload"] == document["payload"], event_id  # the exact payload, byte for byte
        assert logged["type"] == document["type"] and logged["resource_id"] == document["payload"]["id"]
        resource, _, action = document["type"].partition(".")
        if resource in state_tables and action != "merged":
            row = snapshot[f"{resource}:{document['payload']['id']}"]
            assert row["_raw"] == document["payload"]  # unknown fields included
        else:
            assert logged["outcome"] == "unknown_type"
    assert snapshot["log:aw-11-" + str(ascii_only)]["outcome"] == "unknown_type"
    for (resource, resource_id), columns in EXPECTED_COLUMNS.items():
        row = snapshot[f"{resource}:{resource_id}"]
        assert {name: row[name] for name in columns} == columns
        assert row["_errors"] is None
    for (resource, resource_id), fields in EXPECTED_ERRORS.items():
        row = snapshot[f"{resource}:{resource_id}"]
        assert set(row["_errors"]) == fields
        assert all(row[field] is None for field in fields)

    key = f"{ascii_only}"
    for backend, other in _SNAPSHOTS.items():
        if backend.endswith(key):
            assert snapshot == other, f"{served.backend} stores the awkward events differently from {backend}"
    _SNAPSHOTS[f"{served.backend}-{key}"] = snapshot
