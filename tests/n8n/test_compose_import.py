"""The n8n of docker-compose.yml, for real: the bundle imported with n8n's own CLI before `n8n start`.

The same programs as the compose services (tests/test_compose.py pins their commands): the
`n8n-bundle` service's `python scripts/n8n_workflows.py bundle --output DIR`, then the n8n
service's `scripts/n8n-import-bundle DIR && exec n8n start`, on a fresh user folder with the
pinned n8n, against the test stack. No API import and no API activation take part.
"""
from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from n8n_stack import ROOT, N8n, Processes, Stack, create_api_key, n8n_env, serve_n8n, workflow_tool
from service_processes import wait_until

pytestmark = pytest.mark.n8n

tool = workflow_tool()
FILES = sorted((ROOT / "n8n" / "workflows").glob("*.json"))
WORKFLOW_NAMES = {tool.load_workflow(path)["name"] for path in FILES}
WEBHOOK_FLOWS = {"AI dispatch (step by step)", "Dispatch (one call)", "Dispatch async with callback",
                 "Model onboarding", "Feedback", "Chat through the Ollama front door"}
NO_SUCH_REQUEST = "00000000-0000-4000-8000-000000000000"
QUESTION = {"prompt": "What is the capital of France?", "task_type": "question-answering", "complexity": "low",
            "max_tokens": 8, "temperature": 0}


@dataclass
class ComposeN8n:
    """An n8n set up as the compose n8n service sets it up, restartable as `docker compose restart n8n`."""

    processes: Processes
    folder: Path
    bundle: Path
    stack: Stack
    webhook_token: str
    n8n: N8n | None = None

    def run(self, argv: list[str], env: dict[str, str]) -> None:
        done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def start(self) -> N8n:
        """Bundle, import with the CLI while n8n is stopped, start n8n; wait until its webhooks answer."""
        # As in docker-compose.yml, the bundle and n8n itself get the token (the async flow reads it in n8n).
        environ = {**self.stack.env, "N8N_WEBHOOK_TOKEN": self.webhook_token}
        self.run([sys.executable, "scripts/n8n_workflows.py", "bundle", "--output", str(self.bundle)], environ)
        self.run(["scripts/n8n-import-bundle", str(self.bundle)], n8n_env(self.folder, environ))
        url, env = serve_n8n(self.processes, self.folder, environ)
        api_key = self.n8n.api_key if self.n8n else create_api_key(url)   # the key is kept in n8n's database
        self.n8n = N8n(url=url, env=env, api_key=api_key, webhook_token=self.webhook_token)
        # Webhooks of published workflows are registered a few seconds after the API answers.
        wait_until(lambda: self.n8n.webhook("feedback", {}, headers={}, timeout_s=5).status_code == 403,
                   "the feedback webhook", timeout_s=60)
        return self.n8n

    def restart(self) -> N8n:
        self.processes.stop_all()
        return self.start()


@pytest.fixture(scope="module")
def compose_n8n(n8n_harness: Path, stack: Stack, tmp_path_factory) -> Iterator[ComposeN8n]:
    workdir = tmp_path_factory.mktemp("compose-n8n")
    started = ComposeN8n(processes=Processes(logs=workdir), folder=workdir / "user", bundle=workdir / "bundle",
                         stack=stack, webhook_token=secrets.token_urlsafe(24))
    try:
        started.start()
        yield started
    finally:
        started.processes.stop_all()


def state(n8n: N8n) -> tuple[dict, dict]:
    """The workflows (id, active) by name and the credentials' ids by name, as n8n's API lists them."""
    workflows = n8n.api("GET", "/workflows").json()["data"]
    credentials = n8n.api("GET", "/credentials").json()["data"]
    return ({w["name"]: (w["id"], w["active"]) for w in workflows},
            {c["name"]: c["id"] for c in credentials})


def expected_state() -> tuple[dict, dict]:
    """The bundle's ids (derived from the names); only the webhook flows published."""
    workflows = {name: (tool.n8n_id("workflow", name), name in WEBHOOK_FLOWS) for name in WORKFLOW_NAMES}
    credentials = {credential.name: credential_id for credential, credential_id in tool.credential_ids_for_bundle().items()}
    return workflows, credentials


def assert_feedback_reaches_the_service(n8n: N8n) -> None:
    """Through the webhook (its credential) to the feedback service (the API credential): the service's 404."""
    response = n8n.webhook("feedback", {"request_id": NO_SUCH_REQUEST, "score": 0.5}, timeout_s=60)

    assert response.status_code == 404, response.text
    assert response.json() == {"type": "about:blank", "title": "Not Found", "status": 404,
                               "detail": f"Request {NO_SUCH_REQUEST} does not exist.",
                               "request_id": response.json()["request_id"]}


def test_the_cli_import_publishes_the_webhook_flows_with_their_credentials(compose_n8n: ComposeN8n):
    n8n = compose_n8n.n8n

    assert state(n8n) == expected_state()
    _, credential_ids = expected_state()
    feedback = n8n.api("GET", f"/workflows/{tool.n8n_id('workflow', 'Feedback')}").json()
    assert {node["name"]: node.get("credentials") for node in feedback["nodes"] if node.get("credentials")} == {
        "Webhook": {"httpHeaderAuth": {"id": credential_ids["Dispatcher webhooks"], "name": "Dispatcher webhooks"}},
        "Send feedback": {"httpHeaderAuth": {"id": credential_ids["Dispatcher API"], "name": "Dispatcher API"}},
    }


def test_a_webhook_works_with_the_token_and_refuses_a_call_without(compose_n8n: ComposeN8n):
    n8n = compose_n8n.n8n

    assert_feedback_reaches_the_service(n8n)
    refused = n8n.webhook("feedback", {"request_id": NO_SUCH_REQUEST, "score": 0.5}, headers={}, timeout_s=30)
    assert (refused.status_code, refused.text) == (403, "Authorization data is wrong!")
    wrong = n8n.webhook("feedback", {"request_id": NO_SUCH_REQUEST, "score": 0.5}, timeout_s=30,
                        headers={"Authorization": f"Bearer {compose_n8n.stack.token}"})
    assert (wrong.status_code, wrong.text) == (403, "Authorization data is wrong!")


def test_the_async_flow_is_resumed_by_the_callback_with_the_token_from_n8n_s_environment(compose_n8n: ComposeN8n):
    n8n = compose_n8n.n8n
    _, credential_ids = expected_state()
    flow = n8n.api("GET", f"/workflows/{tool.n8n_id('workflow', 'Dispatch async with callback')}").json()
    wait, = [node for node in flow["nodes"] if node["type"] == "n8n-nodes-base.wait"]
    assert wait["credentials"] == {"httpHeaderAuth": {"id": credential_ids["Dispatcher webhooks"],
                                                      "name": "Dispatcher webhooks"}}

    response = n8n.webhook("dispatch-async", QUESTION)

    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["valid"]) == ("completed", True)


def test_a_restart_imports_again_in_place_and_publishes_again(compose_n8n: ComposeN8n):
    before = state(compose_n8n.n8n)

    n8n = compose_n8n.restart()

    assert state(n8n) == before == expected_state()
    assert_feedback_reaches_the_service(n8n)
