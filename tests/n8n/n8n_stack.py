"""The processes the n8n tests run: the four services and the queue worker, and a real n8n."""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from service_processes import ROOT, Processes, free_port, start_services, wait_until

N8N_BIN = ROOT / "n8n" / "node_modules" / ".bin" / "n8n"
OWNER = {"email": "owner@dispatcher.test", "firstName": "Test", "lastName": "Owner", "password": "Dispatcher-n8n-1"}
N8N_QUIET = {
    "DB_TYPE": "sqlite", "GENERIC_TIMEZONE": "UTC", "N8N_DIAGNOSTICS_ENABLED": "false",
    "N8N_VERSION_NOTIFICATIONS_ENABLED": "false", "N8N_TEMPLATES_ENABLED": "false",
    "N8N_PERSONALIZATION_ENABLED": "false", "N8N_HIRING_BANNER_ENABLED": "false", "N8N_AI_ENABLED": "false",
    "N8N_COMMUNITY_PACKAGES_ENABLED": "false", "N8N_LISTEN_ADDRESS": "127.0.0.1", "N8N_HOST": "127.0.0.1",
    "N8N_PROTOCOL": "http", "N8N_SECURE_COOKIE": "false",
    # The workflows read the service URLs from $env, which n8n 2 blocks by default.
    "N8N_BLOCK_ENV_ACCESS_IN_NODE": "false",
    "N8N_LOG_LEVEL": "warn",
}


