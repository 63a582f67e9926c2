"""The envelope parser and the ordering rules, as pure functions."""

import json
from datetime import UTC, datetime

import pytest

from connector.errors import InvalidEnvelope
from connector.events import MAX_NESTING, Event, Outcome, RowState, apply_event, parse_event

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def body(document) -> bytes:
    return json.dumps(document).encode()


def event(action: str, payload: dict, event_id: str = "e", resource: str = "message") -> Event:
    return Event(event_id, f"{resource}.{action}", resource, action, payload["id"], payload)


class TestParseEvent:
    def test_the_seed_example_parses(self, seed_body):
        parsed = parse_event(seed_body)
        assert (parsed.event_id, parsed.type, parsed.resource, parsed.action) == (
            "a056V7R7NmNRjl70",
            "message.updated",
            "message",
            "updated",
        )
        assert parsed.resource_id == "SIuAFUNKdSYHZF2w"
        assert parsed.known

    def test_an_unknown_type_parses_and_is_not_known(self):
        parsed = parse_event(body({"id": "e1", "type": "reaction.created", "payload": {"id": "r"}}))
        assert not parsed.known

    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            (b"", "not valid JSON"),
            (b"not json", "not valid JSON"),
            (b'{"id": "e", "type": ', "not valid JSON"),
            (b"\xff\xfe{}", "not valid UTF-8"),
            ('{"id": "e"}'.encode("utf-16"), "not valid UTF-8"),
            (b"[]", "must be a JSON object"),
            (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
            (b'{"id": "e", "type": "contact.created", "payload": {"id": "x", "n": ' + b"9" * 5000 + b"}}", "integer"),
            (b'{"id": "e", "type": "contact.created", "payload": {"id": "x", "n": NaN}}', "NaN"),
            (b'{"id": "e", "type": "contact.created", "payload": {"id": "x", "n": 1e999}}', "too large"),
            (b'{"id": "e", "id": "f", "type": "contact.created", "payload": {"id": "x"}}', "more than once"),
            (body({"id": 123, "type": "contact.created", "payload": {"id": "x"}}), "'id' must be a string"),
            (body({"id": "", "type": "contact.created", "payload": {"id": "x"}}), "must not be empty"),
            (body({"id": "e" * 10_000, "type": "contact.created", "payload": {"id": "x"}}), "longer than"),
            (body({"id": "e\u0000", "type": "contact.created", "payload": {"id": "x"}}), "control characters"),
            (body({"id": "e", "payload": {"id": "x"}}), "'type' must be a string"),
            (body({"id": "e", "type": "contactcreated", "payload": {"id": "x"}}), "resource.action"),
            (body({"id": "e", "type": "contact.created"}), "'payload' must be a JSON object"),
            (body({"id": "e", "type": "contact.created", "payload": []}), "'payload' must be a JSON object"),
            (body({"id": "e", "type": "contact.created", "payload": {}}), "payload 'id' must be a string"),
            (body({"id": "e", "type": "contact.created", "payload": {"id": 7}}), "payload 'id' must be a string"),
            (body({"id": "e", "type": "contact.created", "payload": {"id": "x" * 256}}), "longer than"),
        ],
    )
    def test_malformed_envelopes_name_the_problem(self, raw, message):
        with pytest.raises(InvalidEnvelope, match=message):
            parse_event(raw)

    @pytest.mark.parametrize(("opening", "closing"), [(b"[", b"]"), (b'{"k":', b"}")])
    def test_nesting_is_refused_beyond_a_fixed_depth_at_any_stack_depth(self, opening, closing):
        def nested(levels: int) -> bytes:  # levels counts the envelope and the payload
            value = opening * (levels - 2) + b"1" + closing * (levels - 2)
            return b'{"id": "e", "type": "contact.created", "payload": {"id": "x", "v": ' + value + b"}}"

        assert parse_event(nested(MAX_NESTING)).payload["v"] is not None
        for levels in (MAX_NESTING + 1, 950, 990):
            with pytest.raises(InvalidEnvelope, match=f"more than {MAX_NESTING} levels"):
                parse_event(nested(levels))

        def deep_in_the_stack(depth: int) -> object:
            return parse_event(nested(MAX_NESTING)) if depth == 0 else deep_in_the_stack(depth - 1)

        # What parses does not depend on how much of the stack the caller has used.
        assert deep_in_the_stack(500).payload["id"] == "x"


