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


def add_model(conn, name: str, **overrides) -> dict:
    """Register a model through the catalogue, with the API's defaults."""
    from services.registry import catalogue
    from services.registry.schemas import ModelSchema

    return catalogue.create_model(conn, ModelSchema().load(model_body(name, **overrides)))


def log_requests(conn, model_id, count: int, processing_time_ms: int, *, success: bool = True,
                 validation_passed: bool | None = None, load_time_ms: int | None = None,
                 tokens_per_second: float | None = None) -> None:
    """Add `count` performance rows for a model (call `refresh` to see them in the view)."""
    conn.execute("""
        INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success,
            error_class, validation_passed, load_time_ms, tokens_per_second)
        SELECT %s, 'summarization', %s, %s, CASE WHEN %s THEN NULL ELSE 'timeout' END, %s, %s, %s
        FROM generate_series(1, %s)
    """, (model_id, processing_time_ms, success, success, validation_passed, load_time_ms,
          tokens_per_second, count))


def refresh(conn) -> None:
    conn.execute("REFRESH MATERIALIZED VIEW model_performance_summary")


def add_runtime(conn, model_id, status: str = "running", health: str = "healthy") -> None:
    conn.execute("""
        INSERT INTO container_lifecycle (model_id, driver, status, health_status, allocated_cpu,
            allocated_memory, stopped_at)
        VALUES (%s, 'process', %s, %s, 1, 512, CASE WHEN %s = 'stopped' THEN now() END)
    """, (model_id, status, health, status))
