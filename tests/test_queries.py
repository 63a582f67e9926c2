"""Every query in docs/queries.md, read from the document, run on every database against a known history.

The expected results are computed here in Python from the history itself, not from the database.
"""

import re
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from connector.events import Event

DOC = Path(__file__).parent.parent / "docs" / "queries.md"
DIALECTS = ("sqlite", "postgresql", "mariadb")
BASE = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def parse_queries(markdown: str) -> dict[str, dict[str, str]]:
    """``{heading: {dialect or "all": sql}}`` from the ``## `` sections and their ```sql blocks."""
    queries: dict[str, dict[str, str]] = {}
    heading, block, label = None, None, None
    for line in markdown.splitlines():
        if block is not None:
            if line.startswith("```"):
                queries.setdefault(heading, {})[label] = "\n".join(block)
                block = None
            else:
                block.append(line)
        elif line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("```sql"):
            assert heading is not None, "a query before the first heading"
            label = line[len("```sql") :].strip() or "all"
            block = []
    assert block is None, "an unterminated code block"
    return queries


QUERIES = parse_queries(DOC.read_text())


# --- the history -----------------------------------------------------------------------------------

CONTACTS = {f"c0{i}": f"user{i}" for i in range(1, 6)}
SENDERS = ["c01"] * 6 + ["c02"] * 4 + ["c03"] * 2 + ["c04"]  # 13 messages with distinct counts per sender
EMOJI = {0: ["thumbs_up"], 1: ["thumbs_up", "heart"], 2: ["heart"], 4: ["thumbs_up", "laughing"], 5: ["thumbs_up"]}
DELETED_MESSAGES = {"m03", "m07"}
ATTACHMENTS = [  # id, message, MIME type, bytes, deleted
    ("a1", "m00", "image/png", 1000, False),
    ("a2", "m01", "image/png", 2500, False),
    ("a3", "m02", "image/png", 500, False),
    ("a4", "m04", "application/pdf", 3000, False),
    ("a5", "m05", "application/pdf", 2000, False),
    ("a6", "m06", "video/mp4", 9_000_000, False),
    ("a7", "m08", "video/mp4", 7_000_000, True),
]
UNKNOWN_TYPES = ["reaction.created", "reaction.created", "call.started"]


def message_payload(i: int, sender: str) -> dict[str, Any]:
    created = BASE + timedelta(hours=7 * i)
    reactions = [{emoji: [f"fan{j}"]} for j, emoji in enumerate(EMOJI.get(i, []))]
    return {
        "id": f"m{i:02}",
        "conversation_id": f"v{i % 3 + 1}",
        "contact": {"id": sender, "username": CONTACTS[sender]},
        "message": f"message {i}",
        "reactions": reactions,
        "created_at": int(created.timestamp()),
        "updated_at": int(created.timestamp()),
    }


def history() -> list[tuple[str, dict[str, Any]]]:
    """(event type, payload) in delivery order."""
    out: list[tuple[str, dict[str, Any]]] = []
    out += [("contact.created", {"id": cid, "username": name}) for cid, name in CONTACTS.items()]
    out += [("conversation.created", {"id": f"v{n}", "contact_id": f"c0{n}"}) for n in range(1, 5)]
    out += [("message.created", message_payload(i, sender)) for i, sender in enumerate(SENDERS)]
    # A message in v4, whose conversation is deleted: not an active conversation.
    out.append(("message.created", {**message_payload(13, "c05"), "conversation_id": "v4"}))
    out.append(("conversation.deleted", {"id": "v4"}))
    for attachment_id, message_id, file_type, size, _ in ATTACHMENTS:
        out.append(
            (
                "attachment.created",
                {"id": attachment_id, "message_id": message_id, "file_type": file_type, "file_size": size},
            )
        )
    out += [("attachment.deleted", {"id": a[0]}) for a in ATTACHMENTS if a[4]]
    out += [("message.deleted", {"id": message_id}) for message_id in sorted(DELETED_MESSAGES)]
    out.append(("message.updated", {"id": "m03", "message": "too late"}))  # after_delete
    out.append(("contact.created", {"id": "c01", "username": "older"}))  # stale: c01 was updated below first
    out.insert(len(CONTACTS), ("contact.updated", {"id": "c01", "username": CONTACTS["c01"]}))
    out += [(event_type, {"id": f"x{n}"}) for n, event_type in enumerate(UNKNOWN_TYPES)]
    return out


def received_at(index: int) -> datetime:
    return BASE + timedelta(minutes=25 * index)


@pytest.fixture
def loaded(store, engine):
    deliveries = []
    for index, (event_type, payload) in enumerate(history()):
        resource, _, action = event_type.partition(".")
        event = Event(f"e{index:03}", event_type, resource, action, payload["id"], payload)
        deliveries.append((event, received_at(index)))
    deliveries.append(deliveries[3])  # a redelivery: not recorded twice
    store.record_many(deliveries[:20])
    store.record_many(deliveries[20:])
    return engine


