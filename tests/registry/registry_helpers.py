"""Helpers the registry tests share."""
from __future__ import annotations

from http import HTTPStatus

INVALID = "The request is invalid: see errors for each field."


def problem(response, status: int, detail: str, **extra) -> dict:
    """The whole problem body expected, with the request id the response carries."""
    return {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
            "detail": detail, "request_id": response.headers["X-Request-ID"], **extra}


def model_body(name: str = "tiny", version: str = "1.0", **overrides) -> dict:
    """A valid POST /models body for a process-driver model."""
    body = {
        "name": name, "version": version, "task_types": ["text-generation"],
        "complexity_score": 3, "base_memory_requirement": 512, "runtime_driver": "process",
        "protocol": "openai",
        "runtime_config": {"model_package": "pkg", "model_file": "model.gguf"},
    }
    return {**body, **overrides}
