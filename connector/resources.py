"""Coherent's five resources: their documented fields and how each value becomes a typed column.

Typing never rejects an event. A value of the wrong type leaves its column NULL and is named in
``_errors``; the value itself survives in ``_raw``. Everything here is pure: no I/O, no SQL.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

# Identifiers (primary keys and the ids that point at other resources) are VARCHAR(255) everywhere.
MAX_ID_LENGTH = 255

# The widest range every supported database stores: MySQL/MariaDB DATETIME runs from the year 1000
# to 9999. Timestamps outside it are recorded in ``_errors`` rather than failing the insert.
MIN_TIMESTAMP = -30_610_224_000  # 1000-01-01T00:00:00Z
MAX_TIMESTAMP = 253_402_300_799  # 9999-12-31T23:59:59Z

MIN_BIGINT, MAX_BIGINT = -(2**63), 2**63 - 1

# NUL cannot be stored in PostgreSQL text, and a lone surrogate cannot be encoded as UTF-8 at all.
# In typed text columns they become U+FFFD on every database alike; ``_raw`` and the change log keep
# the exact value as a JSON escape (\u0000, \ud800), so nothing is lost.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


class Kind(enum.Enum):
    ID = "id"
    TEXT = "text"
    TIMESTAMP = "timestamp"
    BOOLEAN = "boolean"
    INTEGER = "integer"
    OBJECT = "object"
    ARRAY = "array"


@dataclasses.dataclass(frozen=True)
class Resource:
    """One Coherent resource: its name in event types, its table and its typed fields."""

    name: str
    table: str
    fields: Mapping[str, Kind]

    @property
    def columns(self) -> Mapping[str, Kind]:
        """The typed columns of the current-state table, including derived ones."""
        if self.name == "message":
            return {**self.fields, "contact_id": Kind.ID}
        return self.fields


RESOURCES: dict[str, Resource] = {
    r.name: r
    for r in (
        Resource(
            "contact",
            "coherent_contacts",
            {
                "username": Kind.TEXT,
                "phone_number": Kind.TEXT,
                "avatar_url": Kind.TEXT,
                "display_name": Kind.TEXT,
                "conversation_id": Kind.ID,
                "last_active_at": Kind.TIMESTAMP,
                "created_at": Kind.TIMESTAMP,
            },
        ),
        Resource(
            "conversation",
            "coherent_conversations",
            {
                "contact_id": Kind.ID,
                "group_id": Kind.ID,
                "pinned_message_id": Kind.ID,
                "is_pinned": Kind.BOOLEAN,
                "is_muted": Kind.BOOLEAN,
                "last_active_at": Kind.TIMESTAMP,
                "last_opened_at": Kind.TIMESTAMP,
                "created_at": Kind.TIMESTAMP,
                "archived_at": Kind.TIMESTAMP,
            },
        ),
        Resource(
            "message",
            "coherent_messages",
            {
                "conversation_id": Kind.ID,
                "contact": Kind.OBJECT,
                "message": Kind.TEXT,
                "reactions": Kind.ARRAY,
                "attachments": Kind.ARRAY,
                "read_at": Kind.TIMESTAMP,
                "created_at": Kind.TIMESTAMP,
                "updated_at": Kind.TIMESTAMP,
            },
        ),
        Resource(
            "group",
            "coherent_groups",
            {
                "name": Kind.TEXT,
                "description": Kind.TEXT,
                "avatar_url": Kind.TEXT,
                "conversation_id": Kind.ID,
                "contacts": Kind.ARRAY,
                "created_at": Kind.TIMESTAMP,
                "archived_at": Kind.TIMESTAMP,
            },
        ),
        Resource(
            "attachment",
            "coherent_attachments",
            {
                "message_id": Kind.ID,
                "filename": Kind.TEXT,
                "file_url": Kind.TEXT,
                "file_type": Kind.TEXT,
                "file_size": Kind.INTEGER,
                "created_at": Kind.TIMESTAMP,
            },
        ),
    )
}

ACTIONS = ("created", "updated", "deleted")


class TypingError(ValueError):
    """A value that does not fit its column; the message becomes the entry in ``_errors``."""


def storable_text(value: str) -> str:
    """Replace the characters no database here can store in a text column with U+FFFD."""
    return _UNSTORABLE.sub(REPLACEMENT, value)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def timestamp_to_datetime(value: Any) -> datetime:
    """Convert Unix seconds to an aware UTC datetime, or raise :class:`TypingError`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypingError(f"expected Unix seconds, got {_type_name(value)}")
    if not math.isfinite(value) or not MIN_TIMESTAMP <= value <= MAX_TIMESTAMP:
        raise TypingError("Unix seconds outside the years 1000 to 9999")
    return datetime.fromtimestamp(value, tz=UTC)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypingError(f"expected a string, got {_type_name(value)}")
    return storable_text(value)


