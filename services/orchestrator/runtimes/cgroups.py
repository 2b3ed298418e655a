"""A cgroup per process runtime: the memory limit and CPU quota of its allocation, enforced by the kernel.

Each runtime gets `dispatcher-<runtime_id>` nested under this process's own cgroup in each hierarchy
that holds the memory and cpu controllers, so the server still counts in every limit and account of
the orchestrator's cgroup. Where that is comes from /proc/self/cgroup and /proc/self/mountinfo:

- cgroup v2: our cgroup in the unified hierarchy, if it hands memory and cpu down to its children
  (cgroup.subtree_control; enabled here when cgroup.controllers offers them). The kernel allows
  that only in a cgroup without processes of its own, or in the root, so a v2 orchestrator living
  in an ordinary service or container cgroup falls back (the reason says so).
- cgroup v1: our cgroup in the memory hierarchy and in the cpu hierarchy, both mounted read-write.

Limits: memory.limit_in_bytes (and memory.memsw.limit_in_bytes, where swap is accounted, to the
same value: no swap beyond the limit) or memory.max (and memory.swap.max 0); cpu.cfs_quota_us =
cores x cpu.cfs_period_us, or cpu.max "quota period".

The memory limit counts page cache too, a mmap'd model file's pages included. That is what the
allocation means (the model's base memory requirement covers its weights; the docker driver's
mem_limit counts the same way), and cached file pages are reclaimed before anything is OOM-killed:
a file too big for the room left would be read again and again, not fail.

A server enters its cgroups before it execs (`enter_and_exec`): a shell writes its own pid into
each cgroup.procs, then execs the server, so no instruction of the server runs unlimited. (Popen's
preexec_fn would do the same in Python, but it may deadlock the child of a threaded process.)
"""
from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

NAME_PREFIX = "dispatcher-"
STALE_AFTER_S = 60.0  # a younger empty cgroup may belong to a server being started right now
REMOVE_TIMEOUT_S = 2.0
REMOVE_INTERVAL_S = 0.01
CONTROLLERS = ("cpu", "memory")

_RUNTIME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MOUNT_ESCAPE = re.compile(r"\\([0-7]{3})")
# $0 names the shell in its error messages; the pid files come before "--", the command after it.
_ENTER_AND_EXEC = ('for procs in "$@"; do shift; [ "$procs" = -- ] && break; echo $$ > "$procs" || exit 125; done; '
                   'exec "$@"')


class CgroupsUnusable(Exception):
    """Why runtimes cannot get cgroups here (the process driver then limits them with RLIMIT_DATA)."""


@dataclass(frozen=True)
class Placement:
    """Where runtime cgroups go: this process's own cgroup directory for each controller."""

    version: int
    memory_parent: Path
    cpu_parent: Path

    @property
    def mechanism(self) -> str:
        return f"cgroup-v{self.version}"

    @property
    def parents(self) -> list[Path]:
        return list(dict.fromkeys([self.memory_parent, self.cpu_parent]))


@dataclass(frozen=True)
class _Mount:
    fstype: str
    root: str
    point: Path
    read_only: bool
    controllers: frozenset[str]


def find_placement(root: Path = Path("/")) -> Placement:
    """Where this process's runtime cgroups go; CgroupsUnusable says why nowhere.

    `root` is where /proc and the cgroup mounts are found (a fake tree in tests).
    """
    try:
        memberships = _memberships((root / "proc/self/cgroup").read_text())
        mounts = _cgroup_mounts((root / "proc/self/mountinfo").read_text(), root)
    except OSError as exc:
        raise CgroupsUnusable(f"cannot read this process's cgroups: {exc}") from exc
    reasons = []
    for placement_in in (_unified_placement, _per_controller_placement):
        try:
            return placement_in(memberships, mounts)
        except (CgroupsUnusable, OSError) as exc:
            reasons.append(str(exc))
    raise CgroupsUnusable("; ".join(reasons))


def cgroup_name(runtime_id: str) -> str:
    if not _RUNTIME_ID.fullmatch(runtime_id):
        raise ValueError(f"runtime id {runtime_id!r} cannot name a cgroup")
    return f"{NAME_PREFIX}{runtime_id}"


