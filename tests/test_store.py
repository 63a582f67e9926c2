"""The store on real SQLite, PostgreSQL and MariaDB: the change log, the state tables and the rules."""

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy
from sqlalchemy import Engine, create_engine, func, select, text

from connector.db import pipeline
from connector.db.engine import create_engine_for
from connector.db.schema import events, group_members, message_reactions, state_tables
from connector.db.store import EventStore, record_events
from connector.errors import DatabaseUnavailable, WriteRefused
from connector.events import Event, Outcome, parse_event
from tests.conftest import empty_tables, encode, envelope, make_config


@pytest.fixture(params=["native", "portable"])
def any_store(request: pytest.FixtureRequest, engine: Engine) -> EventStore:
    """The store with each database's native upsert path, and with the portable one."""
    return EventStore(engine, portable=request.param == "portable")


def make(event_type: str, payload: dict, event_id: str | None = None) -> Event:
    return parse_event(encode(envelope(event_type, payload, event_id)))


def row(engine: Engine, resource: str, resource_id: str):
    table = state_tables[resource]
    with engine.connect() as conn:
        return conn.execute(select(table).where(table.c.id == resource_id)).mappings().one_or_none()


def log(engine: Engine):
    with engine.connect() as conn:
        return conn.execute(select(events).order_by(events.c.seq)).mappings().all()


def test_the_seed_example_lands_in_the_log_and_the_messages_table(any_store, engine, seed_body):
    assert any_store.record(parse_event(seed_body)) is Outcome.APPLIED
    [entry] = log(engine)
    assert entry["event_id"] == "a056V7R7NmNRjl70"
    assert (entry["type"], entry["resource"], entry["action"]) == ("message.updated", "message", "updated")
    assert entry["resource_id"] == "SIuAFUNKdSYHZF2w" and entry["outcome"] == "applied"
    assert entry["payload"]["message"].startswith("I\u2019m traveling")
    assert entry["received_at"].tzinfo is not None

    message = row(engine, "message", "SIuAFUNKdSYHZF2w")
    assert message["conversation_id"] == "xgQQXg3hrtjh7AvZ"
    assert message["contact_id"] == "WAz8eIbvDR60rouK"
    assert message["contact"]["username"] == "KevinMcCallister"
    assert message["created_at"] == datetime(1991, 12, 8, 23, 0, tzinfo=UTC)
    assert message["read_at"] == datetime.fromtimestamp(705103200, UTC)
    assert message["reactions"] == [] and message["attachments"] == []
    assert message["_event_id"] == "a056V7R7NmNRjl70" and message["_deleted_at"] is None
    assert message["_errors"] is None and message["_raw"]["message"] == message["message"]


def test_a_redelivered_event_is_a_duplicate_and_adds_nothing(any_store, engine):
    event = make("contact.created", {"id": "c1", "username": "kevin"}, "e1")
    assert any_store.record(event) is Outcome.APPLIED
    assert any_store.record(event) is Outcome.DUPLICATE
    assert len(log(engine)) == 1


def test_seq_increases_in_arrival_order(any_store, engine):
    for i in range(5):
        any_store.record(make("contact.updated", {"id": "c1", "username": f"v{i}"}, f"e{i}"))
    entries = log(engine)
    assert [e["event_id"] for e in entries] == [f"e{i}" for i in range(5)]
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    assert row(engine, "contact", "c1")["username"] == "v4"


def test_unknown_types_are_recorded_and_apply_nothing(any_store, engine):
    assert any_store.record(make("reaction.created", {"id": "r1", "emoji": "x"})) is Outcome.UNKNOWN_TYPE
    assert any_store.record(make("contact.archived", {"id": "c1"})) is Outcome.UNKNOWN_TYPE
    assert [e["outcome"] for e in log(engine)] == ["unknown_type", "unknown_type"]
    assert row(engine, "contact", "c1") is None


