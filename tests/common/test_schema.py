"""Every table rejects bad rows; the summary view keeps models without logs and refreshes concurrently."""
from __future__ import annotations

import pytest
from psycopg import errors as pg_errors

from services.common.db import connect

MODEL = """
INSERT INTO model_registry (name, version, task_types, complexity_score, base_memory_requirement)
VALUES (%(name)s, %(version)s, %(task_types)s, %(complexity)s, %(memory)s) RETURNING id
"""
GOOD_MODEL = {"name": "tiny", "version": "1b", "task_types": ["conversation"], "complexity": 3, "memory": 512}


def insert_model(conn, **overrides):
    return conn.execute(MODEL, {**GOOD_MODEL, **overrides}).fetchone()["id"]


def assert_rejected(conn, statement, params, error=pg_errors.CheckViolation):
    with pytest.raises(error):
        with conn.transaction():
            conn.execute(statement, params)


@pytest.mark.parametrize("overrides", [
    {"name": "Llama"}, {"name": "-x"}, {"name": "a" * 64}, {"version": "7b;drop"},
    {"task_types": []}, {"task_types": ["painting"]}, {"complexity": 0}, {"complexity": 11},
    {"memory": 0},
])
def test_model_registry_rejects_bad_rows(conn, overrides):
    assert_rejected(conn, MODEL, {**GOOD_MODEL, **overrides})


def test_model_registry_name_and_version_are_unique(conn):
    insert_model(conn)
    assert_rejected(conn, MODEL, GOOD_MODEL, pg_errors.UniqueViolation)


@pytest.mark.parametrize("statement", [
    "INSERT INTO container_lifecycle (model_id, driver, allocated_cpu, allocated_memory) VALUES (%(m)s, 'kubernetes', 1, 512)",
    "INSERT INTO container_lifecycle (model_id, driver, allocated_cpu, allocated_memory) VALUES (%(m)s, 'process', 0, 512)",
    "INSERT INTO container_lifecycle (model_id, driver, allocated_cpu, allocated_memory, port) VALUES (%(m)s, 'process', 1, 512, 70000)",
    "INSERT INTO container_lifecycle (model_id, driver, allocated_cpu, allocated_memory, status) VALUES (%(m)s, 'process', 1, 512, 'stopped')",
    "INSERT INTO container_lifecycle (model_id, driver, allocated_cpu, allocated_memory, status) VALUES (%(m)s, 'process', 1, 512, 'exploded')",
    "INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success) VALUES (%(m)s, 'conversation', -1, true)",
    "INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success) VALUES (%(m)s, 'conversation', 10, false)",
    "INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success, output_format) VALUES (%(m)s, 'conversation', 10, true, 'xml')",
    "INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success) VALUES (%(m)s, 'painting', 10, true)",
    "INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success, input_tokens) VALUES (%(m)s, 'conversation', 10, true, -1)",
    "INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success, tokens_per_second) VALUES (%(m)s, 'conversation', 10, true, -0.5)",
    "INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success, attempt) VALUES (%(m)s, 'conversation', 10, true, 0)",
    "INSERT INTO request_queue (request_payload, task_type, status) VALUES ('{}', 'conversation', 'processing')",
    "INSERT INTO request_queue (request_payload, task_type, status, completed_at) VALUES ('{}', 'conversation', 'completed', now())",
    "INSERT INTO request_queue (request_payload, task_type, priority) VALUES ('{}', 'conversation', 5000)",
    "INSERT INTO request_queue (request_payload, task_type, callback_url) VALUES ('{}', 'conversation', 'file:///etc/passwd')",
    "INSERT INTO request_queue (request_payload, task_type) VALUES ('[]', 'conversation')",
    "INSERT INTO optimization_rules (rule_name, action_type) VALUES ('r', 'reboot')",
    "INSERT INTO optimization_rules (rule_name, action_type, scope) VALUES ('r', 'scale_up', 'model')",
    "INSERT INTO optimization_actions (rule_name, action_type, status) VALUES ('r', 'scale_up', 'failed')",
    "INSERT INTO prompt_templates (task_type, user_template) VALUES ('painting', '{prompt}')",
])
def test_tables_reject_bad_rows(conn, statement):
    assert_rejected(conn, statement, {"m": insert_model(conn)})


