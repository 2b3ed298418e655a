"""Runtime cgroups against fake cgroup filesystems (v1, v2, unusable), and the process driver's fallback."""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from orchestrator_helpers import fake_server_command
from services.orchestrator.runtimes import cgroups, process
from services.orchestrator.runtimes.cgroups import CgroupsUnusable, Placement

UNLIMITED = "9223372036854771712"
# This host's layout: cgroup v1 controllers, and a cgroup v2 mount that holds none of them.
HYBRID_MOUNTINFO = """\
25 1 0:23 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = "9:name=systemd:/\n4:memory:/process_api/7ac5\n2:cpu,cpuacct:/\n0::/\n"
UNIFIED_MOUNTINFO = ("30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 "
                     "- cgroup2 cgroup2 rw,nsdelegate\n")


def fake_host(root: Path, proc_cgroup: str, mountinfo: str, files: dict[str, str]) -> Path:
    """/proc/self and cgroup directories under `root`; `files` maps paths under root to contents."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(proc_cgroup)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(content)
    return root


def hybrid_host(root: Path, *, swap_accounting: bool = True) -> Path:
    return fake_host(root, HYBRID_CGROUP, HYBRID_MOUNTINFO, {
        "sys/fs/cgroup/memory/process_api/7ac5/cgroup.procs": "4242\n",
        "sys/fs/cgroup/cpu,cpuacct/cgroup.procs": "1\n",
        "sys/fs/cgroup/unified/cgroup.controllers": "hugetlb\n",
        "sys/fs/cgroup/unified/cgroup.subtree_control": "\n",
        **({"sys/fs/cgroup/memory/process_api/7ac5/memory.memsw.limit_in_bytes": UNLIMITED}
           if swap_accounting else {})})


def unified_host(root: Path, *, subtree_control: str) -> Path:
    return fake_host(root, "0::/dispatcher.service\n", UNIFIED_MOUNTINFO, {
        "sys/fs/cgroup/dispatcher.service/cgroup.controllers": "cpuset cpu io memory pids\n",
        "sys/fs/cgroup/dispatcher.service/cgroup.subtree_control": subtree_control})


