"""The migrations: up and down on every database, from the command line, and in step with the models."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from connector.db import migrate
from connector.db.schema import metadata
from connector.db.store import EventStore
from connector.events import parse_event
from tests.conftest import encode, envelope

ROOT = Path(__file__).resolve().parent.parent


def alembic(db_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONNECTOR_DATABASE_URL": db_url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )


def test_alembic_downgrade_base_and_upgrade_head_from_the_repository_root(db_url, engine):
    alembic(db_url, "downgrade", "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    alembic(db_url, "upgrade", "head")
    assert alembic(db_url, "current").stdout.split()[0] == migrate.head_revision()
    assert {table.name for table in metadata.sorted_tables} <= set(inspect(engine).get_table_names())


def test_the_models_and_the_migrations_agree(engine):
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert differences == []


def test_live_views_leave_out_deleted_rows(engine):
    store = EventStore(engine)
    for event_type, contact_id in [
        ("contact.created", "kept"),
        ("contact.created", "gone"),
        ("contact.deleted", "gone"),
    ]:
        store.record(parse_event(encode(envelope(event_type, {"id": contact_id}))))
    with engine.connect() as conn:
        assert conn.scalars(text("SELECT id FROM coherent_contacts_live")).all() == ["kept"]
        assert sorted(conn.scalars(text("SELECT id FROM coherent_contacts")).all()) == ["gone", "kept"]


@pytest.mark.parametrize("db_url", ["mariadb"], indirect=True)
def test_mariadb_tables_are_utf8mb4(engine):
    with engine.connect() as conn:
        collations = conn.execute(
            select(text("TABLE_NAME"), text("TABLE_COLLATION"))
            .select_from(text("information_schema.TABLES"))
            .where(text("TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'BASE TABLE' AND TABLE_NAME LIKE 'coherent%'"))
        ).all()
    assert len(collations) == len(metadata.tables)
    # Binary (case-sensitive) and NO PAD (trailing spaces count), as every other database compares.
    assert {collation for _, collation in collations} == {"utf8mb4_nopad_bin"}
