"""Prometheus metrics, served at ``GET /metrics``, summed across gunicorn workers.

Each gunicorn worker is a process with counters of its own, so a scrape answered by one worker would
show only that worker's share. prometheus_client's multiprocess mode has every process write its
values to files in ``PROMETHEUS_MULTIPROC_DIR`` and sums them at scrape time. prometheus_client
decides which mode to use when it is first imported, so the directory is set up in the gunicorn
master before any worker starts (see ``connector.gunicorn_conf``). Without it (tests, a single
process) the metrics live in the process as usual.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import falcon
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from connector.resources import ACTIONS, RESOURCES

if TYPE_CHECKING:
    from connector.telemetry import RequestSummary

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Label values must come from a small set: each distinct value is a time series kept forever.
# Unknown event types are authentic but unbounded, so they share one label value; the log line has
# the exact type.
KNOWN_TYPES = frozenset(f"{resource}.{action}" for resource in RESOURCES for action in ACTIONS)
OTHER_TYPE = "other"

EVENTS_RECEIVED = Counter(
    "coherent_events_received",
    "Webhook events answered 2xx, by event type ('other' for unknown types) and outcome.",
    ["type", "outcome"],
)
REQUESTS_REJECTED = Counter(
    "coherent_requests_rejected",
    "Requests answered with an error, by reason: the 'error' code of the JSON answer.",
    ["reason"],
)
REQUEST_DURATION = Histogram(
    "coherent_request_duration_seconds",
    "Time from the start of a request to its answer, by method, route and status.",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
DATABASE_ERRORS = Counter(
    "coherent_database_errors",
    "Database errors met while recording events, by driver error class; transient ones are retried.",
    ["error"],
)
DATABASE_RETRIES = Counter(
    "coherent_database_retries",
    "Transactions run again after a transient database error or a race lost to a concurrent writer.",
)
GROUP_SIZE = Histogram(
    "coherent_group_commit_size",
    "Events recorded per transaction by the webhook receiver (group commit; see connector.group_commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


def observe_request(summary: RequestSummary) -> None:
    """Count one answered request."""
    REQUEST_DURATION.labels(summary.method, summary.route, str(summary.status)).observe(summary.latency)
    if summary.outcome is not None and summary.event_type is not None:
        event_type = summary.event_type if summary.event_type in KNOWN_TYPES else OTHER_TYPE
        EVENTS_RECEIVED.labels(event_type, summary.outcome).inc()
    if summary.reason is not None:
        REQUESTS_REJECTED.labels(summary.reason).inc()


def render() -> bytes:
    """The metrics in Prometheus text format: every worker's, summed, in multiprocess mode."""
    if os.environ.get(MULTIPROC_DIR_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


class MetricsResource:
    """``GET /metrics``: Prometheus text."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = render()
