"""Faults under concurrent load through real gunicorn workers, checked against the database.

An event is "acked" when it got a 2xx. Whatever the fault, every acked event must be in the change
log, every other answer must be a 503 with Retry-After (or, where a worker dies, no answer at all),
and once the sender has resent every event that was not acked, each is stored exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import make_url

from connector.db import migrate
from connector.db.engine import create_engine_for
from connector.db.schema import events, state_tables
from connector.signing import sign
from tests.conftest import DATABASES, SECRET, Gunicorn, encode, envelope, make_config, migrated_url

pytestmark = pytest.mark.gunicorn

HOT_IDS = ("hot-0", "hot-1", "hot-2")


def event_body(n: int, prefix: str) -> tuple[str, bytes]:
    """Half the events create a contact of their own, half update one of a few hot rows."""
    event_id = f"{prefix}-{n}"
    if n % 2:
        return event_id, encode(envelope("contact.updated", {"id": HOT_IDS[n % 3], "username": event_id}, event_id))
    return event_id, encode(envelope("contact.created", {"id": f"own-{event_id}", "username": "x"}, event_id))


@dataclasses.dataclass
class Answer:
    status: int  # 0: no HTTP answer at all (connection refused, reset or closed mid-answer)
    retry_after: str | None
    seconds: float
    failure: str | None = None  # for status 0, how the connection failed


def deliver(server: Gunicorn, body: bytes) -> Answer:
    started = time.monotonic()
    try:
        status, headers, _ = server.post(body)
    except (OSError, HTTPException) as exc:
        reason = getattr(exc, "reason", exc)  # urllib wraps a failure to connect in URLError
        return Answer(0, None, time.monotonic() - started, type(reason).__name__)
    return Answer(status, headers.get("Retry-After"), time.monotonic() - started)


class Load:
    """Sends numbered events from several threads until stopped, and remembers every answer."""

    def __init__(self, server: Gunicorn, prefix: str, threads: int = 4, limit: int = 5000) -> None:
        self.server, self.prefix, self.limit = server, prefix, limit
        self.answers: dict[str, list[Answer]] = {}
        self.bodies: dict[str, bytes] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._next >= self.limit:
                    return
                event_id, body = event_body(self._next, self.prefix)
                self._next += 1
                self.bodies[event_id] = body
            answer = deliver(self.server, body)
            with self._lock:
                self.answers.setdefault(event_id, []).append(answer)
            time.sleep(0.05)  # a steady trickle; an outage's quick 503s would otherwise flood the resend

    def all_answers(self) -> list[Answer]:
        return [answer for answers in self.answers.values() for answer in answers]

    def acked(self) -> set[str]:
        return {event_id for event_id, answers in self.answers.items() if any(200 <= a.status < 300 for a in answers)}


def logged_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(events.c.event_id)))


def resend_until_acked(server: Gunicorn, bodies: dict[str, bytes], acked: set[str]) -> None:
    """What Coherent does: resend every event that did not get a 2xx, until it does."""
    pending = {event_id: body for event_id, body in bodies.items() if event_id not in acked}
    for _ in range(20):
        if not pending:
            return
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = dict(zip(pending, pool.map(lambda body: deliver(server, body), pending.values()), strict=True))
        pending = {event_id: pending[event_id] for event_id, answer in answers.items() if answer.status != 200}
        time.sleep(0.2)
    pytest.fail(f"{len(pending)} events were still not acknowledged after 20 resends")


def assert_nothing_lost_or_doubled(engine: Engine, bodies: dict[str, bytes], acked_before_resend: set[str]) -> None:
    """Every event stored exactly once, and no event half applied."""
    ids = logged_ids(engine)
    assert len(ids) == len(set(ids))
    assert set(ids) == set(bodies)
    assert acked_before_resend <= set(ids)
    contacts = state_tables["contact"]
    with engine.connect() as conn:
        own = set(conn.scalars(select(contacts.c.id).where(contacts.c.id.like("own-%"))))
        hot_last = set(conn.scalars(select(contacts.c._event_id).where(contacts.c.id.in_(HOT_IDS))))
        created = set(
            conn.scalars(
                select(events.c.resource_id).where(events.c.type == "contact.created", events.c.event_id.in_(ids))
            )
        )
    # A change-log row exists exactly when its state change does.
    assert own == created
    assert hot_last <= set(ids)


@contextlib.contextmanager
def serving(url: str, **env: str) -> Iterator[Gunicorn]:
    server = Gunicorn(url, workers=4, **env).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def engine_for(request):
    """A function giving an engine on this run's migrated, emptied database of a kind."""
    engines: list[Engine] = []

    def make(backend: str) -> tuple[str, Engine]:
        url = migrated_url(request, backend)
        engines.append(create_engine_for(make_config(url)))
        return url, engines[-1]

    yield make
    for engine in engines:
        engine.dispose()


