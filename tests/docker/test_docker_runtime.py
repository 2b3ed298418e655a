"""The docker driver against a real daemon, running SmolLM2 in the locally built llama.cpp image."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from docker.errors import NotFound

from services.orchestrator import create_app, lifecycle, queries
from services.orchestrator.protocols import Options, client_for
from services.orchestrator.runtimes import runtime_scope

pytestmark = pytest.mark.docker

OPTIONS = Options(max_tokens=8, temperature=0.0, seed=1)
MB = 1024 * 1024


def labels(settings, model: dict, runtime: dict) -> dict:
    return {"dispatcher.managed": "true", "dispatcher.scope": runtime_scope(settings),
            "dispatcher.model_id": str(model["id"]), "dispatcher.runtime_id": str(runtime["id"])}


def ours(docker_host) -> list[str]:
    return [c.id for c in docker_host.client.containers.list(all=True, filters={"label": "dispatcher.managed=true"})]


def assert_generates(model: dict, runtime: dict) -> None:
    generation = client_for(model, runtime["endpoint"]).generate("Say hello.", options=OPTIONS).as_dict()
    assert generation["text"].strip()
    assert 1 <= generation["output_tokens"] <= 8 and generation["input_tokens"] > 0
    assert generation["finish_reason"] in ("stop", "length")


def cgroup_limits(pid: int) -> dict | None:
    """The memory and CPU limits the kernel applies to a process, from its cgroup files (v1 or v2)."""
    paths = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") or [""]:
            paths[controller] = path
    if "memory" in paths and Path("/sys/fs/cgroup/memory").is_dir():  # cgroup v1
        memory, cpu = Path("/sys/fs/cgroup/memory" + paths["memory"]), Path("/sys/fs/cgroup/cpu" + paths["cpu"])
        return {"memory_bytes": int((memory / "memory.limit_in_bytes").read_text()),
                "cpu_quota_us": int((cpu / "cpu.cfs_quota_us").read_text()),
                "cpu_period_us": int((cpu / "cpu.cfs_period_us").read_text())}
    unified = Path("/sys/fs/cgroup" + paths.get("", "/nonexistent"))
    if (unified / "memory.max").is_file():  # cgroup v2
        quota, period = (unified / "cpu.max").read_text().split()
        return {"memory_bytes": int((unified / "memory.max").read_text()),
                "cpu_quota_us": int(quota), "cpu_period_us": int(period)}
    return None


def test_the_private_daemon_has_no_bridge_network(docker_host):
    assert sorted(network.name for network in docker_host.client.networks.list()) == ["host", "none"]


def test_ensure_runs_a_limited_labelled_container_that_generates_and_is_reaped_when_idle(
        docker_host, db, settings, register):
    model = register()

    runtime = lifecycle.ensure_runtime(db, model["id"], settings)

    assert (runtime["status"], runtime["health_status"]) == ("running", "healthy")
    container = docker_host.client.containers.get(runtime["container_id"])
    attrs = container.attrs
    assert attrs["Config"]["Labels"] == labels(settings, model, runtime)
    assert (attrs["Config"]["Image"], attrs["Config"]["User"], attrs["Name"]) == (
        docker_host.image, "10001", f"/dispatcher-{runtime['id']}")
    allocation = runtime["driver_state"]["allocation"]
    assert allocation["memory_mb"] >= 512 and allocation["parallel_slots"] == 2
    assert attrs["Config"]["Cmd"][-10:] == ["--host", "127.0.0.1", "--port", str(runtime["port"]),
                                            "--threads", str(allocation["threads"]), "--parallel", "2",
                                            "--ctx", "2048"]
    host_config = attrs["HostConfig"]
    assert (host_config["Memory"], host_config["NanoCpus"], host_config["NetworkMode"]) == (
        allocation["memory_mb"] * MB, int(allocation["cpu"] * 1e9), "host")
    assert runtime["endpoint"] == f"http://127.0.0.1:{runtime['port']}"
    assert_generates(model, runtime)

    with db.connection() as conn:
        conn.execute("UPDATE container_lifecycle SET last_activity = now() - interval '301 seconds' WHERE id = %s",
                     (runtime["id"],))
    actions = lifecycle.reap_idle(db, settings)

    assert [(a["runtime_id"], a["action"]) for a in actions] == [(runtime["id"], "stopped")]
    with pytest.raises(NotFound):
        docker_host.client.containers.get(runtime["container_id"])


def test_the_kernel_applies_the_limits(docker_host, db, settings, register):
    model = register(base_cpu_requirement=0.5, base_memory_requirement=384)
    runtime = lifecycle.ensure_runtime(db, model["id"], settings)
    allocation = runtime["driver_state"]["allocation"]
    pid = docker_host.client.containers.get(runtime["container_id"]).attrs["State"]["Pid"]

    limits = cgroup_limits(pid)

    if limits is None:
        lifecycle.stop_runtime(db, runtime["id"], settings)
        pytest.skip("this kernel exposes neither cgroup v1 nor v2 limit files")
    assert limits == {"memory_bytes": allocation["memory_mb"] * MB,
                      "cpu_quota_us": int(allocation["cpu"] * 100_000), "cpu_period_us": 100_000}
    assert 0 < allocation["cpu"] < 2  # a fraction of the host's cores: a real quota, not "unlimited" (-1)
    lifecycle.stop_runtime(db, runtime["id"], settings)


def test_a_killed_container_is_found_dead_by_the_health_check_and_restarted(docker_host, db, settings, register):
    model = register()
    runtime = lifecycle.ensure_runtime(db, model["id"], settings)
    container = docker_host.client.containers.get(runtime["container_id"])
    container.kill()
    container.wait()

    report = lifecycle.check_health(db, settings)

    assert report["actions"] == [{"model_id": model["id"], "runtime_id": runtime["id"], "action": "restarted",
                                  "detail": "the model server exited"}]
    with db.connection() as conn:
        restarted = queries.get_runtime(conn, runtime["id"])
    assert (restarted["status"], restarted["health_status"], restarted["restart_count"]) == ("running", "healthy", 1)
    assert restarted["container_id"] != runtime["container_id"]
    assert ours(docker_host) == [restarted["container_id"]]  # the killed one was removed
    assert_generates(model, restarted)
    lifecycle.stop_runtime(db, runtime["id"], settings)


def test_a_container_over_its_memory_limit_fails_the_start_and_says_so(docker_host, db, settings, register):
    model = register(base_memory_requirement=24)

    with pytest.raises(lifecycle.RuntimeUnavailable):
        lifecycle.ensure_runtime(db, model["id"], settings)

    with db.connection() as conn:
        [runtime] = queries.list_runtimes(conn, model_id=model["id"])
    assert runtime["status"] == "error"
    assert runtime["error_message"].startswith("the model server exited before it was ready\n--- log tail ---\n")
    assert runtime["error_message"].endswith(
        "[container exited with code 137, killed for going over its memory limit (OOMKilled)]\n")
    assert ours(docker_host) == []


@contextmanager
def orchestrator(settings) -> Iterator:
    """One orchestrator process's app (it reconciles at start) on the test's database and daemon."""
    app = create_app({"TESTING": True, "DATABASE_URL": settings.database_url, "API_TOKEN": "",
                      "RUNTIME_DIR": settings.runtime_dir, "RUNTIME_DRIVERS": ("docker",),
                      "DOCKER_URL": settings.docker_url, "HOST_CPU_CORES": 2.0, "HOST_MEMORY_MB": 4096})
    try:
        yield app.test_client()
    finally:
        app.extensions["database"].close()


def test_a_restarted_orchestrator_adopts_its_container_and_removes_orphans(docker_host, db, settings, register):
    model = register()
    with orchestrator(settings) as first:
        answer = first.post("/generate", json={"model": "smollm2-docker", "prompt": "Say hello.",
                                               "options": {"max_tokens": 8, "temperature": 0}}).get_json()
        assert answer["text"].strip() and answer["model_id"] == str(model["id"])
        runtime = first.get(f"/runtimes/{answer['runtime_id']}").get_json()
    # A container of ours that no row knows, e.g. from an orchestrator that died mid-start.
    orphan = docker_host.client.containers.run(
        docker_host.image, ["sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"], detach=True, network_mode="none",
        labels={**labels(settings, model, {"id": uuid.uuid4()})})

    with orchestrator(settings) as second:
        adopted = second.get(f"/runtimes/{runtime['id']}").get_json()
        assert (adopted["status"], adopted["container_id"]) == ("running", runtime["container_id"])
        assert second.post("/runtimes/ensure", json={"model_id": str(model["id"])}).get_json()["id"] == runtime["id"]
        listed = second.get(f"/runtimes?model_id={model['id']}").get_json()
        assert [row["id"] for row in listed["items"]] == [runtime["id"]]
        assert ours(docker_host) == [runtime["container_id"]]
        with pytest.raises(NotFound):
            orphan.reload()
        assert second.delete(f"/runtimes/{runtime['id']}").get_json()["status"] == "stopped"
    assert ours(docker_host) == []