def test_delete_is_terminal_and_keeps_the_last_values(any_store, engine):
    any_store.record(make("contact.created", {"id": "c1", "username": "kevin"}))
    assert any_store.record(make("contact.deleted", {"id": "c1"})) is Outcome.APPLIED
    deleted = row(engine, "contact", "c1")
    assert deleted["_deleted_at"] is not None and deleted["username"] == "kevin"
    assert any_store.record(make("contact.updated", {"id": "c1", "username": "ghost"})) is Outcome.AFTER_DELETE
    assert any_store.record(make("contact.created", {"id": "c1", "username": "ghost"})) is Outcome.AFTER_DELETE
    assert row(engine, "contact", "c1") == deleted


def test_a_delete_for_an_unseen_id_leaves_a_tombstone(any_store, engine):
    any_store.record(make("group.deleted", {"id": "g1"}))
    tombstone = row(engine, "group", "g1")
    assert tombstone["_deleted_at"] is not None and tombstone["name"] is None


def test_a_late_create_does_not_overwrite_an_update(any_store, engine):
    any_store.record(make("conversation.updated", {"id": "v1", "is_muted": True}))
    assert any_store.record(make("conversation.created", {"id": "v1", "is_muted": False})) is Outcome.STALE
    assert row(engine, "conversation", "v1")["is_muted"] is True
    assert [e["outcome"] for e in log(engine)] == ["applied", "stale"]


def test_an_older_message_version_never_overwrites_a_newer_one(any_store, engine):
    any_store.record(make("message.updated", {"id": "m1", "message": "v2", "updated_at": 200}))
    assert any_store.record(make("message.updated", {"id": "m1", "message": "v1", "updated_at": 100})) is Outcome.STALE
    assert row(engine, "message", "m1")["message"] == "v2"


def test_absent_fields_keep_their_values_and_nulls_clear_them(any_store, engine):
    any_store.record(make("contact.created", {"id": "c1", "username": "kevin", "display_name": "Kev"}))
    any_store.record(make("contact.updated", {"id": "c1", "display_name": None, "phone_number": "1-800"}))
    contact = row(engine, "contact", "c1")
    assert (contact["username"], contact["display_name"], contact["phone_number"]) == ("kevin", None, "1-800")
    assert contact["_raw"] == {"id": "c1", "username": "kevin", "display_name": None, "phone_number": "1-800"}


def test_wrong_types_are_recorded_in_errors_and_the_rest_applies(any_store, engine):
    outcome = any_store.record(
        make("attachment.created", {"id": "a1", "file_size": "21 KB", "filename": "invoice.pdf", "created_at": 1e20})
    )
    assert outcome is Outcome.APPLIED
    attachment = row(engine, "attachment", "a1")
    assert attachment["filename"] == "invoice.pdf"
    assert attachment["file_size"] is None and attachment["created_at"] is None
    assert set(attachment["_errors"]) == {"file_size", "created_at"}
    assert attachment["_raw"]["file_size"] == "21 KB"


def test_unknown_fields_stay_queryable_in_raw(any_store, engine):
    any_store.record(make("contact.created", {"id": "c1", "pronouns": "he/him", "nested": {"a": [1, 2]}}))
    assert row(engine, "contact", "c1")["_raw"]["nested"] == {"a": [1, 2]}


def test_child_tables_are_rewritten_from_the_merged_payload(any_store, engine):
    any_store.record(make("group.created", {"id": "g1", "contacts": [{"username": "Hector"}, {"username": "Cedric"}]}))
    any_store.record(make("group.updated", {"id": "g1", "name": "Plaza Hotel"}))
    any_store.record(make("group.updated", {"id": "g1", "contacts": [{"id": "c9", "username": "Kevin"}]}))
    with engine.connect() as conn:
        members = conn.execute(select(group_members.c.contact_id, group_members.c.username)).all()
    assert [tuple(m) for m in members] == [("c9", "Kevin")]

    any_store.record(make("message.created", {"id": "m1", "reactions": [{"red_angry_face": ["Kate", "Peter"]}]}))
    any_store.record(make("message.updated", {"id": "m1", "reactions": [{"thumbs_up": ["Kate"]}]}))
    with engine.connect() as conn:
        reactions = conn.execute(
            select(message_reactions.c.message_id, message_reactions.c.emoji, message_reactions.c.username)
        ).all()
    assert [tuple(r) for r in reactions] == [("m1", "thumbs_up", "Kate")]


