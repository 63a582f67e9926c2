"""Structured logs: one line per request, as JSON or logfmt (the ``log_format`` setting).

A request's line carries its method, path, route, status, latency and, for a webhook, the event id,
type and outcome, or the reason it was refused. Nothing else from the request is logged: never its
body, its headers or a secret.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from connector.config import Config

if TYPE_CHECKING:
    from connector.telemetry import RequestSummary

REQUEST_LOG = logging.getLogger("connector.requests")

# A request path is chosen by whoever sends the request; cut it short so a log line stays a line.
_MAX_PATH = 200
_BARE_LOGFMT_VALUE = re.compile(r"[A-Za-z0-9_.:/@+-]+")


def request_fields(summary: RequestSummary) -> dict[str, Any]:
    """The fields of a request's log line, without the empty ones."""
    fields = {
        "method": summary.method,
        "path": summary.path[:_MAX_PATH],
        "route": summary.route,
        "status": summary.status,
        "latency_ms": round(summary.latency * 1000, 3),
        "event_id": summary.event_id,
        "type": summary.event_type,
        "outcome": summary.outcome,
        "reason": summary.reason,
    }
    return {name: value for name, value in fields.items() if value is not None}


def log_request(summary: RequestSummary) -> None:
    """Write the one log line of an answered request."""
    level = logging.WARNING if summary.status >= 500 else logging.INFO
    REQUEST_LOG.log(level, "request", extra={"fields": request_fields(summary)})


def _base_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
        **getattr(record, "fields", {}),
    }


class JSONFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _base_fields(record)
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str)


def logfmt_value(value: Any) -> str:
    """A value as logfmt writes it: bare when it is one plain word, else quoted with escapes."""
    text = str(value)
    if _BARE_LOGFMT_VALUE.fullmatch(text):
        return text
    # JSON string escaping quotes the value and escapes quotes, backslashes and control characters,
    # so a hostile path cannot forge a second line or a field.
    return json.dumps(text)


class LogfmtFormatter(logging.Formatter):
    """``key=value`` pairs, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _base_fields(record)
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return " ".join(f"{name}={logfmt_value(value)}" for name, value in fields.items())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of writing (tests and daemons swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(config: Config) -> None:
    """Send the connector's logs to stderr in the configured format; calling it again replaces it."""
    logger = logging.getLogger("connector")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(JSONFormatter() if config.log_format == "json" else LogfmtFormatter())
    logger.addHandler(handler)
    logger.setLevel(config.log_level.upper())
    # The connector's lines are complete here; passing them on to the root logger would print them twice.
    logger.propagate = False