def kernel_makes(directory: Path, files: dict[str, str]) -> None:
    """What the kernel puts in a cgroup directory when it is made (mkdir of a plain directory cannot)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in {"cgroup.procs": "", **files}.items():
        (directory / name).write_text(content)


def v1_runtime_cgroup(placement: Placement, runtime_id: str) -> list[Path]:
    memory, cpu = (parent / f"dispatcher-{runtime_id}" for parent in (placement.memory_parent, placement.cpu_parent))
    swap_accounting = (placement.memory_parent / "memory.memsw.limit_in_bytes").exists()
    kernel_makes(memory, {"memory.limit_in_bytes": UNLIMITED, "memory.oom_control": "oom_kill 0\n",
                          **({"memory.memsw.limit_in_bytes": UNLIMITED} if swap_accounting else {})})
    kernel_makes(cpu, {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n"})
    return [memory, cpu]


def test_v1_controllers_beside_an_empty_v2_mount_give_v1_cgroups_under_our_own(tmp_path):
    root = hybrid_host(tmp_path)

    placement = cgroups.find_placement(root)

    assert placement == Placement(1, root / "sys/fs/cgroup/memory/process_api/7ac5", root / "sys/fs/cgroup/cpu,cpuacct")
    assert placement.mechanism == "cgroup-v1"


def test_v1_limits_are_the_allocation(tmp_path):
    placement = cgroups.find_placement(hybrid_host(tmp_path))
    memory, cpu = v1_runtime_cgroup(placement, "r1")

    assert cgroups.create_runtime_cgroups(placement, "r1", memory_mb=768, cpu=1.5) == [memory, cpu]

    assert {name: (memory / name).read_text() for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")} == {
        "memory.limit_in_bytes": str(768 * 1024 * 1024), "memory.memsw.limit_in_bytes": str(768 * 1024 * 1024)}
    assert (cpu / "cpu.cfs_quota_us").read_text() == "150000"


def test_v1_without_swap_accounting_writes_no_memsw_limit(tmp_path):
    placement = cgroups.find_placement(hybrid_host(tmp_path, swap_accounting=False))
    memory, _ = v1_runtime_cgroup(placement, "r1")

    cgroups.create_runtime_cgroups(placement, "r1", memory_mb=256, cpu=0.25)

    assert sorted(path.name for path in memory.iterdir()) == [
        "cgroup.procs", "memory.limit_in_bytes", "memory.oom_control"]
    assert (placement.cpu_parent / "dispatcher-r1/cpu.cfs_quota_us").read_text() == "25000"


def test_v1_in_a_container_whose_mounts_show_only_its_own_cgroup(tmp_path):
    root = fake_host(tmp_path, "5:memory:/docker/c0ffee\n3:cpu:/docker/c0ffee\n", (
        "40 31 0:32 /docker/c0ffee /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "41 31 0:33 /docker/c0ffee /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"), {
        "sys/fs/cgroup/memory/cgroup.procs": "1\n", "sys/fs/cgroup/cpu/cgroup.procs": "1\n"})

    assert cgroups.find_placement(root) == Placement(1, root / "sys/fs/cgroup/memory", root / "sys/fs/cgroup/cpu")


def test_v2_hands_memory_and_cpu_down_and_limits_the_runtime(tmp_path):
    root = unified_host(tmp_path, subtree_control="pids\n")
    ours = root / "sys/fs/cgroup/dispatcher.service"

    placement = cgroups.find_placement(root)
    kernel_makes(ours / "dispatcher-r2", {"memory.max": "max\n", "memory.swap.max": "max\n", "cpu.max": "max 100000\n"})
    directories = cgroups.create_runtime_cgroups(placement, "r2", memory_mb=512, cpu=2.0)

    assert placement == Placement(2, ours, ours) and placement.mechanism == "cgroup-v2"
    assert (ours / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert directories == [ours / "dispatcher-r2"]
    assert {name: (directories[0] / name).read_text() for name in ("memory.max", "memory.swap.max", "cpu.max")} == {
        "memory.max": str(512 * 1024 * 1024), "memory.swap.max": "0", "cpu.max": "200000 100000"}


def test_v2_already_handing_the_controllers_down_is_left_as_it_is(tmp_path):
    root = unified_host(tmp_path, subtree_control="cpu memory pids\n")

    assert cgroups.find_placement(root).version == 2
    assert (root / "sys/fs/cgroup/dispatcher.service/cgroup.subtree_control").read_text() == "cpu memory pids\n"


@pytest.mark.parametrize(("proc_cgroup", "mountinfo", "files", "reason"), [
    pytest.param("0::/user.slice\n", UNIFIED_MOUNTINFO,
                 {"sys/fs/cgroup/user.slice/cgroup.controllers": "cpu io pids\n"},
                 "cgroup v2 at {root}/sys/fs/cgroup/user.slice offers no memory controller; "
                 "no cgroup v1 cpu hierarchy holds this process", id="v2-without-memory"),
    pytest.param(HYBRID_CGROUP, HYBRID_MOUNTINFO.replace("cgroup/memory rw", "cgroup/memory ro"),
                 {"sys/fs/cgroup/memory/process_api/7ac5/cgroup.procs": "",
                  "sys/fs/cgroup/cpu,cpuacct/cgroup.procs": "", "sys/fs/cgroup/unified/cgroup.controllers": ""},
                 "cgroup v2 at {root}/sys/fs/cgroup/unified offers no cpu or memory controller; "
                 "the cgroup v1 memory hierarchy at {root}/sys/fs/cgroup/memory is mounted read-only",
                 id="v1-read-only"),
    pytest.param("4:memory:/\n", "", {}, "no cgroup v2 hierarchy holds this process; "
                 "no cgroup v1 cpu hierarchy holds this process", id="nothing-mounted"),
])
def test_an_unusable_host_says_why(tmp_path, proc_cgroup, mountinfo, files, reason):
    root = fake_host(tmp_path, proc_cgroup, mountinfo, files)

    with pytest.raises(CgroupsUnusable) as raised:
        cgroups.find_placement(root)
    assert str(raised.value) == reason.format(root=root)


def test_a_host_without_proc_cannot_have_cgroups(tmp_path):
    with pytest.raises(CgroupsUnusable, match=r"^cannot read this process's cgroups: \[Errno 2\]"):
        cgroups.find_placement(tmp_path)


def test_v2_that_will_not_hand_controllers_down_says_why(tmp_path, monkeypatch):
    root = unified_host(tmp_path, subtree_control="")
    write = cgroups._write

    def kernel_write(path: Path, value: object) -> None:
        if path.name == "cgroup.subtree_control":  # what the kernel answers for a cgroup with processes
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        write(path, value)
    monkeypatch.setattr(cgroups, "_write", kernel_write)

    with pytest.raises(CgroupsUnusable) as raised:
        cgroups.find_placement(root)
    assert str(raised.value) == (
        f"cgroup v2 at {root}/sys/fs/cgroup/dispatcher.service cannot hand cpu and memory down to child cgroups "
        "(Device or resource busy; the kernel refuses while the cgroup has processes of its own); "
        "no cgroup v1 cpu hierarchy holds this process")


def test_a_failed_setup_removes_the_cgroups_it_made_and_says_why(tmp_path):
    placement = cgroups.find_placement(hybrid_host(tmp_path))
    (placement.memory_parent / "dispatcher-r3/memory.limit_in_bytes").mkdir(parents=True)  # cannot be written

    with pytest.raises(CgroupsUnusable, match=r"^cannot set up cgroup dispatcher-r3: \[Errno 21\] Is a directory"):
        cgroups.create_runtime_cgroups(placement, "r3", memory_mb=256, cpu=1.0)
    assert not (placement.cpu_parent / "dispatcher-r3").exists()


def test_the_server_enters_its_cgroups_before_it_execs(tmp_path):
    memory, cpu = tmp_path / "memory/dispatcher-r", tmp_path / "cpu/dispatcher-r"
    for directory in (memory, cpu):
        kernel_makes(directory, {})
    out = tmp_path / "out"

    command = cgroups.enter_and_exec([memory, cpu], ["/bin/sh", "-c", 'echo "$$ $1" > "$0"', str(out), "a -- b"])
    child = subprocess.run(command, check=True)

    pid, arg = out.read_text().split(" ", 1)
    assert child.returncode == 0 and arg == "a -- b\n"
    assert (memory / "cgroup.procs").read_text() == (cpu / "cgroup.procs").read_text() == f"{pid}\n"


def test_a_cgroup_it_cannot_enter_stops_the_server_before_it_runs(tmp_path):
    out = tmp_path / "out"
    command = cgroups.enter_and_exec([tmp_path / "gone"], ["/bin/sh", "-c", 'touch "$0"', str(out)])
    child = subprocess.run(command, capture_output=True, text=True, check=False)

    assert child.returncode == 125 and "dispatcher-enter-cgroups" in child.stderr
    assert not out.exists()


def test_recorded_paths_are_trusted_only_when_they_name_the_runtime(tmp_path):
    assert cgroups.recorded_directories("r1", ["/sys/fs/cgroup/memory/dispatcher-r1", "/sys/fs/cgroup/memory",
                                               "/tmp/dispatcher-r2", "relative/dispatcher-r1"]) == [
        Path("/sys/fs/cgroup/memory/dispatcher-r1")]
    with pytest.raises(ValueError, match="cannot name a cgroup"):
        cgroups.cgroup_name("../r1")


def test_oom_kills_are_counted_from_v1_and_v2_files(tmp_path):
    kernel_makes(tmp_path / "v1", {"memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"})
    kernel_makes(tmp_path / "v2", {"memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n"})

    assert cgroups.oom_kills([tmp_path / "v1", tmp_path / "v2", tmp_path / "gone"]) == 3


def test_stale_cgroups_are_old_and_empty(tmp_path):
    placement = cgroups.find_placement(hybrid_host(tmp_path))
    old = time.time() - 3600
    empty_old, busy_old, empty_young = (placement.cpu_parent / f"dispatcher-{name}" for name in ("a", "b", "c"))
    for directory in (empty_old, busy_old, empty_young):
        kernel_makes(directory, {})
    (busy_old / "cgroup.procs").write_text("4242\n")
    (empty_old / "cgroup.procs").unlink()  # a real cgroup directory is removed with its files in it
    for directory in (empty_old, busy_old):
        os.utime(directory, (old, old))

    assert cgroups.remove_stale(placement) == [empty_old]
    assert sorted(path.name for path in placement.cpu_parent.glob("dispatcher-*")) == ["dispatcher-b", "dispatcher-c"]


# The process driver where cgroups are unusable: RLIMIT_DATA, said once.
def recorded_spec(specs: list):
    def command(spec: process.LaunchSpec) -> list[str]:
        specs.append(spec)
        return fake_server_command(spec)
    return command


def test_without_cgroups_the_driver_falls_back_to_rlimit_and_warns_once(tmp_path, settings, monkeypatch, caplog):
    specs: list[process.LaunchSpec] = []
    monkeypatch.setitem(process.SERVER_COMMANDS, "recorded", recorded_spec(specs))
    root = fake_host(tmp_path / "host", "0::/\n", "", {})
    driver = process.ProcessDriver(settings, "scope", cgroup_root=root)
    model = {"id": uuid.uuid4(), "name": "fake", "runtime_config": {"server": "recorded"}}
    allocation = {"cpu": 1.0, "memory_mb": 256, "gpu": 0.0, "threads": 1, "parallel_slots": 1}
    runtimes = [{"id": uuid.uuid4()} for _ in range(2)]

    with caplog.at_level(logging.WARNING, logger=process.__name__):
        launched = [driver.start(runtime, model, allocation) for runtime in runtimes]
    for runtime, started in zip(runtimes, launched):
        driver.stop({**runtime, "pid": started.pid, "driver_state": started.driver_state})

    reason = "no cgroup v2 hierarchy holds this process; no cgroup v1 cpu hierarchy holds this process"
    assert [started.driver_state["limits"] for started in launched] == 2 * [
        {"mechanism": "rlimit", "memory_mb": 256, "cpu": None, "cgroups": [], "reason": reason}]
    assert [spec.memory_rlimit_mb for spec in specs] == [256, 256]
    assert [(record.getMessage(), record.reason) for record in caplog.records] == [
        ("process runtimes are limited by RLIMIT_DATA only: no cgroup is usable", reason)]


def test_the_llama_cpp_launcher_gets_the_rlimit_only_without_cgroups(tmp_path):
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF")
    model = {"name": "m", "runtime_config": {"model_path": str(model_file)}}
    allocation = {"cpu": 1.0, "memory_mb": 768, "gpu": 0.0, "threads": 1, "parallel_slots": 2}

    commands = [process.llama_cpp_command(process.LaunchSpec(model, allocation, 1234, str(tmp_path), rlimit))
                for rlimit in (768, 0)]

    assert [command[command.index("--memory-mb") + 1] for command in commands] == ["768", "0"]
