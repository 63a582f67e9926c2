"""The JSON every write path stores: ``connector.db.types.json_dumps``."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.db.types import json_dumps

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_json_dumps_writes_what_json_dumps_does_with_the_same_options(value):
    expected = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    assert json_dumps(value) == expected
    assert json_dumps(value).isascii()


@pytest.mark.parametrize("value", [math.nan, {"a": [math.inf]}, -math.inf])
def test_json_dumps_refuses_what_json_cannot_hold(value):
    with pytest.raises(ValueError, match="Out of range float"):
        json_dumps(value)


def test_json_dumps_refuses_values_json_has_no_form_for():
    with pytest.raises(TypeError, match="not JSON serializable"):
        json_dumps({"a": object()})