def create_runtime_cgroups(placement: Placement, runtime_id: str, memory_mb: int, cpu: float) -> list[Path]:
    """The runtime's cgroup directories, made (or reused) with its limits written."""
    name = cgroup_name(runtime_id)
    memory_dir, cpu_dir = placement.memory_parent / name, placement.cpu_parent / name
    directories = list(dict.fromkeys([memory_dir, cpu_dir]))
    try:
        for directory in directories:
            directory.mkdir(exist_ok=True)
        _limit_memory(placement.version, memory_dir, memory_mb * 1024 * 1024)
        _limit_cpu(placement.version, cpu_dir, cpu)
    except OSError as exc:
        remove(directories, timeout_s=0)
        raise CgroupsUnusable(f"cannot set up cgroup {name}: {exc}") from exc
    return directories


def enter_and_exec(directories: list[Path], command: list[str]) -> list[str]:
    """`command`, run so that it is in `directories` before its first instruction."""
    procs = [str(directory / "cgroup.procs") for directory in directories]
    return ["/bin/sh", "-c", _ENTER_AND_EXEC, "dispatcher-enter-cgroups", *procs, "--", *command]


def recorded_directories(runtime_id: str, paths: list[str]) -> list[Path]:
    """The recorded cgroup paths that are this runtime's (no other directory is ever removed)."""
    name = cgroup_name(runtime_id)
    return [Path(path) for path in paths if Path(path).is_absolute() and Path(path).name == name]


def member_pids(directories: list[Path]) -> set[int]:
    """The processes in the cgroups now (rmdir refuses a cgroup with any, so an unreadable one adds none)."""
    pids = set()
    for directory in directories:
        try:
            pids.update(int(line) for line in (directory / "cgroup.procs").read_text().split())
        except OSError:
            continue
    return pids


def oom_kills(directories: list[Path]) -> int:
    """How many processes the kernel killed for going over the memory limit of these cgroups."""
    kills = 0
    for directory in directories:
        for counters in ("memory.oom_control", "memory.events"):  # v1, v2
            try:
                lines = (directory / counters).read_text().splitlines()
            except OSError:
                continue
            kills += sum(int(line.split()[1]) for line in lines if line.startswith("oom_kill "))
    return kills


def remove(directories: list[Path], timeout_s: float = REMOVE_TIMEOUT_S) -> list[Path]:
    """rmdir each cgroup, retrying while the kernel still frees its exited processes; those left."""
    deadline = time.monotonic() + timeout_s
    left = []
    for directory in directories:
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    left.append(directory)
                    break
                time.sleep(REMOVE_INTERVAL_S)
    return left


