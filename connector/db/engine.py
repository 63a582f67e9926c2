"""Creating a SQLAlchemy engine that is safe for concurrent webhook writers on each database."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

from connector.config import Config
from connector.db.types import json_dumps
from connector.errors import ConfigError

# A bare "postgresql://" would pick psycopg2 and "mysql://" MySQLdb; neither is a dependency here.
_DEFAULT_DRIVERS = {"postgresql": "psycopg", "postgres": "psycopg", "mysql": "pymysql", "mariadb": "pymysql"}


def normalize_url(database_url: str) -> URL:
    """Parse a database URL, choosing the drivers this project installs where none is named."""
    try:
        url = make_url(database_url)
    except Exception as exc:  # SQLAlchemy raises ArgumentError with the URL in it; keep it out.
        raise ConfigError("database_url is not a valid SQLAlchemy URL") from exc
    if url.drivername in _DEFAULT_DRIVERS:
        backend = "postgresql" if url.drivername == "postgres" else url.drivername
        url = url.set(drivername=f"{backend}+{_DEFAULT_DRIVERS[url.drivername]}")
    if url.get_backend_name() in ("mysql", "mariadb") and "charset" not in url.query:
        # The connection must speak utf8mb4 too, or 4-byte characters are mangled before they
        # reach the utf8mb4 columns.
        url = url.update_query_dict({"charset": "utf8mb4"})
    return url


# SQLite's messages for a file it can no longer write.
_SQLITE_FILE_ERRORS = ("disk i/o error", "readonly database", "database or disk is full", "unable to open database")


def _setup_sqlite(engine: Engine, config: Config) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (the documented recipe).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets readers run beside the one writer; the busy timeout makes a second writer wait
        # for the lock instead of failing at once; FULL sync means an acknowledged event survives
        # a power cut, not only a crash.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(config.sqlite_busy_timeout_ms)}")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "handle_error")
    def on_error(context: Any) -> None:
        # After a disk I/O error, a full disk or a file that turned read-only, the connection may
        # keep failing even once the fault is fixed. Treating it as a lost connection makes the pool
        # open a fresh one, so the receiver recovers without a restart.
        if any(sign in str(context.original_exception).lower() for sign in _SQLITE_FILE_ERRORS):
            context.is_disconnect = True

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front. A deferred transaction that reads and then
        # writes can deadlock against another one and fail with "database is locked" at once,
        # without waiting for the busy timeout.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_engine_for(config: Config, **kwargs: Any) -> Engine:
    """Return an engine for ``config.database_url`` with the per-database settings the store needs."""
    url = normalize_url(config.database_url)
    backend = url.get_backend_name()
    # No pool_pre_ping: it costs a round trip on every request. A connection that died while idle
    # fails its first statement as "invalidated", and EventStore retries that in a new transaction
    # on a fresh connection, so the sender still gets its answer.
    options: dict[str, Any] = {"json_serializer": json_dumps}
    # A server that takes the TCP connection but never answers would otherwise hold a request until
    # gunicorn kills the worker; this turns it into a 503 after one lock timeout's worth of waiting.
    # (libpq treats anything under 2 seconds as 2.)
    connect_timeout = max(2, round(config.lock_timeout_ms / 1000))
    if backend == "postgresql":
        # A held lock fails the statement after lock_timeout, well before gunicorn's worker timeout,
        # so the sender gets a 503 to retry rather than a dropped connection.
        # Statements are planned for their parameters at every execution, which keeps them on the
        # indexes at every table size: a plan cached while the tables were small would stay a
        # sequential scan as they grow (tested). The pipelined path, whose statements are all key
        # lookups, keeps one plan per statement instead, set up inside its own transactions
        # (connector.db.pipeline).
        options["connect_args"] = {
            "options": f"-c lock_timeout={int(config.lock_timeout_ms)} -c plan_cache_mode=force_custom_plan",
            "connect_timeout": connect_timeout,
        }
        if url.get_driver_name() == "psycopg":
            # Text as UTF-8 on every path, whatever PGCLIENTENCODING says (the pipelined path needs it).
            options["connect_args"]["client_encoding"] = "utf8"
            # psycopg would prepare a statement on its fifth execution, and after any ROLLBACK it then
            # sends DEALLOCATE ALL, which drops the statements the pipelined path prepared as well
            # (connector.db.pipeline). Statements sent through SQLAlchemy are few per transaction.
            options["connect_args"]["prepare_threshold"] = None
    elif backend in ("mysql", "mariadb"):
        # READ COMMITTED avoids InnoDB's gap locks on inserts of new ids, the main source of
        # deadlocks between concurrent webhook writers.
        options["isolation_level"] = "READ COMMITTED"
        seconds = max(1, round(config.lock_timeout_ms / 1000))
        options["connect_args"] = {
            "init_command": f"SET SESSION innodb_lock_wait_timeout={seconds}",
            "connect_timeout": connect_timeout,
        }
    connect_args = {**options.get("connect_args", {}), **kwargs.pop("connect_args", {})}
    options.update(kwargs)
    if connect_args:
        options["connect_args"] = connect_args
    engine = create_engine(url, **options)
    if backend == "sqlite":
        _setup_sqlite(engine, config)
    return engine