# --- 1. the database stops ------------------------------------------------------------------------------


class CuttableProxy:
    """A TCP proxy in front of a database server that can be cut: every connection closed, new ones refused."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = self._listen(0)
        self.port = self.listener.getsockname()[1]
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.settimeout(0.1)
        return listener

    def _accept(self) -> None:
        while not self.closed:
            with self.lock:
                listener = self.listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self.lock:
                self.connections |= {client, upstream}
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """The server is gone: close every connection and refuse new ones."""
        with self.lock:
            self.listener.close()
            self.listener = None
            for sock in self.connections:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.connections.clear()

    def restore(self) -> None:
        with self.lock:
            self.listener = self._listen(self.port)

    def close(self) -> None:
        if self.listener is not None:
            self.cut()
        self.closed = True


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_database_outage_gets_503_and_recovers_without_a_restart(engine_for, backend):
    url, engine = engine_for(backend)
    proxy = CuttableProxy(make_url(url).port)
    proxied = make_url(url).set(port=proxy.port).render_as_string(hide_password=False)
    try:
        with serving(proxied) as server:
            with Load(server, "outage", threads=2) as load:
                time.sleep(2)
                proxy.cut()
                cut_at = len(load.all_answers())
                time.sleep(10)
                during = load.all_answers()[cut_at:]
                proxy.restore()
                restored = time.monotonic()
                recovered_after = None
                for n in range(100):  # a fresh event every 0.1 s for up to 10 s
                    if deliver(server, event_body(n, "probe")[1]).status == 200:
                        recovered_after = time.monotonic() - restored
                        break
                    time.sleep(0.1)
                time.sleep(1)
            answers = load.all_answers()
            print(
                f"{backend}: {len(answers)} deliveries, {len(during)} during the outage, recovered after {recovered_after}"
            )
            assert during and all(a.status == 503 for a in during[len(during) // 2 :])  # the database really was gone
            assert all(a.status == 200 or (a.status == 503 and a.retry_after) for a in answers)
            assert recovered_after is not None and recovered_after < 2, recovered_after
            acked = load.acked()
            resend_until_acked(server, load.bodies, acked)  # what the sender does, to the same server
        probes = {f"probe-{n}" for n in range(100)} & set(logged_ids(engine))
        assert_nothing_lost_or_doubled(engine, {**load.bodies, **dict.fromkeys(probes, b"")}, acked)
    finally:
        proxy.close()


# --- 2. workers are killed --------------------------------------------------------------------------------


def worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.mark.parametrize("backend", DATABASES)
def test_workers_killed_under_load_lose_no_acked_event_and_half_apply_none(engine_for, backend):
    url, engine = engine_for(backend)
    killed = 0
    with serving(url) as server:
        with Load(server, "kill", threads=8) as load:
            for _ in range(4):  # a worker SIGKILLed every 2 s, for 8 s
                time.sleep(2)
                pids = worker_pids(server.process.pid)
                if pids:
                    os.kill(random.choice(pids), signal.SIGKILL)
                    killed += 1
            time.sleep(1)
        answers = load.all_answers()
        print(
            f"{backend}: {killed} workers killed, {len(answers)} deliveries, {sum(a.status == 0 for a in answers)} cut off"
        )
        assert killed >= 3
        assert all(a.status in (0, 200) or (a.status == 503 and a.retry_after) for a in answers)
        acked = load.acked()
        assert acked <= set(logged_ids(engine))
        resend_until_acked(server, load.bodies, acked)
    assert_nothing_lost_or_doubled(engine, load.bodies, acked)


# --- 3. a lock held on a hot row ------------------------------------------------------------------------


@contextlib.contextmanager
def row_locked(backend: str, url: str, engine: Engine) -> Iterator[None]:
    """Hold the hot row's lock (on SQLite: the database's write lock) from a connection of our own."""
    if backend == "sqlite":
        conn = sqlite3.connect(make_url(url).database, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    with engine.connect() as conn, conn.begin():
        conn.execute(text("SELECT id FROM coherent_contacts WHERE id = 'hot-1' FOR UPDATE")).one()
        yield


@pytest.mark.parametrize("backend", DATABASES)
def test_a_locked_row_gets_503_within_the_lock_timeout_not_the_worker_timeout(engine_for, backend):
    url, engine = engine_for(backend)
    with serving(url) as server:
        assert server.post(encode(envelope("contact.created", {"id": "hot-1"})))[0] == 200
        with row_locked(backend, url, engine):
            # One at a time, so that each answer's time is the lock wait, not a wait for a free worker.
            hot = [encode(envelope("contact.updated", {"id": "hot-1", "username": f"u{n}"})) for n in range(3)]
            answers = [deliver(server, body) for body in hot]
            cold = deliver(server, encode(envelope("contact.created", {"id": "cold-1"})))
        after = deliver(server, encode(envelope("contact.updated", {"id": "hot-1", "username": "after"})))
    print(f"{backend}: answered in {[round(a.seconds, 2) for a in answers]} s")
    assert all(a.status == 503 and a.retry_after for a in answers)
    # lock_timeout_ms is 2,000 by default; one wait, and no retry that would start a second one.
    assert all(a.seconds < 3 for a in answers), [a.seconds for a in answers]
    # Other rows go on being written; on SQLite the lock is the whole database's.
    assert cold.status == (503 if backend == "sqlite" else 200)
    assert after.status == 200


# --- 4. the master is told to stop ---------------------------------------------------------------------


def wait_for_workers(server: Gunicorn, count: int) -> None:
    """Wait (at most 30 s) until the master has ``count`` workers and each has answered a request."""
    deadline = time.monotonic() + 30
    while len(worker_pids(server.process.pid)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    with ThreadPoolExecutor(max_workers=count) as pool:
        list(pool.map(lambda _: server.post(b"{}"), range(count * 4)))
    time.sleep(1)  # a worker still importing the app would be busy when the slow requests come


def start_slow_request(port: int, body: bytes) -> socket.socket:
    """Send the headers and half the body, so that a worker is busy reading this request."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /webhooks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        f"x-protocol-signature: {sign(body, SECRET)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def finish_slow_request(sock: socket.socket, body: bytes) -> int:
    with sock:
        sock.sendall(body[len(body) // 2 :])
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return int(received.split(b" ", 2)[1])


# gunicorn's graceful stop does not depend on the database; one server database is enough.
@pytest.mark.parametrize("backend", ["postgresql"])
def test_sigterm_to_the_master_lets_in_flight_requests_finish(engine_for, backend):
    url, engine = engine_for(backend)
    server = Gunicorn(url, workers=4).start()
    try:
        slow = {f"slow-{n}": encode(envelope("contact.created", {"id": f"slow-{n}"}, f"slow-{n}")) for n in range(3)}
        wait_for_workers(server, 4)
        socks = {event_id: start_slow_request(server.port, body) for event_id, body in slow.items()}
        time.sleep(1)  # three workers are now each reading a slow request's body
        with Load(server, "term", threads=2) as load:
            time.sleep(1)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            finished = {event_id: finish_slow_request(socks[event_id], body) for event_id, body in slow.items()}
            assert server.process.wait(timeout=20) == 0
    finally:
        server.stop()
    answers = load.all_answers()
    print(
        f"{backend}: {len(answers)} deliveries, refused after the stop: {Counter(a.failure for a in answers if a.status == 0)}"
    )
    assert finished == dict.fromkeys(slow, 200)  # mid-request when the stop came, and finished
    # Once stopping, the server takes no new connection; every answer it did give is a real one.
    assert all(a.status in (0, 200) for a in answers)
    # A connection the server never took is refused, or reset if it was still in the listen queue.
    # A request a worker had taken and then abandoned would end without an answer instead.
    failures = {a.failure for a in answers if a.status == 0}
    assert failures <= {"ConnectionRefusedError", "ConnectionResetError"}, failures
    ids = set(logged_ids(engine))
    assert set(slow) <= ids and load.acked() <= ids


# --- 5. SQLite's file becomes read-only, or its disk fills --------------------------------------------


def sqlite_url_in(directory: Path) -> str:
    url = f"sqlite:///{directory / 'coherent.db'}"
    engine = create_engine_for(make_config(url))
    migrate.upgrade(engine)
    engine.dispose()
    return url


def deliver_all(server: Gunicorn, prefix: str, count: int, size: int = 0) -> dict[str, tuple[bytes, Answer]]:
    bodies = [
        encode(envelope("contact.created", {"id": f"{prefix}-{n}", "bio": "b" * size}, f"{prefix}-{n}"))
        for n in range(count)
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda body: deliver(server, body), bodies))
    return {json.loads(body)["id"]: (body, answer) for body, answer in zip(bodies, answers, strict=True)}


def check_fault_and_recovery(server: Gunicorn, engine: Engine, during: dict[str, tuple[bytes, Answer]]) -> None:
    answers = [answer for _, answer in during.values()]
    assert all(a.status == 200 or (a.status == 503 and a.retry_after) for a in answers)
    assert any(a.status == 503 for a in answers)  # the fault did bite
    acked = {event_id for event_id, (_, answer) in during.items() if answer.status == 200}
    assert acked <= set(logged_ids(engine))
    after = deliver_all(server, "after", 8)
    assert [answer.status for _, answer in after.values()] == [200] * 8
    resend_until_acked(server, {event_id: body for event_id, (body, _) in during.items()}, acked)
    ids = logged_ids(engine)
    assert len(ids) == len(set(ids)) and set(during) | set(after) <= set(ids)


def _require(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        message = f"cannot {what} here: {result.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_a_read_only_sqlite_file_gets_503_and_recovers(tmp_path):
    # We run as root, for whom chmod does not make a file read-only; the immutable attribute does.
    url = sqlite_url_in(tmp_path)
    engine = create_engine_for(make_config(url))
    files = [str(tmp_path / "coherent.db"), str(tmp_path / "coherent.db-wal")]
    try:
        with serving(url) as server:
            assert {a.status for _, a in deliver_all(server, "before", 8).values()} == {200}
            _require(["chattr", "+i", *files], "make a file immutable")
            try:
                during = deliver_all(server, "during", 12)
            finally:
                subprocess.run(["chattr", "-i", *files], check=True)
            check_fault_and_recovery(server, engine, during)
    finally:
        engine.dispose()


def fill_up(path: Path) -> None:
    """Write ``path`` until the disk is full (at most 4 MiB, more than the small disk holds)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for _ in range(4 * 1024):
            os.write(fd, b"\0" * 1024)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_disk_gets_503_and_recovers(tmp_path):
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    _require(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], "mount a small tmpfs")
    try:
        url = sqlite_url_in(mount_point)
        engine = create_engine_for(make_config(url))
        try:
            with serving(url) as server:
                assert {a.status for _, a in deliver_all(server, "before", 8).values()} == {200}
                filler = mount_point / "filler"
                fill_up(filler)
                during = deliver_all(server, "during", 12, size=100_000)
                filler.unlink()
                check_fault_and_recovery(server, engine, during)
        finally:
            engine.dispose()
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)
