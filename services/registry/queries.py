"""SQL of the registry: the catalogue, the evidence selection scores from, and why models drop out."""
from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

# Numerics as float8, so callers get floats, not Decimals.
MODEL_COLUMNS = """
    id, name, version, task_types, complexity_score,
    base_cpu_requirement::float8 AS base_cpu_requirement, base_memory_requirement,
    base_gpu_requirement::float8 AS base_gpu_requirement, storage_requirement, model_size,
    download_url, runtime_driver, protocol, runtime_config, keep_alive_seconds, max_replicas,
    performance_metrics, tags, active, created_at, updated_at
"""
WRITABLE_COLUMNS = (
    "name", "version", "task_types", "complexity_score", "base_cpu_requirement",
    "base_memory_requirement", "base_gpu_requirement", "storage_requirement", "model_size",
    "download_url", "runtime_driver", "protocol", "runtime_config", "keep_alive_seconds",
    "max_replicas", "performance_metrics", "tags", "active",
)
JSON_COLUMNS = frozenset({"runtime_config", "performance_metrics"})


def _values(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: Jsonb(value) if key in JSON_COLUMNS else value for key, value in fields.items()}


def insert_model(conn: psycopg.Connection, fields: dict[str, Any]) -> dict:
    columns = [column for column in WRITABLE_COLUMNS if column in fields]
    query = sql.SQL("INSERT INTO model_registry ({}) VALUES ({}) RETURNING {}").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(map(sql.Placeholder, columns)),
        sql.SQL(MODEL_COLUMNS))
    return conn.execute(query, _values(fields)).fetchone()


def get_model(conn: psycopg.Connection, model_id: UUID, *, for_update: bool = False) -> dict | None:
    lock = " FOR UPDATE" if for_update else ""
    return conn.execute(f"SELECT {MODEL_COLUMNS} FROM model_registry WHERE id = %s{lock}",
                        (model_id,)).fetchone()


def get_models(conn: psycopg.Connection, model_ids: list[UUID]) -> list[dict]:
    return conn.execute(f"SELECT {MODEL_COLUMNS} FROM model_registry WHERE id = ANY(%s)",
                        (model_ids,)).fetchall()


def update_model(conn: psycopg.Connection, model_id: UUID, changes: dict[str, Any]) -> dict:
    columns = [column for column in WRITABLE_COLUMNS if column in changes]
    query = sql.SQL("UPDATE model_registry SET {} WHERE id = {} RETURNING {}").format(
        sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder(c))
                           for c in columns),
        sql.Placeholder("_id"), sql.SQL(MODEL_COLUMNS))
    return conn.execute(query, {**_values(changes), "_id": model_id}).fetchone()


def delete_model(conn: psycopg.Connection, model_id: UUID) -> None:
    conn.execute("DELETE FROM model_registry WHERE id = %s", (model_id,))


LIST_FILTER = """
FROM model_registry
WHERE (%(task_type)s::text IS NULL OR task_types @> ARRAY[%(task_type)s::text])
  AND (%(tag)s::text IS NULL OR tags @> ARRAY[%(tag)s::text])
  AND (%(active)s::boolean IS NULL OR active = %(active)s::boolean)
  AND (%(name)s::text IS NULL OR name = %(name)s::text)
"""


def list_models(conn: psycopg.Connection, filters: dict[str, Any], limit: int,
                offset: int) -> list[dict]:
    return conn.execute(
        f"SELECT {MODEL_COLUMNS} {LIST_FILTER} ORDER BY name, version, id "
        "LIMIT %(limit)s OFFSET %(offset)s",
        {**filters, "limit": limit, "offset": offset}).fetchall()


def count_models(conn: psycopg.Connection, filters: dict[str, Any]) -> int:
    return conn.execute(f"SELECT count(*) AS n {LIST_FILTER}", filters).fetchone()["n"]


def model_history(conn: psycopg.Connection, model_id: UUID) -> dict:
    """Whether anything refers to the model, and how many of its runtimes are live."""
    return conn.execute("""
        SELECT EXISTS (SELECT 1 FROM performance_logs WHERE model_id = %(id)s)
            OR EXISTS (SELECT 1 FROM request_queue WHERE assigned_model_id = %(id)s)
            OR EXISTS (SELECT 1 FROM container_lifecycle WHERE model_id = %(id)s) AS has_history,
               (SELECT count(*) FROM container_lifecycle WHERE model_id = %(id)s
                  AND status IN ('starting', 'running', 'draining', 'stopping')) AS live_runtimes
    """, {"id": model_id}).fetchone()


