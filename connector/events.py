"""Coherent's webhook envelope and the ordering rules that turn events into current state.

Pure: bytes in, values out, no I/O. The store (``connector.db.store``) does the reading, locking and
writing around :func:`apply_event`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from datetime import datetime
from typing import Any

from connector.errors import InvalidEnvelope
from connector.resources import ACTIONS, MAX_ID_LENGTH, RESOURCES

# Integers longer than this are refused with a clear message. Python would refuse beyond 4,300
# digits anyway; no Coherent field needs more than a 64-bit integer.
MAX_INTEGER_DIGITS = 100
MAX_TYPE_LENGTH = 100
# Objects and arrays nested deeper than this are refused. Without a fixed limit, what parses depends
# on how deep the parser's own stack already is: a document near Python's recursion limit parsed in
# one place and failed in another (or when it was serialised again to be stored).
MAX_NESTING = 100

_TYPE_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+")
# Control characters and lone surrogates have no place in an identifier.
_BAD_ID_CHARS = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


class Outcome(enum.StrEnum):
    """What recording an event did; the change log stores it in ``outcome``."""

    APPLIED = "applied"  # the event changed the current state
    STALE = "stale"  # older than what the row holds (rules 3 and 4); recorded, not applied
    AFTER_DELETE = "after_delete"  # arrived after the row was deleted (rule 2); recorded, not applied
    UNKNOWN_TYPE = "unknown_type"  # authentic, but a type the connector does not know; recorded only
    DUPLICATE = "duplicate"  # an event id already in the log: nothing is written at all


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One webhook envelope, checked."""

    event_id: str
    type: str
    resource: str
    action: str
    resource_id: str
    payload: dict[str, Any]

    @property
    def known(self) -> bool:
        """True for the 15 event types the connector applies to current-state tables."""
        return self.resource in RESOURCES and self.action in ACTIONS


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise InvalidEnvelope(f"the JSON body has the key {duplicate[:50]!r} more than once")
    return result


def _reject_constant(name: str) -> Any:
    raise InvalidEnvelope(f"the JSON body contains {name}, which is not valid JSON")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise InvalidEnvelope(f"the JSON body has an integer longer than {MAX_INTEGER_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidEnvelope("the JSON body has a number too large to represent")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_reject_duplicate_keys,
    parse_constant=_reject_constant,
    parse_int=_parse_int,
    parse_float=_parse_float,
)


_NESTED_TOO_DEEPLY = f"the JSON body is nested too deeply (more than {MAX_NESTING} levels)"


def _too_deep(document: Any) -> bool:
    """Whether ``document`` nests objects and arrays more than MAX_NESTING levels deep."""
    stack = [(document, 1)] if isinstance(document, dict | list) else []
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def decode_json(body: bytes) -> Any:
    """Decode a strict JSON document: UTF-8, no duplicate keys, no NaN, no huge numbers, at most
    MAX_NESTING levels deep."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEnvelope(f"the body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        document = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidEnvelope(f"the body is not valid JSON: {exc.msg} at character {exc.pos}") from exc
    except RecursionError as exc:
        raise InvalidEnvelope(_NESTED_TOO_DEEPLY) from exc
    # Nesting needs an opening bracket per level, so a body with few cannot be too deep: the walk is
    # left to the rare body with many (it cost 3 us for every event).
    if body.count(b"[") + body.count(b"{") > MAX_NESTING and _too_deep(document):
        raise InvalidEnvelope(_NESTED_TOO_DEEPLY)
    return document


def _identifier(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidEnvelope(f"{what} must be a string")
    if not value:
        raise InvalidEnvelope(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidEnvelope(f"{what} is longer than {MAX_ID_LENGTH} characters")
    if _BAD_ID_CHARS.search(value):
        raise InvalidEnvelope(f"{what} contains control characters or invalid Unicode")
    return value


def parse_event(body: bytes) -> Event:
    """Parse and check a signed body as a Coherent envelope ``{"id", "type", "payload"}``.

    Raises :class:`InvalidEnvelope` with a message naming the problem.
    """
    return event_from_document(decode_json(body))


def event_from_document(document: Any) -> Event:
    """Check an already decoded JSON document as a Coherent envelope; see :func:`parse_event`."""
    if not isinstance(document, dict):
        raise InvalidEnvelope("the body must be a JSON object")
    event_id = _identifier(document.get("id"), "the event 'id'")
    event_type = document.get("type")
    if not isinstance(event_type, str):
        raise InvalidEnvelope("the event 'type' must be a string")
    if len(event_type) > MAX_TYPE_LENGTH or _TYPE_SHAPE.fullmatch(event_type) is None:
        raise InvalidEnvelope("the event 'type' must have the form 'resource.action'")
    payload = document.get("payload")
    if not isinstance(payload, dict):
        raise InvalidEnvelope("the event 'payload' must be a JSON object")
    resource_id = _identifier(payload.get("id"), "the payload 'id'")
    resource, _, action = event_type.partition(".")
    return Event(event_id, event_type, resource, action, resource_id, payload)


@dataclasses.dataclass(frozen=True, slots=True)
class RowState:
    """What a current-state row holds, as far as the ordering rules are concerned."""

    raw: dict[str, Any]
    last_action: str
    event_id: str
    deleted_at: datetime | None = None


def _timestamp(raw: dict[str, Any], field: str) -> int | float | None:
    value = raw.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _older(event: Event, current: RowState) -> bool:
    """Rule 4: both carry a numeric ``updated_at`` and the event's is older."""
    incoming, stored = _timestamp(event.payload, "updated_at"), _timestamp(current.raw, "updated_at")
    return incoming is not None and stored is not None and incoming < stored


def apply_event(current: RowState | None, event: Event, received_at: datetime) -> tuple[Outcome, RowState | None]:
    """Apply one event of a known type to a row's state under the ordering rules.

    Returns the outcome and the new state, or ``None`` where the row must not change.

    Coherent delivers at least once and in no guaranteed order, so:

    1. An event id is applied at most once (the store checks the change log before calling this).
    2. ``deleted`` is terminal. A deleted row keeps its values, gets ``deleted_at`` and is never
       revived or changed by anything that arrives later (outcome ``after_delete``). A delete for an
       id never seen before leaves a tombstone row holding whatever the delete carried.
    3. ``created`` never overwrites a row that an ``updated`` or ``deleted`` event already wrote
       (outcome ``stale``): a create that arrives late describes an older version.
    4. Where both the row and the event carry a numeric ``updated_at``, an event with an older one
       never overwrites the newer (outcome ``stale``). A delete that is older still deletes, but
       does not bring back the older field values.
    5. Otherwise the later arrival wins. The payload is merged into the stored one field by field:
       a field absent from the payload keeps its stored value, a field present as null becomes null.
    """
    if current is not None and current.deleted_at is not None:
        return Outcome.AFTER_DELETE, None
    if event.action == "deleted":
        if current is None:
            return Outcome.APPLIED, RowState(dict(event.payload), "deleted", event.event_id, received_at)
        raw = current.raw if _older(event, current) else {**current.raw, **event.payload}
        return Outcome.APPLIED, RowState(raw, "deleted", event.event_id, received_at)
    if current is None:
        return Outcome.APPLIED, RowState(dict(event.payload), event.action, event.event_id)
    if event.action == "created" and current.last_action != "created":
        return Outcome.STALE, None
    if _older(event, current):
        return Outcome.STALE, None
    return Outcome.APPLIED, RowState({**current.raw, **event.payload}, event.action, event.event_id)