def test_embedded_objects_never_touch_other_tables(any_store, engine):
    any_store.record(
        make(
            "message.created",
            {"id": "m1", "contact": {"id": "c1", "username": "k"}, "attachments": [{"id": "a1", "filename": "f"}]},
        )
    )
    any_store.record(make("group.created", {"id": "g1", "contacts": [{"id": "c2", "username": "h"}]}))
    assert row(engine, "contact", "c1") is None and row(engine, "contact", "c2") is None
    assert row(engine, "attachment", "a1") is None


def test_a_batch_applies_in_order_and_skips_repeats_within_it(any_store, engine):
    now = datetime.now(UTC)
    first = make("message.created", {"id": "m1", "message": "a", "updated_at": 1}, "e1")
    batch = [
        (first, now),
        (make("message.updated", {"id": "m1", "message": "b", "updated_at": 2}, "e2"), now),
        (first, now),
        (make("message.updated", {"id": "m1", "message": "old", "updated_at": 1}, "e3"), now),
    ]
    outcomes = any_store.record_many(batch)
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED, Outcome.DUPLICATE, Outcome.STALE]
    assert row(engine, "message", "m1")["message"] == "b"
    assert [e["event_id"] for e in log(engine)] == ["e1", "e2", "e3"]


def test_awkward_text_is_stored_and_the_raw_value_kept_exactly(any_store, engine):
    text = "nul\u0000 lone\ud800 emoji\U0001f600 rtl\u202e '; DROP TABLE coherent_events; --"
    any_store.record(make("contact.created", {"id": "c1", "username": text}, "e1"))
    contact = row(engine, "contact", "c1")
    assert contact["_raw"]["username"] == text
    assert contact["username"] == text.replace("\u0000", "\ufffd").replace("\ud800", "\ufffd")
    assert log(engine)[0]["payload"]["username"] == text
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(events)) == 1


@pytest.mark.parametrize("db_url", ["postgresql", "mariadb"], indirect=True)
def test_a_pooled_connection_the_server_dropped_is_replaced_by_a_retry(db_url, store, engine):
    # The engine does not ping connections before use (a round trip per request); a connection that
    # died while idle in the pool must cost a retry, not an event.
    assert store.record(make("contact.created", {"id": "c1"})) is Outcome.APPLIED
    with engine.connect() as conn:
        backend_id = conn.exec_driver_sql(
            "SELECT pg_backend_pid()" if conn.dialect.name == "postgresql" else "SELECT CONNECTION_ID()"
        ).scalar_one()
    admin = create_engine(engine.url)
    try:
        with admin.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(select(func.pg_terminate_backend(backend_id)))
            else:
                conn.exec_driver_sql(f"KILL {int(backend_id)}")
    finally:
        admin.dispose()

    assert store.record(make("contact.created", {"id": "c2"})) is Outcome.APPLIED
    assert store.retries >= 1
    assert [entry["resource_id"] for entry in log(engine)] == ["c1", "c2"]


