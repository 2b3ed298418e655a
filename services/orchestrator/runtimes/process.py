"""The `process` driver: a model server as a child process in its own session, found again by pid file.

Each runtime gets a log file and a pid file (`<runtime_id>.log`, `<runtime_id>.json`) in
`settings.runtime_dir`. The pid file records the pid and the process start time (from /proc), so
any orchestrator process, including a restarted one, can tell our server from a recycled pid.

Limits: each server runs in cgroups of its own, nested under the orchestrator's (`cgroups.py`): a
memory limit of the allocation's memory_mb and a CPU quota of its cpu cores, entered before the
server execs. The limit counts the model file's page cache too. SmolLM2's 768 MB allocation holds
it with room to spare: its 94 MB file and ~18 MB of libraries (page cache), ~10 MB of Python, a
45 MiB KV cache (2048 tokens, f16) and at most ~96 MiB of compute buffer, under 300 MB in all.
Stopping a runtime ends whatever is left in its cgroups and removes them; reconcile removes those
left empty.

Where no cgroup is usable (no writable memory and cpu hierarchy, or cgroup v2 in a cgroup with
processes of its own), the launcher caps RLIMIT_DATA (heap and anonymous mappings) at the
allocation instead, and a warning says why, once. RLIMIT_AS is not usable: llama.cpp mmaps the
model file and reserves thread stacks, so SmolLM2's server has ~900 MB of address space for
~250 MB of data and would fail under a 512 MB RLIMIT_AS. driver_state["limits"] says which applies.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.common.config import PROJECT_ROOT, Settings
from services.orchestrator.runtimes import cgroups
from services.orchestrator.runtimes.base import (Allocation, Launched, Managed, RuntimeStartError,
                                                  free_port)

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
_PACKAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Popen objects of the servers this process started, kept so they are reaped, never zombies.
_children: dict[int, subprocess.Popen] = {}
_children_lock = threading.Lock()
# Why runtimes fell back to RLIMIT_DATA, each said once.
_fallbacks_warned: set[str] = set()


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a server command needs to know."""

    model: dict
    allocation: Allocation
    port: int
    models_dir: str
    # RLIMIT_DATA the server sets on itself: the allocation's memory where no cgroup limits it, else 0.
    memory_rlimit_mb: int


def resolve_model_file(config: dict, models_dir: str) -> str:
    """The model file: `model_path`, or `model_file` inside `model_package` (found, not imported)."""
    if config.get("model_path"):
        path = Path(config["model_path"])
        if not path.is_file():
            raise RuntimeStartError(f"model file {path} does not exist")
        return str(path)
    package, file_name = config.get("model_package"), config.get("model_file")
    if not package or not file_name:
        raise RuntimeStartError("runtime_config needs 'model_path', or 'model_package' and 'model_file'")
    if not _PACKAGE_NAME.fullmatch(str(package)) or Path(str(file_name)).name != file_name:
        raise RuntimeStartError(f"invalid model_package {package!r} or model_file {file_name!r}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeStartError(
            f"model package {package} is not installed (pip install {package.replace('_', '-')})")
    if config.get("assemble"):
        return _assembled(package, file_name, Path(models_dir))
    path = Path(spec.submodule_search_locations[0]) / file_name
    if not path.is_file():
        raise RuntimeStartError(f"model package {package} has no file {file_name}")
    return str(path)


def _assembled(package: str, file_name: str, models_dir: Path) -> str:
    """Packages that ship a model in parts write it once into `models_dir` with `assemble(path)`."""
    target = models_dir / file_name
    if not target.is_file():
        models_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.part")
        importlib.import_module(package).assemble(str(partial))
        partial.replace(target)
    return str(target)


def llama_cpp_command(spec: LaunchSpec) -> list[str]:
    """llama.cpp's server through our launcher (../shared/RUNTIMES.md)."""
    config = spec.model["runtime_config"]
    return [
        sys.executable, "-m", "services.orchestrator.runtimes.llama_server",
        "--model-path", resolve_model_file(config, spec.models_dir),
        "--port", str(spec.port),
        "--threads", str(spec.allocation["threads"]),
        "--parallel", str(spec.allocation["parallel_slots"]),
        "--ctx", str(int(config.get("context_length", 2048))),
        "--alias", str(config.get("model_alias") or spec.model["name"]),
        "--memory-mb", str(spec.memory_rlimit_mb),
    ]


