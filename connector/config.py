"""One configuration object for the receiver, the CLI and Alembic.

Precedence, lowest first: built-in defaults < the TOML file named by ``CONNECTOR_CONFIG`` <
``CONNECTOR_*`` environment variables < explicit keyword arguments.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from connector.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///coherent.db"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of the connector; ``config.example.toml`` documents each one."""

    database_url: str = DEFAULT_DATABASE_URL
    webhook_secrets: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    max_body_bytes: int = 1024 * 1024
    bind: str = "127.0.0.1:8000"
    workers: int = 2
    threads: int = 16
    timeout: int = 30
    graceful_timeout: int = 30
    lock_timeout_ms: int = 2000
    sqlite_busy_timeout_ms: int = 2000
    retry_attempts: int = 5
    retry_after_seconds: int = 5
    log_format: str = "json"
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ConfigError("max_body_bytes must be a positive number of bytes")
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        if self.threads < 1:
            raise ConfigError("threads must be at least 1")
        if self.retry_attempts < 1:
            raise ConfigError("retry_attempts must be at least 1")
        if self.log_format not in ("json", "logfmt"):
            raise ConfigError("log_format must be 'json' or 'logfmt'")
        if any(not secret for secret in self.webhook_secrets):
            raise ConfigError("webhook_secrets must not contain an empty secret")

    def require_secrets(self) -> None:
        """Refuse to receive webhooks with nothing to verify them against."""
        if not self.webhook_secrets:
            raise ConfigError(
                "no webhook secret is configured: set CONNECTOR_WEBHOOK_SECRETS "
                "(comma-separated) or webhook_secrets in the file named by CONNECTOR_CONFIG"
            )

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict that is safe to print or log: secrets are counted, never shown."""
        values = dataclasses.asdict(self)
        values["webhook_secrets"] = f"<{len(self.webhook_secrets)} configured>"
        return values


_FIELDS = {field.name: field for field in dataclasses.fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML or environment value into the type the field declares."""
    default = _FIELDS[name].default
    try:
        if name == "webhook_secrets":
            if isinstance(value, str):
                value = value.split(",")
            return tuple(secret.strip() for secret in value if secret.strip())
        if isinstance(default, bool):
            return str(value).lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r} has an invalid value") from exc


def load_config(environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Build the configuration from defaults, the TOML file, the environment and ``overrides``."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}

    path = environ.get("CONNECTOR_CONFIG")
    if path:
        try:
            with Path(path).open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"CONNECTOR_CONFIG names {path!r}, which does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        unknown = set(data) - set(_FIELDS)
        if unknown:
            raise ConfigError(f"{path} has unknown settings: {', '.join(sorted(unknown))}")
        values.update({name: _coerce(name, value) for name, value in data.items()})

    for name in _FIELDS:
        env_value = environ.get(f"CONNECTOR_{name.upper()}")
        if env_value is not None and env_value != "":
            values[name] = _coerce(name, env_value)

    values.update({name: _coerce(name, value) for name, value in overrides.items() if value is not None})
    return Config(**values)
