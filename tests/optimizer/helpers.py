"""Assertion helpers of the optimizer tests."""
from __future__ import annotations

from http import HTTPStatus


def problem(response, status: int, detail: str, **members) -> dict:
    """The problem body a response should have, with its request id."""
    return {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
            "detail": detail, "request_id": response.headers["X-Request-ID"], **members}