@dataclass
class Stack:
    """The dispatcher's services on free ports, with a bearer token."""

    urls: dict[str, str]
    token: str
    database_url: str
    runtime_dir: Path
    worker: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a client of the stack (n8n, the import script) needs to know."""
        return {**{f"{name.upper()}_URL": url for name, url in self.urls.items()},
                "DISPATCHER_API_TOKEN": self.token}

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def call(self, method: str, service: str, path: str, **kwargs) -> requests.Response:
        """One authenticated call to a service."""
        return requests.request(method, self.urls[service] + path, headers=self.headers, timeout=120, **kwargs)

    @contextmanager
    def worker_paused(self) -> Iterator[None]:
        """Stop the queue worker (SIGSTOP) while the block runs: queued requests wait, pending."""
        os.killpg(self.worker.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.worker.pid, signal.SIGCONT)


def start_stack(processes: Processes, database_url: str, workdir: Path) -> Stack:
    """Start the services (granian, one worker each) and the queue worker; wait until ready."""
    token = secrets.token_urlsafe(24)
    runtime_dir = workdir / "runtimes"

    def env_for(urls: dict[str, str]) -> dict[str, str]:
        return {**os.environ, **Stack(urls, token, database_url, runtime_dir).env, "DATABASE_URL": database_url,
                "RUNTIME_DRIVERS": "process", "RUNTIME_DIR": str(runtime_dir), "MODELS_DIR": str(workdir / "models"),
                "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}

    urls = start_services(processes, env_for)
    worker, _ = processes.start("worker", [sys.executable, "-m", "services.orchestrator.worker", "--workers", "1"],
                                env_for(urls))
    return Stack(urls=urls, token=token, database_url=database_url, runtime_dir=runtime_dir, worker=worker)


def stop_runtimes(stack: Stack) -> None:
    """Stop the model servers the orchestrator started (they outlive the services by design)."""
    try:
        for runtime in stack.call("GET", "orchestrator", "/runtimes").json()["items"]:
            if runtime["status"] not in ("stopped", "error"):
                stack.call("DELETE", "orchestrator", f"/runtimes/{runtime['id']}")
    except requests.RequestException:
        pass
    # Whatever is still recorded on disk (an orchestrator that died mid-start, say).
    from services.common.config import Settings
    from services.orchestrator.runtimes import process

    settings = Settings(runtime_dir=str(stack.runtime_dir))
    for pid_file in stack.runtime_dir.glob("*.json"):
        record = json.loads(pid_file.read_text())
        ref = {"id": record["runtime_id"], "pid": record["pid"], "driver_state": {"start_time": record["start_time"]}}
        process.ProcessDriver(settings, record["scope"]).stop(ref)


@dataclass
class N8n:
    """A running n8n with its own user folder and SQLite database, an API key and the webhooks' token
    (in its environment too: the async flow sends it to the orchestrator for the callback)."""

    url: str
    env: dict[str, str]
    webhook_token: str
    api_key: str = ""
    import_output: str = ""

    def import_env(self, stack: Stack) -> dict[str, str]:
        """What scripts/n8n-import needs to import into this n8n for this stack."""
        return {**stack.env, "N8N_URL": self.url, "N8N_API_KEY": self.api_key, "N8N_WEBHOOK_TOKEN": self.webhook_token}

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        """One call to n8n's public API."""
        return requests.request(method, f"{self.url}/api/v1{path}", headers={"X-N8N-API-KEY": self.api_key},
                                timeout=30, **kwargs)

    def webhook(self, path: str, body, timeout_s: float = 300.0, headers: dict[str, str] | None = None
                ) -> requests.Response:
        """POST to a production webhook, with the webhooks' token unless other headers are given."""
        if headers is None:
            headers = {"Authorization": f"Bearer {self.webhook_token}"}
        return requests.post(f"{self.url}/webhook/{path}", json=body, headers=headers, timeout=timeout_s)

    def execution_count(self, workflow_name: str) -> int:
        """How many finished executions n8n recorded for a workflow."""
        count, query = 0, {"workflowId": self.workflow_id(workflow_name), "limit": 250}
        while True:
            page = self.api("GET", "/executions", params=query).json()
            count += len(page["data"])
            if not page.get("nextCursor"):
                return count
            query["cursor"] = page["nextCursor"]

    def workflow_id(self, name: str) -> str:
        found = self.api("GET", "/workflows", params={"name": name}).json()["data"]
        assert len(found) == 1, f"workflow {name!r}: {found}"
        return found[0]["id"]

    def execute(self, name: str, timeout_s: float = 180.0) -> dict:
        """Run a workflow once with `n8n execute` (from its Manual Trigger); the run's data by node."""
        # Its own task broker port (n8n start holds one); info level, as the result is logged at info.
        env = {**self.env, "N8N_RUNNERS_BROKER_PORT": str(free_port()), "N8N_LOG_LEVEL": "info"}
        out = Path(self.env["N8N_USER_FOLDER"]) / "execute.out"
        with out.open("wb") as stdout:
            completed = subprocess.run(
                ["timeout", "-k", "10", str(timeout_s), str(N8N_BIN), "execute", f"--id={self.workflow_id(name)}",
                 "--rawOutput"], env=env, cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        text = out.read_text()
        assert completed.returncode == 0, text[-3000:]
        # Log lines come first; the run is the indented JSON document that ends the output.
        return json.loads(text[text.index("\n{\n"):])["data"]["resultData"]


def n8n_env(folder: Path, service_env: dict[str, str], port: int | None = None) -> dict[str, str]:
    """The environment of an n8n command on this user folder (`n8n start` listens on `port`)."""
    port = port or free_port()
    return {**os.environ, **N8N_QUIET, **service_env, "N8N_USER_FOLDER": str(folder), "N8N_PORT": str(port),
            "N8N_RUNNERS_BROKER_PORT": str(free_port()), "WEBHOOK_URL": f"http://127.0.0.1:{port}/",
            # scripts/n8n-import-bundle calls `n8n` as the compose n8n image has it: on the PATH.
            "PATH": f"{N8N_BIN.parent}{os.pathsep}{os.environ['PATH']}"}


def serve_n8n(processes: Processes, folder: Path, service_env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Start `n8n start` on a free port; wait until its public API is mounted; its URL and environment."""
    port = free_port()
    env = n8n_env(folder, service_env, port)
    process, log = processes.start("n8n", [str(N8N_BIN), "start"], env)
    url = f"http://127.0.0.1:{port}"
    # /healthz/readiness answers long before the public API is mounted (first start: migrations).
    wait_until(lambda: requests.get(f"{url}/api/v1/workflows", timeout=2).status_code == 401, "n8n",
               timeout_s=180, log=log, process=process)
    return url, env


def create_api_key(url: str) -> str:
    """Set up n8n's owner, log in and create an API key for the public API."""
    with requests.Session() as session:   # the login cookie
        session.post(f"{url}/rest/owner/setup", json=OWNER, timeout=30).raise_for_status()
        session.post(f"{url}/rest/login", json={"emailOrLdapLoginId": OWNER["email"], "password": OWNER["password"]},
                     timeout=30).raise_for_status()
        # Without an API-key-scopes licence n8n grants the owner's full scopes, whatever is asked.
        created = session.post(f"{url}/rest/api-keys", json={"label": "dispatcher tests", "scopes": ["workflow:read"],
                                                              "expiresAt": None}, timeout=30)
        created.raise_for_status()
    return created.json()["data"]["rawApiKey"]


def start_n8n(processes: Processes, folder: Path, service_env: dict[str, str]) -> N8n:
    """Start `n8n start` with a webhook token of its own, set up its owner and an API key; wait until it serves."""
    webhook_token = secrets.token_urlsafe(24)
    url, env = serve_n8n(processes, folder, {**service_env, "N8N_WEBHOOK_TOKEN": webhook_token})
    return N8n(url=url, env=env, api_key=create_api_key(url), webhook_token=webhook_token)


def workflow_tool():
    """scripts/n8n_workflows.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("n8n_workflows", ROOT / "scripts" / "n8n_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run scripts/<name> as a user would, with these extra environment variables."""
    return subprocess.run([str(ROOT / "scripts" / name), *args], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
