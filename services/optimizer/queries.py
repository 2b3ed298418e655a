"""SQL of the optimizer: plain, parameterised, returning dict rows."""
from __future__ import annotations

import json
from datetime import datetime, timedelta
from functools import partial

import psycopg
from psycopg.types.json import Jsonb

# Scope filters shared by the metric queries: NULL means "not restricted".
_LOG_SCOPE = """
      AND (%(model_id)s::uuid IS NULL OR pl.model_id = %(model_id)s::uuid)
      AND (%(task_type)s::text IS NULL OR pl.task_type = %(task_type)s::text)"""
_IN_WINDOW = "pl.logged_at > now() - make_interval(secs => %(window_seconds)s)"
_RUNTIME_SCOPE = """
      AND (%(model_id)s::uuid IS NULL OR c.model_id = %(model_id)s::uuid)
      AND (%(task_type)s::text IS NULL OR %(task_type)s::text = ANY (m.task_types))"""


def _jsonb(value) -> Jsonb:
    # UUIDs, datetimes and Decimals become strings that Postgres casts back.
    return Jsonb(value, dumps=partial(json.dumps, default=str))


# --- performance_logs ------------------------------------------------------------------------

PERFORMANCE_COLUMNS = (
    "model_id", "runtime_id", "request_id", "task_type", "output_format", "attempt",
    "template_id", "template_version", "input_tokens", "output_tokens", "tokens_per_second",
    "processing_time_ms", "load_time_ms", "queue_wait_ms", "memory_used_mb", "cpu_usage_percent",
    "success", "validation_passed", "error_class", "error_message", "logged_at",
)

INSERT_PERFORMANCE = """
INSERT INTO performance_logs (model_id, runtime_id, request_id, task_type, output_format, attempt,
    template_id, template_version, input_tokens, output_tokens, tokens_per_second,
    processing_time_ms, load_time_ms, queue_wait_ms, memory_used_mb, cpu_usage_percent,
    success, validation_passed, error_class, error_message, logged_at)
SELECT r.model_id, r.runtime_id, r.request_id, r.task_type, r.output_format, COALESCE(r.attempt, 1),
    r.template_id, r.template_version, r.input_tokens, r.output_tokens, r.tokens_per_second,
    r.processing_time_ms, r.load_time_ms, r.queue_wait_ms, r.memory_used_mb, r.cpu_usage_percent,
    r.success, r.validation_passed, r.error_class, r.error_message, COALESCE(r.logged_at, now())
FROM jsonb_array_elements(%(rows)s) WITH ORDINALITY AS e (item, n)
CROSS JOIN LATERAL jsonb_populate_record(NULL::performance_logs, e.item) AS r
ORDER BY e.n
RETURNING *
"""


def insert_performance(conn: psycopg.Connection, rows: list[dict]) -> list[dict]:
    """Insert performance rows in one statement (all or nothing), in order."""
    return conn.execute(INSERT_PERFORMANCE, {"rows": performance_rows(rows)}).fetchall()


def performance_rows(rows: list[dict]) -> Jsonb:
    """The `rows` parameter of INSERT_PERFORMANCE (which other statements may embed as a step)."""
    unknown = {key for row in rows for key in row} - set(PERFORMANCE_COLUMNS)
    if unknown:
        raise TypeError(f"unknown performance_logs columns: {sorted(unknown)}")
    return _jsonb(rows)


SUMMARY = """
SELECT * FROM model_performance_summary
WHERE (%(model_id)s::uuid IS NULL OR model_id = %(model_id)s::uuid)
  AND (%(task_type)s::text IS NULL OR %(task_type)s::text = ANY (task_types))
ORDER BY name, version
LIMIT %(limit)s OFFSET %(offset)s
"""


def performance_summary(conn: psycopg.Connection, *, model_id: str | None, task_type: str | None,
                        limit: int, offset: int) -> list[dict]:
    """Rows of the materialized summary view."""
    params = {"model_id": model_id, "task_type": task_type, "limit": limit, "offset": offset}
    return conn.execute(SUMMARY, params).fetchall()


# The index on logged_at finds the oldest rows; each batch is one short DELETE.
DELETE_OLD_PERFORMANCE = """
DELETE FROM performance_logs
WHERE id IN (SELECT id FROM performance_logs WHERE logged_at < %(cutoff)s
             ORDER BY logged_at LIMIT %(batch_size)s)
"""


