"""The connector's app for the host-writer experiment (``bench/host_writer.py``): the webhook route hands
each verified event to the host's writer over a Unix socket instead of committing it in this worker.

    gunicorn --pythonpath bench host_writer_app:app     # with HOST_WRITER_SOCKET set

An experiment, not the product: a writer that is down answers 503, and nothing else is handled.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from datetime import UTC, datetime
from typing import Any

import connector.app
from connector.config import load_config
from connector.errors import DatabaseUnavailable
from connector.events import Event, Outcome

FRAME = struct.Struct("!I")  # each message: its length, then that many bytes of JSON


def receive(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("the writer closed the connection")
        data += chunk
    return bytes(data)


class HostWriterClient:
    """Stands in for ``GroupCommit``: one connection to the writer per request thread."""

    def __init__(self, store: Any) -> None:
        self.path = os.environ["HOST_WRITER_SOCKET"]
        self.local = threading.local()

    def record(self, event: Event, received_at: datetime | None = None) -> Outcome:
        envelope = {"id": event.event_id, "type": event.type, "payload": event.payload}
        body = json.dumps({"event": envelope, "received_at": (received_at or datetime.now(UTC)).isoformat()}).encode()
        try:
            sock = getattr(self.local, "sock", None)
            if sock is None:
                sock = self.local.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.path)
            sock.sendall(FRAME.pack(len(body)) + body)
            reply = json.loads(receive(sock, FRAME.unpack(receive(sock, FRAME.size))[0]))
        except OSError as exc:
            self.local.sock = None
            raise DatabaseUnavailable("the host's writer is unavailable") from exc
        if "error" in reply:
            raise DatabaseUnavailable(reply["error"])
        return Outcome(reply["outcome"])


def __getattr__(name: str) -> Any:
    """``app`` is built when gunicorn asks for it, so the writer can import this module for FRAME."""
    if name != "app":
        raise AttributeError(name)
    connector.app.GroupCommit = HostWriterClient  # type: ignore[misc,assignment]
    app = globals()["app"] = connector.app.create_app(load_config())
    return app
