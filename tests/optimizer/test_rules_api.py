from __future__ import annotations

import threading
import uuid

import pytest

from services.common.db import connect
from services.optimizer import rules
from services.optimizer.schemas import RuleSchema

from .helpers import problem

INVALID = "The request is invalid: see errors for each field."


def _rule(**fields) -> dict:
    return {"rule_name": "queue", "action_type": "scale_up",
            "conditions": [{"metric": "pending_queue_length", "operator": ">", "threshold": 5}], **fields}


def test_create_rule_fills_defaults_and_returns_it_whole(client):
    response = client.post("/rules", json=_rule(
        scope="task_type", scope_value="summarization", action_parameters={"max_replicas": 3},
        conditions=[{"metric": "pending_queue_length", "operator": ">", "threshold": 5},
                    {"metric": "p95_processing_time_ms", "aggregate": "p99", "operator": ">=", "threshold": 2000}]))
    assert response.status_code == 201
    body = response.json
    assert body == {
        "id": body["id"], "rule_name": "queue", "window_seconds": 600, "scope": "task_type",
        "scope_value": "summarization", "action_type": "scale_up", "action_parameters": {"max_replicas": 3},
        "priority": 100, "cooldown_seconds": 300, "active": True,
        "conditions": [
            {"metric": "pending_queue_length", "aggregate": "current", "operator": ">", "threshold": 5.0},
            {"metric": "p95_processing_time_ms", "aggregate": "p99", "operator": ">=", "threshold": 2000.0}],
        "success_count": 0, "failure_count": 0, "last_evaluated_at": None, "last_triggered_at": None,
        "cooldown_until": None, "created_at": body["created_at"], "updated_at": body["updated_at"],
    }
    assert client.get(f"/rules/{body['id']}").json == body


def test_list_is_in_evaluation_order_and_filters_active(client):
    client.post("/rules", json=_rule(rule_name="first", priority=1000))
    client.post("/rules", json=_rule(rule_name="off", priority=999, active=False))
    names = [r["rule_name"] for r in client.get("/rules").json["items"]]
    assert names == ["first", "off", "Scale Up on High Queue", "Switch to Faster Model on Timeout",
                     "Scale Down on Low Activity", "Reduce Resources on Low Utilization"]
    assert [r["rule_name"] for r in client.get("/rules?active=false").json["items"]] == ["off"]
    assert [r["rule_name"] for r in client.get("/rules?limit=1&offset=1").json["items"]] == ["off"]


def test_seed_rules_ship_as_structured_rules(client):
    rules = {r["rule_name"]: r for r in client.get("/rules").json["items"]}
    reduce = rules["Reduce Resources on Low Utilization"]
    assert (reduce["action_type"], reduce["window_seconds"], reduce["conditions"]) == ("adjust_resources", 3600, [
        {"metric": "avg_cpu_percent", "aggregate": "avg", "operator": "<", "threshold": 30.0},
        {"metric": "avg_memory_mb", "aggregate": "avg", "operator": "<", "threshold": 2048.0}])


@pytest.mark.parametrize(("body", "errors"), [
    (_rule(conditions=[{"metric": "gpu_temperature", "operator": ">", "threshold": 1}]),
     {"conditions": {"0": {"metric": ["Must be one of: pending_queue_length, request_count, "
                                      "avg_processing_time_ms, p95_processing_time_ms, success_rate, "
                                      "validation_pass_rate, avg_cpu_percent, avg_memory_mb, idle_seconds, "
                                      "running_runtimes."]}}}),
    (_rule(conditions=[{"metric": "success_rate", "aggregate": "p95", "operator": "<", "threshold": 0.5}]),
     {"conditions": {"0": {"aggregate": ["success_rate offers the aggregates ['avg']."]}}}),
    (_rule(conditions=[{"metric": "success_rate", "operator": "~", "threshold": "NaN"}]),
     {"conditions": {"0": {"operator": ["Must be one of: >, >=, <, <=, =, !=."],
                           "threshold": ["Special numeric values (nan or infinity) are not permitted."]}}}),
    (_rule(conditions=[]), {"conditions": ["Length must be between 1 and 10."]}),
    (_rule(scope_value="summarization"), {"scope_value": ["Must be null when scope is all."]}),
    (_rule(scope="task_type"), {"scope_value": ["Required when scope is task_type."]}),
    (_rule(scope="task_type", scope_value="poetry"),
     {"scope_value": ["Must be one of: text-generation, code-generation, question-answering, "
                      "conversation, summarization, classification."]}),
    (_rule(scope="model", scope_value="gemma3"), {"scope_value": ["Must be a model id (UUID)."]}),
    (_rule(action_parameters={"scale_factor": 20, "replicas": 2}),
     {"action_parameters": {"scale_factor": ["Must be greater than or equal to 1 and less than or equal to 10."],
                            "replicas": ["Unknown field."]}}),
    (_rule(action_type="adjust_resources", action_parameters={}),
     {"action_parameters": {"_schema": ["Set at least one of cpu/memory reduction/increase."]}}),
    (_rule(action_type="adjust_resources", action_parameters={"cpu_reduction": 0.5, "cpu_increase": 0.5}),
     {"action_parameters": {"_schema": ["cpu: a reduction and an increase exclude each other."]}}),
    (_rule(rule_name="", window_seconds=0, sql="DROP TABLE x"),
     {"rule_name": ["Length must be between 1 and 200."],
      "window_seconds": ["Must be greater than or equal to 1 and less than or equal to 2592000."],
      "sql": ["Unknown field."]}),
])
def test_create_rule_validates(client, body, errors):
    response = client.post("/rules", json=body)
    assert response.status_code == 422
    assert response.json == problem(response, 422, INVALID, errors={"json": errors})


