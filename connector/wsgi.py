"""The WSGI entry point: ``gunicorn connector.wsgi:app``.

The app configures itself from ``CONNECTOR_CONFIG`` and the ``CONNECTOR_*`` environment variables.
"""

from connector.app import create_app
from connector.config import load_config

app = create_app(load_config())