def _two_batches(size: int = 60) -> tuple[list[Event], list[Event]]:
    """A batch creating ``size`` messages and groups, and one that edits, deletes and re-creates them."""
    first, second = [], []
    for i in range(size):
        reactions = [{"eyes": ["kevin", f"user\u0000{i}"]}] if i % 2 else []
        first.append(
            make(
                "message.created",
                {"id": f"m{i}", "message": f"hi {i}", "reactions": reactions, "updated_at": 10},
                f"mc{i}",
            )
        )
        first.append(
            make(
                "group.created",
                {"id": f"g{i}", "name": "g", "contacts": [{"id": "c1", "username": "a"}, {"username": "b"}]},
                f"gc{i}",
            )
        )
        second.append(
            make(
                "message.updated",
                {"id": f"m{i}", "message": "edited", "reactions": [{"heart": ["x"]}], "updated_at": 20 - i % 3 * 10},
                f"mu{i}",
            )
        )
        action = "deleted" if i % 3 == 0 else "updated"
        second.append(make(f"group.{action}", {"id": f"g{i}", "contacts": [{"username": "z"}]}, f"gu{i}"))
        second.append(make("group.created", {"id": f"g{i}", "name": "late"}, f"gl{i}"))
    return first, second


def _snapshot(engine: Engine) -> dict[str, list[dict]]:
    """Every table's rows without the columns that record when they were written."""
    tables = [*state_tables.values(), group_members, message_reactions, events]
    volatile = {"_synced_at", "seq"}
    with engine.connect() as conn:
        return {
            table.name: [
                {key: value for key, value in row.items() if key not in volatile}
                for row in conn.execute(select(table).order_by(*table.primary_key.columns)).mappings()
            ]
            for table in tables
        }


def test_large_batches_leave_the_same_tables_as_one_event_at_a_time(any_store, engine):
    # Batches this large take PostgreSQL's COPY path for new rows, overwritten rows, child rows and
    # the change log; recorded one at a time, the same events take the per-row statements.
    first, second = _two_batches()
    now = datetime.now(UTC)
    batched = any_store.record_many([(event, now) for event in first])
    batched += any_store.record_many([(event, now) for event in second])
    in_batches = _snapshot(engine)

    empty_tables(engine)
    one_by_one = [any_store.record(event, now) for event in first + second]
    assert batched == one_by_one
    assert Outcome.STALE in batched and Outcome.AFTER_DELETE in batched
    assert _snapshot(engine) == in_batches
    assert [e["event_id"] for e in log(engine)] == [event.event_id for event in first + second]


@pytest.mark.parametrize(
    "url",
    ["postgresql://root@127.0.0.1:1/nowhere", "mysql://root@127.0.0.1:1/nowhere", "sqlite:////nonexistent/dir/x.db"],
)
def test_an_unreachable_database_is_unavailable_not_a_refused_write(url):
    """Group commit runs a refused group again event by event; an unreachable database must not be one."""
    store = EventStore(create_engine_for(make_config(url)))
    with pytest.raises(DatabaseUnavailable) as raised:
        store.record(make("contact.created", {"id": "c1"}))
    assert not isinstance(raised.value, WriteRefused)
    store.engine.dispose()


def test_a_key_clash_that_is_no_race_is_a_refused_write_not_retried(any_store, engine):
    """A child row left behind under a new group's id clashes on insert: refused at once, not retried as a race."""
    with engine.begin() as conn:
        conn.execute(group_members.insert().values(group_id="g1", position=0, contact_id="x", username="left"))
    started = time.monotonic()
    with pytest.raises(WriteRefused):
        any_store.record(make("group.created", {"id": "g1", "contacts": [{"id": "c1", "username": "kevin"}]}))
    assert any_store.retries == 0 and time.monotonic() - started < 2
    assert log(engine) == []


def _wait_until_blocked(engine: Engine) -> None:
    """On PostgreSQL, wait until a session of this database waits for a lock; elsewhere, half a second."""
    if engine.dialect.name != "postgresql":
        time.sleep(0.5)
        return
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 10
    with engine.connect() as conn:
        while not conn.scalar(waiting) and time.monotonic() < deadline:
            time.sleep(0.02)


