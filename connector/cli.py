"""The ``connector`` command.

Exit codes, the same for every command, for scripts to rely on:

- 0: success.
- 1: the command ran and found something wrong: a failed check, bad lines in an import file, an
  import stopped part-way (a loader killed, the file changed), a receiver that answered ``send``
  with an error.
- 2: bad usage or configuration: an unknown option, a missing file, no secret, an invalid setting.
- 3: the database or the receiver could not be reached, or kept failing; retry later.
"""

from __future__ import annotations

import gc
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from connector.config import Config, load_config
from connector.errors import ConfigError, ConnectorError, DatabaseUnavailable, ImportFailed
from connector.signing import SIGNATURE_HEADER, sign

if TYPE_CHECKING:
    from connector.db.store import EventStore


class _Context:
    def __init__(self, overrides: dict[str, Any]) -> None:
        self.overrides = overrides

    def config(self, **more: Any) -> Config:
        """The configuration, with this command's own options on top."""
        try:
            return load_config(**self.overrides, **more)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from exc


EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


class _Group(click.Group):
    """Turns the connector's deliberate errors into the documented exit codes, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DatabaseUnavailable as exc:
            click.echo(f"error: the database is unavailable: {exc}", err=True)
            ctx.exit(EXIT_UNAVAILABLE)
        except ImportFailed as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_PROBLEM)
        except ConnectorError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_USAGE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--threads", type=int, help="Request threads per worker; their events share transactions.")
@click.pass_obj
def serve(obj: _Context, bind: str | None, workers: int | None, threads: int | None) -> None:
    """Run the webhook receiver under gunicorn."""
    from connector.server import run_gunicorn

    config = obj.config(bind=bind, workers=workers, threads=threads)
    try:
        config.require_secrets()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    gc.set_threshold(*_GC_THRESHOLD)
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


def _ready_store(config: Config) -> EventStore:
    """A store on the configured database, refusing one that is not migrated to head."""
    from connector.db.engine import create_engine_for
    from connector.db.migrate import head_revision
    from connector.db.store import EventStore

    store = EventStore(create_engine_for(config), retry_attempts=config.retry_attempts)
    current, head = store.current_revision(), head_revision()
    if current != (head,):
        store.engine.dispose()
        raise _Problem(
            f"the database is at revision {', '.join(current) or 'none'}, not {head}: run `connector migrate`"
        )
    return store


class _Problem(click.ClickException):
    """Something is wrong that the user must fix first: exit 1."""

    exit_code = EXIT_PROBLEM


@cli.command()
@click.pass_obj
def check(obj: _Context) -> None:
    """Check the configuration, the database, its migrations and the secrets.

    Prints one line per check and exits 1 if any failed. Secrets are counted, never shown.
    """
    from connector.db.engine import create_engine_for, normalize_url
    from connector.db.migrate import head_revision
    from connector.db.store import EventStore

    config = obj.config()
    failed = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal failed
        failed += not ok
        click.echo(f"{'ok' if ok else 'FAILED':<7} {what}: {detail}")

    url = normalize_url(config.database_url)
    report(True, "config", f"valid; database {url.render_as_string(hide_password=True)}")
    count = len(config.webhook_secrets)
    report(count > 0, "secrets", f"{count} configured" if count else "none configured: set CONNECTOR_WEBHOOK_SECRETS")
    sqlite_file = url.database if url.get_backend_name() == "sqlite" and url.database != ":memory:" else None
    if sqlite_file and not Path(sqlite_file).exists():
        # Connecting would create an empty file, which a check must not do.
        report(False, "database", f"no SQLite file at {sqlite_file}: `connector migrate` creates it")
        raise click.exceptions.Exit(EXIT_PROBLEM)
    engine = create_engine_for(config)
    try:
        current = EventStore(engine).current_revision()
    except DatabaseUnavailable as exc:
        report(False, "database", f"unreachable ({exc})")
        report(False, "migrations", "unknown while the database is unreachable")
    else:
        head = head_revision()
        report(True, "database", f"reachable ({url.get_backend_name()})")
        at = ", ".join(current) or "none"
        report(
            current == (head,),
            "migrations",
            f"at head {head}" if current == (head,) else f"at {at}, head is {head}: run `connector migrate`",
        )
    finally:
        engine.dispose()
    if failed:
        raise click.exceptions.Exit(EXIT_PROBLEM)


_MAX_BAD_LINES_SHOWN = 20


@cli.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=10_000,
    show_default=True,
    help="Events per transaction.",
)
@click.option("--skip-bad", is_flag=True, help="Import the good lines even if some are bad (still exits 1).")
@click.option(
    "--processes",
    type=click.IntRange(1, 254),
    help="Processes loading at once, each taking a share of the resource ids (default: one per core, "
    "up to 8; on SQLite always 1).",
)
@click.pass_obj
def import_(obj: _Context, file: Path, batch_size: int, skip_bad: bool, processes: int | None) -> None:
    """Backfill FILE, JSON lines of webhook envelopes, by the same rules as live delivery.

    Each line is an envelope {"id", "type", "payload"}, optionally with "received_at" (ISO 8601 with
    an offset), as `connector export` writes. Every line is checked before anything is written: a bad
    line is reported with its line number and, unless --skip-bad, nothing is imported (exit 1).
    Signatures are not checked: the file is the operator's own. Rerunning, also after a crash, is
    safe: events already recorded are duplicates and write nothing.
    """
    from connector.backfill import check_file  # no database code: the check starts at once

    if not file.is_file():
        raise click.UsageError(
            f"{file} is not a regular file (a pipe, say): the import reads it twice, to check every line "
            "and then to load them; save it to a file first"
        )
    config = obj.config()

    def meanwhile() -> None:
        # This process waits while the file is checked: it loads the database code and checks the
        # database's revision then. Each loader opens its own connections.
        _ready_store(config).engine.dispose()

    check = check_file(file, keep=_MAX_BAD_LINES_SHOWN, meanwhile=meanwhile)
    lines, bad = check.lines, check.bad
    for line in check.first_bad:
        click.echo(f"{file}:{line.number}: {line.problem}", err=True)
    if bad > _MAX_BAD_LINES_SHOWN:
        click.echo(f"... and {bad - _MAX_BAD_LINES_SHOWN} more bad lines", err=True)
    if bad and not skip_bad:
        click.echo(f"nothing imported: {bad} of {lines} lines are bad; fix them or pass --skip-bad", err=True)
        raise click.exceptions.Exit(EXIT_PROBLEM)

    from tqdm import tqdm

    from connector.db.transfer import import_file, loaders_for

    loaders = loaders_for(config, processes)
    with tqdm(total=lines - bad, unit="event", disable=None, file=sys.stderr) as progress:
        outcomes = import_file(config, file, check, loaders, batch_size=batch_size, on_batch=progress.update)
    summary = ", ".join(f"{outcome} {count}" for outcome, count in sorted(outcomes.items())) or "no events"
    click.echo(f"imported {lines - bad} events from {file}: {summary}" + (f"; skipped {bad} bad lines" if bad else ""))
    if bad:
        raise click.exceptions.Exit(EXIT_PROBLEM)


def _instant(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        instant = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter("expected an ISO 8601 date or time, e.g. 2026-11-29T12:00:00+00:00") from exc
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant


@cli.command()
@click.option(
    "--since",
    callback=_instant,
    metavar="INSTANT",
    help="Only events received at or after this ISO 8601 instant (UTC unless it has an offset).",
)
@click.option(
    "-o",
    "--output",
    type=click.File("w", encoding="utf-8", atomic=True),
    default="-",
    help="File to write (default: standard output).",
)
@click.pass_obj
def export(obj: _Context, since: datetime | None, output: TextIO) -> None:
    """Write the change log as JSON lines that `connector import` takes back.

    Events come in the order they were recorded, each with its "received_at", so importing the file
    into an empty database gives the same tables.
    """
    from connector.db.transfer import export_lines

    store = _ready_store(obj.config())
    try:
        written = export_lines(store.engine, output, since=since)
    finally:
        store.engine.dispose()
    click.echo(f"exported {written} events", err=True)


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", help="Receiver to post to (default: http://<configured bind>/webhooks).")
@click.option("--new-id", is_flag=True, help="Give the event a fresh id, so that it is not a duplicate of a past send.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the answer.")
@click.pass_obj
def send(obj: _Context, file: Path, url: str | None, new_id: bool, timeout: float) -> None:
    """Sign FILE with the configured secret and POST it, as Coherent would.

    A developer's tool for trying a receiver: exits 0 on a 2xx answer, 1 on any other answer and 3
    when the receiver cannot be reached.
    """
    import urllib.error  # here, not at the top: 25 ms that every other command's start-up would pay
    import urllib.request

    config = obj.config()
    config.require_secrets()
    body = file.read_bytes()
    if new_id:
        try:
            document = json.loads(body)
            document["id"] = uuid.uuid4().hex[:16]
        except (ValueError, TypeError) as exc:
            raise click.UsageError(f"--new-id needs a JSON object in {file}") from exc
        body = json.dumps(document, ensure_ascii=False).encode()
    target = url or f"http://{config.bind}/webhooks"
    if not target.startswith(("http://", "https://")):
        raise click.BadParameter("must be an http:// or https:// URL", param_hint="--url")
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        target,
        data=body,
        method="POST",
        headers={SIGNATURE_HEADER: sign(body, config.webhook_secrets[0]), "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - checked above
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"error: could not reach {target}: {getattr(exc, 'reason', exc)}", err=True)
        raise click.exceptions.Exit(EXIT_UNAVAILABLE) from exc
    click.echo(f"{status} {answer.decode(errors='replace')}")
    if not 200 <= status < 300:
        raise click.exceptions.Exit(EXIT_PROBLEM)


@cli.command()
@click.option("--batch-size", type=click.IntRange(min=1), default=10_000, show_default=True, help="Log rows per batch.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.pass_obj
def rebuild(obj: _Context, batch_size: int, progress: bool) -> None:
    """Recompute every current-state table from the change log and swap it in atomically.

    Safe while the receiver runs: deliveries wait for the rebuild (past their lock timeout they get
    503 and are retried by the sender), and readers see the old tables until it commits.
    """
    from connector.db.rebuild import rebuild as rebuild_tables

    engine = _ready_store(obj.config()).engine
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


# Python's default: a collection every 700 new objects.
_GC_THRESHOLD = gc.get_threshold()


def main() -> None:
    """Console-script entry point."""
    # Every command but serve is a one-off job that allocates much and keeps little (imports, then a
    # batch load): collecting every 700 new objects cost about 10% of starting up. Serve puts the
    # default back for its long-running workers: there the threshold made no difference to the CPU
    # per event (0.76-0.79 ms either way, bench/profile_ingest.py), so memory gets the default.
    gc.set_threshold(50_000, 20, 100)
    try:
        cli.main(standalone_mode=True)
    except ConnectorError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