def remove_stale(placement: Placement, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the runtime cgroups under ours that no process is in any more (their server ended unseen)."""
    removed = []
    for parent in placement.parents:
        for directory in sorted(parent.glob(f"{NAME_PREFIX}*")):
            if _is_stale(directory, older_than_s) and not remove([directory], timeout_s=0):
                removed.append(directory)
    return removed


def _is_stale(directory: Path, older_than_s: float) -> bool:
    try:
        age_s = time.time() - directory.stat().st_mtime
    except OSError:
        return False
    return directory.is_dir() and age_s >= older_than_s and not member_pids([directory])


def _limit_memory(version: int, directory: Path, limit_bytes: int) -> None:
    if version == 2:
        _write(directory / "memory.max", limit_bytes)
        swap = directory / "memory.swap.max"
    else:
        _write(directory / "memory.limit_in_bytes", limit_bytes)
        swap = directory / "memory.memsw.limit_in_bytes"
    if swap.exists():
        _write(swap, 0 if version == 2 else limit_bytes)  # v1 memsw is memory plus swap


def _limit_cpu(version: int, directory: Path, cores: float) -> None:
    if version == 2:
        period = int((directory / "cpu.max").read_text().split()[1])
        _write(directory / "cpu.max", f"{_quota(cores, period)} {period}")
    else:
        period = int((directory / "cpu.cfs_period_us").read_text())
        _write(directory / "cpu.cfs_quota_us", _quota(cores, period))


def _quota(cores: float, period_us: int) -> int:
    return max(1000, round(cores * period_us))  # the kernel's smallest quota is 1 ms


def _write(path: Path, value: object) -> None:
    with open(path, "w") as control:
        control.write(str(value))


def _unified_placement(memberships: dict[str, str], mounts: list[_Mount]) -> Placement:
    mount, directory = _own_directory(memberships.get(""), [m for m in mounts if m.fstype == "cgroup2"])
    if directory is None:
        raise CgroupsUnusable("no cgroup v2 hierarchy holds this process")
    missing = set(CONTROLLERS) - set((directory / "cgroup.controllers").read_text().split())
    if missing:
        raise CgroupsUnusable(f"cgroup v2 at {directory} offers no {' or '.join(sorted(missing))} controller")
    if mount.read_only:
        raise CgroupsUnusable(f"cgroup v2 at {mount.point} is mounted read-only")
    if not os.access(directory, os.W_OK):
        raise CgroupsUnusable(f"{directory} is not writable")
    subtree_control = directory / "cgroup.subtree_control"
    disabled = set(CONTROLLERS) - set(subtree_control.read_text().split())
    if disabled:
        try:
            _write(subtree_control, " ".join(f"+{name}" for name in sorted(disabled)))
        except OSError as exc:
            raise CgroupsUnusable(
                f"cgroup v2 at {directory} cannot hand {' and '.join(sorted(disabled))} down to child cgroups "
                f"({exc.strerror}; the kernel refuses while the cgroup has processes of its own)") from exc
    return Placement(2, directory, directory)


def _per_controller_placement(memberships: dict[str, str], mounts: list[_Mount]) -> Placement:
    directories = {}
    for controller in CONTROLLERS:
        holding = [m for m in mounts if m.fstype == "cgroup" and controller in m.controllers]
        mount, directory = _own_directory(memberships.get(controller), holding)
        if directory is None:
            raise CgroupsUnusable(f"no cgroup v1 {controller} hierarchy holds this process")
        if mount.read_only:
            raise CgroupsUnusable(f"the cgroup v1 {controller} hierarchy at {mount.point} is mounted read-only")
        if not os.access(directory, os.W_OK):
            raise CgroupsUnusable(f"{directory} is not writable")
        directories[controller] = directory
    return Placement(1, directories["memory"], directories["cpu"])


def _own_directory(cgroup_path: str | None, mounts: list[_Mount]) -> tuple[_Mount | None, Path | None]:
    """The first mount that shows `cgroup_path`, and the directory it shows it at."""
    if cgroup_path is None:
        return None, None
    for mount in mounts:
        inside = mount.root.rstrip("/")
        if cgroup_path == mount.root or cgroup_path.startswith(inside + "/"):
            directory = mount.point / cgroup_path[len(inside):].lstrip("/")
            if directory.is_dir():
                return mount, directory
    return None, None


def _memberships(proc_cgroup: str) -> dict[str, str]:
    """controller -> our cgroup path in its v1 hierarchy; "" -> our path in the v2 hierarchy."""
    memberships = {}
    for line in proc_cgroup.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        names = controllers.split(",") if controllers else [""] if hierarchy == "0" else []
        memberships.update({name: path for name in names})
    return memberships


def _cgroup_mounts(mountinfo: str, root: Path) -> list[_Mount]:
    """The cgroup and cgroup2 mounts (proc(5): mountinfo), with mount points under `root`."""
    mounts = []
    for line in mountinfo.splitlines():
        mount_fields, _, fs_fields = line.partition(" - ")
        fields, described = mount_fields.split(), fs_fields.split()
        if len(fields) < 6 or len(described) < 3 or described[0] not in ("cgroup", "cgroup2"):
            continue
        options = set(fields[5].split(",")) | set(described[2].split(","))
        point = root / _unescape(fields[4]).lstrip("/")
        mounts.append(_Mount(fstype=described[0], root=_unescape(fields[3]), point=point,
                             read_only="ro" in options, controllers=frozenset(described[2].split(","))))
    return mounts


def _unescape(field: str) -> str:
    return _MOUNT_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)
