"""The `docker` driver: one container per runtime, with limits and labels, found again by label.

The image must already be on the Docker host: the driver never pulls images (a missing image is
a clear error, not a long wait on an unreachable registry). Models inside the server are pulled
through the server's own API by the lifecycle (`pull` for the Ollama protocol).

Networking: with runtime_config `network_mode` "host" the server binds 127.0.0.1 on a free host
port; else it listens on `container_port` (11434), reached by container name on the Docker
network `settings.docker_network` (the orchestrator itself runs in a container there, as in
docker-compose.yml) or, without one, published on the host's 127.0.0.1.

runtime_config: `image` (default ollama/ollama, which serves the Ollama protocol on OLLAMA_HOST
and keeps pulled models in the volume dispatcher-ollama-models); `command` and `environment`, whose
values may name {host}, {port} and the allocation's {threads}, {parallel_slots}, {memory_mb},
{cpu}. E.g. the llama.cpp image of scripts/dockerd-test-env, speaking the OpenAI protocol:
{"image": "dispatcher-llm:<hash>", "network_mode": "host", "model_alias": "smollm2",
 "command": ["/venv/bin/python", "/opt/dispatcher/llama_server.py", "--model-path",
             "/models/smollm2.gguf", "--host", "{host}", "--port", "{port}", "--threads", "{threads}"]}
"""
from __future__ import annotations

import logging
import math
from functools import cached_property

import docker
import requests
from docker.errors import DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest, EndpointConfig

from services.common.config import Settings
from services.orchestrator.runtimes.base import (Allocation, DriverError, Launched, Managed,
                                                  RuntimeStartError, free_port)

DEFAULT_IMAGE = "ollama/ollama"
OLLAMA_PORT = 11434
OLLAMA_MODELS_VOLUME = "dispatcher-ollama-models"
LABEL_MANAGED = "dispatcher.managed"
LABEL_SCOPE = "dispatcher.scope"
LABEL_MODEL = "dispatcher.model_id"
LABEL_RUNTIME = "dispatcher.runtime_id"
STOP_TIMEOUT_S = 10
MIN_API_VERSION = "1.41"  # Docker 20.10, Debian bookworm's docker.io
_FAILURES = (DockerException, requests.RequestException)

logger = logging.getLogger(__name__)


