"""The process driver on this host's own cgroups, with the fake model server as a real child process."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator_helpers import fake_process_model
from services.orchestrator import lifecycle, queries
from services.orchestrator.lifecycle import RuntimeUnavailable
from services.orchestrator.runtimes import cgroups, driver_for
from services.orchestrator.runtimes.cgroups import CgroupsUnusable, Placement
from services.orchestrator.runtimes.process import process_start_time

MB = 1024 * 1024


@pytest.fixture
def placement() -> Placement:
    try:
        return cgroups.find_placement()
    except CgroupsUnusable as exc:
        pytest.skip(f"this host gives this process no writable cgroup: {exc}")


def cgroup_paths(pid: int) -> dict[str, str]:
    """The process's cgroup path per controller ("" for cgroup v2), from /proc (proc(7))."""
    paths = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""] if hierarchy == "0" else []:
            paths[name] = path
    return paths


def kernel_limits(memory_dir: Path, cpu_dir: Path) -> dict:
    """The memory limit and CPU quota the kernel applies in these cgroups (v1 or v2 files)."""
    if (memory_dir / "memory.max").exists():
        quota, period = (cpu_dir / "cpu.max").read_text().split()
        return {"memory_bytes": int((memory_dir / "memory.max").read_text()),
                "cpu_quota_us": int(quota), "cpu_period_us": int(period)}
    limits = {"memory_bytes": int((memory_dir / "memory.limit_in_bytes").read_text()),
              "cpu_quota_us": int((cpu_dir / "cpu.cfs_quota_us").read_text()),
              "cpu_period_us": int((cpu_dir / "cpu.cfs_period_us").read_text())}
    if (memory_dir / "memory.memsw.limit_in_bytes").exists():
        limits["memory_and_swap_bytes"] = int((memory_dir / "memory.memsw.limit_in_bytes").read_text())
    return limits


def runtime_directories(placement: Placement, runtime_id) -> list[Path]:
    return [parent / f"dispatcher-{runtime_id}" for parent in placement.parents]


def test_the_server_runs_in_its_own_cgroups_limited_to_its_allocation(db, conn, settings, placement):
    model = fake_process_model(conn, base_cpu_requirement=0.5, base_memory_requirement=320)

    runtime = lifecycle.ensure_runtime(db, model["id"], settings)

    directories = runtime_directories(placement, runtime["id"])
    assert runtime["driver_state"]["limits"] == {"mechanism": placement.mechanism, "memory_mb": 320, "cpu": 0.5,
                                                 "cgroups": [str(directory) for directory in directories]}
    ours, server = cgroup_paths(os.getpid()), cgroup_paths(runtime["pid"])
    for controller in ("memory", "cpu") if placement.version == 1 else ("",):
        assert server[controller] == f"{ours[controller].rstrip('/')}/dispatcher-{runtime['id']}"
        assert str(directories[0 if controller in ("memory", "") else -1]).endswith(server[controller])
    limits = kernel_limits(directories[0], directories[-1])
    assert limits["memory_bytes"] == limits.get("memory_and_swap_bytes", 320 * MB) == 320 * MB
    assert limits["cpu_quota_us"] == limits["cpu_period_us"] // 2

    lifecycle.stop_runtime(db, runtime["id"], settings)

    assert [directory.exists() for directory in directories] == [False] * len(directories)


def test_a_server_over_its_memory_limit_is_killed_and_the_error_says_so(db, conn, settings, placement):
    model = fake_process_model(conn, base_memory_requirement=64, runtime_config={"fake_args": ["--allocate-mb", "256"]})

    with pytest.raises(RuntimeUnavailable, match="the model server exited before it was ready"):
        lifecycle.ensure_runtime(db, model["id"], settings)

    failed = queries.list_runtimes(conn, model_id=model["id"])[0]
    assert failed["error_message"].startswith("the model server exited before it was ready\n--- log tail ---\n")
    assert failed["error_message"].endswith("\n[killed for going over its memory limit: 1 OOM kill(s) in its cgroup]\n")
    assert [directory.exists() for directory in runtime_directories(placement, failed["id"])] == [False] * len(
        placement.parents)


def test_stop_ends_what_the_server_left_in_its_cgroup(db, conn, settings, placement):
    runtime = lifecycle.ensure_runtime(db, fake_process_model(conn)["id"], settings)
    directories = runtime_directories(placement, runtime["id"])
    # a process the server started in a session of its own: the process group signal misses it
    escaped = subprocess.Popen(["sleep", "60"], start_new_session=True)
    for directory in directories:
        (directory / "cgroup.procs").write_text(str(escaped.pid))

    lifecycle.stop_runtime(db, runtime["id"], settings)

    assert escaped.wait(timeout=5) == -signal.SIGKILL
    assert [directory.exists() for directory in directories] == [False] * len(directories)


def test_reconcile_removes_runtime_cgroups_nobody_is_in_any_more(db, conn, settings, placement):
    settings = replace(settings, runtime_drivers=("process", "external"))
    running = lifecycle.ensure_runtime(db, fake_process_model(conn)["id"], settings)
    left_behind, being_started = (runtime_directories(placement, uuid.uuid4()) for _ in range(2))
    an_hour_ago = time.time() - 3600
    for directory in left_behind + being_started:
        directory.mkdir()
    for directory in left_behind:
        os.utime(directory, (an_hour_ago, an_hour_ago))

    try:
        report = lifecycle.reconcile(db, settings)

        assert report == {"skipped": False, "actions": []}
        assert [directory.exists() for directory in left_behind] == [False] * len(left_behind)
        assert [directory.exists() for directory in being_started] == [True] * len(being_started)
        assert all(Path(path).is_dir() for path in running["driver_state"]["limits"]["cgroups"])
        assert queries.get_runtime(conn, running["id"])["status"] == "running"
    finally:
        cgroups.remove(being_started + left_behind)


def test_stopping_an_earlier_start_leaves_the_restarted_server_and_its_cgroups(db, conn, settings, placement):
    runtime = lifecycle.ensure_runtime(db, fake_process_model(conn)["id"], settings)
    # e.g. the pid file a reconcile read just before a health check restarted the runtime
    earlier = {**runtime, "driver_state": {**runtime["driver_state"],
                                           "start_time": runtime["driver_state"]["start_time"] - 1}}

    driver_for("process", settings).stop(earlier)

    assert process_start_time(runtime["pid"]) == runtime["driver_state"]["start_time"]
    assert [directory.is_dir() for directory in runtime_directories(placement, runtime["id"])] == [True] * len(
        placement.parents)
    assert (Path(settings.runtime_dir) / f"{runtime['id']}.json").exists()
