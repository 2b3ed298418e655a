"""What every runtime driver offers, and the small types drivers and the lifecycle exchange."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Protocol, TypedDict


class Allocation(TypedDict):
    """Resources for one runtime; the shape of `services.registry.resources.right_size`."""

    cpu: float
    memory_mb: int
    gpu: float
    threads: int
    parallel_slots: int


class DriverError(Exception):
    """A driver could not do what was asked (its backend, e.g. the Docker daemon, failed)."""


class RuntimeStartError(DriverError):
    """A runtime could not be started; the message says why in words an operator can act on."""


@dataclass(frozen=True)
class Launched:
    """What a driver started: where it answers and how to recognise it later."""

    endpoint: str
    host: str = "127.0.0.1"
    port: int | None = None
    pid: int | None = None
    container_id: str | None = None
    log_path: str | None = None
    driver_state: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Managed:
    """A process or container a driver runs for us, found without the database (for reconcile)."""

    runtime_id: str
    identity: str
    alive: bool
    # Enough of a runtime row (pid, container_id, driver_state) for `RuntimeDriver.stop`.
    ref: dict = field(default_factory=dict)


class RuntimeDriver(Protocol):
    """Starts, recognises and stops model servers of one kind (process, docker, external)."""

    name: str
    # False for endpoints we only use: nothing to start, stop or restart.
    manages_lifecycle: bool

    def start(self, runtime: dict, model: dict, allocation: Allocation) -> Launched: ...

    def is_running(self, runtime: dict) -> bool: ...

    def identity(self, runtime: dict) -> str | None: ...

    def stop(self, runtime: dict) -> None: ...

    def find_managed(self) -> list[Managed]: ...

    def log_tail(self, runtime: dict, max_chars: int = 2000) -> str: ...


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
