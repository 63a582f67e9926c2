"""The ``connector`` command: help, exit codes, check, import, export, send, and migrate from a wheel."""

import gc
import json
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, inspect, select, text

from connector.backfill import (
    SKIP,
    Check,
    bucket_of,
    check_file,
    decode_checked,
    fewer_collections,
    loader_of,
    parse_line,
    planned_lines,
)
from connector.cli import cli
from connector.db.migrate import head_revision
from connector.db.schema import events, metadata
from connector.db.store import EventStore
from connector.db.transfer import _load_apart
from connector.db.types import json_dumps
from connector.errors import FileChanged, ImportFailed, InvalidEnvelope
from connector.events import decode_json, event_from_document
from tests.conftest import SECRET, Gunicorn, empty_tables, envelope, free_port, make_config

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
COMMANDS = ["serve", "migrate", "check", "import", "export", "send"]


def run(*args: str, secret: str | None = SECRET, **env: str):
    """Invoke the command in-process, with a clean CONNECTOR_* environment."""
    environ = {name: None for name in os.environ if name.startswith("CONNECTOR_")}
    environ.update({"CONNECTOR_WEBHOOK_SECRETS": secret, **env})
    return CliRunner().invoke(cli, list(args), env=environ, catch_exceptions=False)


def received(event_type: str, payload: dict, event_id: str, minute: int) -> dict:
    """An import line: the envelope with the time it was received."""
    return {**envelope(event_type, payload, event_id), "received_at": (T0 + timedelta(minutes=minute)).isoformat()}


def history() -> list[dict]:
    """Lines of a backfill file: creates, updates, a late create, deletes, an unknown type, a repeat."""
    contact = {"id": "c1", "username": "kevin", "created_at": 692233200}
    message = {"id": "m1", "conversation_id": "v1", "contact": {"id": "c1"}, "message": "hi", "updated_at": 10}
    reacted = {**message, "reactions": [{"wave": ["kate"]}], "updated_at": 20}
    return [
        received("contact.created", contact, "e01", 0),
        received("contact.updated", {**contact, "display_name": "Kevin"}, "e02", 1),
        received("contact.created", {**contact, "username": "old"}, "e03", 2),  # stale
        received("message.created", message, "e04", 3),
        received("message.updated", {**message, "message": "old", "updated_at": 5}, "e05", 4),  # stale
        received("message.updated", reacted, "e06", 5),
        received("group.created", {"id": "g1", "name": "Plaza", "contacts": [{"username": "Hector"}]}, "e07", 6),
        received("group.deleted", {"id": "g1"}, "e08", 7),
        received("group.updated", {"id": "g1", "name": "revived?"}, "e09", 8),  # after delete
        received("attachment.deleted", {"id": "a1", "file_size": 3}, "e10", 9),  # tombstone
        received("reaction.created", {"id": "r1"}, "e11", 10),  # unknown type
        received("contact.updated", {**contact, "username": "again"}, "e02", 11),  # repeated id
        envelope("conversation.created", {"id": "v1", "contact_id": "c1", "is_pinned": False}, "e12"),  # no received_at
    ]


EXPECTED_OUTCOMES = [
    ("e01", "applied"), ("e02", "applied"), ("e03", "stale"), ("e04", "applied"), ("e05", "stale"),
    ("e06", "applied"), ("e07", "applied"), ("e08", "applied"), ("e09", "after_delete"), ("e10", "applied"),
    ("e11", "unknown_type"), ("e12", "applied"),
]  # fmt: skip


def write_lines(path: Path, documents: list) -> Path:
    path.write_text("".join(json.dumps(document) + "\n" for document in documents))
    return path