def delete_old_performance(conn: psycopg.Connection, cutoff: datetime, batch_size: int) -> int:
    """Delete up to `batch_size` rows logged before `cutoff`; return how many went."""
    return conn.execute(DELETE_OLD_PERFORMANCE, {"cutoff": cutoff, "batch_size": batch_size}).rowcount


# --- metrics: one fixed query per metric; the columns are the aggregates it offers -------------

PENDING_QUEUE_LENGTH = """
SELECT count(*)::float8 AS current FROM request_queue q
WHERE q.status = 'pending'
  AND (%(task_type)s::text IS NULL OR q.task_type = %(task_type)s::text)
  AND (%(model_id)s::uuid IS NULL OR q.assigned_model_id = %(model_id)s::uuid
       OR (q.assigned_model_id IS NULL AND q.task_type = ANY (
           SELECT unnest(task_types) FROM model_registry WHERE id = %(model_id)s::uuid)))
"""
REQUEST_COUNT = f"SELECT count(*)::float8 AS count FROM performance_logs pl WHERE {_IN_WINDOW}{_LOG_SCOPE}"
PROCESSING_TIME = f"""
SELECT avg(processing_time_ms)::float8 AS avg, min(processing_time_ms)::float8 AS min,
       max(processing_time_ms)::float8 AS max
FROM performance_logs pl WHERE {_IN_WINDOW}{_LOG_SCOPE}"""
PROCESSING_TIME_PERCENTILES = f"""
SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY processing_time_ms) AS p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY processing_time_ms) AS p99
FROM performance_logs pl WHERE {_IN_WINDOW}{_LOG_SCOPE}"""
SUCCESS_RATE = f"SELECT avg(success::int)::float8 AS avg FROM performance_logs pl WHERE {_IN_WINDOW}{_LOG_SCOPE}"
VALIDATION_PASS_RATE = f"""
SELECT avg(validation_passed::int)::float8 AS avg FROM performance_logs pl WHERE {_IN_WINDOW}{_LOG_SCOPE}"""
CPU_PERCENT = f"""
SELECT avg(cpu_usage_percent)::float8 AS avg, min(cpu_usage_percent)::float8 AS min,
       max(cpu_usage_percent)::float8 AS max
FROM performance_logs pl WHERE {_IN_WINDOW}{_LOG_SCOPE}"""
MEMORY_MB = f"""
SELECT avg(memory_used_mb)::float8 AS avg, min(memory_used_mb)::float8 AS min,
       max(memory_used_mb)::float8 AS max
FROM performance_logs pl WHERE {_IN_WINDOW}{_LOG_SCOPE}"""
# Seconds since the last activity of the running runtimes; 0 while any serves a request (a long
# generation does not touch last_activity until it ends).
_IDLE_SECONDS = """CASE WHEN bool_or(c.active_requests > 0) THEN 0
            ELSE extract(epoch FROM now() - max(c.last_activity)) END::float8"""
IDLE_SECONDS = f"""
SELECT {_IDLE_SECONDS} AS current
FROM container_lifecycle c JOIN model_registry m ON m.id = c.model_id
WHERE c.status = 'running'{_RUNTIME_SCOPE}"""
RUNNING_RUNTIMES = f"""
SELECT count(*)::float8 AS current
FROM container_lifecycle c JOIN model_registry m ON m.id = c.model_id
WHERE c.status = 'running'{_RUNTIME_SCOPE}"""


def metric_row(conn: psycopg.Connection, query: str, *, window_seconds: int,
               model_id: str | None, task_type: str | None) -> dict:
    """Run one of the fixed metric queries above for a window and scope."""
    params = {"window_seconds": window_seconds, "model_id": model_id, "task_type": task_type}
    return conn.execute(query, params).fetchone()


# --- action targets --------------------------------------------------------------------------

SCALE_UP_TARGETS = """
SELECT m.id AS model_id, m.name, m.version, m.max_replicas
FROM model_registry m
WHERE m.active
  AND (%(model_id)s::uuid IS NULL OR m.id = %(model_id)s::uuid)
  AND (%(task_type)s::text IS NULL OR %(task_type)s::text = ANY (m.task_types))
  AND (EXISTS (SELECT 1 FROM container_lifecycle c WHERE c.model_id = m.id AND c.status IN ('starting', 'running'))
       OR EXISTS (SELECT 1 FROM request_queue q WHERE q.status = 'pending' AND q.assigned_model_id = m.id))
ORDER BY m.name, m.version
"""

