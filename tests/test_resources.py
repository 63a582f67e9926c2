"""Typing payload values into columns, without a database."""

from datetime import UTC, datetime

from connector.resources import RESOURCES, group_members, message_reactions, typed_columns


def test_timestamps_booleans_and_integers_are_typed():
    values, errors = typed_columns(
        RESOURCES["conversation"],
        {"id": "c", "is_pinned": True, "is_muted": False, "created_at": 692233200, "archived_at": None},
    )
    assert errors == {}
    assert values["is_pinned"] is True and values["is_muted"] is False
    assert values["created_at"] == datetime(1991, 12, 8, 23, 0, tzinfo=UTC)
    assert values["archived_at"] is None
    assert values["last_opened_at"] is None  # absent is NULL


def test_a_wrong_type_is_an_error_and_a_null_never_a_rejection():
    values, errors = typed_columns(
        RESOURCES["attachment"],
        {"id": "a", "file_size": "big", "created_at": "yesterday", "filename": 7},
    )
    assert values["file_size"] is None and values["created_at"] is None and values["filename"] is None
    assert set(errors) == {"file_size", "created_at", "filename"}
    assert "expected an integer" in errors["file_size"]


def test_booleans_are_not_integers_and_integers_are_not_booleans():
    _, errors = typed_columns(RESOURCES["attachment"], {"file_size": True})
    assert "file_size" in errors
    _, errors = typed_columns(RESOURCES["conversation"], {"is_pinned": 1})
    assert "is_pinned" in errors


def test_timestamps_that_do_not_fit_a_datetime_are_errors():
    _, errors = typed_columns(RESOURCES["contact"], {"created_at": 10**15, "last_active_at": -(10**12)})
    assert set(errors) == {"created_at", "last_active_at"}


def test_a_message_takes_contact_id_from_its_sender():
    values, _ = typed_columns(RESOURCES["message"], {"contact": {"id": "WAz8eIbvDR60rouK", "username": "k"}})
    assert values["contact_id"] == "WAz8eIbvDR60rouK"
    values, _ = typed_columns(RESOURCES["message"], {"contact": None})
    assert values["contact_id"] is None


def test_nul_and_lone_surrogates_become_replacement_characters_in_text_columns():
    values, errors = typed_columns(RESOURCES["contact"], {"username": "a\u0000b\ud800c"})
    assert values["username"] == "a\ufffdb\ufffdc" and errors == {}


def test_group_members_keep_their_order_and_may_lack_an_id():
    rows, error = group_members({"contacts": [{"username": "Hector"}, {"id": "c2", "username": "Cedric"}]})
    assert rows == [
        {"position": 0, "contact_id": None, "username": "Hector"},
        {"position": 1, "contact_id": "c2", "username": "Cedric"},
    ]
    assert error is None


def test_malformed_members_are_skipped_and_reported():
    rows, error = group_members({"contacts": [{"username": "ok"}, "nope", {"username": 5}]})
    assert [row["username"] for row in rows] == ["ok"]
    assert error.startswith("2 member(s)")


def test_reactions_map_emoji_to_usernames():
    rows, error = message_reactions(
        {"reactions": [{"red_angry_face": ["KateMcCallister", "Kevin"]}, {"thumbs_up": ["Kevin"]}]}
    )
    assert [(row["emoji"], row["username"]) for row in rows] == [
        ("red_angry_face", "KateMcCallister"),
        ("red_angry_face", "Kevin"),
        ("thumbs_up", "Kevin"),
    ]
    assert error is None
    rows, error = message_reactions({"reactions": [{"x": "not-a-list"}, 3]})
    assert rows == [] and error.startswith("2 reaction")
