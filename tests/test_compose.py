"""docker-compose.yml declares the whole stack, wired by health, with the socket in one place."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from services.common.config import PROJECT_ROOT
from services.orchestrator.runtimes.docker import OLLAMA_MODELS_VOLUME

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_declares_every_service(compose):
    assert set(compose["services"]) == {
        "postgres", "migrate", "registry", "orchestrator", "prompt-builder", "optimizer",
        "worker", "scheduler", "n8n", "ollama"}


def test_only_the_orchestrator_gets_the_docker_socket(compose):
    with_socket = {name for name, service in compose["services"].items()
                   if any("docker.sock" in volume for volume in service.get("volumes", []))}
    assert with_socket == {"orchestrator"}


def test_services_start_in_order_of_health(compose):
    services = compose["services"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("registry", "orchestrator", "prompt-builder", "optimizer"):
        assert services[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
        assert services[name]["healthcheck"]["test"][-1].endswith("/readyz")
        assert services[name]["command"][1] == f"services.{name.replace('-', '_')}:create_app()"
    assert "healthcheck" in services["postgres"]


def test_model_containers_join_the_stack_network_and_share_the_ollama_store(compose):
    orchestrator = compose["services"]["orchestrator"]
    assert orchestrator["environment"]["DOCKER_NETWORK"] == compose["networks"]["default"]["name"]
    assert compose["volumes"]["ollama_models"]["name"] == OLLAMA_MODELS_VOLUME
    assert compose["services"]["ollama"]["volumes"] == ["ollama_models:/root/.ollama"]


def test_n8n_imports_the_mounted_workflows_and_has_a_health_check(compose):
    n8n = compose["services"]["n8n"]
    assert "./n8n/workflows:/workflows:ro" in n8n["volumes"]
    assert "n8n import:workflow --separate --input=/workflows" in n8n["entrypoint"][-1]
    assert n8n["healthcheck"]["test"][-1].startswith("wget -qO- http://127.0.0.1:5678/healthz")


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) or `docker-compose` (Debian's), whichever is installed."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(compose_command() is None, reason="neither `docker compose` nor docker-compose is installed "
                                                      "(scripts/dockerd-test-env install adds it): YAML checks only")
def test_compose_validates_the_file():
    result = subprocess.run([*compose_command(), "-f", str(COMPOSE_FILE), "config", "--quiet"],
                            capture_output=True, text=True, env={**os.environ, "DISPATCHER_API_TOKEN": "x"})
    assert (result.returncode, result.stderr) == (0, "")