# The eligibility rules of selection.py, as the first rule each model breaks (NULL: eligible).
# Shared by the query of the eligible models and the count of the others, so they cannot disagree.
INELIGIBILITY = """
    CASE WHEN NOT m.active THEN 'active'
         WHEN NOT m.runtime_driver = ANY(%(drivers)s::text[]) THEN 'runtime_driver'
         WHEN m.complexity_score < %(complexity)s THEN 'complexity'
         WHEN m.base_memory_requirement > %(max_memory_mb)s THEN 'max_memory_mb'
         WHEN NOT m.tags @> %(required_tags)s::text[] THEN 'required_tags'
         WHEN m.id = ANY(%(exclude_ids)s::uuid[])
           OR m.name || ':' || m.version = ANY(%(exclude_refs)s::text[]) THEN 'exclude'
    END
"""


def eligible_evidence(conn: psycopg.Connection, params: dict[str, Any]) -> list[tuple]:
    """Per eligible model: what scoring needs, as tuples in the order of EVIDENCE_COLUMNS."""
    with conn.cursor(row_factory=psycopg.rows.tuple_row) as cur:
        return cur.execute(f"""
            SELECT m.id, m.name, m.version, m.complexity_score, m.base_memory_requirement,
                   m.runtime_driver,
                   p.avg_latency_ms, p.p95_latency_ms, p.accuracy, p.success_rate,
                   p.validation_pass_rate, p.feedback_score, p.tokens_per_second, p.load_time_ms,
                   s.total_requests, s.success_rate, s.p95_processing_time,
                   s.avg_tokens_per_second, s.validated_requests, s.validation_pass_rate,
                   s.avg_feedback_score, s.avg_load_time,
                   r.warm, r.load_time_ms
            FROM model_registry m
            CROSS JOIN LATERAL jsonb_to_record(m.performance_metrics) AS p(
                avg_latency_ms float8, p95_latency_ms float8, accuracy float8, success_rate float8,
                validation_pass_rate float8, feedback_score float8, tokens_per_second float8,
                load_time_ms float8)
            LEFT JOIN model_performance_summary s ON s.model_id = m.id
            LEFT JOIN (
                SELECT model_id,
                       bool_or(status = 'running' AND health_status <> 'unhealthy') AS warm,
                       avg(load_time_ms)::float8 AS load_time_ms
                FROM container_lifecycle GROUP BY model_id
            ) r ON r.model_id = m.id
            WHERE m.task_types @> ARRAY[%(task_type)s::text]
              AND ({INELIGIBILITY}) IS NULL
        """, params).fetchall()


EVIDENCE_COLUMNS = (
    "id", "name", "version", "complexity_score", "base_memory_requirement", "runtime_driver",
    "prior_avg_latency_ms", "prior_p95_latency_ms", "prior_accuracy", "prior_success_rate",
    "prior_validation_pass_rate", "prior_feedback_score", "prior_tokens_per_second",
    "prior_load_time_ms",
    "total_requests", "success_rate", "p95_latency_ms", "tokens_per_second", "validated_requests",
    "validation_pass_rate", "feedback_score", "avg_load_time_ms",
    "warm", "runtime_load_time_ms",
)


def ineligible_counts(conn: psycopg.Connection, params: dict[str, Any]) -> list[dict]:
    """Models serving the task type that break a rule: per rule (and driver), a count and examples."""
    return conn.execute(f"""
        SELECT rule, driver, count(*) AS count,
               (array_agg(ref ORDER BY ref))[1:%(examples)s] AS models
        FROM (
            SELECT {INELIGIBILITY} AS rule, m.name || ':' || m.version AS ref,
                   CASE WHEN m.active AND NOT m.runtime_driver = ANY(%(drivers)s::text[])
                        THEN m.runtime_driver END AS driver
            FROM model_registry m
            WHERE m.task_types @> ARRAY[%(task_type)s::text]
        ) t
        WHERE rule IS NOT NULL
        GROUP BY rule, driver
        ORDER BY count DESC, rule, driver
    """, params).fetchall()


def count_all_models(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) AS n FROM model_registry").fetchone()["n"]
