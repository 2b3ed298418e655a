from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from services.common.db import SingleConnectionDatabase, connect
from services.optimizer import create_app
from services.optimizer.performance import (REFRESH_LOCK_KEY, log_performance, purge_old_performance,
                                            refresh_summary)

from .helpers import problem


def _row(model_id, **columns) -> dict:
    return {"model_id": str(model_id), "task_type": "text-generation", "processing_time_ms": 250,
            "success": True, **columns}


def test_post_performance_logs_one_row_with_defaults(client, models, conn):
    model_id = models["smollm2:135m-instruct-q4_1"]["id"]
    response = client.post("/performance", json=_row(model_id, output_format="json", output_tokens=40,
                                                     tokens_per_second=80.5, cpu_usage_percent=55.25))
    assert response.status_code == 201
    body = response.json
    stored = conn.execute("SELECT id, logged_at FROM performance_logs WHERE id = %s", (body["id"],)).fetchone()
    assert body == {
        "id": stored["id"], "model_id": str(model_id), "runtime_id": None, "request_id": None,
        "task_type": "text-generation", "output_format": "json", "attempt": 1, "template_id": None,
        "template_version": None, "input_tokens": None, "output_tokens": 40, "tokens_per_second": 80.5,
        "processing_time_ms": 250, "load_time_ms": None, "queue_wait_ms": None, "memory_used_mb": None,
        "cpu_usage_percent": 55.25, "success": True, "validation_passed": None, "error_class": None,
        "error_message": None, "logged_at": stored["logged_at"].isoformat(),
    }


def test_log_performance_in_process_keeps_given_time(conn, models):
    logged_at = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    row = log_performance(conn, {"model_id": models["gemma3:270m-q4_k_m"]["id"], "task_type": "summarization",
                                 "processing_time_ms": 10, "success": False, "error_class": "timeout",
                                 "logged_at": logged_at, "attempt": 2})
    assert (row["logged_at"], row["attempt"], row["success"], row["error_class"]) == (logged_at, 2, False, "timeout")


def test_log_performance_rejects_unknown_columns(conn, models):
    with pytest.raises(TypeError, match="unknown performance_logs columns: \\['speed'\\]"):
        log_performance(conn, {"model_id": models["gemma3:270m-q4_k_m"]["id"], "speed": 1})


@pytest.mark.parametrize(("body", "errors"), [
    ({"task_type": "poetry", "processing_time_ms": -1, "success": True, "model_id": "x"},
     {"task_type": ["Must be one of: text-generation, code-generation, question-answering, "
                    "conversation, summarization, classification."],
      "processing_time_ms": ["Must be greater than or equal to 0 and less than or equal to 2147483647."],
      "model_id": ["Not a valid UUID."]}),
    ({"success": False, "processing_time_ms": 1, "task_type": "conversation", "model_id": str(uuid.uuid4())},
     {"error_class": ["A failed attempt needs an error_class."]}),
    ({"success": True, "processing_time_ms": 1, "task_type": "conversation", "model_id": str(uuid.uuid4()),
      "cpu_usage_percent": 10000, "colour": "red"},
     {"cpu_usage_percent": ["Must be greater than or equal to 0 and less than or equal to 9999.99."],
      "colour": ["Unknown field."]}),
    # A row in the future would count in every window and outlive every purge.
    ({"success": True, "processing_time_ms": 1, "task_type": "conversation", "model_id": str(uuid.uuid4()),
      "logged_at": "2999-01-01T00:00:00Z"}, {"logged_at": ["Must not be in the future."]}),
    ({"success": True, "processing_time_ms": 1, "task_type": "conversation", "model_id": str(uuid.uuid4()),
      "logged_at": "1999-12-31T23:59:59Z"}, {"logged_at": ["Must be in 2000 or later."]}),
])
def test_post_performance_rejects_bad_rows(client, body, errors):
    response = client.post("/performance", json=body)
    assert response.status_code == 422
    assert response.json == problem(response, 422, "The request is invalid: see errors for each field.",
                                    errors={"json": errors})


def test_post_performance_unknown_model_is_422(client):
    response = client.post("/performance", json=_row(uuid.uuid4()))
    assert response.status_code == 422
    assert response.json == problem(response, 422, "A referenced resource does not exist.",
                                    constraint="performance_logs_model_id_fkey")


