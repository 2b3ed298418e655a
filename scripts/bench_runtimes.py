"""Benchmark the orchestrator's runtime overhead with the real SmolLM2 server (1 thread).

Cold: time from `ensure_runtime` to a ready runtime, minus the server's own time to ready. Per run, the
server's own time is from its launch to the moment it printed that it serves (its log line carries the
time); as a cross-check, the same launcher is also started directly (ready at that same line).
Warm: latency of `ensure_runtime` on a running model, and of a lease (acquire + release, what
dispatch wraps each generation in).
Goals: cold overhead <= 50 ms, warm ensure p99 <= 5 ms.

Usage: python scripts/bench_runtimes.py [--cold-runs 3] [--warm-calls 1000]
Uses a throw-away database (created, migrated, seeded, dropped) on DATABASE_URL's server.
"""
from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
import requests
from psycopg import conninfo, sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.config import PROJECT_ROOT, Settings  # noqa: E402
from services.common.db import PooledDatabase, connect  # noqa: E402
from services.common.migrate import migrate  # noqa: E402
from services.orchestrator import lifecycle  # noqa: E402
from services.orchestrator.runtimes.base import free_port  # noqa: E402
from services.orchestrator.runtimes.process import LaunchSpec, llama_cpp_command  # noqa: E402
from services.registry.selection import find_model  # noqa: E402

READY_LINE = re.compile(r"llama_server: serving .* \(ready at ([0-9.]+)\)")


def server_own_ready_ms(model: dict, settings: Settings) -> float:
    """Start the launcher directly; it is ready when it prints its serving line (read blocking, no polling)."""
    port = free_port()
    allocation = lifecycle.allocation_for(model, 1.0, settings)
    command = llama_cpp_command(LaunchSpec(model, allocation, port, settings.models_dir))
    started = time.perf_counter()
    server = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True, text=True)
    try:
        for line in server.stdout:
            if "llama_server: serving" in line:  # llama.cpp's logger may share the line
                ready_ms = (time.perf_counter() - started) * 1000
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code != 200:
                    raise SystemExit("the server printed its serving line before /health answered 200")
                return ready_ms
        raise SystemExit("the model server exited before it was ready")
    finally:
        server.terminate()
        server.wait(timeout=10)
        server.stdout.close()


def cold_ensure(db: PooledDatabase, model: dict, settings: Settings) -> tuple[float, float]:
    """Time a cold ensure, and the server's own part of it: from its launch (started_at, recorded just
    after the spawn) to the moment it printed that it serves (its own clock, same host)."""
    started = time.perf_counter()
    runtime = lifecycle.ensure_runtime(db, model["id"], settings)
    elapsed = (time.perf_counter() - started) * 1000
    lifecycle.stop_runtime(db, runtime["id"], settings)
    match = READY_LINE.search(Path(runtime["log_path"]).read_text())
    server_ms = (float(match.group(1)) - runtime["started_at"].timestamp()) * 1000
    return elapsed, server_ms


def _list(samples: list[float]) -> str:
    return f"{', '.join(f'{v:.0f}' for v in samples)} ms (median {statistics.median(samples):.1f})"


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"p50 {pick(0.50):.2f} ms, p99 {pick(0.99):.2f} ms, max {ordered[-1]:.2f} ms (n={len(ordered)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--warm-calls", type=int, default=1000)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally blocks: stop servers, drop the db

    base = Settings.from_env()
    name = f"dispatcher_bench_{uuid.uuid4().hex[:8]}"
    admin_url = conninfo.make_conninfo(base.database_url, dbname="postgres")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    database_url = conninfo.make_conninfo(base.database_url, dbname=name)
    run_dir = tempfile.mkdtemp(prefix="bench-runtimes-")
    settings = replace(base, database_url=database_url, runtime_dir=run_dir, runtime_drivers=("process",))
    db = PooledDatabase(database_url, min_size=2, max_size=4, name="bench-runtimes")
    try:
        with connect(database_url) as conn:
            migrate(conn, seed=True)
        db.pool.open(wait=True)
        with db.connection() as conn:
            model = find_model(conn, "smollm2")[0]

        direct, ensured, overheads = [], [], []
        for _ in range(args.cold_runs):  # interleaved, so drift on a shared machine hits both alike
            direct.append(server_own_ready_ms(model, settings))
            elapsed, server_ms = cold_ensure(db, model, settings)
            ensured.append(elapsed)
            overheads.append(elapsed - server_ms)
        print(f"server started directly, own time to ready: {_list(direct)}")
        print(f"cold ensure to ready:                       {_list(ensured)}")
        print(f"cold overhead (per run: ensure - that server's own time to ready): {_list(overheads)}"
              "   (goal <= 50 ms)")
        print(f"cold overhead (median ensure - median direct start): "
              f"{statistics.median(ensured) - statistics.median(direct):.1f} ms (noisy on a shared machine)")

        runtime = lifecycle.ensure_runtime(db, model["id"], settings)
        warm = []
        for _ in range(args.warm_calls):
            started = time.perf_counter()
            lifecycle.ensure_runtime(db, model["id"], settings)
            warm.append((time.perf_counter() - started) * 1000)
        print(f"warm ensure:  {percentiles(warm)}   (goal p99 <= 5 ms)")
        leases = []
        for _ in range(args.warm_calls):
            started = time.perf_counter()
            with lifecycle.leased_runtime(db, model["id"], settings):
                pass
            leases.append((time.perf_counter() - started) * 1000)
        print(f"warm lease (acquire + release): {percentiles(leases)}")
        lifecycle.stop_runtime(db, runtime["id"], settings)
    finally:
        db.close()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