def snapshot(engine, *, ignore=("seq", "_synced_at")) -> dict[str, list[tuple]]:
    """Every table's rows in key order, without the columns a round trip may legitimately change.

    The change log is in event id order: an import numbers ``seq`` afresh, and its loaders in parallel
    interleave different rows' events (:func:`seq_order_per_row` checks what the order must keep).
    """
    tables = {}
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            columns = [column for column in table.c if column.name not in ignore]
            order = [events.c.event_id] if table is events else list(table.primary_key.columns)
            tables[table.name] = [tuple(row) for row in conn.execute(select(*columns).order_by(*order))]
    return tables


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command):
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0 and "Usage:" in result.stdout
    if command is None:
        assert all(name in result.stdout for name in COMMANDS) and "Exit codes" not in result.stdout


def test_an_unknown_command_or_option_exits_2():
    assert run("frobnicate").exit_code == 2
    assert run("import", "--no-such-option", "x").exit_code == 2
    assert run("import", "/no/such/file.jsonl").exit_code == 2


# --- check -----------------------------------------------------------------------------------------


def test_check_passes_on_a_migrated_database_and_never_prints_the_secret(db_url):
    secret = "s3cr3t-that-must-never-be-printed"
    result = run("--database-url", db_url, "check", secret=secret)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "config:"], ["ok", "secrets:"], ["ok", "database:"], ["ok", "migrations:"]
    ]  # fmt: skip
    assert f"at head {head_revision()}" in result.stdout and "1 configured" in result.stdout
    assert secret not in result.output


