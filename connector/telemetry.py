"""The Falcon middleware that measures each request once and hands it to the metrics and the log."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import falcon

from connector import logs, metrics


@dataclasses.dataclass(frozen=True, slots=True)
class RequestSummary:
    """What is known about one answered request; never its body or headers."""

    method: str
    path: str
    route: str
    status: int
    latency: float
    event_id: str | None = None
    event_type: str | None = None
    outcome: str | None = None
    reason: str | None = None


def summarize(req: falcon.Request, resp: falcon.Response, latency: float) -> RequestSummary:
    """Collect the summary from what the resource and the error handlers left on ``req.context``."""
    status = resp.status_code
    event = getattr(req.context, "event", None)
    outcome = getattr(req.context, "outcome", None)
    reason = getattr(req.context, "rejected", None)
    if reason is None and status >= 400:
        reason = f"http_{status}"  # an error answer that no handler named
    return RequestSummary(
        method=req.method,
        path=req.path,
        route=req.uri_template or "unmatched",
        status=status,
        latency=latency,
        event_id=event.event_id if event is not None else None,
        event_type=event.type if event is not None else None,
        outcome=outcome.value if outcome is not None else None,
        reason=reason,
    )


class RequestTelemetry:
    """Times every request, then counts it in the metrics and writes its one log line."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool) -> None:
        summary = summarize(req, resp, time.perf_counter() - req.context.started)
        metrics.observe_request(summary)
        logs.log_request(summary)