SCALE_DOWN_TARGETS = f"""
SELECT m.id AS model_id, m.name, m.version, m.max_replicas, {_IDLE_SECONDS} AS idle_seconds
FROM model_registry m JOIN container_lifecycle c ON c.model_id = m.id AND c.status = 'running'
WHERE (%(model_id)s::uuid IS NULL OR m.id = %(model_id)s::uuid)
  AND (%(task_type)s::text IS NULL OR %(task_type)s::text = ANY (m.task_types))
GROUP BY m.id
ORDER BY m.name, m.version
"""

# Models in scope with logs in the window, slowest first, with what they cost and serve.
MODELS_WITH_LOGS = """
SELECT m.id AS model_id, m.name, m.version, m.task_types, m.active,
       m.base_cpu_requirement::float8 AS base_cpu_requirement, m.base_memory_requirement,
       count(*) AS request_count, avg(pl.processing_time_ms)::float8 AS avg_processing_time_ms,
       avg(pl.success::int)::float8 AS success_rate, max(pl.memory_used_mb) AS peak_memory_mb
FROM performance_logs pl JOIN model_registry m ON m.id = pl.model_id
WHERE pl.logged_at > now() - make_interval(secs => %(window_seconds)s)
  AND (%(model_id)s::uuid IS NULL OR pl.model_id = %(model_id)s::uuid)
  AND (%(task_type)s::text IS NULL OR pl.task_type = %(task_type)s::text)
GROUP BY m.id
ORDER BY avg(pl.processing_time_ms) DESC, m.name
"""

# Every task type of the model is served by some active model outside `excluded` (which holds
# the model itself and those already planned for demotion).
HAS_ALTERNATIVE = """
SELECT NOT EXISTS (
    SELECT 1 FROM unnest((SELECT task_types FROM model_registry WHERE id = %(model_id)s)) AS t (task_type)
    WHERE NOT EXISTS (SELECT 1 FROM model_registry o
                      WHERE o.active AND o.id <> ALL (%(excluded)s::uuid[]) AND t.task_type = ANY (o.task_types))
) AS has_alternative
"""


def scale_up_targets(conn: psycopg.Connection, *, model_id: str | None, task_type: str | None) -> list[dict]:
    """Active models in scope that run (or start) or have pending requests assigned to them: not every
    model that could serve a waiting request (the worker starts the one selection picks)."""
    return conn.execute(SCALE_UP_TARGETS, {"model_id": model_id, "task_type": task_type}).fetchall()


def scale_down_targets(conn: psycopg.Connection, *, model_id: str | None, task_type: str | None) -> list[dict]:
    """Models in scope with running runtimes, and how long the most recent one has been idle."""
    return conn.execute(SCALE_DOWN_TARGETS, {"model_id": model_id, "task_type": task_type}).fetchall()


def models_with_logs(conn: psycopg.Connection, *, window_seconds: int, model_id: str | None,
                     task_type: str | None) -> list[dict]:
    """Models in scope with performance rows in the window, slowest first."""
    params = {"window_seconds": window_seconds, "model_id": model_id, "task_type": task_type}
    return conn.execute(MODELS_WITH_LOGS, params).fetchall()


def has_alternative(conn: psycopg.Connection, model_id: str, excluded: list[str]) -> bool:
    """Whether active models outside `excluded` serve every task type of this one."""
    params = {"model_id": model_id, "excluded": [str(e) for e in excluded]}
    return conn.execute(HAS_ALTERNATIVE, params).fetchone()["has_alternative"]


# --- rules -----------------------------------------------------------------------------------

RULE_COLUMNS = ("rule_name", "window_seconds", "scope", "scope_value", "action_type",
                "action_parameters", "priority", "cooldown_seconds", "active")