def test_check_fails_with_exit_1_on_an_unmigrated_database_or_a_missing_secret(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    result = run("--database-url", url, "check")
    assert result.exit_code == 1 and "FAILED  database: no SQLite file at" in result.stdout
    assert not (tmp_path / "empty.db").exists()  # checking never creates the database
    sqlite3.connect(tmp_path / "empty.db").close()
    result = run("--database-url", url, "check", secret=None)
    assert result.exit_code == 1
    assert "FAILED  secrets: none configured" in result.stdout
    assert f"FAILED  migrations: at none, head is {head_revision()}: run `connector migrate`" in result.stdout


def test_check_reports_an_unreachable_database_without_its_password():
    url = f"postgresql://root:hunter2-password@127.0.0.1:{free_port()}/nothing"
    result = run("--database-url", url, "check")
    assert result.exit_code == 1
    assert "FAILED  database: unreachable (cannot connect to the database)" in result.stdout
    assert "hunter2" not in result.output and "***" in result.stdout


def test_an_invalid_setting_exits_2_with_a_message(tmp_path):
    result = run("check", CONNECTOR_LOG_FORMAT="xml")
    assert result.exit_code == 2 and "log_format must be 'json' or 'logfmt'" in result.stderr


# --- import ----------------------------------------------------------------------------------------


def test_import_applies_a_backfill_under_the_live_rules(db_url, engine, tmp_path):
    path = write_lines(tmp_path / "history.jsonl", history())
    result = run("--database-url", db_url, "import", str(path), "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "imported 13 events" in result.stdout and "applied 8, duplicate 1" in result.stdout
    assert "after_delete 1" in result.stdout and "stale 2" in result.stdout and "unknown_type 1" in result.stdout
    with engine.connect() as conn:
        # By event id: loaders in parallel interleave different rows' events in seq.
        outcomes = conn.execute(select(events.c.event_id, events.c.outcome).order_by(events.c.event_id)).all()
        group = conn.execute(text("SELECT name, _deleted_at FROM coherent_groups")).one()
        received = conn.execute(select(events.c.received_at).where(events.c.event_id == "e08")).scalar_one()
        contact = conn.execute(text("SELECT username, display_name FROM coherent_contacts")).one()
    assert outcomes == EXPECTED_OUTCOMES
    assert group.name == "Plaza" and group._deleted_at is not None
    assert received == T0 + timedelta(minutes=7)  # the file's received_at, not the time of the import
    assert tuple(contact) == ("kevin", "Kevin")


def test_import_is_idempotent_also_after_a_crash_part_way(db_url, engine, tmp_path):
    lines = history()
    full = write_lines(tmp_path / "full.jsonl", lines)
    assert run("--database-url", db_url, "import", str(full)).exit_code == 0
    once = snapshot(engine, ignore=("seq", "_synced_at", "received_at", "_deleted_at"))

    again = run("--database-url", db_url, "import", str(full))
    assert again.exit_code == 0 and "imported 13 events from" in again.stdout and "duplicate 13" in again.stdout
    assert snapshot(engine, ignore=("seq", "_synced_at", "received_at", "_deleted_at")) == once

    # A crash after the first batches committed: the rerun of the whole file completes it.
    empty_tables(engine)
    prefix = write_lines(tmp_path / "prefix.jsonl", lines[:5])
    assert run("--database-url", db_url, "import", str(prefix), "--batch-size", "2").exit_code == 0
    assert run("--database-url", db_url, "import", str(full), "--batch-size", "2").exit_code == 0
    assert snapshot(engine, ignore=("seq", "_synced_at", "received_at", "_deleted_at")) == once


def seq_order_per_row(engine) -> dict[tuple[str, str], list[str]]:
    """Each row's event ids in ``seq`` order, duplicates never recorded."""
    order: dict[tuple[str, str], list[str]] = {}
    with engine.connect() as conn:
        query = select(events.c.resource, events.c.resource_id, events.c.event_id).order_by(events.c.seq)
        for resource, resource_id, event_id in conn.execute(query):
            order.setdefault((resource, resource_id), []).append(event_id)
    return order


def file_order_per_row(documents: list[dict]) -> dict[tuple[str, str], list[str]]:
    """Each row's event ids in file order, each id at its first line only."""
    order: dict[tuple[str, str], list[str]] = {}
    seen = set()
    for document in documents:
        if document["id"] not in seen:
            seen.add(document["id"])
            key = (document["type"].partition(".")[0], document["payload"]["id"])
            order.setdefault(key, []).append(document["id"])
    return order


def busy_history(events_per_row: int = 12, rows: int = 8, seed: int = 7) -> list[dict]:
    """Lines where each of a few rows per resource gets many events, shuffled across rows: creates,
    updates with rising and falling ``updated_at``, late creates, deletes, and repeated event ids."""
    rng = random.Random(seed)
    per_row = []
    for resource in ("contact", "conversation", "group", "message", "attachment"):
        for row in range(rows):
            row_id = f"{resource[:2]}{row}"
            lines = []
            for n in range(events_per_row):
                action = rng.choice(["created", "updated", "updated", "updated", "deleted"] if n else ["created"])
                payload = {"id": row_id, "updated_at": rng.randint(1, 50), "name": f"v{n}", "username": f"u{n}"}
                if resource == "group":
                    payload["contacts"] = [{"id": f"c{k}", "username": f"m{k}"} for k in range(rng.randint(0, 3))]
                if resource == "message":
                    payload["reactions"] = [{"wave": [f"r{n}"]}] if n % 2 else []
                lines.append(envelope(f"{resource}.{action}", payload, f"{row_id}-{n}"))
            lines.append(dict(lines[rng.randrange(len(lines))]))  # a redelivery
            per_row.append(lines)
    # Interleave the rows' streams, each in its own order, as a sender would.
    documents = []
    while per_row:
        stream = rng.choice(per_row)
        documents.append(stream.pop(0))
        if not stream:
            per_row.remove(stream)
    for minute, document in enumerate(documents):
        document["received_at"] = (T0 + timedelta(minutes=minute)).isoformat()
    return documents


def test_an_import_in_parallel_gives_what_one_process_gives(db_url, engine, tmp_path):
    documents = busy_history()
    path = write_lines(tmp_path / "busy.jsonl", documents)
    one = run("--database-url", db_url, "import", str(path), "--processes", "1", "--batch-size", "25")
    assert one.exit_code == 0, one.output
    alone = snapshot(engine)
    assert seq_order_per_row(engine) == file_order_per_row(documents)

    empty_tables(engine)
    many = run("--database-url", db_url, "import", str(path), "--processes", "3", "--batch-size", "25")
    assert many.exit_code == 0, many.output
    assert many.stdout == one.stdout  # the same count per outcome
    assert snapshot(engine) == alone
    # Each row's events were applied in file order, whichever loader took them.
    assert seq_order_per_row(engine) == file_order_per_row(documents)


def test_forked_loaders_share_the_files_check_rather_than_each_unpickling_a_copy(db_url, engine, tmp_path, monkeypatch):
    """The check holds 5 bytes a line (50 MB for a 10M-line file); a loader forked from the import
    shares the parent's instead of receiving a pickled copy of its own."""

    def refuse(self, protocol):
        raise AssertionError("the file's check was pickled for a loader")

    monkeypatch.setattr(Check, "__reduce_ex__", refuse)
    path = write_lines(tmp_path / "busy.jsonl", busy_history())
    result = run("--database-url", db_url, "import", str(path), "--processes", "2", "--batch-size", "25")
    assert result.exit_code == 0, result.output
    assert "applied" in result.stdout


def test_one_event_id_on_two_rows_is_recorded_once_when_loaders_race_for_it(db_url, engine, tmp_path):
    """Coherent never reuses an event id, but a hand-made file may: the loaders of the two rows race
    for it, the loser finds it recorded and counts it a duplicate, and the import completes."""
    rows = [f"c{n}" for n in range(40)]
    loader = {
        row: loader_of(bucket_of(event_from_document(envelope("contact.created", {"id": row}))), 2) for row in rows
    }
    first = next(row for row in rows if loader[row] == 0)
    second = next(row for row in rows if loader[row] == 1)
    documents = [envelope("contact.created", {"id": row}, f"e-{row}") for row in rows]
    documents += [envelope("contact.updated", {"id": row}, "twice") for row in (first, second)]
    path = write_lines(tmp_path / "twice.jsonl", documents)
    result = run("--database-url", db_url, "import", str(path), "--processes", "2")
    assert result.exit_code == 0, result.output
    assert "applied 41, duplicate 1" in result.stdout
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).where(events.c.event_id == "twice")) == 1