@pytest.mark.parametrize("taken", ["event id", "row id"])
def test_a_large_batch_that_loses_a_race_for_a_key_runs_again_and_applies_the_rest(any_store, engine, taken):
    """Another transaction writes a key of the batch after the batch looked for it: the batch (large
    enough for PostgreSQL's COPY path) runs again, finds that key taken, and applies the rest."""
    now = datetime.now(UTC)
    batch = [(make("contact.created", {"id": f"c{i:02}", "username": f"u{i}"}, f"e{i:02}"), now) for i in range(40)]
    if taken == "event id":
        rival = make("contact.created", {"id": "elsewhere"}, "e07")
    else:
        rival = make("contact.created", {"id": "c07", "username": "first"}, "rival")
    outcomes: list[Outcome] = []
    # The rival's write is held uncommitted: on PostgreSQL the batch's look for its keys does not
    # see it, and its insert waits on the rival's key until the rival commits.
    with engine.connect() as holder, holder.begin():
        record_events(holder, [(rival, now)])
        worker = threading.Thread(target=lambda: outcomes.extend(any_store.record_many(batch)))
        worker.start()
        _wait_until_blocked(engine)
    worker.join(timeout=30)
    assert len(outcomes) == 40
    if engine.dialect.name == "postgresql":
        # Elsewhere the batch's look may wait for the rival instead: SQLite has one writer at a time,
        # and InnoDB's locking read of the row waits on the rival's uncommitted insert.
        assert any_store.retries >= 1
    if taken == "event id":
        assert outcomes[7] is Outcome.DUPLICATE and row(engine, "contact", "c07") is None
        assert outcomes[:7] + outcomes[8:] == [Outcome.APPLIED] * 39
    else:
        assert outcomes == [Outcome.APPLIED] * 40
        assert row(engine, "contact", "c07")["username"] == "u7"
    assert len(log(engine)) == (40 if taken == "event id" else 41)


def test_ids_that_differ_only_by_trailing_spaces_are_different_events_and_rows(any_store, engine):
    """MariaDB's utf8mb4_bin compared them as equal: the second clashed on insert, for ever (a 503
    at every delivery). Every database now keeps them apart."""
    assert any_store.record(make("contact.created", {"id": "c1", "username": "a"}, "e1")) is Outcome.APPLIED
    assert any_store.record(make("contact.created", {"id": "c9", "username": "b"}, "e1 ")) is Outcome.APPLIED
    assert any_store.record(make("contact.created", {"id": "c1 ", "username": "c"}, "e2")) is Outcome.APPLIED
    assert any_store.record(make("contact.created", {"id": "c1", "username": "d"}, "e1")) is Outcome.DUPLICATE
    assert [entry["event_id"] for entry in log(engine)] == ["e1", "e1 ", "e2"]
    assert row(engine, "contact", "c1")["username"] == "a" and row(engine, "contact", "c1 ")["username"] == "c"
    assert any_store.retries == 0


# Characters that mean something in an array literal, in SQL or in JSON, and some that are not ASCII.
AWKWARD_IDS = ['a"b', "c\\d", "{e,f}", "g h", "NULL", "{}", " ", "'; DROP TABLE x; --", "\u00fc\U0001f600", 'x\\"}']


