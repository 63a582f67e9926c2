"""docs/schema.md against the models: every table, column, type and nullability, and the views."""

import re
from pathlib import Path

from sqlalchemy import JSON, BigInteger, Boolean, Integer, Text, inspect

from connector.db.schema import metadata, state_tables
from connector.db.types import UTCDateTime

DOC = Path(__file__).parent.parent / "docs" / "schema.md"
_ROW = re.compile(r"\| `(\w+)` \| ([\w()]+) \| (yes|no) \| .+ \|")
_VIEW_ROW = re.compile(r"\| `(\w+_live)` \| `(\w+)` \|")


def documented() -> tuple[dict[str, list[tuple[str, str, bool]]], dict[str, str]]:
    """Columns per table section, and view -> table, as the document states them."""
    tables: dict[str, list[tuple[str, str, bool]]] = {}
    views: dict[str, str] = {}
    section = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            if section != "Views":
                tables[section] = []
        elif section == "Views" and (match := _VIEW_ROW.fullmatch(line)):
            views[match[1]] = match[2]
        elif section and (match := _ROW.fullmatch(line)):
            tables[section].append((match[1], match[2], match[3] == "yes"))
    return tables, views


def portable_type(column) -> str:
    """The type as the document names it."""
    for cls, name in ((UTCDateTime, "timestamp"), (JSON, "json"), (Boolean, "boolean"), (BigInteger, "bigint")):
        if isinstance(column.type, cls):
            return name
    if isinstance(column.type, Integer):
        return "integer"
    if isinstance(column.type, Text):
        return "text"
    return f"varchar({column.type.length})"


def test_the_document_describes_every_table_and_column_as_the_models_declare_them():
    tables, _ = documented()
    assert set(tables) == set(metadata.tables)
    for name, table in metadata.tables.items():
        assert tables[name] == [(c.name, portable_type(c), c.nullable) for c in table.c], name


def test_the_documented_views_exist_with_their_tables_columns(engine):
    _, views = documented()
    assert views == {f"{table.name}_live": table.name for table in state_tables.values()}
    inspector = inspect(engine)
    assert set(views) <= set(inspector.get_view_names())
    for view, table in views.items():
        assert [c["name"] for c in inspector.get_columns(view)] == [c.name for c in metadata.tables[table].c]