def test_import_reports_bad_lines_by_number_and_imports_nothing_unless_told(db_url, engine, tmp_path):
    good = history()[:3]
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps(good[0]) + "\n"
        + "{not json\n"
        + "\n"  # blank lines are ignored
        + json.dumps(good[1]) + "\n"
        + json.dumps({"id": "x", "type": "contact", "payload": {"id": "c"}}) + "\n"
        + json.dumps({**good[2], "received_at": "yesterday"}) + "\n"
    )  # fmt: skip
    result = run("--database-url", db_url, "import", str(path))
    assert result.exit_code == 1
    assert f"{path}:2: the body is not valid JSON" in result.stderr
    assert f"{path}:5: the event 'type' must have the form 'resource.action'" in result.stderr
    assert f"{path}:6: 'received_at' is not an ISO 8601 instant" in result.stderr
    assert "nothing imported: 3 of 5 lines are bad" in result.stderr
    with engine.connect() as conn:
        assert conn.scalar(select(events.c.event_id)) is None

    result = run("--database-url", db_url, "import", str(path), "--skip-bad")
    assert result.exit_code == 1 and "imported 2 events" in result.stdout and "skipped 3 bad lines" in result.stdout
    with engine.connect() as conn:
        assert conn.scalars(select(events.c.event_id).order_by(events.c.seq)).all() == ["e01", "e02"]


