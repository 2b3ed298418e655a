"""The committed workflow files: importable shape, no secrets, stable form; the export and import helpers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from n8n_stack import ROOT, workflow_tool

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
    text = json.dumps(workflow)
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


def test_webhook_flows_answer_through_a_respond_node_on_unique_paths():
    paths = []
    for workflow in WORKFLOWS.values():
        for hook in nodes_by_type(workflow, "n8n-nodes-base.webhook"):
            assert (hook["parameters"]["httpMethod"], hook["parameters"]["responseMode"]) == ("POST", "responseNode")
            assert nodes_by_type(workflow, "n8n-nodes-base.respondToWebhook")
            paths.append(hook["parameters"]["path"])
    assert sorted(paths) == ["ai-dispatch", "chat", "dispatch", "dispatch-async", "feedback", "onboard-model"]


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
             "position": [-9, 290], "webhookId": "random-3", "parameters": {"path": "feedback"}},
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
             "parameters": {"path": "feedback"}},
        ],
    }


def test_import_points_each_authenticating_node_at_its_credential():
    workflow = WORKFLOWS["chat_ollama.json"] | {"nodes": WORKFLOWS["chat_ollama.json"]["nodes"] + [
        WORKFLOWS["dispatch_request.json"]["nodes"][0]]}
    ids = {"httpHeaderAuth": ("h1", "Dispatcher API"), "ollamaApi": ("o1", "Dispatcher Ollama front door")}

    prepared = tool.with_credentials(workflow, ids)

    assert {node["name"]: node.get("credentials") for node in prepared["nodes"]} == {
        "Answer": None, "Respond": None, "Webhook": None,
        "Dispatcher (Ollama Chat Model)": {"ollamaApi": {"id": "o1", "name": "Dispatcher Ollama front door"}},
        "Dispatch": {"httpHeaderAuth": {"id": "h1", "name": "Dispatcher API"}},
    }
    assert WORKFLOWS["chat_ollama.json"]["nodes"][1].get("credentials") is None   # the file's data is untouched


def test_credentials_come_from_the_environment():
    assert tool.credential_data({"DISPATCHER_API_TOKEN": "s3cret", "ORCHESTRATOR_URL": "http://orch:8102/"}) == {
        "httpHeaderAuth": {"name": "Authorization", "value": "Bearer s3cret"},
        "ollamaApi": {"baseUrl": "http://orch:8102", "apiKey": "s3cret"},
    }
    assert tool.credential_data({}) == {
        "httpHeaderAuth": {"name": "Authorization", "value": "Bearer none"},
        "ollamaApi": {"baseUrl": "http://127.0.0.1:8102", "apiKey": ""},
    }
