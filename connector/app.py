"""Wiring: ``create_app(config)`` builds the Falcon app, and maps every error to HTTP in one place."""

from __future__ import annotations

import http
import logging

import falcon

from connector.config import Config
from connector.db.engine import create_engine_for
from connector.db.store import EventStore
from connector.errors import DatabaseUnavailable, RequestRejected
from connector.group_commit import GroupCommit
from connector.metrics import MetricsResource
from connector.telemetry import RequestTelemetry
from connector.webhooks import HealthResource, ReadinessResource, WebhookResource

log = logging.getLogger(__name__)


def _rejected(req: falcon.Request, resp: falcon.Response, exc: RequestRejected, params: dict) -> None:
    req.context.rejected = exc.reason
    resp.status = exc.status
    resp.media = {"error": exc.reason, "message": exc.message}


def _unavailable(
    req: falcon.Request, resp: falcon.Response, exc: DatabaseUnavailable, params: dict, *, retry_after: int
) -> None:
    # The only 5xx the connector sends on purpose: the sender retries, and since the transaction
    # rolled back, the retry is applied exactly once.
    req.context.rejected = "database_unavailable"
    resp.status = falcon.HTTP_503
    resp.set_header("Retry-After", str(retry_after))
    resp.media = {
        "error": "database_unavailable",
        "message": str(exc) or "the database is unavailable; retry later",
    }


def _serialize_http_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    # Falcon's own errors (404, 405, ...) answer in the same {"error", "message"} shape as ours.
    # From the status, not the title: Falcon's titles vary ("405 Method Not Allowed", "Bad request").
    reason = http.HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    req.context.rejected = reason
    resp.content_type = falcon.MEDIA_JSON
    resp.media = {"error": reason, "message": exc.description or exc.title}


def _unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict) -> None:
    if isinstance(exc, falcon.HTTPError):  # Falcon's own 404, 405 and friends keep their answer
        raise exc
    log.exception("unexpected error handling %s %s", req.method, req.path)
    req.context.rejected = "internal_error"
    resp.status = falcon.HTTP_500
    resp.media = {"error": "internal_error", "message": "an unexpected error occurred; it has been logged"}


def create_app(config: Config, store: EventStore | None = None) -> falcon.App:
    """Build the WSGI app for ``config``; tests may hand in a ``store`` on an engine of their own."""
    config.require_secrets()
    if store is None:
        store = EventStore(
            create_engine_for(config),
            retry_attempts=config.retry_attempts,
            lock_timeout_seconds=max(config.lock_timeout_ms, config.sqlite_busy_timeout_ms) / 1000,
        )
    app = falcon.App(middleware=[RequestTelemetry()])
    app.req_options.strip_url_path_trailing_slash = True
    app.add_route("/webhooks", WebhookResource(GroupCommit(store), config))
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadinessResource(store))
    app.add_route("/metrics", MetricsResource())
    app.set_error_serializer(_serialize_http_error)
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(RequestRejected, _rejected)
    app.add_error_handler(
        DatabaseUnavailable,
        lambda req, resp, exc, params: _unavailable(req, resp, exc, params, retry_after=config.retry_after_seconds),
    )
    return app
