"""The committed workflow files: importable shape, no secrets, stable form; the export and import helpers."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from n8n_stack import ROOT, run_script, workflow_tool

tool = workflow_tool()
FILES = sorted((ROOT / "n8n" / "workflows").glob("*.json"))
WORKFLOWS = {path.name: json.loads(path.read_text()) for path in FILES}
# Node types and the versions n8n 2.8.4 has (n8n export:nodes); the workflows use only these.
NODE_VERSIONS = {
    "n8n-nodes-base.webhook": 2.1, "n8n-nodes-base.httpRequest": 4.4, "n8n-nodes-base.code": 2,
    "n8n-nodes-base.if": 2.3, "n8n-nodes-base.respondToWebhook": 1.5, "n8n-nodes-base.scheduleTrigger": 1.3,
    "n8n-nodes-base.manualTrigger": 1, "n8n-nodes-base.wait": 1.1,
    "@n8n/n8n-nodes-langchain.chainLlm": 1.7, "@n8n/n8n-nodes-langchain.lmChatOllama": 1,
}
TRIGGERS = {"n8n-nodes-base.webhook", "n8n-nodes-base.scheduleTrigger", "n8n-nodes-base.manualTrigger"}
SECRET_KEYS = {"credentials", "apikey", "api_key", "password", "token", "secret", "authorization"}
# The one bearer token a workflow names: the webhooks' own, read from n8n's environment.
WEBHOOK_TOKEN_FROM_ENV = "'Bearer ' + ($env.N8N_WEBHOOK_TOKEN || '')"


def strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


def keys(value) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for item in value.values() for k in keys(item)}
    if isinstance(value, list):
        return {k for item in value for k in keys(item)}
    return set()


def nodes_by_type(workflow: dict, node_type: str) -> list[dict]:
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def node_named(workflow: dict, name: str) -> dict:
    node, = [node for node in workflow["nodes"] if node["name"] == name]
    return node


def test_the_issue_s_workflows_are_all_there():
    assert {name: workflow["name"] for name, workflow in WORKFLOWS.items()} == {
        "route_request.json": "AI dispatch (step by step)",
        "dispatch_request.json": "Dispatch (one call)",
        "dispatch_async.json": "Dispatch async with callback",
        "optimize_models.json": "Optimization schedule",
        "clean_runtimes.json": "Idle cleanup and scaling",
        "onboard_model.json": "Model onboarding",
        "record_feedback.json": "Feedback",
        "chat_ollama.json": "Chat through the Ollama front door",
    }


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_a_file_is_in_its_committed_form(path: Path):
    """Sorted keys, derived ids, grid positions: exactly what scripts/n8n-export writes."""
    workflow = json.loads(path.read_text())
    assert path.read_text() == tool.dump_workflow(tool.strip_workflow(workflow))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_a_workflow_holds_no_credential_or_secret(name: str):
    workflow = WORKFLOWS[name]
    assert set(workflow) == {"name", "nodes", "connections", "settings"}
    assert not {key.lower() for key in keys(workflow)} & SECRET_KEYS
    text = json.dumps(workflow).replace(WEBHOOK_TOKEN_FROM_ENV, "")
    assert "Bearer" not in text and "X-N8N-API-KEY" not in text
    # Every address of a service comes from n8n's environment, with the local default as fallback.
    for value in strings(workflow):
        for url in re.findall(r"https?://[^\s'\"]+", value):
            assert re.fullmatch(r"http://127\.0\.0\.1:810[1-4]", url), url


@pytest.mark.parametrize("name", WORKFLOWS)
def test_a_workflow_is_well_formed(name: str):
    workflow = WORKFLOWS[name]
    nodes = {node["name"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"])
    assert workflow["settings"] == {"executionOrder": "v1"}
    for node in workflow["nodes"]:
        assert NODE_VERSIONS[node["type"]] == node["typeVersion"], node["name"]
    for source, outputs in workflow["connections"].items():
        assert source in nodes
        for kind, branches in outputs.items():
            for branch in branches:
                for target in branch:
                    assert target["node"] in nodes and target["type"] == kind
    # Every node is reached from a trigger (sub-nodes feed the node they are attached to).
    reached = {n for n, node in nodes.items() if node["type"] in TRIGGERS}
    while True:
        more = {t["node"] for s in reached for branches in workflow["connections"].get(s, {}).values()
                for branch in branches for t in branch}
        more |= {s for s, outputs in workflow["connections"].items() for kind, branches in outputs.items()
                 if kind != "main" and any(t["node"] in reached for b in branches for t in b)}
        if more <= reached:
            break
        reached |= more
    assert reached == set(nodes)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_service_call_authenticates_with_the_header_credential(name: str):
    for node in nodes_by_type(WORKFLOWS[name], "n8n-nodes-base.httpRequest"):
        parameters = node["parameters"]
        assert (parameters["authentication"], parameters["genericAuthType"]) == (
            "genericCredentialType", "httpHeaderAuth"), node["name"]
        assert parameters["url"].startswith("={{ ($env.") and "_URL || 'http://127.0.0.1:810" in parameters["url"]


def test_every_webhook_requires_the_header_credential():
    hooks = [hook for workflow in WORKFLOWS.values() for hook in nodes_by_type(workflow, "n8n-nodes-base.webhook")]

    assert len(hooks) == 6
    assert all(hook["parameters"]["authentication"] == "headerAuth" for hook in hooks)
    for workflow in WORKFLOWS.values():
        tool.check_importable(workflow)


def test_every_wait_node_resumed_by_a_webhook_requires_the_header_credential():
    waits = [wait for workflow in WORKFLOWS.values() for wait in nodes_by_type(workflow, "n8n-nodes-base.wait")]

    assert [(wait["parameters"]["resume"], wait["parameters"]["incomingAuthentication"]) for wait in waits] == [
        ("webhook", "headerAuth")]


def test_the_async_flow_hands_the_orchestrator_the_token_its_resume_url_requires():
    workflow = WORKFLOWS["dispatch_async.json"]
    queue, = nodes_by_type(workflow, "n8n-nodes-base.httpRequest")

    # The caller's body first: a caller cannot choose where, or with what, the result is sent.
    assert queue["parameters"]["jsonBody"] == (
        "={{ JSON.stringify({ ...$json.body, async: true, callback_url: $execution.resumeUrl, "
        f"callback_headers: {{ Authorization: {WEBHOOK_TOKEN_FROM_ENV} }} }}) }}}}")
    assert node_named(tool.with_credentials(workflow, IDS), "Wait for callback")["credentials"] == {
        "httpHeaderAuth": {"id": "w1", "name": "Dispatcher webhooks"}}


def test_webhook_flows_answer_through_a_respond_node_on_unique_paths():
    paths = []
    for workflow in WORKFLOWS.values():
        for hook in nodes_by_type(workflow, "n8n-nodes-base.webhook"):
            assert (hook["parameters"]["httpMethod"], hook["parameters"]["responseMode"]) == ("POST", "responseNode")
            assert nodes_by_type(workflow, "n8n-nodes-base.respondToWebhook")
            paths.append(hook["parameters"]["path"])
    assert sorted(paths) == ["ai-dispatch", "chat", "dispatch", "dispatch-async", "feedback", "onboard-model"]


CALLS_A_SERVICE = ("n8n-nodes-base.httpRequest", "@n8n/n8n-nodes-langchain.chainLlm")


@pytest.mark.parametrize("name", [name for name, workflow in WORKFLOWS.items()
                                  if nodes_by_type(workflow, "n8n-nodes-base.webhook")])
def test_a_webhook_flow_answers_even_when_a_service_cannot_be_reached(name: str):
    """A node that fails stops the flow, and n8n then answers its caller 200 with an empty body: every
    call to a service goes on to an answer, through its error output or its regular one."""
    workflow = WORKFLOWS[name]
    for node in (n for n in workflow["nodes"] if n["type"] in CALLS_A_SERVICE):
        outputs = workflow["connections"].get(node["name"], {}).get("main", [])
        if node.get("onError") == "continueErrorOutput":
            assert len(outputs) > 1 and outputs[1], f"{node['name']}: its error output leads nowhere"
        else:
            assert node.get("onError") == "continueRegularOutput", f"{node['name']} stops the flow when it fails"


@pytest.mark.parametrize("name", ["optimize_models.json", "clean_runtimes.json"])
def test_schedule_flows_can_also_be_run_by_hand(name: str):
    """`n8n execute` and the editor's button start from the Manual Trigger."""
    workflow = WORKFLOWS[name]
    schedule, = nodes_by_type(workflow, "n8n-nodes-base.scheduleTrigger")
    manual, = nodes_by_type(workflow, "n8n-nodes-base.manualTrigger")
    assert workflow["connections"][schedule["name"]] == workflow["connections"][manual["name"]]


