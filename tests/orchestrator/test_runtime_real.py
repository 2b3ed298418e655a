"""The real SmolLM2 server (llama.cpp through xllamacpp) run by the process driver: one server at a time, 1 thread."""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from orchestrator_helpers import insert_model
from services.orchestrator import create_app, lifecycle, queries
from services.orchestrator.protocols import Options, client_for
from services.orchestrator.runtimes import driver_for
from services.orchestrator.runtimes.process import process_start_time
from services.registry.selection import find_model

pytestmark = pytest.mark.real_model

OPTIONS = Options(max_tokens=8, temperature=0.0, seed=1)


@pytest.fixture
def smollm2(conn) -> dict:
    return find_model(conn, "smollm2")[0]


def generate(model: dict, runtime: dict) -> dict:
    return client_for(model, runtime["endpoint"]).generate("Say hello.", options=OPTIONS).as_dict()


def assert_real_answer(generation: dict) -> None:
    assert generation["text"].strip()
    assert 1 <= generation["output_tokens"] <= 8 and generation["input_tokens"] > 0
    assert generation["finish_reason"] in ("stop", "length")
    assert generation["timings"]["generation_ms"] > 0 and generation["timings"]["tokens_per_second"] > 0


def test_ensure_generate_then_reap_when_idle(db, conn, smollm2, settings):
    runtime = lifecycle.ensure_runtime(db, smollm2["id"], settings)

    assert (runtime["status"], runtime["health_status"]) == ("running", "healthy")
    # Two request slots: right-sized at 1.5 times the base (512 MB, 1 CPU).
    assert runtime["driver_state"]["allocation"] == {"cpu": 1.5, "memory_mb": 768, "gpu": 0.0, "threads": 1,
                                                     "parallel_slots": 2}
    assert (runtime["driver_state"]["limits"]["memory_mb"], runtime["driver_state"]["limits"]["cpu"]) in (
        (768, 1.5), (768, None))  # its cgroups, or RLIMIT_DATA (no CPU limit) where there are none
    assert_real_answer(generate(smollm2, runtime))
    assert "llama_server: serving smollm2 on 127.0.0.1" in Path(runtime["log_path"]).read_text()

    conn.execute("UPDATE container_lifecycle SET last_activity = now() - interval '301 seconds' WHERE id = %s",
                 (runtime["id"],))
    actions = lifecycle.reap_idle(db, settings)

    assert [(a["runtime_id"], a["action"]) for a in actions] == [(runtime["id"], "stopped")]
    assert process_start_time(runtime["pid"]) is None


def test_a_killed_server_is_restarted_by_the_health_check(db, conn, smollm2, settings):
    runtime = lifecycle.ensure_runtime(db, smollm2["id"], settings)
    os.kill(runtime["pid"], signal.SIGKILL)
    while driver_for("process", settings).is_running(runtime):
        pass

    report = lifecycle.check_health(db, settings)

    restarted = queries.get_runtime(conn, runtime["id"])
    assert report["actions"] == [{"model_id": smollm2["id"], "runtime_id": runtime["id"], "action": "restarted",
                                  "detail": "the model server exited"}]
    assert (restarted["status"], restarted["restart_count"]) == ("running", 1) and restarted["pid"] != runtime["pid"]
    assert_real_answer(generate(smollm2, restarted))
    lifecycle.stop_runtime(db, runtime["id"], settings)


def test_concurrent_ensure_starts_one_server(pooled_db, fresh_settings):
    with pooled_db.connection() as conn:
        model = find_model(conn, "smollm2")[0]
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        lifecycle.ensure_runtime(pooled_db, model["id"], fresh_settings)["id"])) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    with pooled_db.connection() as conn:
        runtimes = queries.list_runtimes(conn, model_id=model["id"])
    assert len(runtimes) == 1 and results == [runtimes[0]["id"]] * 4
    lifecycle.stop_runtime(pooled_db, runtimes[0]["id"], fresh_settings)