SELECT_RULES = """
SELECT r.*, r.last_triggered_at + make_interval(secs => r.cooldown_seconds) AS cooldown_until,
       COALESCE(r.last_triggered_at + make_interval(secs => r.cooldown_seconds) > now(), false) AS in_cooldown,
       COALESCE((SELECT jsonb_agg(jsonb_build_object('metric', c.metric, 'aggregate', c.aggregate,
                     'operator', c.operator, 'threshold', c.threshold) ORDER BY c.position)
                 FROM optimization_rule_conditions c WHERE c.rule_id = r.id), '[]') AS conditions
FROM optimization_rules r
"""


def list_rules(conn: psycopg.Connection, *, active: bool | None, limit: int, offset: int) -> list[dict]:
    """Rules with their conditions, highest priority first."""
    query = SELECT_RULES + """
WHERE (%(active)s::boolean IS NULL OR r.active = %(active)s::boolean)
ORDER BY r.priority DESC, r.rule_name LIMIT %(limit)s OFFSET %(offset)s"""
    return conn.execute(query, {"active": active, "limit": limit, "offset": offset}).fetchall()


def get_rule(conn: psycopg.Connection, rule_id: str, *, lock: bool = False) -> dict | None:
    """One rule with its conditions; `lock` takes its row lock, skipping it if already held."""
    query = SELECT_RULES + " WHERE r.id = %(id)s"
    if lock:
        query += " FOR UPDATE OF r SKIP LOCKED"
    return conn.execute(query, {"id": rule_id}).fetchone()


def lock_rule(conn: psycopg.Connection, rule_id: str) -> None:
    """Wait for and take the rule's row lock, until the transaction ends."""
    conn.execute("SELECT id FROM optimization_rules WHERE id = %(id)s FOR UPDATE", {"id": rule_id})


def active_rule_ids(conn: psycopg.Connection) -> list[str]:
    """Ids of the active rules in evaluation order."""
    found = conn.execute(
        "SELECT id FROM optimization_rules WHERE active ORDER BY priority DESC, rule_name").fetchall()
    return [row["id"] for row in found]


def insert_rule(conn: psycopg.Connection, rule: dict) -> str:
    """Insert a rule (without conditions); return its id."""
    params = {**{c: rule.get(c) for c in RULE_COLUMNS},
              "action_parameters": _jsonb(rule["action_parameters"])}
    return conn.execute("""
INSERT INTO optimization_rules (rule_name, window_seconds, scope, scope_value, action_type,
    action_parameters, priority, cooldown_seconds, active)
VALUES (%(rule_name)s, %(window_seconds)s, %(scope)s, %(scope_value)s, %(action_type)s,
    %(action_parameters)s, %(priority)s, %(cooldown_seconds)s, %(active)s)
RETURNING id""", params).fetchone()["id"]


def update_rule(conn: psycopg.Connection, rule_id: str, rule: dict) -> None:
    """Overwrite the editable columns of a rule."""
    params = {**{c: rule.get(c) for c in RULE_COLUMNS}, "id": rule_id,
              "action_parameters": _jsonb(rule["action_parameters"])}
    conn.execute("""
UPDATE optimization_rules SET rule_name = %(rule_name)s, window_seconds = %(window_seconds)s,
    scope = %(scope)s, scope_value = %(scope_value)s, action_type = %(action_type)s,
    action_parameters = %(action_parameters)s, priority = %(priority)s,
    cooldown_seconds = %(cooldown_seconds)s, active = %(active)s
WHERE id = %(id)s""", params)


def replace_conditions(conn: psycopg.Connection, rule_id: str, conditions: list[dict]) -> None:
    """Replace the conditions of a rule, positioned in list order."""
    conn.execute("DELETE FROM optimization_rule_conditions WHERE rule_id = %s", (rule_id,))
    with conn.cursor() as cur:
        cur.executemany("""
INSERT INTO optimization_rule_conditions (rule_id, position, metric, aggregate, operator, threshold)
VALUES (%(rule_id)s, %(position)s, %(metric)s, %(aggregate)s, %(operator)s, %(threshold)s)""",
                        [{**c, "rule_id": rule_id, "position": i} for i, c in enumerate(conditions)])


def delete_rule(conn: psycopg.Connection, rule_id: str) -> bool:
    """Delete a rule and its conditions; its audit rows keep its name."""
    return conn.execute("DELETE FROM optimization_rules WHERE id = %s", (rule_id,)).rowcount == 1


