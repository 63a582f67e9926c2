"""The WSGI entry point: ``gunicorn -c python:connector.gunicorn_conf connector.wsgi:app``.

The app configures itself from ``CONNECTOR_CONFIG`` and the ``CONNECTOR_*`` environment variables.
"""

from connector.app import create_app
from connector.config import load_config
from connector.logs import configure_logging

config = load_config()
configure_logging(config)
app = create_app(config)