@pytest.mark.parametrize("assignment", [
    "status = 'exploded'", "health_status = 'fine'", "active_requests = -1", "total_requests = -1",
    "port = 0", "pid = 0", "allocated_cpu = 0", "driver_state = '[]'",
])
def test_updates_of_runtimes_are_checked_as_inserts_are(conn, assignment):
    runtime = conn.execute("INSERT INTO container_lifecycle (model_id, driver, allocated_cpu, allocated_memory)"
                           " VALUES (%(m)s, 'process', 1, 512) RETURNING id", {"m": insert_model(conn)}).fetchone()
    assert_rejected(conn, f"UPDATE container_lifecycle SET {assignment} WHERE id = %(id)s", runtime)


@pytest.mark.parametrize("assignment", [
    "status = 'lost'", "mode = 'batch'", "task_type = 'painting'", "priority = -1", "attempts = -1",
    "request_payload = '1'", "callback_url = 'ftp://x'",
])
def test_updates_of_requests_are_checked_as_inserts_are(conn, assignment):
    request = conn.execute("INSERT INTO request_queue (request_payload, task_type) VALUES ('{}', 'conversation')"
                           " RETURNING id").fetchone()
    assert_rejected(conn, f"UPDATE request_queue SET {assignment} WHERE id = %(id)s", request)


def test_rule_conditions_reject_unknown_metrics_and_operators(conn):
    rule_id = conn.execute(
        "INSERT INTO optimization_rules (rule_name, action_type) VALUES ('r', 'scale_up') RETURNING id"
    ).fetchone()["id"]
    condition = ("INSERT INTO optimization_rule_conditions (rule_id, position, metric, operator, threshold) "
                 "VALUES (%(r)s, 0, %(metric)s, %(op)s, 1)")
    assert_rejected(conn, condition, {"r": rule_id, "metric": "pg_sleep(10)", "op": ">"})
    assert_rejected(conn, condition, {"r": rule_id, "metric": "success_rate", "op": "LIKE"})


def test_only_one_active_template_per_task_and_family(conn):
    insert = ("INSERT INTO prompt_templates (task_type, model_family, version, user_template) "
              "VALUES ('conversation', 'zz-family', %(v)s, '{prompt}')")
    conn.execute(insert, {"v": 1})
    assert_rejected(conn, insert, {"v": 2}, pg_errors.UniqueViolation)


def test_summary_view_keeps_models_without_recent_logs(conn):
    with_logs = insert_model(conn, name="busy")
    without_logs = insert_model(conn, name="idle")
    stale = insert_model(conn, name="stale")
    conn.execute(
        "INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success, error_class, logged_at) "
        "VALUES (%(busy)s, 'conversation', 100, true, NULL, now()),"
        "       (%(busy)s, 'conversation', 300, false, 'timeout', now()),"
        "       (%(stale)s, 'conversation', 100, true, NULL, now() - interval '3 days')",
        {"busy": with_logs, "stale": stale},
    )
    conn.execute("REFRESH MATERIALIZED VIEW model_performance_summary")
    rows = {row["model_id"]: row for row in conn.execute(
        "SELECT model_id, total_requests, success_rate, avg_processing_time FROM model_performance_summary "
        "WHERE model_id = ANY(%s)", ([with_logs, without_logs, stale],))}
    assert rows == {
        with_logs: {"model_id": with_logs, "total_requests": 2, "success_rate": 0.5, "avg_processing_time": 200.0},
        without_logs: {"model_id": without_logs, "total_requests": 0, "success_rate": None, "avg_processing_time": None},
        stale: {"model_id": stale, "total_requests": 0, "success_rate": None, "avg_processing_time": None},
    }


def test_summary_view_refreshes_concurrently(fresh_database_url):
    with connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY model_performance_summary")
        count = conn.execute("SELECT count(*) AS n FROM model_performance_summary").fetchone()["n"]
    assert count == 10