def model_exists(conn: psycopg.Connection, model_id: str) -> bool:
    return conn.execute("SELECT 1 FROM model_registry WHERE id = %s", (model_id,)).fetchone() is not None


def mark_evaluated(conn: psycopg.Connection, rule_id: str, *, triggered: bool,
                   succeeded: bool, failed: bool) -> None:
    """Record an evaluation on the rule: last run times and outcome counts."""
    conn.execute("""
UPDATE optimization_rules SET last_evaluated_at = now(),
    last_triggered_at = CASE WHEN %(triggered)s THEN now() ELSE last_triggered_at END,
    success_count = success_count + %(succeeded)s::int,
    failure_count = failure_count + %(failed)s::int
WHERE id = %(id)s""", {"id": rule_id, "triggered": triggered, "succeeded": succeeded, "failed": failed})


# --- optimization_actions --------------------------------------------------------------------

def insert_action(conn: psycopg.Connection, action: dict) -> dict:
    """Write one audit row."""
    params = {**action, "measured": _jsonb(action["measured"]),
              "action_parameters": _jsonb(action["action_parameters"]),
              "result": _jsonb(action["result"]) if action.get("result") is not None else None}
    return conn.execute("""
INSERT INTO optimization_actions (rule_id, rule_name, measured, action_type, action_parameters,
    dry_run, status, result, error)
VALUES (%(rule_id)s, %(rule_name)s, %(measured)s, %(action_type)s, %(action_parameters)s,
    %(dry_run)s, %(status)s, %(result)s, %(error)s)
RETURNING *""", params).fetchone()


def list_actions(conn: psycopg.Connection, *, rule_id: str | None, limit: int, offset: int) -> list[dict]:
    """Audit rows, newest first."""
    return conn.execute("""
SELECT * FROM optimization_actions
WHERE (%(rule_id)s::uuid IS NULL OR rule_id = %(rule_id)s::uuid)
ORDER BY created_at DESC, id DESC LIMIT %(limit)s OFFSET %(offset)s""",
                        {"rule_id": rule_id, "limit": limit, "offset": offset}).fetchall()


# --- analysis --------------------------------------------------------------------------------

MODEL_WINDOW_STATS = """
SELECT m.id AS model_id, m.name, m.version, m.task_types, m.active,
       count(pl.id) AS request_count,
       avg(pl.success::int)::float8 AS success_rate,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY pl.processing_time_ms) AS p95_processing_time_ms,
       avg(pl.cpu_usage_percent)::float8 AS avg_cpu_percent,
       count(pl.cpu_usage_percent) AS cpu_samples,
       avg(pl.memory_used_mb)::float8 AS avg_memory_mb,
       max(pl.memory_used_mb)::float8 AS max_memory_mb,
       count(pl.memory_used_mb) AS memory_samples,
       count(pl.id) FILTER (WHERE lower(pl.error_class) = ANY (%(resource_errors)s)) AS resource_errors,
       (SELECT avg(c.allocated_cpu)::float8 FROM container_lifecycle c
         WHERE c.model_id = m.id AND (c.stopped_at IS NULL OR c.stopped_at > %(since)s)) AS allocated_cpu,
       (SELECT avg(c.allocated_memory)::float8 FROM container_lifecycle c
         WHERE c.model_id = m.id AND (c.stopped_at IS NULL OR c.stopped_at > %(since)s)) AS allocated_memory_mb,
       (SELECT count(*) FROM request_queue q
         WHERE q.assigned_model_id = m.id AND q.created_at > %(since)s) AS assigned_requests,
       NOT EXISTS (SELECT 1 FROM unnest(m.task_types) AS t (task_type)
                   WHERE NOT EXISTS (SELECT 1 FROM model_registry o WHERE o.active AND o.id <> m.id
                                     AND t.task_type = ANY (o.task_types))) AS has_alternative
FROM model_registry m
LEFT JOIN performance_logs pl ON pl.model_id = m.id AND pl.logged_at > %(since)s
GROUP BY m.id
ORDER BY m.name, m.version
"""