_LINE_KINDS = {
    "good": json.dumps({"id": "e1", "type": "contact.created", "payload": {"id": "c1"}}) + "\n",
    "not json": "{not json\n",
    "no type": json.dumps({"id": "e2", "payload": {"id": "c2"}}) + "\n",
    "blank": "\n",
    "spaces": "   \n",
    "long good": json.dumps({"id": "e3", "type": "message.created", "payload": {"id": "m", "message": "x" * 300}})
    + "\n",
    "good, CRLF": json.dumps({"id": "e4", "type": "group.created", "payload": {"id": "g1"}}) + "\r\n",
    "lone CR inside": json.dumps({"id": "e5", "type": "contact.created", "payload": {"id": "c5"}}) + "\r" + "{}\n",
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kinds=st.lists(st.sampled_from(sorted(_LINE_KINDS)), max_size=60),
    last_newline=st.booleans(),
    processes=st.integers(1, 5),
    part_bytes=st.integers(1, 400),
    loaders=st.integers(1, 4),
)
def test_checking_a_file_in_parallel_parts_finds_what_reading_it_line_by_line_does(
    tmp_path, kinds, last_newline, processes, part_bytes, loaders
):
    text = "".join(_LINE_KINDS[kind] for kind in kinds)
    path = tmp_path / "lines.jsonl"
    path.write_bytes((text if last_newline else text.removesuffix("\n")).encode())
    check = check_file(path, keep=5, part_bytes=part_bytes, processes=processes)
    with path.open("rb") as fh:  # the file read line by line, numbered as an editor numbers them
        lines = [parse_line(number, text) for number, text in enumerate(fh, start=1) if text.strip()]
    bad = [(line.number, line.problem) for line in lines if line.problem is not None]
    assert (check.lines, check.bad) == (len(lines), len(bad))
    assert [(line.number, line.problem) for line in check.first_bad] == bad[:5]
    # The plan has a byte per line of the file: a good line's bucket; blank and bad lines, SKIP.
    with path.open("rb") as fh:
        plan = [SKIP] * len(fh.readlines())  # lines as a file reads them: only \n ends one
    taker = [None] * len(plan)
    for line in lines:
        if line.event is not None:
            plan[line.number - 1] = bucket_of(line.event)
            taker[line.number - 1] = loader_of(bucket_of(line.event), loaders)
    assert list(check.plan) == plan
    for loader in range(loaders):
        numbers = [line.number for line in planned_lines(path, check, loader, loaders)]
        assert numbers == [number for number, took in enumerate(taker, start=1) if took == loader]


# Any JSON value, with the strings and numbers where decoders part ways: lone surrogates, integers
# beyond 64 bits, floats at the edges of their range.
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec=None, exclude_categories=())),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(value=_JSON_VALUES, ascii_only=st.booleans(), spaced=st.booleans())
def test_the_loaders_fast_decoder_reads_every_checked_line_as_the_check_did(value, ascii_only, spaced):
    """Loaders decode lines the check accepted with orjson: it must give the very value Python's
    decoder gives (int against float included, which json_dumps tells apart), or hand the line over."""
    separators = (", ", ": ") if spaced else (",", ":")
    try:
        text = json.dumps(value, ensure_ascii=ascii_only, separators=separators).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written raw is not UTF-8: no line holds one
        return
    try:
        checked = decode_json(text + b"\n")
    except InvalidEnvelope:  # refused by the check (a number too long, say): never loaded
        return
    assert json_dumps(decode_checked(text + b"\n")) == json_dumps(checked)


@pytest.mark.parametrize(
    "literal",
    [
        "18446744073709551615",  # the largest unsigned 64-bit integer
        "18446744073709551616",  # one more: orjson would read it as a float
        "-9223372036854775809",
        "1" * 100,
        "123456789012345678901234567890.5",
        "5e-324",
        "2.2250738585072011e-308",
        "1e-400",
        "1.7976931348623157e308",
        "-0",
        "-0.0",
        "0e0",
        '"\\ud800"',
        '"\\udc00\\ud800"',
        '"\\ud83d\\ude00"',
        '"\\u0000"',
    ],
)
def test_the_loaders_fast_decoder_at_the_edges_of_numbers_and_strings(literal):
    text = f'{{"id": "e1", "payload": {{"value": [{literal}]}}}}'.encode()
    assert json_dumps(decode_checked(text)) == json_dumps(decode_json(text))
    assert type(decode_checked(text)["payload"]["value"][0]) is type(decode_json(text)["payload"]["value"][0])


