"""End to end: the four services under granian, the real SmolLM2 behind the process driver.

POST /dispatch -> the orchestrator selects SmolLM2, starts its llama.cpp server, answers; the
performance row is there; the optimizer's refresh puts the request in its summary. Every process
started here (the services and the model server) is stopped at the end.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from service_processes import Processes, start_services, wait_until

from services.common.config import Settings
from services.common.db import connect
from services.orchestrator.runtimes import process

pytestmark = pytest.mark.real_model

@pytest.fixture
def stack(fresh_database_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The four services as granian processes on free ports; their base URLs by name."""
    runtime_dir = tmp_path / "runtimes"

    def env_for(urls: dict[str, str]) -> dict[str, str]:
        return {**os.environ, "DATABASE_URL": fresh_database_url, "RUNTIME_DRIVERS": "process,external",
                "RUNTIME_DIR": str(runtime_dir), "MODELS_DIR": str(tmp_path / "models"), "DISPATCHER_API_TOKEN": "",
                **{f"{name.upper()}_URL": url for name, url in urls.items()}}

    processes = Processes(logs=tmp_path)
    urls = None
    try:
        urls = start_services(processes, env_for, threads=4)
        yield urls
    finally:
        if urls:
            stop_runtimes(urls["orchestrator"], fresh_database_url, runtime_dir)
        processes.stop_all()


def stop_runtimes(orchestrator: str, database_url: str, runtime_dir: Path) -> None:
    """Stop every model server through the orchestrator; whatever is left, by its recorded pid."""
    with connect(database_url) as conn:
        ids = [row["id"] for row in conn.execute(
            "SELECT id FROM container_lifecycle WHERE status NOT IN ('stopped', 'error')")]
    for runtime_id in ids:
        try:
            requests.delete(f"{orchestrator}/runtimes/{runtime_id}", timeout=60)
        except requests.RequestException:
            pass
    settings = Settings(database_url=database_url, runtime_dir=str(runtime_dir))
    for pid_file in runtime_dir.glob("*.json"):
        record = json.loads(pid_file.read_text())
        ref = {"id": record["runtime_id"], "pid": record["pid"], "driver_state": {"start_time": record["start_time"]}}
        process.ProcessDriver(settings, record["scope"]).stop(ref)


def test_a_real_dispatch_is_answered_logged_and_summarised(stack, fresh_database_url):
    response = requests.post(f"{stack['orchestrator']}/dispatch", timeout=300, json={
        "prompt": "What is the capital of France?", "task_type": "question-answering", "complexity": "low",
        "max_tokens": 24, "temperature": 0, "seed": 1})

    assert response.status_code == 200, response.text
    answer = response.json()
    request_id = answer["request_id"]
    assert (answer["status"], answer["valid"], answer["output_format"]) == ("completed", True, "text")
    assert answer["model"]["name"] == "smollm2" and answer["response"].strip()
    assert answer["decision"]["chosen"] == "smollm2:135m-instruct-q4_1"
    assert 1 <= answer["tokens"]["output"] <= 24 and answer["finish_reason"] in ("stop", "length")
    assert [(a["model"], a["outcome"]) for a in answer["attempts"]] == [("smollm2:135m-instruct-q4_1", "ok")]

    with connect(fresh_database_url) as conn:
        # The answer is recorded just after it is sent: wait for the request's end.
        wait_until(lambda: conn.execute("SELECT status FROM request_queue WHERE id = %s",
                                        (request_id,)).fetchone()["status"] != "processing",
                   f"request {request_id} to end", timeout_s=10, interval_s=0.02)
        logged = conn.execute(
            "SELECT p.model_id, p.attempt, p.success, p.validation_passed, p.output_tokens, p.task_type,"
            " q.status FROM performance_logs p JOIN request_queue q ON q.id = p.request_id"
            " WHERE p.request_id = %s", (request_id,)).fetchall()
    assert logged == [{"model_id": uuid.UUID(answer["model"]["id"]), "attempt": 1, "success": True,
                       "validation_passed": True, "output_tokens": answer["tokens"]["output"],
                       "task_type": "question-answering", "status": "completed"}]

    refreshed = requests.post(f"{stack['optimizer']}/performance/refresh", timeout=60)
    assert (refreshed.status_code, refreshed.json()["refreshed"]) == (200, True)
    summary = requests.get(f"{stack['optimizer']}/performance/summary", timeout=30,
                           params={"model_id": answer["model"]["id"]}).json()["items"]
    assert [(row["name"], row["total_requests"], row["successful_requests"], row["validated_requests"])
            for row in summary] == [("smollm2", 1, 1, 1)]

    stopped = requests.delete(f"{stack['orchestrator']}/runtimes/{answer['runtime_id']}", timeout=60)
    assert (stopped.status_code, stopped.json()["status"]) == (200, "stopped")
