from __future__ import annotations

import pytest

from services.optimizer.metrics import METRICS, compare, measure

GEMMA = "gemma3:270m-q4_k_m"
SMOL = "smollm2:135m-instruct-q4_1"


@pytest.fixture
def data(conn, models, log):
    """Crafted rows: gemma3 summarizes 4 times in the window, smollm2 generates twice; old rows."""
    gemma, smol = models[GEMMA]["id"], models[SMOL]["id"]
    for t, ok, valid in ((100, True, True), (200, True, True), (300, True, False), (400, False, None)):
        log(gemma, task_type="summarization", processing_time_ms=t, success=ok, validation_passed=valid,
            error_class=None if ok else "timeout", cpu_usage_percent=t / 10, memory_used_mb=t)
    log(smol, n=2, processing_time_ms=1000)
    conn.execute("""INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success, logged_at)
                    VALUES (%s, 'summarization', 99999, true, now() - interval '2 hours')""", (gemma,))
    conn.execute("""INSERT INTO request_queue (request_payload, task_type, status, assigned_model_id, completed_at, result)
                    VALUES ('{}', 'summarization', 'pending', NULL, NULL, NULL),
                           ('{}', 'summarization', 'pending', NULL, NULL, NULL),
                           ('{}', 'code-generation', 'pending', %(code)s, NULL, NULL),
                           ('{}', 'summarization', 'completed', %(gemma)s, now(), '{}')""",
                 {"code": models["codellama:7b"]["id"], "gemma": gemma})
    conn.execute("""INSERT INTO container_lifecycle (model_id, driver, status, allocated_cpu, allocated_memory,
                        last_activity, stopped_at)
                    VALUES (%(gemma)s, 'process', 'running', 1, 768, now() - interval '100 seconds', NULL),
                           (%(gemma)s, 'process', 'running', 1, 768, now() - interval '50 seconds', NULL),
                           (%(smol)s, 'process', 'stopped', 1, 512, now() - interval '10 seconds', now())""",
                 {"gemma": gemma, "smol": smol})
    return {"gemma": str(gemma), "smol": str(smol), "code": str(models["codellama:7b"]["id"])}


def _measure(conn, metric, aggregate, scope="all", scope_value=None, window_seconds=3600):
    return measure(conn, metric, aggregate, window_seconds=window_seconds, scope=scope, scope_value=scope_value)


@pytest.mark.parametrize(("metric", "aggregate", "expected"), [
    ("request_count", "count", 4),
    ("avg_processing_time_ms", "avg", 250),
    ("avg_processing_time_ms", "min", 100),
    ("avg_processing_time_ms", "max", 400),
    ("p95_processing_time_ms", "p95", 385),
    ("p95_processing_time_ms", "p99", 397),
    ("success_rate", "avg", 0.75),
    ("validation_pass_rate", "avg", 2 / 3),
    ("avg_cpu_percent", "avg", 25),
    ("avg_cpu_percent", "max", 40),
    ("avg_memory_mb", "min", 100),
    ("pending_queue_length", "current", 2),
    ("running_runtimes", "current", 2),
    ("idle_seconds", "current", 50),
])
def test_each_metric_for_a_model_scope(conn, data, metric, aggregate, expected):
    assert _measure(conn, metric, aggregate, "model", data["gemma"]) == pytest.approx(expected)


@pytest.mark.parametrize(("metric", "aggregate", "scope", "value_key", "expected"), [
    ("request_count", "count", "all", None, 6),
    ("avg_processing_time_ms", "max", "all", None, 1000),
    ("request_count", "count", "task_type", "summarization", 4),
    ("request_count", "count", "task_type", "text-generation", 2),
    ("pending_queue_length", "current", "all", None, 3),
    ("pending_queue_length", "current", "task_type", "summarization", 2),
    ("pending_queue_length", "current", "model", "code", 1),
    ("running_runtimes", "current", "task_type", "summarization", 2),
    ("running_runtimes", "current", "model", "smol", 0),
])
def test_scopes(conn, data, metric, aggregate, scope, value_key, expected):
    value = data.get(value_key, value_key)
    assert _measure(conn, metric, aggregate, scope, value) == expected


def test_the_window_bounds_the_samples(conn, data):
    assert _measure(conn, "avg_processing_time_ms", "max", "model", data["gemma"], window_seconds=3 * 3600) == 99999


@pytest.mark.parametrize(("metric", "aggregate"), [
    ("avg_processing_time_ms", "avg"), ("p95_processing_time_ms", "p95"), ("success_rate", "avg"),
    ("validation_pass_rate", "avg"), ("avg_cpu_percent", "avg"), ("avg_memory_mb", "avg"),
    ("idle_seconds", "current"),
])
def test_no_data_is_null(conn, data, metric, aggregate):
    assert _measure(conn, metric, aggregate, "model", data["code"]) is None


def test_counts_without_data_are_zero(conn, data):
    assert _measure(conn, "request_count", "count", "model", data["code"]) == 0
    assert _measure(conn, "running_runtimes", "current", "model", data["code"]) == 0


def test_every_metric_is_covered():
    assert set(METRICS) == {"pending_queue_length", "request_count", "avg_processing_time_ms",
                            "p95_processing_time_ms", "success_rate", "validation_pass_rate",
                            "avg_cpu_percent", "avg_memory_mb", "idle_seconds", "running_runtimes"}


@pytest.mark.parametrize(("value", "op", "threshold", "holds"), [
    (5, ">", 4, True), (4, ">", 4, False), (4, ">=", 4, True), (3, ">=", 4, False),
    (3, "<", 4, True), (4, "<", 4, False), (4, "<=", 4, True), (5, "<=", 4, False),
    (4, "=", 4, True), (5, "=", 4, False), (5, "!=", 4, True), (4, "!=", 4, False),
    (None, ">", 4, False), (None, "<", 4, False), (None, "!=", 4, False),
])
def test_operators(value, op, threshold, holds):
    assert compare(value, op, threshold) is holds