class DockerDriver:
    """Model servers as containers on the Docker host at `settings.docker_url`."""

    name = "docker"
    manages_lifecycle = True

    def __init__(self, settings: Settings, scope: str) -> None:
        self.docker_url = settings.docker_url
        self.network = settings.docker_network
        self.scope = scope

    @cached_property
    def client(self) -> docker.DockerClient:
        try:
            return docker.DockerClient(base_url=self.docker_url, version="auto", timeout=30)
        except _FAILURES as exc:
            raise DriverError(f"the Docker daemon at {self.docker_url} is not reachable: {exc}") from exc

    def start(self, runtime: dict, model: dict, allocation: Allocation) -> Launched:
        config = model["runtime_config"]
        image = str(config.get("image") or DEFAULT_IMAGE)
        name = f"dispatcher-{runtime['id']}"
        mode = "host" if config.get("network_mode") == "host" else ("network" if self.network else "published")
        port = free_port() if mode == "host" else int(config.get("container_port", OLLAMA_PORT))
        fill = {**allocation, "port": port, "host": "127.0.0.1" if mode == "host" else "0.0.0.0"}
        command = [_fill(arg, fill) for arg in config["command"]] if config.get("command") else None
        environment = {key: _fill(value, fill) for key, value in self._environment(config, image).items()}
        options = dict(
            name=name,
            detach=True,
            environment=environment,
            labels={LABEL_MANAGED: "true", LABEL_SCOPE: self.scope,
                    LABEL_MODEL: str(model["id"]), LABEL_RUNTIME: str(runtime["id"])},
            mem_limit=f"{allocation['memory_mb']}m",
            nano_cpus=int(allocation["cpu"] * 1_000_000_000),
        )
        if _is_ollama(image):  # pulled models outlive the container, shared by every Ollama runtime
            options["volumes"] = {OLLAMA_MODELS_VOLUME: {"bind": "/root/.ollama", "mode": "rw"}}
        if allocation["gpu"] > 0:
            options["device_requests"] = [DeviceRequest(count=math.ceil(allocation["gpu"]), capabilities=[["gpu"]])]
        if mode == "host":
            options["network_mode"] = "host"
        elif mode == "network":
            # Reached by name from the orchestrator's own container on that network.
            options["network"] = self.network
            options["networking_config"] = {self.network: EndpointConfig(MIN_API_VERSION)}  # else the SDK sends {name: None}
        else:
            options["ports"] = {f"{port}/tcp": ("127.0.0.1", None)}  # Docker picks the host port
        try:
            container = self.client.containers.create(image, command, **options)
        except ImageNotFound as exc:
            raise RuntimeStartError(f"image {image} is not on the Docker host; load or pull it there first") from exc
        except _FAILURES as exc:
            raise RuntimeStartError(f"Docker could not start {image}: {_explain(exc)}") from exc
        try:
            container.start()
            container.reload()
            host_port = _published_port(container.attrs, port) if mode == "published" else port
        except Exception as exc:
            # The row never learns its id: left, the container would hold its limits (and its name,
            # which a restart of the row needs) until a reconcile.
            _remove_quietly(container)
            if isinstance(exc, _FAILURES):
                raise RuntimeStartError(f"Docker could not start {image}: {_explain(exc)}") from exc
            raise
        host = name if mode == "network" else "127.0.0.1"
        return Launched(endpoint=f"http://{host}:{host_port}", host=host, port=host_port, container_id=container.id,
                        driver_state={"image": image, "container_name": name,
                                      "network_mode": {"host": "host", "network": self.network}.get(mode, "bridge")})

    def is_running(self, runtime: dict) -> bool:
        if not runtime.get("container_id"):
            return False
        try:
            return self.client.containers.get(runtime["container_id"]).status == "running"
        except NotFound:
            return False
        except _FAILURES as exc:
            raise DriverError(f"Docker could not inspect {runtime['container_id']}: {_explain(exc)}") from exc

    def identity(self, runtime: dict) -> str | None:
        return runtime.get("container_id")

    def stop(self, runtime: dict) -> None:
        if not runtime.get("container_id"):
            return
        try:
            container = self.client.containers.get(runtime["container_id"])
            container.stop(timeout=STOP_TIMEOUT_S)
            container.remove(force=True)
        except NotFound:
            return
        except _FAILURES as exc:
            raise DriverError(f"Docker could not remove {runtime['container_id']}: {_explain(exc)}") from exc

    def find_managed(self) -> list[Managed]:
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_SCOPE}={self.scope}"]}
        try:
            containers = self.client.containers.list(all=True, filters=filters, sparse=True)
        except _FAILURES as exc:
            raise DriverError(f"Docker could not list containers: {_explain(exc)}") from exc
        return [
            Managed(runtime_id=c.attrs["Labels"].get(LABEL_RUNTIME, ""), identity=c.id,
                    alive=c.attrs.get("State") == "running", ref={"id": c.attrs["Labels"].get(LABEL_RUNTIME),
                                                                 "container_id": c.id})
            for c in containers
        ]

    def log_tail(self, runtime: dict, max_chars: int = 2000) -> str:
        if not runtime.get("container_id"):
            return ""
        try:
            container = self.client.containers.get(runtime["container_id"])
            logs = container.logs(tail=100).decode("utf-8", "replace")
        except _FAILURES:
            return ""
        return (logs + _exit_note(container.attrs.get("State") or {}))[-max_chars:]

    @staticmethod
    def _environment(config: dict, image: str) -> dict:
        if "environment" in config:
            return dict(config["environment"])
        if _is_ollama(image):
            return {"OLLAMA_HOST": "{host}:{port}"}
        return {}


def _is_ollama(image: str) -> bool:
    return image.split(":")[0].endswith("ollama/ollama")


def _fill(template: object, values: dict) -> str:
    """A command or environment value with its {placeholders} filled in."""
    try:
        return str(template).format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise RuntimeStartError(f"runtime_config value {template!r} has an unknown placeholder "
                                f"({exc}); known: {', '.join(sorted(values))}") from exc


def _exit_note(state: dict) -> str:
    """Why an exited container ended, in the words of its state (an OOM kill leaves no log line)."""
    if state.get("Status") != "exited":
        return ""
    oom = ", killed for going over its memory limit (OOMKilled)" if state.get("OOMKilled") else ""
    return f"[container exited with code {state.get('ExitCode')}{oom}]\n"


def _remove_quietly(container) -> None:
    try:
        container.remove(force=True)
    except _FAILURES:
        logger.warning("could not remove a container that failed to start", extra={"container_id": container.id})


def _published_port(attrs: dict, container_port: int) -> int:
    bindings = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    for binding in bindings.get(f"{container_port}/tcp") or []:
        if binding.get("HostPort"):
            return int(binding["HostPort"])
    raise RuntimeStartError(f"Docker published no host port for container port {container_port}")


def _explain(exc: Exception) -> str:
    return str(getattr(exc, "explanation", None) or exc)
