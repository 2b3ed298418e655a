"""JSON through orjson, and through the standard library where the two differ.

orjson writes and reads several times faster, but refuses to write an integer beyond 64 bits (a
model's JSON answer may hold one), reads one as a float, and refuses what the standard library
reads (1e400, NaN). Those take the standard library's path, so nothing that worked before fails.
"""
from __future__ import annotations

import json
import re
from typing import Any

import orjson

# An integer of 20 digits or more (2**64 has 20): orjson would read it as a float.
_LONG_INTEGER = re.compile(r"\d{20}")
_LONG_INTEGER_BYTES = re.compile(rb"\d{20}")


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, say; what json refuses too raises
        return json.dumps(value).encode()


def loads(text: str | bytes | bytearray | memoryview) -> Any:
    if isinstance(text, memoryview):
        text = bytes(text)
    pattern = _LONG_INTEGER if isinstance(text, str) else _LONG_INTEGER_BYTES
    if pattern.search(text):
        return json.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # either json reads it, or it raises its own ValueError
        return json.loads(text)
