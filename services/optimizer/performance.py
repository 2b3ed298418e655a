"""Performance data: logging attempts, the summary view and retention."""
from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

import psycopg

from services.common.db import connect
from services.optimizer import queries

logger = logging.getLogger(__name__)

# Any fixed number, the same in every process: one summary refresh at a time.
REFRESH_LOCK_KEY = 7_301_994_007


def log_performance(conn: psycopg.Connection, row: dict) -> dict:
    """Insert one performance_logs row (validated by PerformanceLogSchema) and return it."""
    return log_performance_batch(conn, [row])[0]


def log_performance_batch(conn: psycopg.Connection, rows: list[dict]) -> list[dict]:
    """Insert many rows in one statement: all of them or none."""
    return queries.insert_performance(conn, rows) if rows else []


def summary(conn: psycopg.Connection, *, model_id: str | None = None, task_type: str | None = None,
            limit: int = 100, offset: int = 0) -> list[dict]:
    """Rows of model_performance_summary, filtered by model and task type (any of a model's)."""
    return queries.performance_summary(conn, model_id=model_id and str(model_id), task_type=task_type,
                                       limit=limit, offset=offset)


def refresh_summary(conninfo: str, statement_timeout_ms: int) -> dict:
    """REFRESH the summary view CONCURRENTLY unless a refresh is already running.

    CONCURRENTLY cannot run in a transaction block, so this opens its own autocommit connection.
    """
    with connect(conninfo, autocommit=True, statement_timeout_ms=statement_timeout_ms) as conn:
        if not conn.execute("SELECT pg_try_advisory_lock(%s) AS got", (REFRESH_LOCK_KEY,)).fetchone()["got"]:
            return {"refreshed": False, "reason": "a refresh is already running", "duration_ms": None}
        try:
            started = time.perf_counter()
            conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY model_performance_summary")
            duration_ms = round((time.perf_counter() - started) * 1000, 1)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (REFRESH_LOCK_KEY,))
    logger.info("performance summary refreshed", extra={"duration_ms": duration_ms})
    return {"refreshed": True, "reason": None, "duration_ms": duration_ms}


def purge_old_performance(conn: psycopg.Connection, max_age: timedelta, batch_size: int = 5000) -> int:
    """Delete rows older than `max_age` in batches; return how many were deleted.

    On an autocommit connection each batch commits by itself, so locks stay short.
    """
    cutoff = datetime.now(timezone.utc) - max_age
    deleted = 0
    while True:
        batch = queries.delete_old_performance(conn, cutoff, batch_size)
        deleted += batch
        if batch < batch_size:
            return deleted
