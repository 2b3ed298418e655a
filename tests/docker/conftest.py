"""A private Docker daemon and the locally built model-server image (scripts/dockerd-test-env).

The daemon starts once per session with its state in a temporary directory and stops at the
end with everything it ran. Without root or without a daemon the tests are skipped with the
reason; DISPATCHER_DOCKER_TESTS=required (scripts/test sets it where it installed Docker)
makes that a failure instead.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from services.common.config import PROJECT_ROOT, Settings
from services.common.db import PooledDatabase
from services.orchestrator import queries
from services.registry import create_app as create_registry_app

SCRIPT = PROJECT_ROOT / "scripts" / "dockerd-test-env"
IMAGE_BUILD_TIMEOUT_S = 1200


@dataclass(frozen=True)
class DockerHost:
    """The private daemon: its URL for the driver, an SDK client for the tests, the model image."""

    url: str
    client: docker.DockerClient
    image: str


def _unavailable(reason: str) -> None:
    if os.environ.get("DISPATCHER_DOCKER_TESTS") == "required":
        pytest.fail(f"docker tests are required here, but {reason}")
    pytest.skip(reason)


def _env_script(command: str, state_dir: str, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), command, state_dir], capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def _last_lines(text: str, count: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-count:])


@pytest.fixture(scope="session")
def docker_host() -> Iterator[DockerHost]:
    if os.geteuid() != 0:
        _unavailable("the docker tests start a private dockerd, which needs root")
    state_dir = tempfile.mkdtemp(prefix="dispatcher-dockerd-")  # short: the socket path has a length limit
    try:
        started = _env_script("start", state_dir, 300)
        if started.returncode != 0:
            _unavailable(f"the private dockerd did not start:\n{_last_lines(started.stderr)}")
        loaded = _env_script("image", state_dir, IMAGE_BUILD_TIMEOUT_S)
        if loaded.returncode != 0:
            pytest.fail(f"the model-server image could not be built or loaded:\n{_last_lines(loaded.stderr)}")
        url = f"unix://{state_dir}/docker.sock"
        client = docker.DockerClient(base_url=url, version="auto", timeout=60)
        try:
            yield DockerHost(url=url, client=client, image=loaded.stdout.strip().splitlines()[-1])
        finally:
            client.close()
    finally:
        _env_script("stop", state_dir, 120)


@pytest.fixture
def settings(tmp_path: Path, fresh_database_url: str, docker_host: DockerHost) -> Settings:
    return Settings(database_url=fresh_database_url, runtime_dir=str(tmp_path / "runtimes"),
                    models_dir=str(tmp_path / "models"), runtime_drivers=("docker",),
                    docker_url=docker_host.url, host_cpu_cores=2.0, host_memory_mb=4096,
                    default_keep_alive_s=300)


@pytest.fixture
def db(settings: Settings) -> Iterator[PooledDatabase]:
    database = PooledDatabase(settings.database_url, min_size=1, max_size=4, name="docker-test")
    database.pool.open(wait=True)
    yield database
    database.close()


def smollm2_in_docker(image: str, **fields) -> dict:
    """The catalogue entry of SmolLM2 served by llama.cpp in the locally built image."""
    return {
        "name": "smollm2-docker", "version": "135m", "task_types": ["text-generation", "conversation"],
        "complexity_score": 1, "base_cpu_requirement": 1.0, "base_memory_requirement": 512,
        "runtime_driver": "docker", "protocol": "openai", "keep_alive_seconds": 300,
        "runtime_config": {
            "image": image, "network_mode": "host", "model_alias": "smollm2", "parallel": 2,
            "command": ["/venv/bin/python", "/opt/dispatcher/llama_server.py", "--model-path",
                        "/models/smollm2.gguf", "--alias", "smollm2", "--host", "{host}", "--port", "{port}",
                        "--threads", "{threads}", "--parallel", "{parallel_slots}", "--ctx", "2048"]},
        **fields,
    }


@pytest.fixture
def register(settings: Settings, docker_host: DockerHost, db: PooledDatabase):
    """Register a model through the registry's API, as an operator would: register(**overrides) -> its row."""
    app = create_registry_app({"TESTING": True, "DATABASE_URL": settings.database_url, "API_TOKEN": ""})

    def post(**fields) -> dict:
        response = app.test_client().post("/models", json=smollm2_in_docker(docker_host.image, **fields))
        assert response.status_code == 201, response.get_json()
        with db.connection() as conn:
            return queries.get_model(conn, response.get_json()["id"])

    yield post
    app.extensions["database"].close()


@pytest.fixture(autouse=True)
def no_container_left(docker_host: DockerHost) -> Iterator[None]:
    """Every test leaves the daemon as it found it: nothing of ours runs afterwards."""
    yield
    leftovers = docker_host.client.containers.list(all=True, filters={"label": "dispatcher.managed=true"})
    for container in leftovers:
        container.remove(force=True)
    assert [c.name for c in leftovers] == []
