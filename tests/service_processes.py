"""Processes the end-to-end tests start: the services under granian, each on a port of its own.

Every process starts in its own session and is stopped by its process group; readiness is polled,
never slept on. A service is ready when *it* answers /readyz on its port (the answer names the
service): a port that another process took between the draw and the bind is caught, not served by
the wrong program.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("registry", "orchestrator", "prompt_builder", "optimizer")
START_ATTEMPTS = 3


class NotReady(RuntimeError):
    """A process did not become ready; the message carries its log's tail."""


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (each probe stays bound until all are drawn)."""
    with contextlib.ExitStack() as probes:
        sockets = [probes.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def log_tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-3000:] if log and log.exists() else ""


def wait_until(probe: Callable, what: str, timeout_s: float = 60.0, interval_s: float = 0.2,
               log: Path | None = None, process: subprocess.Popen | None = None):
    """Poll `probe` until it returns something truthy; fail with the log's tail after the deadline
    or as soon as `process` has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise NotReady(f"{what} exited with status {process.returncode}\n{log_tail(log)}")
        try:
            result = probe()
            if result:
                return result
        except requests.RequestException:
            pass
        time.sleep(interval_s)
    raise NotReady(f"{what} not ready after {timeout_s} s\n{log_tail(log)}")


@dataclass
class Processes:
    """Started processes, stopped together (each by its own process group)."""

    logs: Path
    running: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.running.append(process)
        return process, log

    def stop(self, process: subprocess.Popen, timeout_s: float = 20.0) -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.running.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process)


def serves(url: str, service: str) -> bool:
    answer = requests.get(f"{url}/readyz", timeout=2)
    return answer.ok and answer.json().get("service") == service


def start_services(processes: Processes, env_for: Callable[[dict[str, str]], dict[str, str]],
                   names: Iterable[str] = SERVICES, threads: int = 8) -> dict[str, str]:
    """Start each service under granian on a free port; their base URLs by name, once all are ready.

    `env_for(urls)` gives the services' environment (they learn each other's URLs from it). If a
    port was taken before its service bound it, all are stopped and started again on new ports.
    """
    names = tuple(names)
    granian = str(Path(sys.executable).with_name("granian"))
    for attempt in range(1, START_ATTEMPTS + 1):
        urls = {name: f"http://127.0.0.1:{port}" for name, port in zip(names, free_ports(len(names)), strict=True)}
        env = env_for(urls)
        started = {name: processes.start(name, [
            granian, "--interface", "wsgi", "--factory", f"services.{name}:create_app", "--host", "127.0.0.1",
            "--port", url.rsplit(":", 1)[1], "--workers", "1", "--blocking-threads", str(threads)], env)
            for name, url in urls.items()}
        try:
            for name, (process, log) in started.items():
                wait_until(lambda name=name, url=urls[name]: serves(url, name), name, log=log, process=process)
            return urls
        except NotReady:
            for process, _ in started.values():
                processes.stop(process)
            if attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")