def _identifier(value: Any) -> str:
    if isinstance(value, str) and len(value) > MAX_ID_LENGTH:
        raise TypingError(f"an id longer than {MAX_ID_LENGTH} characters")
    return _text(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypingError(f"expected a boolean, got {_type_name(value)}")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypingError(f"expected an integer, got {_type_name(value)}")
    if not MIN_BIGINT <= value <= MAX_BIGINT:
        raise TypingError("an integer outside the 64-bit range")
    return value


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypingError(f"expected an object, got {_type_name(value)}")
    return value


def _array(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypingError(f"expected an array, got {_type_name(value)}")
    return value


_CONVERTERS: dict[Kind, Callable[[Any], Any]] = {
    Kind.ID: _identifier,
    Kind.TEXT: _text,
    Kind.TIMESTAMP: timestamp_to_datetime,
    Kind.BOOLEAN: _boolean,
    Kind.INTEGER: _integer,
    Kind.OBJECT: _object,
    Kind.ARRAY: _array,
}


def type_value(kind: Kind, value: Any) -> Any:
    """Return ``value`` as its column stores it, or raise :class:`TypingError`. None stays None."""
    return None if value is None else _CONVERTERS[kind](value)


def _message_contact_id(raw: Mapping[str, Any]) -> Any:
    contact = raw.get("contact")
    return contact.get("id") if isinstance(contact, dict) else None


# Typing runs for every row written, so each resource's columns are resolved once: the column's
# name, how to derive its value where it is not a field of the payload, and its converter.
_Derive = Callable[[Mapping[str, Any]], Any]
_DERIVED: dict[tuple[str, str], _Derive] = {("message", "contact_id"): _message_contact_id}
_TYPERS: dict[str, tuple[tuple[str, _Derive | None, Callable[[Any], Any]], ...]] = {
    resource.name: tuple(
        (name, _DERIVED.get((resource.name, name)), _CONVERTERS[kind]) for name, kind in resource.columns.items()
    )
    for resource in RESOURCES.values()
}


def typed_columns(resource: Resource, raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Type every documented field of a merged payload.

    Returns the column values and the errors, a dict from field name to what was wrong. A field
    absent from ``raw`` is NULL, as it is when present as null.
    """
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, derive, convert in _TYPERS[resource.name]:
        value = raw.get(name) if derive is None else derive(raw)
        if value is None:
            values[name] = None
            continue
        try:
            values[name] = convert(value)
        except TypingError as exc:
            values[name] = None
            errors[name] = str(exc)
    return values, errors


def group_members(raw: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """Rows of ``coherent_group_members`` from a group's ``contacts``, and an error if any was skipped."""
    contacts = raw.get("contacts")
    if not isinstance(contacts, list):
        return [], None
    rows, skipped = [], 0
    for position, contact in enumerate(contacts):
        try:
            if not isinstance(contact, dict):
                raise TypingError("not an object")
            rows.append(
                {
                    "position": position,
                    "contact_id": type_value(Kind.ID, contact.get("id")),
                    "username": type_value(Kind.TEXT, contact.get("username")),
                }
            )
        except TypingError:
            skipped += 1
    return rows, f"{skipped} member(s) were not objects with string id and username" if skipped else None


def message_reactions(raw: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """Rows of ``coherent_message_reactions`` from a message's ``reactions``.

    Each reaction object maps an emoji name to the usernames who reacted, e.g.
    ``[{"red_angry_face": ["KateMcCallister"]}]``.
    """
    reactions = raw.get("reactions")
    if not isinstance(reactions, list):
        return [], None
    rows, skipped = [], 0
    for reaction in reactions:
        if not isinstance(reaction, dict):
            skipped += 1
            continue
        for emoji, usernames in reaction.items():
            if len(emoji) > MAX_ID_LENGTH or not isinstance(usernames, list):
                skipped += 1
                continue
            for username in usernames:
                if not isinstance(username, str):
                    skipped += 1
                    continue
                rows.append(
                    {
                        "position": len(rows),
                        "emoji": storable_text(emoji),
                        "username": storable_text(username),
                    }
                )
    return rows, f"{skipped} reaction entries were not emoji -> [username] lists" if skipped else None
