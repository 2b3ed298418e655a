"""Shared field validators."""
from __future__ import annotations

import pytest
from marshmallow import ValidationError

from services.common.validation import WholeMatch


def test_a_pattern_must_match_the_whole_value_a_trailing_newline_included():
    name = WholeMatch(r"^[a-z]+$")
    assert name("abc") == "abc"
    for bad in ("abc\n", "abc\ndef", "Abc"):
        with pytest.raises(ValidationError):
            name(bad)
