"""The ``connector`` command. Exit codes: 0 success, 1 a check failed, 2 bad usage or configuration."""

from __future__ import annotations

import sys
from typing import Any

import click

from connector.config import Config, load_config
from connector.errors import ConfigError, ConnectorError


class _Context:
    def __init__(self, overrides: dict[str, Any]) -> None:
        self.overrides = overrides

    def config(self, **more: Any) -> Config:
        """The configuration, with this command's own options on top."""
        try:
            return load_config(**self.overrides, **more)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--database-url", envvar=None, help="Override the configured database URL.")
@click.version_option(package_name="coherent-connector")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None) -> None:
    """Coherent warehouse connector: signed webhooks into SQL tables.

    Settings come from the TOML file named by CONNECTOR_CONFIG and from CONNECTOR_* environment
    variables; see config.example.toml.
    """
    ctx.obj = _Context({"database_url": database_url})


@cli.command()
@click.option("--bind", help="Address to listen on, e.g. 0.0.0.0:8000 (default: the configured bind).")
@click.option("--workers", type=int, help="Number of gunicorn worker processes.")
@click.pass_obj
def serve(obj: _Context, bind: str | None, workers: int | None) -> None:
    """Run the webhook receiver under gunicorn."""
    from connector.server import run_gunicorn

    config = obj.config(bind=bind, workers=workers)
    try:
        config.require_secrets()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    run_gunicorn(config)


@cli.command()
@click.option("--revision", default="head", show_default=True, help="Revision to upgrade to.")
@click.pass_obj
def migrate(obj: _Context, revision: str) -> None:
    """Create or upgrade the tables (the same as `alembic upgrade head`)."""
    from connector.db.engine import create_engine_for
    from connector.db.migrate import upgrade

    engine = create_engine_for(obj.config())
    try:
        upgrade(engine, revision)
    finally:
        engine.dispose()
    click.echo(f"database migrated to {revision}")


@cli.command()
@click.option("--batch-size", type=click.IntRange(min=1), default=2000, show_default=True, help="Log rows per batch.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.pass_obj
def rebuild(obj: _Context, batch_size: int, progress: bool) -> None:
    """Recompute every current-state table from the change log and swap it in atomically.

    Safe while the receiver runs: deliveries wait for the rebuild (past their lock timeout they get
    503 and are retried by the sender), and readers see the old tables until it commits.
    """
    from connector.db.engine import create_engine_for
    from connector.db.rebuild import rebuild as rebuild_tables

    engine = create_engine_for(obj.config())
    try:
        report = rebuild_tables(engine, batch_size=batch_size, progress=progress)
    finally:
        engine.dispose()
    click.echo(f"rebuilt the state tables from {report.events} change-log events")
    if report.outcome_changes:
        click.echo(
            f"{report.outcome_changes} event(s) now have another outcome than the log records "
            "(the log was written by another version of the rules)"
        )


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(standalone_mode=True)
    except ConnectorError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
