"""Every error the connector raises on purpose, defined once.

``connector.app`` maps them to HTTP answers in one place; the CLI maps them to exit codes.
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Base class of the connector's deliberate errors."""


class ConfigError(ConnectorError):
    """The configuration is missing something or holds an invalid value."""


class ImportFailed(ConnectorError):
    """An import stopped part-way: a loading process failed or died. What was committed stays, and
    rerunning the import completes it."""


class FileChanged(ImportFailed):
    """A file being imported no longer holds what checking it found."""


class RequestRejected(ConnectorError):
    """A webhook request that is refused for what it is: the sender must not retry it as-is.

    ``status`` is the HTTP status and ``reason`` a short, stable machine-readable code (it also labels
    the rejection metric); the message says what is wrong in words.
    """

    status = "400 Bad Request"
    reason = "bad_request"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class SignatureInvalid(RequestRejected):
    status = "401 Unauthorized"
    reason = "bad_signature"


class BodyTooLarge(RequestRejected):
    status = "413 Content Too Large"
    reason = "body_too_large"


class LengthRequired(RequestRejected):
    status = "411 Length Required"
    reason = "length_required"


class UnsupportedEncoding(RequestRejected):
    status = "415 Unsupported Media Type"
    reason = "unsupported_encoding"


class InvalidEnvelope(RequestRejected):
    """The signed body is not a well-formed Coherent envelope."""

    status = "400 Bad Request"
    reason = "invalid_envelope"


class DatabaseUnavailable(ConnectorError):
    """The database could not take the event now; the sender should retry later (503)."""


class WriteRefused(DatabaseUnavailable):
    """The database refused the write for what it holds (a constraint, a value it cannot store).

    Still a 503 to the sender, whose later retry may meet a repaired database. A group of events that
    fails this way is run again one event at a time, so the others are not refused with it (see
    ``connector.group_commit``).
    """
