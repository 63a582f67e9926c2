"""Column types that behave the same on SQLite, PostgreSQL and MySQL/MariaDB."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String, Text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

# VARCHAR(255): identifiers. utf8mb4 at 4 bytes a character keeps a primary key within InnoDB's limit.
Identifier = String(255)

# MySQL's TEXT holds only 64 KiB; a message may be longer. LONGTEXT holds anything a body can carry.
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
Sequence = BigInteger().with_variant(Integer(), "sqlite")

# ASCII-only JSON: \u0000 and lone surrogates stay escapes, which every database accepts in a JSON
# or text column, so any document a sender signs can be stored exactly.
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False, check_circular=False)
# The C encoder that ``_ENCODER.encode`` builds afresh for every call, built once (where Python has it).
# Documents parsed from JSON cannot refer to themselves, so there is no check for cycles.
_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODER = _make_encoder and _make_encoder(
    None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False
)


def json_dumps(value: Any) -> str:
    """``value`` as compact, ASCII-only JSON; NaN and infinities are refused (ValueError)."""
    if _C_ENCODER is None:
        return _ENCODER.encode(value)
    return "".join(_C_ENCODER(value, 0))


class JSONText(TypeDecorator[Any]):
    """JSON kept as LONGTEXT on MySQL and MariaDB.

    MariaDB's JSON type is LONGTEXT with a ``json_valid`` CHECK, and that check refuses a lone
    surrogate escape such as ``"\\ud800"`` that Python, PostgreSQL's ``json`` and SQLite accept. Without
    the check the same text is stored on every database, and JSON_VALUE() and friends still work.
    """

    impl = mysql.LONGTEXT
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else json_dumps(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else json.loads(value)


# PostgreSQL's ``json`` (not ``jsonb``) keeps \u0000 and lone-surrogate escapes, which jsonb refuses.
Document = JSON(none_as_null=True).with_variant(JSONText(), "mysql", "mariadb")


class UTCDateTime(TypeDecorator[datetime]):
    """An instant in UTC: ``timestamptz`` on PostgreSQL, naive UTC elsewhere, always aware in Python."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=dialect.name == "postgresql"))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
