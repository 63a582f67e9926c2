"""The sample events in examples/: one per event type, delivered through the app on every database."""

import json
from pathlib import Path

from sqlalchemy import select

from connector.db.schema import events, group_members, message_reactions, state_tables
from connector.resources import ACTIONS, RESOURCES
from tests.conftest import signed_headers

EXAMPLES = Path(__file__).parent.parent / "examples"
EVENT_TYPES = [f"{resource}.{action}" for resource in RESOURCES for action in ACTIONS]


def example(event_type: str) -> bytes:
    return (EXAMPLES / f"{event_type}.json").read_bytes()


def rows(conn, table):
    return {row["id"]: row for row in conn.execute(select(table)).mappings()}


def test_there_is_one_example_per_event_type_and_each_says_its_type():
    assert sorted(path.stem for path in EXAMPLES.glob("*.json")) == sorted(EVENT_TYPES)
    for event_type in EVENT_TYPES:
        document = json.loads(example(event_type))
        assert document["type"] == event_type
        assert len(document["id"]) == 16 and len(document["payload"]["id"]) == 16
    assert len({json.loads(example(t))["id"] for t in EVENT_TYPES}) == 15


def test_all_fifteen_examples_are_applied_and_give_the_rows_they_describe(client, engine):
    for event_type in EVENT_TYPES:
        body = example(event_type)
        response = client.simulate_post("/webhooks", body=body, headers=signed_headers(body))
        assert response.status_code == 200, (event_type, response.json)
        assert response.json["outcome"] == "applied", event_type

    with engine.connect() as conn:
        assert conn.execute(select(events.c.type, events.c.outcome).order_by(events.c.seq)).all() == [
            (event_type, "applied") for event_type in EVENT_TYPES
        ]
        contacts = rows(conn, state_tables["contact"])
        conversations = rows(conn, state_tables["conversation"])
        messages = rows(conn, state_tables["message"])
        groups = rows(conn, state_tables["group"])
        attachments = rows(conn, state_tables["attachment"])
        reactions = conn.execute(
            select(message_reactions.c.emoji, message_reactions.c.username).order_by(message_reactions.c.position)
        ).all()
        members = conn.execute(
            select(group_members.c.contact_id, group_members.c.username).order_by(group_members.c.position)
        ).all()

    kevin = contacts["WAz8eIbvDR60rouK"]
    assert kevin["display_name"] == "Kevin" and kevin["_deleted_at"] is None and kevin["_last_action"] == "updated"
    assert kevin["last_active_at"].isoformat() == "1992-05-05T22:00:00+00:00"
    assert contacts["HPm0Wr9dVbR6FhLm"]["_deleted_at"] is not None  # a delete of an unseen id leaves a tombstone

    conversation = conversations["xgQQXg3hrtjh7AvZ"]
    assert conversation["is_pinned"] is True and conversation["pinned_message_id"] == "SIuAFUNKdSYHZF2w"
    assert conversations["ZYjVAbCE9g5XRlrb"]["_deleted_at"] is not None
    assert conversations["ZYjVAbCE9g5XRlrb"]["is_muted"] is True  # a delete carrying fields keeps them

    message = messages["SIuAFUNKdSYHZF2w"]
    assert message["contact_id"] == "WAz8eIbvDR60rouK" and message["message"].startswith("I\u2019m traveling")
    assert message["updated_at"].isoformat() == "1992-05-05T22:00:00+00:00" and message["_errors"] is None
    assert message["attachments"][0]["id"] == "Nc6yKKMpcxiiFxp6"
    assert reactions == [
        ("red_angry_face", "KateMcCallister"),
        ("thumbs_up", "FrankMcCallister"),
        ("thumbs_up", "KateMcCallister"),
    ]
    assert messages["LoPsJaMcPBuFNjg1"]["_deleted_at"] is not None

    group = groups["l7cGNIBKZiNJ6wqF"]
    assert group["description"] == "World-renowned. Room service 24/7." and group["_deleted_at"] is None
    assert members == [(None, "Hector"), (None, "Cedric"), ("WAz8eIbvDR60rouK", "KevinMcCallister")]
    assert groups["Bq2MhLw8XnV4cT6e"]["_deleted_at"] is not None

    invoice = attachments["Nc6yKKMpcxiiFxp6"]
    assert invoice["filename"] == "Invoice_room_service__Plaza_Hotel_paid.pdf" and invoice["file_size"] == 23110
    assert invoice["message_id"] == "SIuAFUNKdSYHZF2w" and invoice["file_type"] == "application/pdf"
    video = attachments["Vd1eO4aTtAcHm9Nt"]
    assert video["_deleted_at"] is not None and video["file_size"] == 48213377
