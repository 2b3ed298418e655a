"""Benchmark model selection: 10,000 models, 1M performance rows, then the log table grown.

Prints p50/p99 of `select_models` in-process and of `POST /select` over HTTP (the registry under
granian), before and after growing performance_logs. Creates its own database and drops it.

Usage: python scripts/bench_select.py [--grow-to 3000000] [--iterations 400]
"""
from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import requests
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.config import Settings  # noqa: E402
from services.common.db import connect  # noqa: E402
from services.common.migrate import migrate  # noqa: E402
from services.registry.selection import NoCandidate, SelectionRequest, select_models  # noqa: E402

ADMIN_URL = os.environ.get("BENCH_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE = "dispatcher_bench_select"
MODELS = 10_000
LOG_ROWS = 1_000_000

MAKE_MODELS = """
INSERT INTO model_registry (name, version, task_types, complexity_score, base_cpu_requirement,
    base_memory_requirement, runtime_driver, protocol, runtime_config, performance_metrics, tags)
SELECT 'bench-' || i, 'v1',
       CASE WHEN i %% 2 = 0 THEN ARRAY[tt[1 + i %% 6]] ELSE ARRAY[tt[1 + i %% 6], tt[1 + (i + 1) %% 6]] END,
       1 + i %% 10, 1 + i %% 4, 256 * (1 + i %% 32),
       (ARRAY['docker', 'process', 'process', 'process', 'process', 'process', 'process',
              'process', 'process', 'external'])[1 + i %% 10],
       'openai',
       CASE i %% 10 WHEN 0 THEN '{"image": "ollama/ollama", "model_name": "m:1"}'::jsonb
                   WHEN 9 THEN '{"endpoint": "http://127.0.0.1:9/v1"}'::jsonb
                   ELSE '{"model_path": "/models/m.gguf"}'::jsonb END,
       jsonb_build_object('avg_latency_ms', 200 + (i * 37) %% 3000, 'accuracy', 0.3 + (i %% 70) / 100.0,
                          'tokens_per_second', 10 + i %% 90, 'load_time_ms', 500 + (i * 13) %% 5000),
       ARRAY['bench', 't' || i %% 20]
FROM generate_series(1, %(models)s) AS i,
     (SELECT ARRAY['text-generation', 'code-generation', 'question-answering', 'conversation',
                   'summarization', 'classification'] AS tt) AS t
"""

# One running runtime per 20 models (warm), and stopped ones whose load times count.
MAKE_RUNTIMES = """
INSERT INTO container_lifecycle (model_id, driver, status, health_status, allocated_cpu,
    allocated_memory, load_time_ms, stopped_at)
SELECT id, runtime_driver, CASE WHEN n % 4 = 0 THEN 'running' ELSE 'stopped' END, 'healthy',
       1, base_memory_requirement, 800 + n % 4000, CASE WHEN n % 4 = 0 THEN NULL ELSE now() END
FROM (SELECT id, runtime_driver, base_memory_requirement, row_number() OVER (ORDER BY name) AS n
      FROM model_registry) m
WHERE n % 5 = 0
"""

# Logs for nine models in ten (the rest are new), spread over the last 24 hours.
MAKE_LOGS = """
INSERT INTO performance_logs (model_id, task_type, processing_time_ms, tokens_per_second,
    load_time_ms, success, validation_passed, error_class, logged_at)
SELECT m.id, 'text-generation', 100 + (g * 31) %% 2000, 20 + g %% 80,
       CASE WHEN g %% 50 = 0 THEN 1000 + g %% 3000 END,
       g %% 17 <> 0, CASE WHEN g %% 5 = 0 THEN NULL ELSE g %% 7 <> 0 END,
       CASE WHEN g %% 17 = 0 THEN 'timeout' END,
       now() - make_interval(secs => (g %% 86000)::float8)
FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS g
JOIN (SELECT id, row_number() OVER (ORDER BY name) - 1 AS n FROM model_registry) m
  ON m.n = (g * 7919) %% (%(models)s * 9 / 10)
"""

TASK_TYPES = ("text-generation", "code-generation", "question-answering", "conversation",
              "summarization", "classification")


def requests_to_time() -> list[dict]:
    """A mix of realistic requests: each task type, three complexities, some with limits."""
    mix = []
    for task_type, complexity in itertools.product(TASK_TYPES, ("low", "medium", "high")):
        mix.append({"task_type": task_type, "complexity": complexity})
        mix.append({"task_type": task_type, "complexity": complexity, "requirements": {
            "max_latency_ms": 4000, "max_memory_mb": 6144, "prefer_warm": True,
            "weights": {"speed": 2, "accuracy": 1}}})
    return mix


def as_selection_request(body: dict) -> SelectionRequest:
    req = body.get("requirements", {})
    weights = req.get("weights")
    return SelectionRequest(
        task_type=body["task_type"], complexity={"low": 3, "medium": 6, "high": 9}[body["complexity"]],
        max_memory_mb=req.get("max_memory_mb"), max_latency_ms=req.get("max_latency_ms"),
        weights={k: weights.get(k, 0.0) for k in ("speed", "accuracy", "memory", "cost")}
        if weights else None, prefer_warm=req.get("prefer_warm", False))


def percentiles(samples_s: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples_s)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   (n={len(ms)})"


def time_in_process(url: str, iterations: int) -> str:
    settings = Settings(database_url=url)
    mix = [as_selection_request(body) for body in requests_to_time()]
    samples, sizes = [], []
    with connect(url, autocommit=True) as conn:
        for i in range(iterations + 20):
            request = mix[i % len(mix)]
            started = time.perf_counter()
            try:
                sizes.append(select_models(conn, request, settings).eligible_count)
            except NoCandidate:
                sizes.append(0)
            if i >= 20:
                samples.append(time.perf_counter() - started)
    return f"{percentiles(samples)}   eligible per request: median {statistics.median(sizes):.0f}, max {max(sizes)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_over_http(url: str, iterations: int) -> str:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "WARNING", "DISPATCHER_API_TOKEN": ""}
    server = subprocess.Popen(
        [sys.executable, "-m", "granian", "--interface", "wsgi", "--factory", "services.registry:create_app",
         "--workers", "1", "--blocking-threads", "4", "--host", "127.0.0.1", "--port", str(port)],
        cwd=Path(__file__).resolve().parents[1], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        mix = requests_to_time()
        samples = []
        with requests.Session() as session:
            for i in range(iterations + 20):
                started = time.perf_counter()
                response = session.post(f"{base}/select", json=mix[i % len(mix)])
                if response.status_code not in (200, 422):
                    raise RuntimeError(f"/select answered {response.status_code}: {response.text}")
                if i >= 20:
                    samples.append(time.perf_counter() - started)
        return percentiles(samples)
    finally:
        server.terminate()
        server.wait(timeout=10)


def wait_ready(base: str, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the registry did not become ready")


def add_logs(url: str, start: int, stop: int) -> None:
    started = time.perf_counter()
    with connect(url, autocommit=True) as conn:
        conn.execute(MAKE_LOGS, {"start": start, "stop": stop, "models": MODELS})
        inserted = time.perf_counter() - started
        conn.execute("REFRESH MATERIALIZED VIEW model_performance_summary")
        conn.execute("VACUUM ANALYZE")
    print(f"  performance_logs now {stop:,} rows: insert {inserted:.1f} s, "
          f"refresh + analyze {time.perf_counter() - started - inserted:.1f} s", flush=True)


def admin(statement: sql.Composable) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(statement)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Growing to 10M takes about 2.5 minutes on a shared 2-core machine (~15 us a row).
    parser.add_argument("--grow-to", type=int, default=10 * LOG_ROWS,
                        help="log rows after growing (default 10M; 3M for a quicker run)")
    parser.add_argument("--iterations", type=int, default=400)
    args = parser.parse_args()

    url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=DATABASE)
    admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
    admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    try:
        with connect(url, autocommit=True) as conn:
            migrate(conn)
            conn.execute(MAKE_MODELS, {"models": MODELS})
            conn.execute(MAKE_RUNTIMES)
        print(f"{MODELS:,} models", flush=True)
        add_logs(url, 1, LOG_ROWS)
        for label, stop in (("1M log rows", LOG_ROWS), (f"{args.grow_to / 1e6:g}M log rows", args.grow_to)):
            if stop > LOG_ROWS:
                add_logs(url, LOG_ROWS + 1, stop)
            print(f"{label}:")
            print(f"  select_models in-process  {time_in_process(url, args.iterations)}", flush=True)
            print(f"  POST /select over HTTP    {time_over_http(url, args.iterations)}", flush=True)
    finally:
        admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
