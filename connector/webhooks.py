"""The HTTP surface: thin Falcon resources that read, verify, parse and hand over to the store."""

from __future__ import annotations

from typing import Any

import falcon

from connector.config import Config
from connector.db.migrate import head_revision
from connector.db.store import EventStore
from connector.errors import BodyTooLarge, DatabaseUnavailable, LengthRequired, UnsupportedEncoding
from connector.events import parse_event
from connector.group_commit import GroupCommit
from connector.signing import SIGNATURE_HEADER, verify_signature

_READ_CHUNK = 64 * 1024


def read_body(req: falcon.Request, limit: int) -> bytes:
    """Read the raw request body, refusing anything over ``limit`` bytes without reading it all.

    A declared Content-Length over the limit is refused before a byte is read. A chunked body has
    no length up front, so it is read in chunks until the limit is passed; that needs a server that
    ends the input stream at the end of the body (gunicorn does, and says so in the environ).
    """
    encoding = (req.get_header("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding[:40]!r} is not accepted: send the JSON body uncompressed"
        )
    length = req.content_length
    if length is not None:
        if length > limit:
            raise BodyTooLarge(f"the body is {length} bytes; the limit is {limit}")
        return req.bounded_stream.read()
    if not req.env.get("wsgi.input_terminated"):
        raise LengthRequired("send a Content-Length header, or a chunked body to a server that supports it")
    chunks, size = [], 0
    while chunk := req.stream.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class WebhookResource:
    """``POST /webhooks``: one Coherent event per request, committed with those in flight beside it."""

    def __init__(self, group_commit: GroupCommit, config: Config) -> None:
        self.group_commit = group_commit
        self.secrets = config.webhook_secrets
        self.max_body_bytes = config.max_body_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_body(req, self.max_body_bytes)
        verify_signature(body, req.get_header(SIGNATURE_HEADER), self.secrets)
        event = parse_event(body)
        req.context.event = event  # for the request's log line, also when recording it fails
        outcome = self.group_commit.record(event)
        req.context.outcome = outcome
        resp.media = {"event_id": event.event_id, "outcome": outcome.value}

    def on_options(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Nothing to negotiate on a webhook endpoint; Falcon would otherwise answer 200.
        raise falcon.HTTPMethodNotAllowed(["POST"])


class HealthResource:
    """``GET /healthz``: the process is up."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadinessResource:
    """``GET /readyz``: the database answers and is migrated to the head revision."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.head = head_revision()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        current = self.store.current_revision()
        if current != (self.head,):
            raise DatabaseUnavailable(
                f"the database is at revision {', '.join(current) or 'none'}, not {self.head}: "
                "run `connector migrate` (or `alembic upgrade head`)"
            )
        body: dict[str, Any] = {"status": "ready", "revision": self.head}
        resp.media = body