def test_model_scope_needs_an_existing_model(client, models):
    response = client.post("/rules", json=_rule(scope="model", scope_value=str(uuid.uuid4())))
    assert response.status_code == 422
    assert response.json == problem(response, 422, INVALID,
                                    errors={"json": {"scope_value": ["No model has this id."]}})
    ok = client.post("/rules", json=_rule(scope="model", scope_value=str(models["gemma3:270m-q4_k_m"]["id"])))
    assert ok.status_code == 201


def test_duplicate_name_is_409(client):
    response = client.post("/rules", json=_rule(rule_name="Scale Up on High Queue"))
    assert response.status_code == 409
    assert response.json == problem(response, 409, "A resource with these unique fields already exists.",
                                    constraint="optimization_rules_rule_name_key")


def test_patch_merges_and_replaces_conditions(client):
    rule = client.post("/rules", json=_rule(scope="task_type", scope_value="summarization")).json
    response = client.patch(f"/rules/{rule['id']}", json={
        "priority": 7, "conditions": [{"metric": "idle_seconds", "operator": ">", "threshold": 60}]})
    assert response.status_code == 200
    assert (response.json["priority"], response.json["scope_value"], response.json["conditions"]) == (
        7, "summarization", [{"metric": "idle_seconds", "aggregate": "current", "operator": ">", "threshold": 60.0}])
    # Scope all clears the scope value.
    assert client.patch(f"/rules/{rule['id']}", json={"scope": "all"}).json["scope_value"] is None


def test_concurrent_patches_of_a_rule_take_turns_and_both_land(fresh_database_url):
    with connect(fresh_database_url) as first, connect(fresh_database_url) as second:
        rule = rules.create_rule(first, RuleSchema().load(_rule()))
        first.commit()
        rules.update_rule(first, rule["id"], {"priority": 7})   # its transaction still open
        other = threading.Thread(target=lambda: (rules.update_rule(second, rule["id"], {"cooldown_seconds": 11}),
                                                 second.commit()))
        other.start()
        other.join(0.3)
        assert other.is_alive()   # waiting for the first to end
        first.commit()
        other.join(10)
        final = rules.get_rule(first, rule["id"])
    assert (final["priority"], final["cooldown_seconds"]) == (7, 11)


def test_patch_validates_the_merged_rule(client):
    rule = client.post("/rules", json=_rule(action_parameters={"scale_factor": 3})).json
    response = client.patch(f"/rules/{rule['id']}", json={"action_type": "scale_down"})
    assert response.status_code == 422
    assert response.json == problem(response, 422, INVALID,
                                    errors={"json": {"action_parameters": {"scale_factor": ["Unknown field."]}}})
    assert client.get(f"/rules/{rule['id']}").json["action_type"] == "scale_up"


def test_delete_then_404(client):
    rule = client.post("/rules", json=_rule()).json
    assert client.delete(f"/rules/{rule['id']}").status_code == 204
    for response in (client.get(f"/rules/{rule['id']}"), client.delete(f"/rules/{rule['id']}"),
                     client.patch(f"/rules/{rule['id']}", json={"priority": 1}),
                     client.post(f"/rules/{rule['id']}/evaluate")):
        assert response.status_code == 404
        assert response.json == problem(response, 404, f"No optimization rule has the id {rule['id']}.")
