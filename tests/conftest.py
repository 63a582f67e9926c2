"""Shared fixtures: real SQLite, PostgreSQL and MariaDB databases, created fresh for each test run.

PostgreSQL and MariaDB are found at ``CONNECTOR_TEST_POSTGRES_URL`` and ``CONNECTOR_TEST_MARIADB_URL``
(defaulting to the local servers). Where one cannot be reached its tests skip, except under CI
(``CI`` set), where an unreachable server fails the run: CI must never pass by skipping.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from falcon import testing
from sqlalchemy import Engine, create_engine, delete, text
from sqlalchemy.engine import make_url

from connector.app import create_app
from connector.config import Config
from connector.db import migrate
from connector.db.engine import create_engine_for
from connector.db.schema import metadata
from connector.db.store import EventStore
from connector.signing import sign

SECRET = "test-secret"
PAYLOADS = Path(__file__).parent / "payloads"
DATABASES = ["sqlite", "postgresql", "mariadb"]

_SERVER_URLS = {
    "postgresql": os.environ.get("CONNECTOR_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/postgres"),
    "mariadb": os.environ.get("CONNECTOR_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}


def _unreachable(backend: str, exc: Exception) -> None:
    message = f"{backend} is not reachable at {_SERVER_URLS[backend]}: {exc}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must run every database's tests)")
    pytest.skip(message)


def _create_server_database(backend: str) -> Iterator[str]:
    """Create a database of this run's own on a server, yield its URL, drop it afterwards."""
    admin_url = make_url(_SERVER_URLS[backend])
    name = f"coherent_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            else:
                conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"))
    except Exception as exc:
        admin.dispose()
        _unreachable(backend, exc)
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            else:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    yield from _create_server_database("postgresql")


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    yield from _create_server_database("mariadb")


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'coherent.db'}"


def make_config(database_url: str, **overrides: Any) -> Config:
    """A configuration for tests: a known secret and the given database."""
    return Config(**{"database_url": database_url, "webhook_secrets": (SECRET,), **overrides})


@pytest.fixture(scope="session")
def _migrated_engines() -> Iterator[dict[str, Engine]]:
    engines: dict[str, Engine] = {}
    yield engines
    for engine in engines.values():
        engine.dispose()


def migrated_url(request: pytest.FixtureRequest, backend: str) -> str:
    """The URL of this run's migrated database of kind ``backend``, emptied; any fixture scope may call it."""
    url = request.getfixturevalue(f"{backend}_url")
    engines = request.getfixturevalue("_migrated_engines")
    if backend not in engines:
        engines[backend] = create_engine_for(make_config(url))
        migrate.upgrade(engines[backend])
    empty_tables(engines[backend])
    return url


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest) -> str:
    """The URL of a migrated database of each kind, emptied before the test."""
    return migrated_url(request, request.param)


def empty_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(delete(table))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a migrated, empty database of each kind."""
    engine = create_engine_for(make_config(db_url))
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> EventStore:
    return EventStore(engine)


@pytest.fixture
def client(db_url: str, store: EventStore) -> testing.TestClient:
    """Falcon's test client on the app, backed by a real database of each kind."""
    return testing.TestClient(create_app(make_config(db_url), store))


def envelope(event_type: str, payload: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    """A Coherent webhook envelope with a fresh event id unless one is given."""
    return {"id": event_id or uuid.uuid4().hex[:16], "type": event_type, "payload": payload}


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


def signed_headers(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"x-protocol-signature": sign(body, secret), "content-type": "application/json"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    """One HTTP request with the standard library; returns (status, headers, parsed JSON or bytes)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, response_headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, response_headers, raw = exc.code, exc.headers, exc.read()
    try:
        return status, response_headers, json.loads(raw)
    except ValueError:
        return status, response_headers, raw


class Gunicorn:
    """A real gunicorn in a subprocess, started as in production with ``connector serve``."""

    def __init__(self, database_url: str, workers: int = 4, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "CONNECTOR_DATABASE_URL": database_url,
            "CONNECTOR_WEBHOOK_SECRETS": SECRET,
            "CONNECTOR_GRACEFUL_TIMEOUT": "5",
            **env,
        }
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Gunicorn:
        # A file, not a pipe: nobody reads gunicorn's log while it runs, and a full pipe would stall it.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop(), it outlives this method
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "connector.cli",
                "serve",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(self.workers),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.output()[-2000:]}")
            try:
                if http("GET", f"{self.url}/healthz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("gunicorn did not answer /healthz within 30 s")

    def output(self) -> str:
        """What gunicorn has logged so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def post(self, body: bytes, headers: dict[str, str] | None = None):
        return http("POST", f"{self.url}/webhooks", body, signed_headers(body) if headers is None else headers)


@pytest.fixture
def gunicorn(db_url: str) -> Iterator[Gunicorn]:
    """A real gunicorn with four workers on a migrated database of each kind."""
    server = Gunicorn(db_url, workers=4).start()
    yield server
    server.stop()


@pytest.fixture
def seed_body() -> bytes:
    """The webhook guide's example payload, byte for byte as the guide shows it."""
    return (PAYLOADS / "seed_message_updated.json").read_bytes()