# runtime_config "server" picks the command; tests register a fake server here.
SERVER_COMMANDS: dict[str, Callable[[LaunchSpec], list[str]]] = {"llama.cpp": llama_cpp_command}


def process_start_time(pid: int) -> int | None:
    """When a live (non-zombie) process started, in clock ticks since boot; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def runtime_ref(record: dict) -> dict:
    """Enough of a runtime row, from its pid file, to check and stop its server."""
    return {"id": record["runtime_id"], "pid": record["pid"], "log_path": record.get("log_path"),
            "driver_state": {"start_time": record["start_time"], "limits": {"cgroups": record.get("cgroups", [])}}}


def reap_children() -> None:
    """Collect the exit status of servers this process started that have ended."""
    with _children_lock:
        for pid, child in list(_children.items()):
            if child.poll() is not None:
                del _children[pid]


class ProcessDriver:
    """Model servers as local child processes, each in its own session."""

    name = "process"
    manages_lifecycle = True

    def __init__(self, settings: Settings, scope: str, cgroup_root: Path = Path("/")) -> None:
        self.runtime_dir = Path(settings.runtime_dir)
        self.models_dir = settings.models_dir
        self.scope = scope
        self.cgroup_root = cgroup_root  # where /proc and the cgroup mounts are (a fake tree in tests)

    def start(self, runtime: dict, model: dict, allocation: Allocation) -> Launched:
        server = str(model["runtime_config"].get("server", "llama.cpp"))
        if server not in SERVER_COMMANDS:
            raise RuntimeStartError(f"unknown process server {server!r}; known: {sorted(SERVER_COMMANDS)}")
        port, runtime_id = free_port(), str(runtime["id"])
        limits = self._limits(runtime_id, allocation)
        try:
            child, log_path = self._spawn(runtime_id, self._command(server, model, allocation, port, limits))
        except BaseException:
            cgroups.remove([Path(path) for path in limits["cgroups"]], timeout_s=0)
            raise
        start_time = process_start_time(child.pid)
        record = {"runtime_id": runtime_id, "model_id": str(model["id"]), "pid": child.pid,
                  "start_time": start_time, "port": port, "scope": self.scope, "log_path": str(log_path),
                  "cgroups": limits["cgroups"]}
        self._write_pid_file(record)
        return Launched(endpoint=f"http://127.0.0.1:{port}", port=port, pid=child.pid,
                        log_path=str(log_path),
                        driver_state={"start_time": start_time, "server": server, "scope": self.scope,
                                      "limits": limits})

    def is_running(self, runtime: dict) -> bool:
        reap_children()
        pid, start_time = runtime.get("pid"), (runtime.get("driver_state") or {}).get("start_time")
        return bool(pid) and start_time is not None and process_start_time(pid) == start_time

    def identity(self, runtime: dict) -> str | None:
        if not runtime.get("pid"):
            return None
        return f"{runtime['pid']}@{(runtime.get('driver_state') or {}).get('start_time')}"

    def stop(self, runtime: dict) -> None:
        if self.is_running(runtime):
            self._signal(runtime, signal.SIGTERM)
            self._signal(runtime, signal.SIGCONT)  # a stopped (SIGSTOP) server handles TERM only once resumed
            if not self._wait_gone(runtime, STOP_GRACE_S):
                self._signal(runtime, signal.SIGKILL)
                self._wait_gone(runtime, STOP_GRACE_S)
        reap_children()
        if self._superseded(runtime):
            return
        self._remove_cgroups(runtime)
        (self.runtime_dir / f"{runtime['id']}.json").unlink(missing_ok=True)

    def find_managed(self) -> list[Managed]:
        self._remove_stale_cgroups()
        found = []
        for path in sorted(self.runtime_dir.glob("*.json")):
            record = _read_pid_file(path)
            if record is None or record.get("scope") != self.scope:
                continue
            ref = runtime_ref(record)
            found.append(Managed(runtime_id=record["runtime_id"], identity=self.identity(ref),
                                 alive=self.is_running(ref), ref=ref))
        return found

    def log_tail(self, runtime: dict, max_chars: int = 2000) -> str:
        tail = _file_tail(runtime.get("log_path"), max_chars)
        kills = cgroups.oom_kills(_cgroup_directories(runtime))
        if kills:  # the kernel's OOM killer leaves no line in the server's own log
            tail += f"\n[killed for going over its memory limit: {kills} OOM kill(s) in its cgroup]\n"
        return tail

    def _limits(self, runtime_id: str, allocation: Allocation) -> dict:
        """The server's own cgroups with the allocation's limits, or RLIMIT_DATA where none are usable."""
        memory_mb, cpu = allocation["memory_mb"], allocation["cpu"]
        try:
            placement = cgroups.find_placement(self.cgroup_root)
            directories = cgroups.create_runtime_cgroups(placement, runtime_id, memory_mb, cpu)
        except cgroups.CgroupsUnusable as exc:
            _warn_fallback_once(str(exc))
            return {"mechanism": "rlimit", "memory_mb": memory_mb, "cpu": None, "cgroups": [], "reason": str(exc)}
        return {"mechanism": placement.mechanism, "memory_mb": memory_mb, "cpu": cpu,
                "cgroups": [str(directory) for directory in directories]}

    def _command(self, server: str, model: dict, allocation: Allocation, port: int, limits: dict) -> list[str]:
        rlimit_mb = allocation["memory_mb"] if limits["mechanism"] == "rlimit" else 0
        command = SERVER_COMMANDS[server](LaunchSpec(model, allocation, port, self.models_dir, rlimit_mb))
        if not limits["cgroups"]:
            return command
        return cgroups.enter_and_exec([Path(path) for path in limits["cgroups"]], command)

    def _spawn(self, runtime_id: str, command: list[str]) -> tuple[subprocess.Popen, Path]:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.runtime_dir / f"{runtime_id}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        with open(log_path, "ab") as log:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=PROJECT_ROOT, env=env)
        with _children_lock:
            _children[child.pid] = child
        return child, log_path

    def _superseded(self, runtime: dict) -> bool:
        """Whether the pid file names another start of this runtime (a restart), whose cgroups these are now."""
        record = _read_pid_file(self.runtime_dir / f"{runtime['id']}.json")
        return record is not None and self.identity(runtime_ref(record)) != self.identity(runtime)

    def _remove_cgroups(self, runtime: dict) -> None:
        directories = _cgroup_directories(runtime)
        for pid in cgroups.member_pids(directories):  # anything the server started outside its session
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        reap_children()
        left = cgroups.remove(directories)
        if left:
            logger.warning("runtime cgroups still hold processes and were left",
                           extra={"runtime_id": str(runtime["id"]), "cgroups": [str(path) for path in left]})

    def _remove_stale_cgroups(self) -> None:
        """Reconcile's part for cgroups: remove those no server is in any more (it ended unseen)."""
        try:
            placement = cgroups.find_placement(self.cgroup_root)
        except cgroups.CgroupsUnusable:
            return
        for directory in cgroups.remove_stale(placement):
            logger.info("removed a stale runtime cgroup", extra={"cgroup": str(directory)})

    def _write_pid_file(self, record: dict) -> None:
        path = self.runtime_dir / f"{record['runtime_id']}.json"
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps(record))
        partial.replace(path)

    def _signal(self, runtime: dict, signum: int) -> None:
        try:
            os.killpg(runtime["pid"], signum)  # its own session: the group is the server and its children
        except ProcessLookupError:
            pass

    def _wait_gone(self, runtime: dict, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.is_running(runtime):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def _cgroup_directories(runtime: dict) -> list[Path]:
    limits = (runtime.get("driver_state") or {}).get("limits") or {}
    return cgroups.recorded_directories(str(runtime["id"]), limits.get("cgroups") or [])


def _read_pid_file(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _file_tail(path: str | None, max_chars: int) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - max_chars))
            return log.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _warn_fallback_once(reason: str) -> None:
    if reason not in _fallbacks_warned:
        _fallbacks_warned.add(reason)
        logger.warning("process runtimes are limited by RLIMIT_DATA only: no cgroup is usable",
                       extra={"reason": reason})