class TestOrderingRules:
    def test_a_new_id_is_created(self):
        outcome, state = apply_event(None, event("created", {"id": "m", "message": "hi"}), T0)
        assert outcome is Outcome.APPLIED
        assert state == RowState({"id": "m", "message": "hi"}, "created", "e")

    def test_rule_2_delete_is_terminal(self):
        current = RowState({"id": "m", "message": "hi"}, "created", "e1")
        outcome, deleted = apply_event(current, event("deleted", {"id": "m"}, "e2"), T0)
        assert outcome is Outcome.APPLIED
        assert deleted.raw == {"id": "m", "message": "hi"} and deleted.deleted_at == T0
        for action in ("created", "updated", "deleted"):
            later = apply_event(deleted, event(action, {"id": "m", "message": "back"}, "e3"), T0)
            assert later == (Outcome.AFTER_DELETE, None)

    def test_rule_2_a_delete_for_an_unseen_id_leaves_a_tombstone(self):
        outcome, state = apply_event(None, event("deleted", {"id": "m"}), T0)
        assert outcome is Outcome.APPLIED
        assert state.deleted_at == T0 and state.raw == {"id": "m"}

    def test_rule_3_a_late_create_never_overwrites_an_update(self):
        current = RowState({"id": "m", "message": "edited"}, "updated", "e2")
        assert apply_event(current, event("created", {"id": "m", "message": "first"}), T0) == (Outcome.STALE, None)

    def test_rule_3_a_second_create_after_a_create_is_a_later_arrival(self):
        current = RowState({"id": "m", "message": "one"}, "created", "e1")
        outcome, state = apply_event(current, event("created", {"id": "m", "message": "two"}, "e2"), T0)
        assert outcome is Outcome.APPLIED and state.raw["message"] == "two"

    def test_rule_4_an_older_updated_at_never_overwrites_a_newer_one(self):
        current = RowState({"id": "m", "message": "v2", "updated_at": 200}, "updated", "e2")
        stale = event("updated", {"id": "m", "message": "v1", "updated_at": 100})
        assert apply_event(current, stale, T0) == (Outcome.STALE, None)
        newer = event("updated", {"id": "m", "message": "v3", "updated_at": 300})
        assert apply_event(current, newer, T0)[1].raw["message"] == "v3"

    def test_rule_4_an_equal_updated_at_is_a_later_arrival(self):
        current = RowState({"id": "m", "message": "v2", "updated_at": 200}, "updated", "e2")
        same = event("updated", {"id": "m", "message": "v2b", "updated_at": 200})
        assert apply_event(current, same, T0)[1].raw["message"] == "v2b"

    def test_rule_4_an_older_delete_still_deletes_but_keeps_the_newer_values(self):
        current = RowState({"id": "m", "message": "v2", "updated_at": 200}, "updated", "e2")
        outcome, state = apply_event(current, event("deleted", {"id": "m", "message": "v1", "updated_at": 100}), T0)
        assert outcome is Outcome.APPLIED
        assert state.deleted_at == T0 and state.raw["message"] == "v2"

    def test_rule_5_absent_fields_are_kept_and_nulls_are_written(self):
        current = RowState({"id": "c", "username": "kevin", "display_name": "Kev"}, "created", "e1")
        outcome, state = apply_event(
            current, event("updated", {"id": "c", "display_name": None}, "e2", resource="contact"), T0
        )
        assert outcome is Outcome.APPLIED
        assert state.raw == {"id": "c", "username": "kevin", "display_name": None}
        assert (state.last_action, state.event_id) == ("updated", "e2")

    def test_a_non_numeric_updated_at_does_not_block_an_update(self):
        current = RowState({"id": "m", "updated_at": "yesterday"}, "updated", "e1")
        assert apply_event(current, event("updated", {"id": "m", "updated_at": 5}), T0)[0] is Outcome.APPLIED