# --- what each query must return -------------------------------------------------------------------


def live_messages() -> list[tuple[int, str, dict[str, Any]]]:
    messages = [(i, s, message_payload(i, s)) for i, s in enumerate(SENDERS)] + [
        (13, "c05", {**message_payload(13, "c05"), "conversation_id": "v4"})
    ]
    return [(i, s, m) for i, s, m in messages if m["id"] not in DELETED_MESSAGES]


def day_of(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).date().isoformat()


def stamp(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S")


def expected_messages_per_day():
    return sorted(Counter(day_of(m["created_at"]) for _, _, m in live_messages()).items())


def expected_active_conversations():
    rows = {}
    for _, sender, m in live_messages():
        if m["conversation_id"] == "v4":
            continue
        count, senders, last = rows.get(m["conversation_id"], (0, set(), 0))
        rows[m["conversation_id"]] = (count + 1, senders | {sender}, max(last, m["created_at"]))
    ordered = sorted(rows.items(), key=lambda item: (-item[1][2], item[0]))
    return [(cid, count, len(senders), stamp(last)) for cid, (count, senders, last) in ordered]


def expected_busiest_contacts():
    counts = Counter(sender for _, sender, _ in live_messages())
    return [(cid, CONTACTS[cid], n) for cid, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))][:10]


def expected_reaction_counts():
    reactions, messages = Counter(), {}
    for i, _, m in live_messages():
        for emoji in EMOJI.get(i, []):
            reactions[emoji] += 1
            messages.setdefault(emoji, set()).add(m["id"])
    return [
        (emoji, n, len(messages[emoji])) for emoji, n in sorted(reactions.items(), key=lambda item: (-item[1], item[0]))
    ]


def expected_attachment_volume():
    count, total = Counter(), Counter()
    for _, _, file_type, size, deleted in ATTACHMENTS:
        if not deleted:
            count[file_type] += 1
            total[file_type] += size
    return [(t, count[t], total[t]) for t in sorted(total, key=lambda t: (-total[t], t))]


def expected_events_per_hour():
    buckets = Counter()
    for index, (event_type, _) in enumerate(history()):
        buckets[(received_at(index).strftime("%Y-%m-%d %H:00"), event_type)] += 1
    return [(hour, event_type, n) for (hour, event_type), n in sorted(buckets.items())]


def expected_outcomes():
    events = len(history())
    stale, after_delete, unknown = 1, 1, len(UNKNOWN_TYPES)
    return [(events, events - stale - after_delete - unknown, stale, after_delete, unknown)]


def expected_unknown_types():
    counts = Counter(UNKNOWN_TYPES)
    last = {t: max(received_at(i) for i, (et, _) in enumerate(history()) if et == t) for t in counts}
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [(t, n, last[t].strftime("%Y-%m-%d %H:%M:%S")) for t, n in ordered]


EXPECTED = {
    "Messages per day": expected_messages_per_day,
    "Active conversations": expected_active_conversations,
    "Busiest contacts": expected_busiest_contacts,
    "Reaction counts by emoji": expected_reaction_counts,
    "Attachment volume by type": expected_attachment_volume,
    "Events per type per hour": expected_events_per_hour,
    "Outcomes of the change log": expected_outcomes,
    "Unknown event types": expected_unknown_types,
}

_TIMESTAMP_TEXT = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def normal(value: Any) -> Any:
    """One Python value for what each driver returns: dates as ISO text, instants as UTC text, sums as int."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value)
    if isinstance(value, str) and _TIMESTAMP_TEXT.match(value):
        return value[:19]  # SQLite keeps instants as text with microseconds
    return value


def test_every_query_in_the_document_is_checked_and_has_a_form_for_every_database():
    assert set(QUERIES) == set(EXPECTED)
    for heading, variants in QUERIES.items():
        assert set(variants) in ({"all"}, set(DIALECTS)), heading


@pytest.mark.parametrize("heading", list(EXPECTED))
def test_the_documented_query_returns_what_the_history_says(loaded, heading):
    dialect = "mariadb" if loaded.dialect.name == "mysql" else loaded.dialect.name
    variants = QUERIES[heading]
    sql = variants.get(dialect, variants.get("all"))
    with loaded.connect() as conn:
        if dialect == "postgresql":
            # Far from UTC, so a query that forgot AT TIME ZONE 'UTC' would put rows in the wrong day.
            conn.execute(text("SET TIME ZONE 'Pacific/Kiritimati'"))
        rows = [tuple(normal(value) for value in row) for row in conn.execute(text(sql))]
    assert rows == EXPECTED[heading]()
    assert rows, "a check against an empty result proves little"