def test_strip_keeps_what_is_committed_and_drops_what_n8n_adds():
    exported = {
        "id": "2tUt1wbLX592XDdX", "name": "Feedback", "active": True, "versionId": "v1", "activeVersionId": "v1",
        "createdAt": "2026-01-01T00:00:00.000Z", "updatedAt": "2026-01-02T00:00:00.000Z", "isArchived": False,
        "meta": {"templateCredsSetupCompleted": True}, "pinData": {}, "staticData": None, "tags": [],
        "shared": [{"role": "workflow:owner"}], "triggerCount": 1, "versionCounter": 3,
        "settings": {"executionOrder": "v1", "callerPolicy": "workflowsFromSameOwner"},
        "connections": {"Webhook": {"main": [[{"node": "Send", "type": "main", "index": 0}]]}},
        "nodes": [
            {"id": "random-1", "name": "Send", "type": "n8n-nodes-base.httpRequest", "typeVersion": 4.4,
             "position": [233, 311], "parameters": {"authentication": "genericCredentialType",
                                                    "genericAuthType": "httpHeaderAuth", "url": "={{ $env.X }}"},
             "credentials": {"httpHeaderAuth": {"id": "c0ffee", "name": "Dispatcher API"}}, "onError": "continueErrorOutput"},
            {"id": "random-2", "name": "Webhook", "type": "n8n-nodes-base.webhook", "typeVersion": 2.1,
             "position": [-9, 290], "webhookId": "random-3",
             "parameters": {"path": "feedback", "authentication": "headerAuth"},
             "credentials": {"httpHeaderAuth": {"id": "d00d", "name": "Dispatcher webhooks"}}},
        ],
    }

    assert tool.strip_workflow(exported) == {
        "name": "Feedback", "settings": {"executionOrder": "v1"},
        "connections": {"Webhook": {"main": [[{"node": "Send", "type": "main", "index": 0}]]}},
        "nodes": [
            {"id": tool.stable_id("Feedback", "Send"), "name": "Send", "type": "n8n-nodes-base.httpRequest",
             "typeVersion": 4.4, "position": [240, 320], "onError": "continueErrorOutput",
             "parameters": {"authentication": "genericCredentialType", "genericAuthType": "httpHeaderAuth",
                            "url": "={{ $env.X }}"}},
            {"id": tool.stable_id("Feedback", "Webhook"), "name": "Webhook", "type": "n8n-nodes-base.webhook",
             "typeVersion": 2.1, "position": [0, 280], "webhookId": tool.stable_id("Feedback", "Webhook", "webhook"),
             "parameters": {"path": "feedback", "authentication": "headerAuth"}},
        ],
    }


