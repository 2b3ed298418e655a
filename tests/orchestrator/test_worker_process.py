"""`python -m services.orchestrator.worker` as real processes: NOTIFY wake-ups, callbacks, and lease expiry.

The workers poll only every 300 s here (QUEUE_POLL_S), so a request that completes was picked up
because Postgres NOTIFYed the worker (or the reclaimer woke it), not because a poll came round.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest.mock import ANY

import psycopg
import pytest

from fake_model_server import FakeModelServer
from orchestrator_helpers import insert_model, wait_until
from services.common.db import connect
from services.orchestrator import create_app

ROOT = Path(__file__).resolve().parents[2]
REPLY = "Hello from the fake model."


class CallbackReceiver(ThreadingHTTPServer):
    """A tiny HTTP server that records the JSON bodies POSTed to it (what an n8n Wait node gets)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CallbackHandler)
        self.bodies: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/resume"


class _CallbackHandler(BaseHTTPRequestHandler):
    server: CallbackReceiver

    def do_POST(self) -> None:
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    server = CallbackReceiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join()
    server.server_close()


@pytest.fixture
def database(fresh_database_url: str) -> Iterator[psycopg.Connection]:
    with connect(fresh_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def client(fresh_database_url: str, settings):
    """The orchestrator app on the same database, to enqueue and read requests as a user would."""
    app = create_app({"TESTING": True, "DATABASE_URL": fresh_database_url, "API_TOKEN": "",
                      "RUNTIME_DRIVERS": ("external",), "RUNTIME_DIR": settings.runtime_dir,
                      "RECONCILE_ON_START": False})
    yield app.test_client()
    app.extensions["database"].close()


@pytest.fixture
def start_worker(fresh_database_url: str, tmp_path: Path) -> Iterator:
    """Start worker processes (`--workers N`); every one still running is stopped at the end."""
    started: list[subprocess.Popen] = []
    env = {**os.environ, "DATABASE_URL": fresh_database_url, "RUNTIME_DRIVERS": "external",
           "RUNTIME_DIR": str(tmp_path / "runtimes"), "QUEUE_LEASE_S": "2", "QUEUE_LEASE_RENEW_S": "0.5",
           "QUEUE_RECLAIM_INTERVAL_S": "0.5", "QUEUE_POLL_S": "300", "DISPATCHER_API_TOKEN": ""}

    def start(workers: int = 2) -> subprocess.Popen:
        log = open(tmp_path / f"worker-{len(started)}.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", "services.orchestrator.worker", "--workers", str(workers)],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        log.close()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def listening(database, process: subprocess.Popen) -> bool:
    """Whether the worker process's listener has run LISTEN (its backend is ours alone, on our database)."""
    return database.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
        " AND query = 'LISTEN request_queue' AND client_port IS NOT NULL").fetchone()["n"] > 0


def served_by(database, server: FakeModelServer) -> dict:
    return insert_model(database, name="fake-qa", task_types=["question-answering"],
                        runtime_config={"endpoint": server.url, "model_alias": "fake"})


def enqueue(client, **fields) -> str:
    response = client.post("/dispatch", json={"prompt": "What is 6 times 7?", "task_type": "question-answering",
                                              "max_tokens": 32, "async": True, **fields})
    assert response.status_code == 202
    return response.get_json()["request_id"]


def status(client, request_id: str) -> dict:
    return client.get(f"/requests/{request_id}").get_json()


def finished(client, request_ids: list[str]) -> list[dict] | None:
    rows = [status(client, request_id) for request_id in request_ids]
    return rows if all(row["status"] in ("completed", "failed") for row in rows) else None


def performance_rows(database) -> list[dict]:
    return database.execute(
        "SELECT request_id, attempt, success, error_class FROM performance_logs ORDER BY request_id, attempt"
    ).fetchall()


def test_workers_run_notified_requests_once_and_call_back(client, database, receiver, start_worker):
    with FakeModelServer(reply=REPLY) as fake:
        model = served_by(database, fake)
        worker = start_worker(workers=2)
        wait_until(lambda: listening(database, worker))

        with_callback = [enqueue(client, callback_url=receiver.url) for _ in range(3)]
        without = [enqueue(client, priority=200) for _ in range(3)]
        rows = wait_until(lambda: finished(client, with_callback + without))
        wait_until(lambda: len(receiver.bodies) >= 3)

    assert [(row["status"], row["mode"], row["attempts"], row["assigned_model_id"]) for row in rows] == [
        ("completed", "async", 1, str(model["id"]))] * 6
    for row in rows:
        assert row["result"] == {
            "request_id": row["id"], "status": "completed", "response": REPLY, "raw": REPLY, "valid": True,
            "output_format": "text", "finish_reason": "stop",
            "model": {"id": str(model["id"]), "name": "fake-qa", "version": "1"},
            "runtime_id": row["assigned_runtime_id"], "template": ANY, "timings": ANY, "tokens": ANY,
            "attempts": [ANY], "decision": ANY}
    # Each callback carries the stored result, once per request that asked for one.
    assert sorted(receiver.bodies, key=lambda body: body["request_id"]) == sorted(
        (row["result"] for row in rows[:3]), key=lambda result: result["request_id"])
    assert performance_rows(database) == sorted(
        ({"request_id": uuid.UUID(row["id"]), "attempt": 1, "success": True, "error_class": None} for row in rows),
        key=lambda r: r["request_id"])
    assert len([r for r in fake.requests if r["method"] == "POST"]) == 6

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0


def test_a_request_of_a_killed_worker_is_reclaimed_and_run_once_by_another(client, database, start_worker):
    # The first generation hangs (the worker running it dies meanwhile); the next one answers at once.
    with FakeModelServer(reply=REPLY, fault="slow", delay_ms=120_000, fault_count=1) as fake:
        served_by(database, fake)
        doomed = start_worker(workers=2)
        wait_until(lambda: listening(database, doomed))
        request_id = enqueue(client)
        wait_until(lambda: [r for r in fake.requests if r["method"] == "POST"])
        running = status(client, request_id)
        assert (running["status"], running["attempts"]) == ("processing", 1)

        doomed.kill()
        assert doomed.wait(timeout=30) == -signal.SIGKILL
        rescuer = start_worker(workers=2)
        row = wait_until(lambda: finished(client, [request_id]))[0]

    assert (row["status"], row["attempts"], row["result"]["response"]) == ("completed", 2, REPLY)
    # Run twice only in the sense that the dead worker's attempt never finished: one answer, one log row.
    assert performance_rows(database) == [
        {"request_id": uuid.UUID(request_id), "attempt": 1, "success": True, "error_class": None}]
    assert len([r for r in fake.requests if r["method"] == "POST"]) == 2
    # The dead worker's hold on the runtime was given back when its request was reclaimed.
    assert [row["active_requests"] for row in database.execute("SELECT active_requests FROM container_lifecycle")] == [0]
    rescuer.send_signal(signal.SIGTERM)
    assert rescuer.wait(timeout=30) == 0