def test_ids_with_quotes_backslashes_and_braces_are_found_and_locked(any_store, engine):
    """PostgreSQL's pipelined path sends id lists as array literals; each id must come back as itself."""
    created = [make("message.created", {"id": rid, "message": "one"}, f"c{rid}") for rid in AWKWARD_IDS]
    assert any_store.record_many([(event, datetime.now(UTC)) for event in created]) == [Outcome.APPLIED] * 10
    # The second batch finds every row (an edit, not a create) and every event id (a duplicate).
    edits = [make("message.updated", {"id": rid, "message": "two"}, f"u{rid}") for rid in AWKWARD_IDS]
    outcomes = any_store.record_many([(event, datetime.now(UTC)) for event in [*edits, *created]])
    assert outcomes == [Outcome.APPLIED] * 10 + [Outcome.DUPLICATE] * 10
    for rid in AWKWARD_IDS:
        assert row(engine, "message", rid)["message"] == "two"
    assert sorted(entry["event_id"] for entry in log(engine)) == sorted(
        [f"c{rid}" for rid in AWKWARD_IDS] + [f"u{rid}" for rid in AWKWARD_IDS]
    )
    assert any_store.retries == 0


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_deleted_row_reads_back_as_deleted_in_any_session_time_zone_and_date_style(db_url, engine):
    """The pipelined path reads ``_deleted_at`` back as text: neither the session's time zone nor its
    DateStyle may stop it from reading, and the row stays deleted."""
    kolkata = create_engine_for(make_config(db_url))

    @sqlalchemy.event.listens_for(kolkata, "connect")
    def set_time_zone(dbapi_connection, _record):
        dbapi_connection.execute("SET timezone = 'Asia/Kolkata'")
        dbapi_connection.execute("SET DateStyle = 'SQL, DMY'")  # 04/12/2026 19:00:00.000000 IST
        dbapi_connection.commit()

    try:
        store = EventStore(kolkata)
        assert store.record(make("contact.created", {"id": "c1"}, "e1")) is Outcome.APPLIED
        assert store.record(make("contact.deleted", {"id": "c1"}, "e2")) is Outcome.APPLIED
        deleted_at = row(engine, "contact", "c1")["_deleted_at"]
        assert store.record(make("contact.updated", {"id": "c1", "username": "x"}, "e3")) is Outcome.AFTER_DELETE
        assert row(engine, "contact", "c1")["_deleted_at"] == deleted_at
        with kolkata.connect() as conn:
            assert conn.exec_driver_sql("SHOW timezone").scalar_one() == "Asia/Kolkata"
    finally:
        kolkata.dispose()