@contextmanager
def orchestrator(fresh_settings) -> Iterator:
    """One orchestrator process's app on the shared database (reconciling at start)."""
    app = create_app({"TESTING": True, "DATABASE_URL": fresh_settings.database_url,
                      "RUNTIME_DIR": fresh_settings.runtime_dir, "RUNTIME_DRIVERS": ("process",)})
    try:
        yield app.test_client()
    finally:
        app.extensions["database"].close()


def test_reconcile_after_an_orchestrator_restart(fresh_settings):
    with orchestrator(fresh_settings) as first:
        answer = first.post("/generate", json={"model": "smollm2", "prompt": "Say hello.",
                                               "options": {"max_tokens": 8, "temperature": 0}}).get_json()
        assert_real_answer(answer)
        runtime = first.get(f"/runtimes/{answer['runtime_id']}").get_json()

    with orchestrator(fresh_settings) as second:  # the server outlived the first orchestrator and is kept
        assert second.get(f"/runtimes/{runtime['id']}").get_json()["status"] == "running"
        again = second.post("/generate", json={"model": "smollm2:135m-instruct-q4_1", "prompt": "Hi",
                                               "options": {"max_tokens": 4}}).get_json()
        assert again["runtime_id"] == runtime["id"]
        os.kill(runtime["pid"], signal.SIGKILL)

    with orchestrator(fresh_settings) as third:  # the dead server's row no longer claims to run
        row = third.get(f"/runtimes/{runtime['id']}").get_json()
        assert (row["status"], row["error_message"]) == ("error", "its model server was not running at reconcile")
        replacement = third.post("/runtimes/ensure", json={"model_id": runtime["model_id"]}).get_json()
        assert replacement["id"] != runtime["id"] and replacement["status"] == "running"
        assert third.delete(f"/runtimes/{replacement['id']}").get_json()["status"] == "stopped"


def test_the_memory_limit_is_applied(db, conn, smollm2, settings):
    """64 MB cannot hold SmolLM2's 180 MB KV cache at 8192 tokens (llama.cpp clears it, so it is touched):
    its cgroup's OOM killer ends the server, or without cgroups RLIMIT_DATA fails the allocation."""
    starved = insert_model(conn, runtime_driver="process", protocol="openai", base_memory_requirement=64,
                           runtime_config={**smollm2["runtime_config"], "parallel": 1, "context_length": 8192})

    with pytest.raises(lifecycle.RuntimeUnavailable,
                       match="failed to start: the model server exited before it was ready"):
        lifecycle.ensure_runtime(db, starved["id"], settings)

    failed = queries.list_runtimes(conn, model_id=starved["id"])[0]
    assert failed["status"] == "error"
    if failed["driver_state"]["limits"]["mechanism"] == "rlimit":
        assert "GGML_ASSERT" in failed["error_message"] or "insufficient memory" in failed["error_message"]
    else:
        assert failed["error_message"].endswith(
            "[killed for going over its memory limit: 1 OOM kill(s) in its cgroup]\n")


def test_gemma3_is_assembled_from_its_parts_once_then_served(db, conn, settings):
    gemma3 = find_model(conn, "gemma3")[0]
    assembled = Path(settings.models_dir) / gemma3["runtime_config"]["model_file"]
    assert not assembled.exists()

    runtime = lifecycle.ensure_runtime(db, gemma3["id"], settings)

    assert (runtime["status"], runtime["health_status"]) == ("running", "healthy")
    assert assembled.stat().st_size > 200_000_000         # the 253 MB GGUF, written into MODELS_DIR
    assert_real_answer(client_for(gemma3, runtime["endpoint"]).generate("The capital of France is",
                                                                         options=OPTIONS).as_dict())
    lifecycle.stop_runtime(db, runtime["id"], settings)
    assert process_start_time(runtime["pid"]) is None