IDS = {tool.API_CREDENTIAL: "h1", tool.WEBHOOK_CREDENTIAL: "w1", tool.OLLAMA_CREDENTIAL: "o1"}
ENVIRON = {"DISPATCHER_API_TOKEN": "api-s3cret", "N8N_WEBHOOK_TOKEN": "hook-s3cret", "ORCHESTRATOR_URL": "http://orch:8102/"}


def test_import_points_each_node_at_the_credential_of_its_role():
    """The webhook and the service calls both use a header credential, each its own."""
    workflow = WORKFLOWS["chat_ollama.json"] | {"nodes": WORKFLOWS["chat_ollama.json"]["nodes"] + [
        WORKFLOWS["dispatch_request.json"]["nodes"][0]]}

    prepared = tool.with_credentials(workflow, IDS)

    assert {node["name"]: node.get("credentials") for node in prepared["nodes"]} == {
        "Answer": None, "Respond": None, "Unreachable": None, "Respond unreachable": None,
        "Webhook": {"httpHeaderAuth": {"id": "w1", "name": "Dispatcher webhooks"}},
        "Dispatcher (Ollama Chat Model)": {"ollamaApi": {"id": "o1", "name": "Dispatcher Ollama front door"}},
        "Dispatch": {"httpHeaderAuth": {"id": "h1", "name": "Dispatcher API"}},
    }
    assert all("credentials" not in node for node in WORKFLOWS["chat_ollama.json"]["nodes"])   # the file's data