def test_batch_is_all_or_nothing(client, models, conn):
    model_id = models["smollm2:135m-instruct-q4_1"]["id"]
    before = conn.execute("SELECT count(*) AS n FROM performance_logs").fetchone()["n"]
    response = client.post("/performance/batch", json={"items": [_row(model_id), _row(uuid.uuid4())]})
    assert response.status_code == 422
    assert conn.execute("SELECT count(*) AS n FROM performance_logs").fetchone()["n"] == before

    response = client.post("/performance/batch", json={"items": [_row(model_id, processing_time_ms=i) for i in range(3)]})
    assert response.status_code == 201
    assert response.json["count"] == 3
    assert [item["processing_time_ms"] for item in response.json["items"]] == [0, 1, 2]


def test_batch_is_bounded(client, models):
    row = _row(models["smollm2:135m-instruct-q4_1"]["id"])
    for items, message in (([], "Length must be between 1 and 1000."),
                           ([row] * 1001, "Length must be between 1 and 1000.")):
        response = client.post("/performance/batch", json={"items": items})
        assert response.status_code == 422
        assert response.json["errors"] == {"json": {"items": [message]}}


@pytest.fixture
def committed(fresh_database_url):
    """A connection on a database of the test's own (real commits), and an app on it."""
    with connect(fresh_database_url, autocommit=True) as conn:
        app = create_app({"TESTING": True, "DATABASE": SingleConnectionDatabase(conn),
                          "DATABASE_URL": fresh_database_url, "API_TOKEN": ""})
        yield conn, app.test_client()


def test_refresh_then_summary_filters_by_model_and_task_type(committed):
    conn, client = committed
    ids = {r["name"]: r["id"] for r in conn.execute("SELECT id, name FROM model_registry")}
    conn.execute("""INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success, error_class,
                    validation_passed, cpu_usage_percent)
                    SELECT %s, 'summarization', t, t < 400, CASE WHEN t < 400 THEN NULL ELSE 'timeout' END,
                           t < 300, 20 FROM generate_series(100, 400, 100) t""", (ids["gemma3"],))

    # The seeds refreshed the view: the model is there, without the rows logged since.
    (before,) = client.get("/performance/summary", query_string={"model_id": ids["gemma3"]}).json["items"]
    assert before["total_requests"] == 0 and before["success_rate"] is None
    response = client.post("/performance/refresh")
    assert response.status_code == 200
    assert response.json["refreshed"] is True and response.json["reason"] is None

    response = client.get("/performance/summary", query_string={"model_id": ids["gemma3"]})
    (row,) = response.json["items"]
    assert {k: v for k, v in row.items() if k not in ("refreshed_at", "last_used")} == {
        "model_id": str(ids["gemma3"]), "name": "gemma3", "version": "270m-q4_k_m",
        "task_types": ["text-generation", "summarization"], "active": True,
        "total_requests": 4, "successful_requests": 3, "success_rate": 0.75,
        "avg_processing_time": 250.0, "p50_processing_time": 250.0, "p95_processing_time": 385.0,
        "p99_processing_time": 397.0, "avg_tokens_per_second": None, "avg_load_time": None,
        "avg_memory_usage": None, "avg_cpu_usage": 20.0, "validated_requests": 4,
        "validation_pass_rate": 0.5, "avg_feedback_score": None, "feedback_count": 0,
    }
    by_task = client.get("/performance/summary", query_string={"task_type": "summarization"}).json["items"]
    assert sorted(r["name"] for r in by_task) == ["gemma3", "smollm2"]
    assert len(client.get("/performance/summary", query_string={"limit": 3}).json["items"]) == 3


def test_refresh_already_running_is_not_started_twice(fresh_database_url):
    with connect(fresh_database_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (REFRESH_LOCK_KEY,))
        assert refresh_summary(fresh_database_url, 30_000) == {
            "refreshed": False, "reason": "a refresh is already running", "duration_ms": None}
        other.execute("SELECT pg_advisory_unlock(%s)", (REFRESH_LOCK_KEY,))
    assert refresh_summary(fresh_database_url, 30_000)["refreshed"] is True


def test_purge_deletes_old_rows_in_batches(conn, models):
    model_id = models["smollm2:135m-instruct-q4_1"]["id"]
    now = datetime.now(timezone.utc)
    rows = [_row(model_id, logged_at=now - timedelta(days=40, minutes=i)) for i in range(7)]
    rows.append(_row(model_id, logged_at=now - timedelta(days=5)))
    from services.optimizer.performance import log_performance_batch
    kept = log_performance_batch(conn, rows)[-1]
    assert purge_old_performance(conn, timedelta(days=30), batch_size=3) == 7
    assert [r["id"] for r in conn.execute("SELECT id FROM performance_logs WHERE model_id = %s", (model_id,))] == [kept["id"]]
