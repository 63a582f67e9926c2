"""What the benchmarks share: databases of their own, generated events, gunicorn and wrk.

Every benchmark creates its databases on the shared PostgreSQL under a ``coherent_bench_`` name and
drops them when it ends, however it ends. Nothing here asserts a speed: the benchmarks print figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from connector.signing import sign

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
PYTHON = sys.executable
SECRET = "bench-secret"
ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/postgres")

# A realistic mix: most traffic is messages and their attachments; groups and conversations change
# less often. Among actions, creates dominate, updates follow, deletes are rare.
RESOURCE_WEIGHTS = {"message": 50, "attachment": 15, "contact": 12, "conversation": 13, "group": 10}
ACTION_WEIGHTS = {"created": 60, "updated": 32, "deleted": 8}


@dataclasses.dataclass
class Sent:
    """What the store sent to PostgreSQL while :func:`postgres_statements` was watching."""

    # (statement, parameters, placeholders): "psycopg" statements take %s parameters through a
    # psycopg cursor; "libpq" ones take $n parameters, each already text, through libpq itself.
    statements: list[tuple[str, Any, str]] = dataclasses.field(default_factory=list)
    round_trips: int = 0  # the pipelined path's syncs: each sends what was queued and waits once


@contextlib.contextmanager
def postgres_statements(*, hold_commit: bool = False) -> Iterator[Sent]:
    """Collect every SELECT, INSERT, UPDATE, DELETE or WITH the store sends to PostgreSQL.

    The store sends its hot path through libpq's pipeline (``connector.db.pipeline``) and its bulk
    path through psycopg, both around SQLAlchemy's cursor events, so this patches both for the
    duration. An executemany counts once, with its first row's parameters. ``hold_commit`` skips
    the pipeline's own ``COMMIT``, so the caller can roll the transaction back.
    """
    import psycopg

    from connector.db import pipeline

    sent = Sent()
    kinds = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")
    execute, executemany = psycopg.Cursor.execute, psycopg.Cursor.executemany
    queue, command, sync = pipeline._Pipeline.execute, pipeline._Pipeline.command, pipeline._Pipeline.sync

    def capturing_execute(cursor, query, params=None, **kwargs):
        if str(query).strip().upper().startswith(kinds):
            sent.statements.append((str(query).strip(), params, "psycopg"))
        return execute(cursor, query, params, **kwargs)

    def capturing_executemany(cursor, query, params_seq, **kwargs):
        params_seq = list(params_seq)
        sent.statements.append((str(query).strip(), params_seq[0] if params_seq else None, "psycopg"))
        return executemany(cursor, query, params_seq, **kwargs)

    def capturing_queue(self, statement, params):
        sent.statements.append((statement.sql, statement.values(params), "libpq"))
        return queue(self, statement, params)

    def capturing_command(self, sql):
        if not (hold_commit and sql == b"COMMIT"):
            command(self, sql)

    def counting_sync(self):
        sent.round_trips += 1
        return sync(self)

    psycopg.Cursor.execute, psycopg.Cursor.executemany = capturing_execute, capturing_executemany
    pipeline._Pipeline.execute, pipeline._Pipeline.command = capturing_queue, capturing_command
    pipeline._Pipeline.sync = counting_sync
    try:
        yield sent
    finally:
        psycopg.Cursor.execute, psycopg.Cursor.executemany = execute, executemany
        pipeline._Pipeline.execute, pipeline._Pipeline.command, pipeline._Pipeline.sync = queue, command, sync


def machine_load() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def banner(title: str) -> None:
    """Print what the figures below were taken on."""
    print(f"# {title}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {os.cpu_count()} cores, load {machine_load()}")
    sys.stdout.flush()


@contextlib.contextmanager
def bench_database(tag: str) -> Iterator[str]:
    """Create a PostgreSQL database ``coherent_bench_<tag>_<hex>``, yield its URL, drop it at the end."""
    admin_url = make_url(ADMIN_URL)
    name = f"coherent_bench_{tag}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def migrate(url: str) -> None:
    """Create the connector's tables in the database at ``url``."""
    from connector.config import Config
    from connector.db import migrate as migrations
    from connector.db.engine import create_engine_for

    engine = create_engine_for(Config(database_url=url))
    try:
        migrations.upgrade(engine)
    finally:
        engine.dispose()


