"""The orjson JSON provider says what Flask's own provider says."""
from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal

import pytest
from flask import Flask
from flask.json.provider import DefaultJSONProvider

from services.common.json_provider import OrjsonProvider


@dataclasses.dataclass
class Point:
    x: int
    y: float


VALUES = [
    {"b": 1, "a": [1, 2.5, None, True], "c": {"z": "é ☃ \u0000", "y": -3}},
    {"when": datetime(2026, 12, 2, 15, 4, 5, tzinfo=timezone.utc), "day": date(2026, 12, 2)},
    {"id": uuid.UUID("12345678-1234-5678-1234-567812345678"), "price": Decimal("1.10")},
    {2: "two", 1: "one"},
    [Point(1, 2.5)],
    "text",
    12345678901234567,
    {"big": 2**70, "small": -(2**65), "nested": [[[{"x": 1}]]]},
]


@pytest.fixture()
def app():
    return Flask(__name__)


@pytest.fixture()
def providers(app):  # they hold the app weakly
    return OrjsonProvider(app), DefaultJSONProvider(app)


@pytest.mark.parametrize("value", VALUES)
def test_dumps_says_what_flask_says(providers, value):
    fast, flask = providers
    assert json.loads(fast.dumps(value)) == json.loads(flask.dumps(value))


@pytest.mark.parametrize("value", VALUES)
def test_response_says_what_flask_says(app, providers, value):
    fast, flask = providers
    with app.app_context():
        ours, theirs = fast.response(value), flask.response(value)
    assert ours.mimetype == theirs.mimetype == "application/json"
    assert json.loads(ours.get_data()) == json.loads(theirs.get_data())


def test_keys_are_sorted_and_options_fall_back_to_flask(providers):
    fast, _ = providers
    assert fast.dumps({"b": 1, "a": 2}) == '{"a":2,"b":1}'
    assert fast.dumps({"a": 1}, indent=2) == '{\n  "a": 1\n}'


@pytest.mark.parametrize("text", ['{"a": [1, "\\u00e9"]}', '{"big": 1180591620717411303424, "n": -36893488147419103232}',
                                  '[1e400, NaN, -Infinity]', '{"id": "12345678901234567890123", "x": 1.5}'])
def test_loads_reads_what_the_standard_library_reads(providers, text):
    fast, _ = providers
    expected = json.loads(text)
    for given in (text, text.encode()):
        assert json.dumps(fast.loads(given)) == json.dumps(expected)   # NaN compares unequal to itself


def test_loads_refuses_what_is_not_json(providers):
    fast, _ = providers
    with pytest.raises(ValueError):
        fast.loads("{not json")


def test_an_unknown_type_is_a_type_error(providers):
    fast, _ = providers
    with pytest.raises(TypeError):
        fast.dumps({"a": object()})
