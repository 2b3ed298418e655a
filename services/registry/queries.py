"""SQL of the registry: the catalogue, and the facts and runtime state selection works from."""
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


# What may change between two selections: the catalogue, the measured figures, warm runtimes; and
# the version of the prompt templates, which the dispatch's attempts build their prompts from.
SELECTION_STATE = """
    SELECT (SELECT version FROM model_registry_version) AS catalogue_version,
           (SELECT version::text FROM prompt_templates_version) AS templates_version,
           (SELECT refreshed_at FROM model_performance_summary LIMIT 1) AS refreshed_at,
           ARRAY(SELECT DISTINCT model_id FROM container_lifecycle
                 WHERE status = 'running' AND health_status <> 'unhealthy' ORDER BY model_id)::text[]
               AS warm_model_ids
"""

SELECTION_STATE_COLUMNS = ("catalogue_version", "templates_version", "refreshed_at", "warm_model_ids")

# Over a row of SELECTION_STATE: whether it is the state given by `selection_state_params`.
SELECTION_STATE_UNCHANGED = """
    (catalogue_version, templates_version, refreshed_at, warm_model_ids) IS NOT DISTINCT FROM
    (%(state_catalogue_version)s::uuid, %(state_templates_version)s::text,
     %(state_refreshed_at)s::timestamptz, %(state_warm_model_ids)s::text[])
"""


def selection_state(conn: psycopg.Connection) -> dict:
    return conn.execute(SELECTION_STATE).fetchone()


def selection_state_params(state: dict) -> dict:
    """The parameters of SELECTION_STATE_UNCHANGED."""
    return {f"state_{key}": value for key, value in state.items()}


def selection_facts(conn: psycopg.Connection) -> list[dict]:
    """Every model with its priors and its measured 24-hour figures, ordered by name and version."""
    return conn.execute("""
        SELECT m.id, m.name, m.version, m.created_at, m.task_types, m.complexity_score,
               m.base_memory_requirement, m.runtime_driver, m.tags, m.active,
               p.avg_latency_ms AS prior_avg_latency_ms, p.p95_latency_ms AS prior_p95_latency_ms,
               p.accuracy AS prior_accuracy, p.success_rate AS prior_success_rate,
               p.validation_pass_rate AS prior_validation_pass_rate,
               p.feedback_score AS prior_feedback_score,
               p.tokens_per_second AS prior_tokens_per_second, p.load_time_ms AS prior_load_time_ms,
               coalesce(s.total_requests, 0) AS total_requests, s.success_rate,
               s.p95_processing_time AS p95_latency_ms,
               s.avg_tokens_per_second AS tokens_per_second,
               coalesce(s.validated_requests, 0) AS validated_requests, s.validation_pass_rate,
               s.avg_feedback_score AS feedback_score, coalesce(s.feedback_count, 0) AS feedback_count,
               s.avg_load_time AS load_time_ms
        FROM model_registry m
        CROSS JOIN LATERAL jsonb_to_record(m.performance_metrics) AS p(
            avg_latency_ms float8, p95_latency_ms float8, accuracy float8, success_rate float8,
            validation_pass_rate float8, feedback_score float8, tokens_per_second float8,
            load_time_ms float8)
        LEFT JOIN model_performance_summary s ON s.model_id = m.id
        ORDER BY m.name, m.version, m.id
    """).fetchall()