@pytest.fixture
def one_connection(db_url: str) -> Iterator[Engine]:
    """An engine with a single pooled connection: what one test does to it, the next use meets."""
    engine = create_engine_for(make_config(db_url), pool_size=1, max_overflow=0)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_pipelined_path_prepares_its_statements_again_after_deallocate_all(one_connection):
    """A pooler or an administrator may drop a session's prepared statements; the next transaction
    then finds them missing, prepares them again and runs once more."""
    engine = one_connection
    store = EventStore(engine)
    assert store.record(make("contact.created", {"id": "c1"}, "e1")) is Outcome.APPLIED
    with engine.connect() as conn:  # the same, only, pooled connection
        conn.exec_driver_sql("DEALLOCATE ALL")
        conn.commit()
    assert store.record(make("contact.updated", {"id": "c1", "username": "k"}, "e2")) is Outcome.APPLIED
    assert store.retries == 1
    # A rollback on that connection no longer makes psycopg drop them (it prepares nothing itself).
    with engine.connect() as conn:
        for _ in range(6):
            conn.execute(select(func.count()).select_from(events))
        conn.rollback()
    assert store.record(make("contact.updated", {"id": "c1", "username": "m"}, "e3")) is Outcome.APPLIED
    assert store.retries == 1
    assert row(engine, "contact", "c1")["username"] == "m"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_pipelined_read_keeps_using_the_indexes_as_an_empty_log_grows(one_connection):
    """The pipelined path's statements keep one plan per connection, made again when a plan is
    invalidated, as by ANALYZE. Planned on an empty log, that plan would scan the change log
    sequentially for every event, and keep doing so as the log grows."""
    engine = one_connection
    store = EventStore(engine)
    assert store.record(make("contact.created", {"id": "c0"}, "e0")) is Outcome.APPLIED
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM coherent_events")
        conn.exec_driver_sql("ANALYZE")  # an empty log, and every plan made so far invalidated
    for i in range(1, 8):
        assert store.record(make("contact.created", {"id": f"c{i}"}, f"e{i}")) is Outcome.APPLIED
    with engine.begin() as conn:  # the log grows, faster than autovacuum would analyze it
        conn.exec_driver_sql(
            "INSERT INTO coherent_events (event_id, type, resource, action, resource_id, payload, received_at, outcome) "
            "SELECT 'g' || i, 'contact.created', 'contact', 'created', 'g' || i, '{}', now(), 'applied' "
            "FROM generate_series(1, 20000) AS i"
        )
    with engine.connect() as conn:  # the same, only, pooled connection, where the read is prepared
        [(name, generic, custom)] = conn.exec_driver_sql(
            "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements "
            "WHERE starts_with(statement, 'WITH locked_')"
        )
        # Under the pipeline's settings, EXPLAIN EXECUTE shows the plan it keeps.
        conn.exec_driver_sql(pipeline._PLAN_ONCE.sql)
        arrays = ", ".join(["'{e1}'::text[]"] + ["'{}'::text[]"] * 5)
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN EXECUTE {name}({arrays})").scalars())
        conn.rollback()
        # Those settings end with the pipeline's transactions: the session, and every other path,
        # still plans each statement for its parameters.
        assert conn.exec_driver_sql("SHOW enable_seqscan").scalar_one() == "on"
        assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar_one() == "force_custom_plan"
    assert (generic, custom) == (8, 0)  # one plan kept, not one made per execution
    assert "Seq Scan on coherent_events" not in plan and "uq_coherent_events_event_id" in plan


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_session_that_lost_one_prepared_statement_recovers_in_one_retry(one_connection):
    """Dropping one statement must not leave the connection failing: the next pipeline drops them all
    and prepares again what it needs."""
    engine = one_connection
    store = EventStore(engine)
    assert store.record(make("contact.created", {"id": "c0"}, "e0")) is Outcome.APPLIED
    with engine.connect() as conn:
        [name] = conn.exec_driver_sql(
            "SELECT name FROM pg_prepared_statements WHERE starts_with(statement, 'INSERT INTO coherent_events')"
        ).scalars()
        conn.exec_driver_sql(f"DEALLOCATE {name}")
        conn.commit()
    for i in range(1, 5):
        assert store.record(make("contact.updated", {"id": "c0", "username": f"u{i}"}, f"e{i}")) is Outcome.APPLIED
    assert store.retries == 1
    assert row(engine, "contact", "c0")["username"] == "u4"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_text_is_utf8_whatever_the_environment_asks(db_url, monkeypatch):
    """Under PGCLIENTENCODING=LATIN1 the pipelined path and psycopg's own would encode text apart: an
    id stored mangled by one was not found by the other, and a redelivery was applied twice."""
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    engine = create_engine_for(make_config(db_url))
    try:
        store = EventStore(engine)
        event = make("contact.created", {"id": "c\u00e9", "username": "\u00fc\u20ac"}, "e\u00e9")
        assert store.record(event) is Outcome.APPLIED
        # A batch this large goes by COPY, through psycopg: it must find the same event and row.
        batch = [make("contact.created", {"id": f"x{i}"}, f"x{i}") for i in range(20)] + [event]
        assert store.record_many([(e, datetime.now(UTC)) for e in batch])[-1] is Outcome.DUPLICATE
        assert row(engine, "contact", "c\u00e9")["username"] == "\u00fc\u20ac"
        assert [entry["event_id"] for entry in log(engine)].count("e\u00e9") == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_pipelined_begin_keeps_the_connections_isolation_level(db_url):
    engine = create_engine_for(make_config(db_url)).execution_options(isolation_level="SERIALIZABLE")
    try:
        assert EventStore(engine).record(make("contact.created", {"id": "c1"}, "e1")) is Outcome.APPLIED
        with engine.connect() as conn:
            assert pipeline._begin(conn.connection.driver_connection) == b"BEGIN ISOLATION LEVEL SERIALIZABLE"
    finally:
        engine.dispose()