@pytest.mark.parametrize("authentication", [None, "none", "basicAuth"])
def test_import_refuses_a_webhook_without_header_auth(authentication):
    workflow = json.loads(json.dumps(WORKFLOWS["record_feedback.json"]))
    hook, = nodes_by_type(workflow, "n8n-nodes-base.webhook")
    hook["parameters"].pop("authentication")
    if authentication:
        hook["parameters"]["authentication"] = authentication

    with pytest.raises(tool.ImportRefused, match="^'Feedback': webhook 'Webhook' does not use header auth"):
        tool.check_importable(workflow)
    with pytest.raises(tool.ImportRefused):
        tool.with_credentials(workflow, IDS)


def wait_resumed_by(resume: str, authentication: str | None) -> dict:
    """The async flow with its Wait node resumed this way, with this authentication (None: not set)."""
    workflow = json.loads(json.dumps(WORKFLOWS["dispatch_async.json"]))
    wait, = nodes_by_type(workflow, "n8n-nodes-base.wait")
    wait["parameters"]["resume"] = resume
    wait["parameters"].pop("incomingAuthentication")
    if authentication:
        wait["parameters"]["incomingAuthentication"] = authentication
    return workflow


@pytest.mark.parametrize("authentication", [None, "none", "basicAuth", "jwtAuth"])
def test_import_refuses_a_wait_node_resumed_by_a_webhook_without_header_auth(authentication):
    workflow = wait_resumed_by("webhook", authentication)

    with pytest.raises(tool.ImportRefused, match="^'Dispatch async with callback': wait node 'Wait for callback' "
                                                 "resumes on a webhook without header auth: anyone could resume it$"):
        tool.check_importable(workflow)
    with pytest.raises(tool.ImportRefused):
        tool.with_credentials(workflow, IDS)


@pytest.mark.parametrize("authentication", [None, "basicAuth"])
def test_import_refuses_a_wait_node_resumed_by_a_form(authentication):
    with pytest.raises(tool.ImportRefused, match="^'Dispatch async with callback': wait node 'Wait for callback' "
                                                 "resumes on a form, which cannot require the webhook token$"):
        tool.check_importable(wait_resumed_by("form", authentication))


@pytest.mark.parametrize("resume", [None, "timeInterval", "specificTime"])
def test_a_wait_node_resumed_by_time_needs_no_credential(resume):
    workflow = wait_resumed_by("timeInterval", None)
    wait, = nodes_by_type(workflow, "n8n-nodes-base.wait")
    if resume is None:
        del wait["parameters"]["resume"]   # n8n's default: after a time interval
    else:
        wait["parameters"]["resume"] = resume

    tool.check_importable(workflow)
    assert "credentials" not in node_named(tool.with_credentials(workflow, IDS), "Wait for callback")


def test_import_refuses_a_credential_it_does_not_create():
    workflow = json.loads(json.dumps(WORKFLOWS["record_feedback.json"]))
    node, = nodes_by_type(workflow, "n8n-nodes-base.httpRequest")
    node["parameters"]["genericAuthType"] = "httpBasicAuth"

    with pytest.raises(tool.ImportRefused, match=f"^'Feedback': node {node['name']!r} needs a 'httpBasicAuth' "
                                                 "credential, which the import does not create$"):
        tool.check_importable(workflow)