def test_bulk_work_leaves_the_callers_garbage_collector_as_it_found_it(db_url, tmp_path):
    """An import on SQLite runs in the calling process: its collector settings must come back."""
    before = gc.get_threshold()
    with fewer_collections():
        assert gc.get_threshold() != before and gc.get_freeze_count() > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    result = run("--database-url", db_url, "import", str(write_lines(tmp_path / "h.jsonl", history())))
    assert result.exit_code == 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze is left alone
    try:
        frozen = gc.get_freeze_count()
        with fewer_collections():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_a_file_that_changes_after_its_check_stops_the_load(tmp_path):
    documents = history()
    path = write_lines(tmp_path / "h.jsonl", documents)
    check = check_file(path)
    assert [line.event.event_id for line in planned_lines(path, check, 0, 1)] == [d["id"] for d in documents]
    edited = json.loads(json.dumps(documents[2]))
    edited["payload"]["username"] = "edited after the check"  # the same row, so the same bucket and loader
    for changed in (
        documents[:-1],
        [*documents, documents[0]],
        [*documents[:3], {"id": "x"}, *documents[4:]],
        [*documents[:2], edited, *documents[3:]],
    ):
        write_lines(path, changed)
        with pytest.raises(FileChanged, match="changed while it was imported"):
            list(planned_lines(path, check, 0, 1))


def test_a_blank_line_that_became_an_event_after_the_check_stops_the_load(tmp_path):
    """No loader takes a blank line, so its CRC is what shows that it now holds an event that would
    otherwise be left out unseen."""
    lines = [json.dumps(document) for document in history()]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")
    check = check_file(path)
    path.write_text(
        "\n".join([lines[0], json.dumps(envelope("contact.created", {"id": "new"}, "n1")), *lines[1:]]) + "\n"
    )
    for loader in range(2):
        with pytest.raises(FileChanged, match="at line 2"):
            list(planned_lines(path, check, loader, 2))


def test_a_line_moved_to_another_loaders_row_since_the_check_stops_the_load(tmp_path):
    """The loader of a row must see all its events: a line that now names a row of another loader
    would be applied out of order with that row's other events."""
    rows = [f"c{n}" for n in range(20)]
    loader = {
        row: loader_of(bucket_of(event_from_document(envelope("contact.created", {"id": row}))), 2) for row in rows
    }
    mine, other = next(r for r in rows if loader[r] == 0), next(r for r in rows if loader[r] == 1)
    path = write_lines(tmp_path / "m.jsonl", [envelope("contact.created", {"id": mine}, "e1")])
    check = check_file(path)
    write_lines(path, [envelope("contact.created", {"id": other}, "e1")])
    with pytest.raises(FileChanged, match="at line 1"):
        list(planned_lines(path, check, 0, 2))


def test_a_loaders_unexpected_error_reaches_the_import_by_name(tmp_path):
    """A loader's error travels back pickled; one that cannot be (a driver's, say) must not turn
    into a misleading 'process pool broken'. Here, the file vanished before the loader opened it."""
    config = make_config(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ImportFailed, match="a loader failed: FileNotFoundError") as caught:
        _load_apart(config, tmp_path / "gone.jsonl", Check(plan=bytearray(b"\x00")), 0, 1, 10, lambda size: None)
    assert pickle.loads(pickle.dumps(caught.value)).args == caught.value.args  # noqa: S301 - our own bytes


def _import_in_a_subprocess(db_url: str, path: Path, output: int = subprocess.PIPE) -> subprocess.Popen:
    command = [sys.executable, "-m", "connector.cli", "--database-url", db_url, "import", str(path)]
    command += ["--processes", "2", "--batch-size", "20"]
    environ = {name: value for name, value in os.environ.items() if not name.startswith("CONNECTOR_")}
    return subprocess.Popen(command, env=environ, stdout=output, stderr=output, text=True)


def _children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in found.read_text().split()] if found.exists() else []