def libpq_dsn(url: str) -> str:
    """The libpq connection string for a SQLAlchemy PostgreSQL URL (for psycopg and psql)."""
    parsed = make_url(url)
    parts = [f"host={parsed.host or '127.0.0.1'}", f"port={parsed.port or 5432}", f"dbname={parsed.database}"]
    if parsed.username:
        parts.append(f"user={parsed.username}")
    if parsed.password:
        parts.append(f"password={parsed.password}")
    return " ".join(parts)


# --- Generated events --------------------------------------------------------------------------------

_ID_ALPHABET = string.ascii_letters + string.digits
_EMOJI = ["red_angry_face", "thumbs_up", "party_popper", "eyes", "heart"]
_WORDS = [
    "keep",
    "the",
    "change",
    "ya",
    "filthy",
    "animal",
    "merry",
    "christmas",
    "kevin",
    "i",
    "made",
    "my",
    "family",
    "disappear",
]


class EventFactory:
    """Distinct Coherent events in a realistic mix of the five resources and three actions.

    Updates and deletes target ids created earlier, so the stream exercises every ordering rule the
    way real traffic does. The same seed gives the same events.
    """

    def __init__(self, seed: int = 6) -> None:
        self.rng = random.Random(seed)
        self.ids: dict[str, list[str]] = {resource: [] for resource in RESOURCE_WEIGHTS}
        self.clock = 700_000_000

    def _id(self) -> str:
        return "".join(self.rng.choices(_ID_ALPHABET, k=16))

    def _text(self, words: int) -> str:
        return " ".join(self.rng.choices(_WORDS, k=words))

    def _payload(self, resource: str, resource_id: str) -> dict[str, Any]:
        rng, now = self.rng, self.clock
        if resource == "contact":
            name = self._text(1).title() + str(rng.randrange(1000))
            return {
                "id": resource_id,
                "username": name,
                "phone_number": f"1-800-{rng.randrange(1000):03}-{rng.randrange(10000):04}",
                "avatar_url": f"https://assets.protocol.chat/avatars/{name}.jpg",
                "display_name": None,
                "conversation_id": self._id(),
                "last_active_at": now,
                "created_at": now - 86_400,
            }
        if resource == "conversation":
            return {
                "id": resource_id,
                "contact_id": self._id(),
                "group_id": None,
                "pinned_message_id": None,
                "is_pinned": rng.random() < 0.1,
                "is_muted": rng.random() < 0.2,
                "last_active_at": now,
                "last_opened_at": now,
                "created_at": now - 86_400,
                "archived_at": None,
            }
        if resource == "message":
            reactions = [{rng.choice(_EMOJI): [self._text(1)]} for _ in range(rng.choice((0, 0, 0, 1, 2)))]
            return {
                "id": resource_id,
                "conversation_id": self._id(),
                "contact": {
                    "id": self._id(),
                    "username": self._text(1),
                    "phone_number": "1-800-759-3000",
                    "avatar_url": "https://assets.protocol.chat/avatars/kevin.jpg",
                    "last_active_at": now,
                    "created_at": now - 86_400,
                },
                "message": self._text(rng.randrange(3, 25)),
                "reactions": reactions,
                "attachments": [],
                "read_at": None,
                "created_at": now,
                "updated_at": now,
            }
        if resource == "group":
            return {
                "id": resource_id,
                "name": self._text(2).title(),
                "description": self._text(6),
                "avatar_url": None,
                "conversation_id": self._id(),
                "contacts": [{"id": self._id(), "username": self._text(1)} for _ in range(rng.randrange(2, 8))],
                "created_at": now - 86_400,
                "archived_at": None,
            }
        return {
            "id": resource_id,
            "message_id": self._id(),
            "filename": "Invoice_room_service__Plaza_Hotel.pdf",
            "file_url": "https://assets.protocol.chat/attachments/Invoice_room_service__Plaza_Hotel.pdf",
            "file_type": "application/pdf",
            "file_size": rng.randrange(1000, 10_000_000),
            "created_at": now,
        }

    def next(self) -> dict[str, Any]:
        """The next event envelope."""
        rng = self.rng
        self.clock += 1
        resource = rng.choices(list(RESOURCE_WEIGHTS), weights=list(RESOURCE_WEIGHTS.values()))[0]
        action = rng.choices(list(ACTION_WEIGHTS), weights=list(ACTION_WEIGHTS.values()))[0]
        known = self.ids[resource]
        if action == "created" or not known:
            action, resource_id = "created", self._id()
            known.append(resource_id)
        else:
            # Recent ids change more often than old ones.
            resource_id = known[max(0, len(known) - 1 - int(rng.expovariate(1 / 200)))]
        payload = self._payload(resource, resource_id)
        if action == "deleted":
            payload = {"id": resource_id}
        elif action == "updated" and resource == "message":
            payload = {"id": resource_id, "message": payload["message"], "updated_at": self.clock}
        return {"id": self._id(), "type": f"{resource}.{action}", "payload": payload}

    def take(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` event envelopes."""
        return [self.next() for _ in range(count)]


def encode(document: Any) -> bytes:
    """An envelope as the compact one-line JSON body Coherent would send."""
    return json.dumps(document, separators=(",", ":")).encode()


def write_signed_events(path: Path, envelopes: list[dict[str, Any]]) -> None:
    """Write one ``signature<TAB>body`` line per event, for the wrk script."""
    with path.open("wb") as fh:
        for envelope in envelopes:
            body = encode(envelope)
            fh.write(sign(body, SECRET).encode() + b"\t" + body + b"\n")


# --- Servers and the load tool --------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A gunicorn serving ``app`` on loopback, in a subprocess.

    ``threads`` above 1 gives gunicorn's threaded (gthread) workers, 1 its sync workers.
    """

    def __init__(
        self, app: str, workers: int, env: dict[str, str], pythonpath: Path | None = None, threads: int = 1
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        command = [PYTHON, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers)]
        command += ["--threads", str(threads)]
        command += ["--graceful-timeout", "5", "--no-control-socket", "--backlog", "256"]
        if pythonpath:
            command += ["--pythonpath", str(pythonpath)]
        self.process = subprocess.Popen(
            command, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"gunicorn exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("gunicorn did not answer /healthz within 30 s")

    def stop(self) -> None:
        """Stop gunicorn and its workers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def require_wrk() -> str:
    """The path of wrk, or exit saying how to install it."""
    path = shutil.which("wrk")
    if path is None:
        sys.exit("wrk is not installed: run `make bench-deps` (apt-get install -y wrk) or install it from your OS")
    return path


def run_wrk(url: str, events_file: Path, *, seconds: float, connections: int = 16, threads: int = 2) -> dict[str, Any]:
    """Post the pre-signed events in ``events_file`` to ``url``/webhooks for ``seconds``; return figures."""
    command = [
        require_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH_DIR / "post_events.lua"),
        f"{url}/webhooks",
        "--",
        str(events_file),
        str(threads),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("BENCH "):
            figures = json.loads(line[len("BENCH ") :])
            figures["events_per_second"] = figures["requests"] / (figures["duration_us"] / 1e6)
            return figures
    raise RuntimeError(f"wrk printed no figures:\n{result.stdout}\n{result.stderr}")


# --- A large change log, generated inside PostgreSQL -----------------------------------------------

# One statement builds ``rows`` change-log rows in the mix above (10/20 messages, 3/20 attachments,
# 2/20 contacts, 3/20 conversations, 2/20 groups; a third updates, one in twelve deletes) with
# payloads shaped like Coherent's. Each id gets about two events, so later events update and delete
# earlier rows.
_FILL_CHANGE_LOG = """
INSERT INTO coherent_events (event_id, type, resource, action, resource_id, payload, received_at, outcome)
SELECT 'log' || lpad(to_hex(i), 13, '0'), resource || '.' || action, resource, action, rid,
  CASE WHEN action = 'deleted' THEN json_build_object('id', rid)
  WHEN resource = 'message' THEN json_build_object('id', rid, 'conversation_id', substr(md5('c' || n), 1, 16),
    'contact', json_build_object('id', substr(md5('p' || n % 5000), 1, 16), 'username', 'user' || n % 5000,
      'phone_number', '1-800-759-3000', 'last_active_at', 700000000 + i, 'created_at', 692233200),
    'message', repeat('merry christmas ya filthy animal ', 1 + (i % 4)::int), 'reactions',
    CASE WHEN i % 4 = 0 THEN json_build_array(json_build_object('thumbs_up', json_build_array('user' || i % 77)))
    ELSE '[]'::json END, 'attachments', '[]'::json, 'read_at', NULL, 'created_at', 700000000 + n,
    'updated_at', 700000000 + i)
  WHEN resource = 'attachment' THEN json_build_object('id', rid, 'message_id', substr(md5('m' || n), 1, 16),
    'filename', 'Invoice_room_service__Plaza_Hotel.pdf', 'file_url',
    'https://assets.protocol.chat/attachments/Invoice_room_service__Plaza_Hotel.pdf',
    'file_type', 'application/pdf', 'file_size', 1000 + i % 100000, 'created_at', 700000000 + n)
  WHEN resource = 'contact' THEN json_build_object('id', rid, 'username', 'user' || n, 'phone_number',
    '1-800-759-3000', 'avatar_url', 'https://assets.protocol.chat/avatars/u' || n || '.jpg', 'display_name', NULL,
    'conversation_id', substr(md5('c' || n), 1, 16), 'last_active_at', 700000000 + i, 'created_at', 692233200)
  WHEN resource = 'conversation' THEN json_build_object('id', rid, 'contact_id', substr(md5('p' || n), 1, 16),
    'group_id', NULL, 'pinned_message_id', NULL, 'is_pinned', i % 10 = 0, 'is_muted', i % 5 = 0,
    'last_active_at', 700000000 + i, 'last_opened_at', 700000000 + i, 'created_at', 692233200, 'archived_at', NULL)
  ELSE json_build_object('id', rid, 'name', 'Plaza Hotel ' || n, 'description', 'World-renowned.',
    'avatar_url', NULL, 'conversation_id', substr(md5('c' || n), 1, 16), 'contacts',
    json_build_array(json_build_object('username', 'Hector'), json_build_object('id', substr(md5('p' || n), 1, 16),
      'username', 'Cedric')), 'created_at', 692233200, 'archived_at', NULL)
  END,
  timestamptz '2026-01-01' + i * interval '1 second', 'applied'
FROM (
  SELECT i, n, resource, action, substr(md5(resource || n), 1, 16) AS rid
  FROM (
    SELECT i, n,
      (ARRAY['message', 'message', 'message', 'message', 'message', 'message', 'message', 'message', 'message',
             'message', 'attachment', 'attachment', 'attachment', 'contact', 'contact', 'conversation',
             'conversation', 'conversation', 'group', 'group'])[1 + n % 20] AS resource,
      CASE abs(hashtext(i::text)) % 12 WHEN 0 THEN 'deleted' WHEN 1 THEN 'updated' WHEN 2 THEN 'updated'
        WHEN 3 THEN 'updated' WHEN 4 THEN 'updated' ELSE 'created' END AS action
    FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS i,
      LATERAL (SELECT (i * 7919) % greatest(1, CAST(:rows AS bigint) / 2) AS n) AS id_number
  ) AS numbered
) AS events
"""

# The current state such a log leaves, one row per resource id, as far as index sizes and the hot
# path's lookups are concerned (the typed columns stay NULL; ``connector rebuild`` would fill them).
_FILL_STATE = """
INSERT INTO {table} (id, _raw, _deleted_at, _event_id, _last_action, _synced_at)
SELECT DISTINCT ON (resource_id) resource_id, payload,
  CASE WHEN action = 'deleted' THEN received_at END, event_id, action, received_at
FROM coherent_events WHERE resource = :resource ORDER BY resource_id, seq DESC
"""


def fill_change_log(url: str, rows: int, *, with_state: bool = False, chunk: int = 250_000) -> float:
    """Append ``rows`` generated events to the change log (and their state rows); return the seconds taken."""
    from connector.db.schema import state_tables

    started = time.perf_counter()
    engine = create_engine(url)
    try:
        for first in range(1, rows + 1, chunk):
            with engine.begin() as conn:
                last = min(rows, first + chunk - 1)
                conn.execute(text(_FILL_CHANGE_LOG), {"rows": rows, "first": first, "last": last})
        if with_state:
            with engine.begin() as conn:
                for resource, table in state_tables.items():
                    conn.execute(text(_FILL_STATE.format(table=table.name)), {"resource": resource})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    finally:
        engine.dispose()
    return time.perf_counter() - started
