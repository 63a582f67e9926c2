# gunicorn reads ./gunicorn.conf.py by default, so that `gunicorn connector.wsgi:app` run from a
# checkout sums /metrics over every worker and runs the configured threads per worker.
# Elsewhere: gunicorn -c python:connector.gunicorn_conf ...
from connector.gunicorn_conf import child_exit, on_exit, threads  # noqa: F401