def _loaders_writing(process: subprocess.Popen, engine) -> list[int]:
    """The import's loader processes, once both exist and events are being committed."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        loaders = _children(process.pid)
        with engine.connect() as conn:
            if len(loaders) == 2 and conn.scalar(select(func.count()).select_from(events)) > 0:
                return loaders
        time.sleep(0.02)
    raise AssertionError(f"no loaders writing; the import exited {process.poll()}")


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_loader_killed_mid_import_gives_a_clear_error_and_a_rerun_completes_it(db_url, engine, tmp_path):
    """As the out-of-memory killer would: exit 1 with what happened and what to do, no traceback."""
    path = write_lines(tmp_path / "busy.jsonl", busy_history(rows=60))
    assert run("--database-url", db_url, "import", str(path), "--processes", "1").exit_code == 0
    clean = snapshot(engine)
    empty_tables(engine)

    process = _import_in_a_subprocess(db_url, path)
    os.kill(_loaders_writing(process, engine)[0], signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1, err
    assert "ended without finishing" in err and "rerun the import" in err and "Traceback" not in err
    assert snapshot(engine) != clean

    assert run("--database-url", db_url, "import", str(path)).exit_code == 0
    assert snapshot(engine) == clean


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_loaders_end_with_the_import_that_started_them(db_url, engine, tmp_path):
    """Killing the import's process must not leave loaders writing unseen, or waiting for ever."""
    path = write_lines(tmp_path / "busy.jsonl", busy_history(rows=60))
    process = _import_in_a_subprocess(db_url, path, output=subprocess.DEVNULL)
    loaders = _loaders_writing(process, engine)
    process.kill()
    process.wait(timeout=10)
    deadline = time.monotonic() + 10
    alive = loaders
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in loaders if _state(pid) not in ("gone", "Z")]
    for pid in alive:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "gone"