FORMAT_VALIDATION = """
SELECT pl.model_id, m.name, m.version, pl.output_format,
       count(pl.validation_passed) AS validated,
       avg(pl.validation_passed::int)::float8 AS validation_pass_rate
FROM performance_logs pl JOIN model_registry m ON m.id = pl.model_id
WHERE pl.logged_at > %(since)s AND pl.output_format IS NOT NULL AND pl.validation_passed IS NOT NULL
GROUP BY pl.model_id, m.name, m.version, pl.output_format
ORDER BY pl.output_format, validation_pass_rate DESC, m.name
"""

# Per model: time buckets of the window, then how p95 moves with the request count (Pearson r).
LOAD_LATENCY = """
WITH buckets AS (
    SELECT pl.model_id, date_bin(%(bucket)s, pl.logged_at, %(since)s) AS bucket, count(*) AS requests,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY pl.processing_time_ms) AS p95
    FROM performance_logs pl
    WHERE pl.logged_at > %(since)s
    GROUP BY 1, 2
)
SELECT model_id, count(*) AS buckets, corr(p95, requests) AS load_latency_correlation,
       min(p95) AS min_bucket_p95_ms, max(p95) AS max_bucket_p95_ms
FROM buckets GROUP BY model_id
"""


def model_window_stats(conn: psycopg.Connection, since: datetime,
                       resource_errors: list[str]) -> list[dict]:
    """Per model since `since`: use, outcomes, allocation and whether it was chosen at all."""
    return conn.execute(MODEL_WINDOW_STATS, {"since": since, "resource_errors": resource_errors}).fetchall()


def format_validation(conn: psycopg.Connection, since: datetime) -> list[dict]:
    """Validation pass rate per model and output format, best first within a format."""
    return conn.execute(FORMAT_VALIDATION, {"since": since}).fetchall()


def load_latency(conn: psycopg.Connection, since: datetime, bucket: timedelta) -> list[dict]:
    """Per model: how the p95 of time buckets correlates with their request counts."""
    return conn.execute(LOAD_LATENCY, {"since": since, "bucket": bucket}).fetchall()


def window_start(conn: psycopg.Connection, window_seconds: int) -> datetime:
    """The start of a window ending now, by the database clock."""
    return conn.execute("SELECT now() - make_interval(secs => %s) AS since",
                        (window_seconds,)).fetchone()["since"]


# --- rankings --------------------------------------------------------------------------------

RANKING_INPUTS = """
SELECT m.id AS model_id, m.name, m.version, m.performance_metrics, s.*, f.*
FROM model_registry m
CROSS JOIN LATERAL (
    SELECT count(*) AS sample_size,
           avg(pl.success::int)::float8 AS success_rate,
           count(pl.validation_passed) AS validated,
           avg(pl.validation_passed::int)::float8 AS validation_pass_rate,
           count(*) FILTER (WHERE pl.success) AS successes,
           (avg(pl.processing_time_ms) FILTER (WHERE pl.success))::float8 AS avg_latency_ms,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY pl.processing_time_ms)
               FILTER (WHERE pl.success) AS p50_latency_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY pl.processing_time_ms)
               FILTER (WHERE pl.success) AS p95_latency_ms,
           count(pl.tokens_per_second) AS tps_samples,
           avg(pl.tokens_per_second)::float8 AS tokens_per_second,
           count(pl.load_time_ms) AS load_samples,
           avg(pl.load_time_ms)::float8 AS load_time_ms
    FROM performance_logs pl WHERE pl.model_id = m.id AND pl.logged_at > %(since)s
) s
CROSS JOIN LATERAL (
    SELECT count(*) AS feedback_samples, avg(rf.score)::float8 AS feedback_score
    FROM request_feedback rf WHERE rf.model_id = m.id AND rf.created_at > %(since)s
) f
ORDER BY m.name, m.version
"""


def ranking_inputs(conn: psycopg.Connection, since: datetime) -> list[dict]:
    """Measured figures per model since `since`, with its current metrics."""
    return conn.execute(RANKING_INPUTS, {"since": since}).fetchall()


def merge_performance_metrics(conn: psycopg.Connection, model_id: str, metrics: dict) -> dict:
    """Merge keys into a model's performance_metrics; return the merged object."""
    return conn.execute("""
UPDATE model_registry SET performance_metrics = performance_metrics || %(metrics)s
WHERE id = %(id)s RETURNING performance_metrics""",
                        {"id": model_id, "metrics": _jsonb(metrics)}).fetchone()["performance_metrics"]
