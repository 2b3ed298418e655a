"""Print how the optimizer's queries scale with performance_logs rows (a scratch database, dropped after).

Usage: python -m scripts.bench_optimizer [ROWS]   (default 200000; keep it short on a shared machine)
"""
from __future__ import annotations

import sys
import time
import uuid
from datetime import timedelta

import psycopg

from services.common.db import connect
from services.common.migrate import migrate
from services.optimizer import metrics, performance, rankings

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def timed(label: str, run) -> object:
    started = time.perf_counter()
    result = run()
    print(f"{label:<45} {(time.perf_counter() - started) * 1000:9.1f} ms")
    return result


def main(rows: int) -> None:
    name = f"bench_optimizer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)
    try:
        with connect(url, autocommit=True) as conn:
            migrate(conn, seed=True)
            # Spread over 60 days: half is past a 30-day retention.
            timed(f"insert {rows} rows", lambda: conn.execute("""
                INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success, error_class,
                    cpu_usage_percent, memory_used_mb, logged_at)
                SELECT m.id, m.task_types[1], (random() * 3000)::int, random() > 0.05,
                       'timeout', random() * 100, (random() * 4000)::int,
                       now() - random() * interval '60 days'
                FROM generate_series(1, %s) g
                JOIN LATERAL (SELECT id, task_types FROM model_registry ORDER BY id OFFSET g %% 10 LIMIT 1) m ON true
                """, (rows,)))
            conn.execute("ANALYZE performance_logs")
            for metric, aggregate in (("p95_processing_time_ms", "p95"), ("success_rate", "avg"),
                                      ("request_count", "count")):
                timed(f"metric {metric} (10 min, all)", lambda: metrics.measure(
                    conn, metric, aggregate, window_seconds=600, scope="all", scope_value=None))
            timed("refresh summary (CONCURRENTLY)", lambda: performance.refresh_summary(url, 600_000))
            timed("update_rankings (24 h)", lambda: rankings.update_rankings(conn, 86_400))
            deleted = timed("purge older than 30 days (batches of 5000)", lambda: performance.purge_old_performance(
                conn, timedelta(days=30), 5000))
            print(f"deleted {deleted} rows")
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
