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
        "worker", "scheduler", "n8n-bundle", "n8n", "ollama"}


def test_only_the_orchestrator_and_its_worker_get_the_docker_socket(compose):
    with_socket = {name for name, service in compose["services"].items()
                   if any("docker.sock" in volume for volume in service.get("volumes", []))}
    assert with_socket == {"orchestrator", "worker"}


def test_the_worker_runs_runtimes_as_the_orchestrator_does(compose):
    """Queued dispatches start the runtimes they need: with the same drivers, Docker and limits."""
    orchestrator, worker = compose["services"]["orchestrator"], compose["services"]["worker"]
    assert worker["environment"] == orchestrator["environment"]
    assert orchestrator["environment"]["RUNTIME_DRIVERS"] == "docker,external"
    assert worker["user"] == orchestrator["user"] == "root"


def test_services_start_in_order_of_health(compose):
    services = compose["services"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("registry", "orchestrator", "prompt-builder", "optimizer"):
        assert services[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
        assert services[name]["healthcheck"]["test"][-1].endswith("/readyz")
        command = services[name]["command"]
        assert command[command.index("--factory") + 1] == f"services.{name.replace('-', '_')}:create_app"
    assert "healthcheck" in services["postgres"]


def test_model_containers_join_the_stack_network_and_share_the_ollama_store(compose):
    orchestrator = compose["services"]["orchestrator"]
    assert orchestrator["environment"]["DOCKER_NETWORK"] == compose["networks"]["default"]["name"]
    assert compose["volumes"]["ollama_models"]["name"] == OLLAMA_MODELS_VOLUME
    assert compose["services"]["ollama"]["volumes"] == ["ollama_models:/root/.ollama"]


def test_n8n_bundle_writes_the_credentials_and_workflows_from_the_environment(compose):
    bundle = compose["services"]["n8n-bundle"]
    assert bundle["image"] == compose["services"]["registry"]["image"]   # the project's image: it has Python
    assert bundle["command"] == ["python", "scripts/n8n_workflows.py", "bundle", "--output", "/n8n-bundle"]
    assert bundle["volumes"] == ["./scripts/n8n_workflows.py:/app/scripts/n8n_workflows.py:ro",
                                 "./n8n/workflows:/app/n8n/workflows:ro", "n8n_bundle:/n8n-bundle"]
    assert bundle["environment"]["N8N_WEBHOOK_TOKEN"].startswith("${N8N_WEBHOOK_TOKEN:?set N8N_WEBHOOK_TOKEN")
    assert bundle["environment"]["DISPATCHER_API_TOKEN"] == compose["x-service"]["environment"]["DISPATCHER_API_TOKEN"]
    assert bundle["environment"]["ORCHESTRATOR_URL"] == compose["services"]["n8n"]["environment"]["ORCHESTRATOR_URL"]
    assert bundle["restart"] == "no"


def test_the_bundle_volume_is_writable_by_the_image_s_user():
    """A new named volume takes the owner of the image directory it is mounted on."""
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert "install -d -o dispatcher /n8n-bundle" in dockerfile
    assert dockerfile.index("install -d -o dispatcher /n8n-bundle") < dockerfile.index("USER dispatcher")


def test_n8n_has_the_webhook_token_in_its_environment_as_the_bundle_does(compose):
    """The async flow reads it ($env) and hands it to the orchestrator for the callback to its resume URL."""
    n8n, bundle = compose["services"]["n8n"], compose["services"]["n8n-bundle"]
    assert n8n["environment"]["N8N_WEBHOOK_TOKEN"] == bundle["environment"]["N8N_WEBHOOK_TOKEN"]
    assert n8n["environment"]["N8N_BLOCK_ENV_ACCESS_IN_NODE"] == "false"


def test_n8n_imports_the_bundle_with_its_own_cli_then_serves(compose):
    n8n = compose["services"]["n8n"]
    assert n8n["depends_on"]["n8n-bundle"] == {"condition": "service_completed_successfully"}
    assert n8n["volumes"] == ["n8n_data:/home/node/.n8n", "n8n_bundle:/n8n-bundle:ro",
                              "./scripts/n8n-import-bundle:/usr/local/bin/n8n-import-bundle:ro"]
    # tests/n8n/test_compose_import.py runs this script and then `n8n start` against a real n8n.
    assert n8n["entrypoint"] == ["/bin/sh", "-c", "sh /usr/local/bin/n8n-import-bundle /n8n-bundle && exec n8n start"]
    assert n8n["healthcheck"]["test"][-1].startswith("wget -qO- http://127.0.0.1:5678/healthz")
    assert set(compose["volumes"]) >= {"n8n_data", "n8n_bundle"}


@pytest.mark.parametrize("service", ["n8n-bundle", "n8n"])
def test_every_file_bind_mounted_into_n8n_exists(compose, service):
    for volume in compose["services"][service]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (PROJECT_ROOT / source).exists(), volume


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) or `docker-compose` (Debian's), whichever is installed."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


needs_compose = pytest.mark.skipif(compose_command() is None, reason="neither `docker compose` nor docker-compose is "
                                   "installed (scripts/dockerd-test-env install adds it): YAML checks only")


def compose_config(tmp_path, **environ: str) -> subprocess.CompletedProcess:
    """`config --quiet` on the file with only these of the variables it reads set (no .env file either)."""
    env = {name: value for name, value in os.environ.items()
           if name not in {"N8N_WEBHOOK_TOKEN", "DISPATCHER_API_TOKEN"}}
    (tmp_path / "empty.env").write_text("")
    return subprocess.run([*compose_command(), "--env-file", str(tmp_path / "empty.env"), "-f", str(COMPOSE_FILE),
                           "config", "--quiet"], capture_output=True, text=True, env={**env, **environ})


@needs_compose
def test_compose_validates_the_file(tmp_path):
    result = compose_config(tmp_path, DISPATCHER_API_TOKEN="x", N8N_WEBHOOK_TOKEN="y")
    assert (result.returncode, result.stderr) == (0, "")


@needs_compose
def test_compose_refuses_to_run_without_a_webhook_token(tmp_path):
    result = compose_config(tmp_path, DISPATCHER_API_TOKEN="x")
    assert result.returncode != 0
    assert "set N8N_WEBHOOK_TOKEN: the secret n8n's webhooks require (README: Run the full stack with Docker)" in (
        result.stderr)