def test_credentials_come_from_the_environment():
    assert tool.credential_data(ENVIRON) == {
        ("httpHeaderAuth", "Dispatcher API"): {"name": "Authorization", "value": "Bearer api-s3cret"},
        ("httpHeaderAuth", "Dispatcher webhooks"): {"name": "Authorization", "value": "Bearer hook-s3cret"},
        ("ollamaApi", "Dispatcher Ollama front door"): {"baseUrl": "http://orch:8102", "apiKey": "api-s3cret"},
    }
    assert tool.credential_data({"N8N_WEBHOOK_TOKEN": "hook-s3cret"}) == {
        ("httpHeaderAuth", "Dispatcher API"): {"name": "Authorization", "value": "Bearer none"},
        ("httpHeaderAuth", "Dispatcher webhooks"): {"name": "Authorization", "value": "Bearer hook-s3cret"},
        ("ollamaApi", "Dispatcher Ollama front door"): {"baseUrl": "http://127.0.0.1:8102", "apiKey": ""},
    }


@pytest.mark.parametrize(("token", "message"), [
    (None, "set N8N_WEBHOOK_TOKEN: webhook callers must send 'Authorization: Bearer <it>'"),
    ("", "set N8N_WEBHOOK_TOKEN: webhook callers must send 'Authorization: Bearer <it>'"),
    ("two words", "N8N_WEBHOOK_TOKEN must be printable ASCII without spaces: it is sent in a header"),
    ("line\nbreak", "N8N_WEBHOOK_TOKEN must be printable ASCII without spaces: it is sent in a header"),
    ("geheimnis-ä", "N8N_WEBHOOK_TOKEN must be printable ASCII without spaces: it is sent in a header"),
])
def test_there_are_no_credentials_without_a_usable_webhook_token(token, message):
    environ = {"DISPATCHER_API_TOKEN": "api-s3cret"} | ({} if token is None else {"N8N_WEBHOOK_TOKEN": token})

    with pytest.raises(tool.ImportRefused, match=f"^{re.escape(message)}"):
        tool.credential_data(environ)