@pytest.mark.parametrize("db_url", ["postgresql", "mariadb"], indirect=True)
def test_a_loader_that_fails_stops_the_import_and_a_rerun_completes_it(db_url, engine, tmp_path):
    """One loader meets a row locked elsewhere for longer than it may wait: the import exits 3, and
    once the lock is gone a rerun gives the tables of one clean import."""
    documents = busy_history()
    documents.insert(len(documents) // 2, received("contact.updated", {"id": "held", "username": "late"}, "held-2", 0))
    path = write_lines(tmp_path / "busy.jsonl", documents)
    store = EventStore(engine)
    held = envelope("contact.created", {"id": "held", "username": "early"}, "held-1")
    store.record(event_from_document(held), T0)
    assert run("--database-url", db_url, "import", str(path), "--processes", "1").exit_code == 0
    clean = snapshot(engine)

    empty_tables(engine)
    store.record(event_from_document(held), T0)
    with engine.connect() as conn, conn.begin():
        conn.execute(text("SELECT id FROM coherent_contacts WHERE id = 'held' FOR UPDATE")).all()
        failed = run(
            "--database-url", db_url, "import", str(path), "--processes", "2", "--batch-size", "20",
            CONNECTOR_LOCK_TIMEOUT_MS="300",
        )  # fmt: skip
    assert failed.exit_code == 3 and "the database is unavailable" in failed.stderr, failed.output
    assert "Traceback" not in failed.output
    assert snapshot(engine) != clean

    rerun = run("--database-url", db_url, "import", str(path))
    assert rerun.exit_code == 0, rerun.output
    assert snapshot(engine) == clean


def test_import_refuses_a_pipe_with_a_usage_error(tmp_path):
    """The import reads its file twice (check, then load), which a pipe cannot give."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    result = run("--database-url", f"sqlite:///{tmp_path / 'x.db'}", "import", str(fifo))
    assert result.exit_code == 2 and "is not a regular file" in result.stderr


def test_import_refuses_an_unmigrated_database(tmp_path):
    path = write_lines(tmp_path / "h.jsonl", history())
    result = run("--database-url", f"sqlite:///{tmp_path / 'new.db'}", "import", str(path))
    assert result.exit_code == 1 and "run `connector migrate`" in result.stderr


def test_import_and_export_exit_3_when_the_database_cannot_be_reached(tmp_path):
    url = f"postgresql://root@127.0.0.1:{free_port()}/nothing"
    path = write_lines(tmp_path / "h.jsonl", history())
    for args in (["import", str(path)], ["export"]):
        result = run("--database-url", url, *args)
        assert result.exit_code == 3 and "the database is unavailable: cannot connect to the database" in result.stderr
        assert "Traceback" not in result.output


# --- export ----------------------------------------------------------------------------------------


def test_export_then_import_into_an_empty_database_gives_identical_tables(db_url, engine, tmp_path):
    assert run("--database-url", db_url, "import", str(write_lines(tmp_path / "h.jsonl", history()))).exit_code == 0
    before = snapshot(engine)
    exported = tmp_path / "export.jsonl"
    result = run("--database-url", db_url, "export", "-o", str(exported))
    assert result.exit_code == 0 and "exported 12 events" in result.stderr
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == [event_id for event_id, _ in EXPECTED_OUTCOMES]
    assert seq_order_per_row(engine) == file_order_per_row(history())
    assert lines[7]["received_at"] == (T0 + timedelta(minutes=7)).isoformat()

    empty_tables(engine)
    result = run("--database-url", db_url, "import", str(exported), "--processes", "3")
    assert result.exit_code == 0, result.output
    # seq is numbered afresh by the target and _synced_at is when the import wrote the row; all else,
    # received_at and _deleted_at included, comes back as it was, and each row's events in order.
    assert snapshot(engine) == before
    assert seq_order_per_row(engine) == file_order_per_row(history())


def test_export_since_writes_only_the_later_slice_to_stdout(db_url, tmp_path):
    assert run("--database-url", db_url, "import", str(write_lines(tmp_path / "h.jsonl", history()))).exit_code == 0
    result = run("--database-url", db_url, "export", "--since", "2026-11-01T09:08:00")
    assert result.exit_code == 0
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["e09", "e10", "e11", "e12"]
    assert run("--database-url", db_url, "export", "--since", "last week").exit_code == 2


# --- send ------------------------------------------------------------------------------------------


@pytest.mark.gunicorn
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_send_signs_and_posts_an_example_like_coherent(db_url, engine):
    server = Gunicorn(db_url, workers=1).start()
    try:
        url = f"{server.url}/webhooks"
        example = str(EXAMPLES / "message.created.json")
        result = run("send", example, "--url", url)
        assert result.exit_code == 0 and json.loads(result.stdout.split(" ", 1)[1])["outcome"] == "applied"
        result = run("send", example, "--url", url)
        assert result.exit_code == 0 and '"duplicate"' in result.stdout
        assert run("send", example, "--url", url, "--new-id").exit_code == 0
        result = run("send", example, "--url", url, secret="not-the-receivers-secret")
        assert result.exit_code == 1 and result.stdout.startswith("401 ") and "bad_signature" in result.stdout
    finally:
        server.stop()
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT COUNT(*) FROM coherent_events")) == 2
    result = run("send", example, "--url", f"http://127.0.0.1:{free_port()}/webhooks")
    assert result.exit_code == 3 and "could not reach" in result.stderr
    assert run("send", example, secret=None).exit_code == 2


# --- migrate, from an installed wheel --------------------------------------------------------------


def test_migrate_works_from_an_installed_wheel_outside_the_checkout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("coherent_connector-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"connector/migrations/env.py", "connector/migrations/script.py.mako"} <= set(names)
    assert "connector/migrations/versions/0001_initial.py" in names

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")},
        "PYTHONPATH": str(site),
        "CONNECTOR_DATABASE_URL": "sqlite:///from-wheel.db",
    }
    found = subprocess.run(
        [sys.executable, "-c", "import connector.db.migrate as m; print(m.MIGRATIONS)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert found.stdout.strip().startswith(str(site))  # the wheel's copy, not the checkout's
    result = subprocess.run(
        [sys.executable, "-m", "connector.cli", "migrate"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    database = create_engine(f"sqlite:///{elsewhere / 'from-wheel.db'}")
    try:
        assert set(inspect(database).get_table_names()) >= {table.name for table in metadata.sorted_tables}
        with database.connect() as conn:
            assert conn.scalar(text("SELECT version_num FROM alembic_version")) == head_revision()
    finally:
        database.dispose()
