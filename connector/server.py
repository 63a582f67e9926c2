"""Running the app under gunicorn with the connector's own configuration."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from connector.config import Config


class ConnectorServer(BaseApplication):
    """A gunicorn application that builds one app per worker, each with its own database pool."""

    def __init__(self, config: Config) -> None:
        self.config_ = config
        super().__init__()

    def load_config(self) -> None:
        from connector import gunicorn_conf

        settings = {
            "bind": self.config_.bind,
            "workers": self.config_.workers,
            # More than one thread makes gunicorn use its gthread worker, whose in-flight requests
            # share transactions (connector.group_commit).
            "threads": self.config_.threads,
            "timeout": self.config_.timeout,
            "graceful_timeout": self.config_.graceful_timeout,
            "loglevel": self.config_.log_level,
            # The control socket sits at one fixed path per user, which several receivers on one
            # host would fight over; the connector does not use it.
            "control_socket_disable": True,
            # Multiprocess metrics: importing the module sets up their directory, here in the master.
            "child_exit": gunicorn_conf.child_exit,
            "on_exit": gunicorn_conf.on_exit,
            # gunicorn answers a header line over its default 8 KiB with an HTML 431 of its own. A
            # larger bound lets an oversized signature reach the app and get its JSON 401.
            "limit_request_field_size": 32 * 1024,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from connector.app import create_app
        from connector.logs import configure_logging

        configure_logging(self.config_)
        return create_app(self.config_)


def run_gunicorn(config: Config) -> None:
    """Serve until gunicorn is told to stop."""
    ConnectorServer(config).run()
