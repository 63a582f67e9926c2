"""The baseline for the ingest benchmark: the least a durable webhook receiver can do.

It verifies the HMAC, INSERTs the raw event once (ON CONFLICT DO NOTHING on the event id), commits
and answers: no typing, no current state, no ordering rules. Serve it with
``gunicorn --pythonpath bench minimal_receiver:app`` and set ``BENCH_SECRET`` and ``BENCH_DSN``
(a libpq connection string). Its table is created by ``create_table``. ``BENCH_ROUND_TRIPS``
(default 1) turns it into an experiment: the INSERT inside a transaction padded with ``SELECT 1`` to
that many round trips.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading

import falcon
import psycopg

TABLE = "bench_minimal_events"


def create_table(conn: psycopg.Connection) -> None:
    """Create the receiver's one table."""
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {TABLE} "
        "(event_id text PRIMARY KEY, body json NOT NULL, received_at timestamptz NOT NULL DEFAULT now())"
    )


class MinimalReceiver:
    """``POST /webhooks``: verify, insert, commit, answer. One connection per worker thread."""

    def __init__(self, secret: str, dsn: str, round_trips: int = 1) -> None:
        self.secret = secret.encode()
        self.dsn = dsn
        self.round_trips = round_trips
        self.local = threading.local()

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = req.bounded_stream.read()
        expected = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, req.get_header("x-protocol-signature") or ""):
            raise falcon.HTTPUnauthorized(title="bad signature")
        event_id = json.loads(body)["id"]
        conn = getattr(self.local, "conn", None)
        if conn is None or conn.closed:
            # Autocommit: the INSERT is its own transaction, committed before execute() returns.
            conn = self.local.conn = psycopg.connect(self.dsn, autocommit=True)
        insert = f"INSERT INTO {TABLE} (event_id, body) VALUES (%s, %s) ON CONFLICT DO NOTHING"  # noqa: S608
        if self.round_trips == 1:
            conn.execute(insert, (event_id, body.decode()))
        else:
            # An experiment, not a receiver: as many round trips as the connector's per-event
            # transaction (BEGIN, SELECTs, the INSERT, COMMIT), to see what round trips alone cost.
            with conn.transaction():
                for _ in range(self.round_trips - 3):
                    conn.execute("SELECT 1")
                conn.execute(insert, (event_id, body.decode()))
        resp.media = {"event_id": event_id}


class Health:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


def create_app(secret: str, dsn: str, round_trips: int = 1) -> falcon.App:
    """The receiver as a WSGI app."""
    app = falcon.App()
    app.add_route("/webhooks", MinimalReceiver(secret, dsn, round_trips))
    app.add_route("/healthz", Health())
    return app


app = (
    create_app(os.environ["BENCH_SECRET"], os.environ["BENCH_DSN"], int(os.environ.get("BENCH_ROUND_TRIPS", "1")))
    if "BENCH_DSN" in os.environ
    else None
)
