"""Helpers of the orchestrator tests: model rows and the fake server as a process driver server."""
from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from services.orchestrator.runtimes import process

FAKE_SERVER = Path(__file__).resolve().parents[1] / "fake_model_server.py"


def fake_server_command(spec: process.LaunchSpec) -> list[str]:
    """The fake model server as the process driver's server (runtime_config "server": "fake")."""
    args = [str(arg) for arg in spec.model["runtime_config"].get("fake_args", [])]
    return [sys.executable, str(FAKE_SERVER), "--port", str(spec.port), "--model",
            str(spec.model["runtime_config"].get("model_alias", spec.model["name"])), *args]


def insert_model(conn: psycopg.Connection, **fields) -> dict:
    """A model row with a unique name; `fields` override the defaults (a fake external endpoint)."""
    row = {"name": f"m-{uuid.uuid4().hex[:10]}", "version": "1", "task_types": ["text-generation"],
           "complexity_score": 3, "base_cpu_requirement": 1, "base_memory_requirement": 256,
           "runtime_driver": "external", "protocol": "openai",
           "runtime_config": {"endpoint": "http://127.0.0.1:9"}, "keep_alive_seconds": 300, "max_replicas": 1}
    row.update(fields)
    row["runtime_config"] = Jsonb(row["runtime_config"])
    columns = ", ".join(row)
    values = ", ".join(f"%({name})s" for name in row)
    return conn.execute(f"INSERT INTO model_registry ({columns}) VALUES ({values}) RETURNING *", row).fetchone()


def fake_process_model(conn: psycopg.Connection, **fields) -> dict:
    """A model served by the fake server as a real child process."""
    config = {"server": "fake", "model_alias": "fake", **fields.pop("runtime_config", {})}
    return insert_model(conn, runtime_driver="process", runtime_config=config, **fields)


def wait_until(condition, timeout_s: float = 30.0, interval_s: float = 0.02):
    """Poll until `condition()` is truthy and return it (a deadline, not a timed assert)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(interval_s)
    return value