class RecordingN8n:
    """Stands in for n8n's API: records each call, knows one credential, creates the rest."""

    def __init__(self) -> None:
        self.calls = []

    def call(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
        self.calls.append((method, path, body))
        return {"id": f"new-{len(self.calls)}"}

    def list_all(self, path: str, query: dict | None = None) -> list[dict]:
        self.calls.append(("GET", path, None))
        existing = {"/credentials": [{"id": "old-api", "type": "httpHeaderAuth", "name": "Dispatcher API"},
                                     {"id": "other", "type": "httpHeaderAuth", "name": "Someone else's"}]}
        return existing.get(path, [])


def test_credentials_are_created_or_updated_each_by_its_name():
    client = RecordingN8n()

    ids = tool.upsert_credentials(client, tool.credential_data(ENVIRON))

    assert ids == {tool.API_CREDENTIAL: "old-api", tool.WEBHOOK_CREDENTIAL: "new-3", tool.OLLAMA_CREDENTIAL: "new-4"}
    assert client.calls == [
        ("GET", "/credentials", None),
        ("PATCH", "/credentials/old-api", {"name": "Dispatcher API", "type": "httpHeaderAuth",
                                           "data": {"name": "Authorization", "value": "Bearer api-s3cret"}}),
        ("POST", "/credentials", {"name": "Dispatcher webhooks", "type": "httpHeaderAuth",
                                  "data": {"name": "Authorization", "value": "Bearer hook-s3cret"}}),
        ("POST", "/credentials", {"name": "Dispatcher Ollama front door", "type": "ollamaApi",
                                  "data": {"baseUrl": "http://orch:8102", "apiKey": "api-s3cret"}}),
    ]


def test_import_without_a_webhook_token_calls_n8n_not_at_all():
    client = RecordingN8n()

    with pytest.raises(tool.ImportRefused, match="^set N8N_WEBHOOK_TOKEN"):
        tool.import_workflows(client, FILES, {"DISPATCHER_API_TOKEN": "api-s3cret"})

    assert client.calls == []


def test_import_of_an_open_webhook_calls_n8n_not_at_all(tmp_path):
    workflow = json.loads(json.dumps(WORKFLOWS["dispatch_request.json"]))
    nodes_by_type(workflow, "n8n-nodes-base.webhook")[0]["parameters"]["authentication"] = "none"
    (tmp_path / "open.json").write_text(json.dumps(workflow))
    client = RecordingN8n()

    with pytest.raises(tool.ImportRefused, match="^'Dispatch \\(one call\\)': webhook 'Webhook' does not use"):
        tool.import_workflows(client, [*FILES, tmp_path / "open.json"], ENVIRON)

    assert client.calls == []


def test_import_of_an_open_resume_url_calls_n8n_not_at_all(tmp_path):
    (tmp_path / "open.json").write_text(json.dumps(wait_resumed_by("webhook", "none")))
    client = RecordingN8n()

    with pytest.raises(tool.ImportRefused, match="^'Dispatch async with callback': wait node 'Wait for callback'"):
        tool.import_workflows(client, [*FILES, tmp_path / "open.json"], ENVIRON)

    assert client.calls == []


def test_the_import_script_refuses_to_run_without_a_webhook_token():
    # An n8n that cannot be reached: a call to it would end with status 1 and "n8n: ...".
    result = run_script("n8n-import", env={"N8N_API_KEY": "unused", "N8N_URL": "http://127.0.0.1:9",
                                           "N8N_WEBHOOK_TOKEN": ""})

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "n8n_workflows.py: error: set N8N_WEBHOOK_TOKEN: webhook callers must send 'Authorization: Bearer <it>'"
        " (make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    assert result.stdout == ""


# --- the bundle for n8n's own CLI (docker-compose.yml's n8n) -------------------------------------

WEBHOOK_FILES = {"route_request.json", "dispatch_request.json", "dispatch_async.json", "onboard_model.json",
                 "record_feedback.json", "chat_ollama.json"}
SCHEDULE_FILES = {"optimize_models.json", "clean_runtimes.json"}


def run_bundle(output: Path, environ: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`scripts/n8n_workflows.py bundle` as docker-compose.yml's n8n-bundle service runs it, without an API key."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("N8N_", "DISPATCHER_"))}
    return subprocess.run([sys.executable, "scripts/n8n_workflows.py", "bundle", "--output", str(output), *args],
                          env={**env, **environ}, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_bundle_ids_are_n8n_ids_derived_from_the_name():
    ids = [tool.n8n_id("workflow", name) for name in ("Feedback", "Feedback ", "Dispatch (one call)")]

    assert all(re.fullmatch(r"[0-9A-Za-z]{16}", found) for found in ids)
    assert len(set(ids)) == 3
    assert tool.n8n_id("workflow", "Feedback") == ids[0]
    assert tool.n8n_id("credential/httpHeaderAuth", "Feedback") != ids[0]
    assert len(set(tool.credential_ids_for_bundle().values())) == len(tool.CREDENTIALS)


def test_the_bundle_holds_the_credentials_and_the_workflows_pointing_at_them(tmp_path):
    published = tool.write_bundle(tmp_path, FILES, ENVIRON, log=lambda line: None)

    ids = tool.credential_ids_for_bundle()
    assert json.loads((tmp_path / "credentials.json").read_text()) == [
        {"id": ids[tool.API_CREDENTIAL], "name": "Dispatcher API", "type": "httpHeaderAuth",
         "data": {"name": "Authorization", "value": "Bearer api-s3cret"}},
        {"id": ids[tool.WEBHOOK_CREDENTIAL], "name": "Dispatcher webhooks", "type": "httpHeaderAuth",
         "data": {"name": "Authorization", "value": "Bearer hook-s3cret"}},
        {"id": ids[tool.OLLAMA_CREDENTIAL], "name": "Dispatcher Ollama front door", "type": "ollamaApi",
         "data": {"baseUrl": "http://orch:8102", "apiKey": "api-s3cret"}},
    ]
    for path in FILES:
        workflow = WORKFLOWS[path.name]
        assert json.loads((tmp_path / "workflows" / path.name).read_text()) == {
            "id": tool.n8n_id("workflow", workflow["name"]), **tool.with_credentials(workflow, ids)}, path.name
    assert sorted(p.name for p in (tmp_path / "workflows").iterdir()) == sorted(WORKFLOWS)
    webhook_ids = {tool.n8n_id("workflow", WORKFLOWS[name]["name"]) for name in WEBHOOK_FILES}
    assert set(published) == webhook_ids and len(published) == len(webhook_ids)
    assert (tmp_path / "publish").read_text() == "".join(f"{found}\n" for found in published)


def test_with_schedules_the_bundle_publishes_the_schedule_flows_too(tmp_path):
    published = tool.write_bundle(tmp_path, FILES, ENVIRON, with_schedules=True, log=lambda line: None)

    assert set(published) == {tool.n8n_id("workflow", WORKFLOWS[name]["name"]) for name in WEBHOOK_FILES | SCHEDULE_FILES}


def test_a_bundle_replaces_the_workflows_of_the_previous_one(tmp_path):
    tool.write_bundle(tmp_path, FILES, ENVIRON, log=lambda line: None)
    feedback = ROOT / "n8n" / "workflows" / "record_feedback.json"

    published = tool.write_bundle(tmp_path, [feedback], ENVIRON, log=lambda line: None)

    assert [p.name for p in (tmp_path / "workflows").iterdir()] == ["record_feedback.json"]
    assert published == [tool.n8n_id("workflow", "Feedback")]
    assert (tmp_path / "publish").read_text() == f"{published[0]}\n"


def test_the_bundle_command_needs_no_api_key(tmp_path):
    result = run_bundle(tmp_path / "bundle", ENVIRON)

    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == sorted(
        f"bundled {w['name']!r} ({tool.n8n_id('workflow', w['name'])}){', to publish' if name in WEBHOOK_FILES else ''}"
        for name, w in WORKFLOWS.items())
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["credentials.json", "publish", "workflows"]


@pytest.mark.parametrize("token", [None, "", "two words"])
def test_the_bundle_command_writes_nothing_without_a_usable_webhook_token(tmp_path, token):
    environ = {"DISPATCHER_API_TOKEN": "api-s3cret"} | ({} if token is None else {"N8N_WEBHOOK_TOKEN": token})

    result = run_bundle(tmp_path / "bundle", environ)

    assert result.returncode == 2
    assert re.match(r"n8n_workflows\.py: error: (set N8N_WEBHOOK_TOKEN|N8N_WEBHOOK_TOKEN must be printable)",
                    result.stderr.splitlines()[-1]), result.stderr
    assert (result.stdout, (tmp_path / "bundle").exists()) == ("", False)


def test_the_bundle_command_writes_nothing_for_an_open_webhook(tmp_path):
    workflow = json.loads(json.dumps(WORKFLOWS["dispatch_request.json"]))
    nodes_by_type(workflow, "n8n-nodes-base.webhook")[0]["parameters"]["authentication"] = "none"
    (tmp_path / "open.json").write_text(json.dumps(workflow))

    result = run_bundle(tmp_path / "bundle", ENVIRON, str(tmp_path / "open.json"))

    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "n8n_workflows.py: error: 'Dispatch (one call)': webhook 'Webhook' does not use header auth: anyone could call it")
    assert not (tmp_path / "bundle").exists()


def test_the_bundle_command_writes_nothing_for_an_open_resume_url(tmp_path):
    (tmp_path / "open.json").write_text(json.dumps(wait_resumed_by("webhook", None)))

    result = run_bundle(tmp_path / "bundle", ENVIRON, str(tmp_path / "open.json"))

    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "n8n_workflows.py: error: 'Dispatch async with callback': wait node 'Wait for callback' resumes on a webhook"
        " without header auth: anyone could resume it")
    assert not (tmp_path / "bundle").exists()
