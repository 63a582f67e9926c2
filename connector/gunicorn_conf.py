"""gunicorn settings that make ``/metrics`` count every worker, and run the configured threads.

``connector serve`` applies them itself. With plain gunicorn, name this module as the config::

    gunicorn -c python:connector.gunicorn_conf connector.wsgi:app

(from a checkout, ``gunicorn connector.wsgi:app`` finds them through ``./gunicorn.conf.py``).

prometheus_client chooses between in-process and multiprocess metrics when it is first imported,
so ``PROMETHEUS_MULTIPROC_DIR`` is set here, in the master, while gunicorn reads its config and
before it loads the app or forks a worker; every worker inherits it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir() -> tuple[str, bool]:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory; return it and whether we created it.

    A directory named in the environment is emptied of metric files: values a previous run left
    behind would otherwise be added to this run's. Without one, a private temporary directory is
    made and removed again when gunicorn exits.
    """
    path = os.environ.get(MULTIPROC_DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="coherent-metrics-")
        os.environ[MULTIPROC_DIR_ENV] = path
        return path, True
    Path(path).mkdir(parents=True, exist_ok=True)
    for stale in Path(path).glob("*.db"):
        stale.unlink()
    return path, False


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: a worker died, so its live gauges must stop counting (its counters stay)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """gunicorn hook: remove the metrics directory if it was ours."""
    if _OWNED_DIR:
        shutil.rmtree(_METRICS_DIR, ignore_errors=True)


# Run in the master as gunicorn reads this module: before the app is loaded, before any fork.
_METRICS_DIR, _OWNED_DIR = prepare_metrics_dir()


def configured_threads() -> int:
    """The connector's ``threads`` setting, for plain gunicorn (its own ``--threads`` still wins)."""
    from connector.config import load_config

    return load_config().threads


threads = configured_threads()
