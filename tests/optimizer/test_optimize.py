from __future__ import annotations

import pytest
from responses import matchers

from .conftest import ORCHESTRATOR, REGISTRY

GEMMA = "gemma3:270m-q4_k_m"
SMOL = "smollm2:135m-instruct-q4_1"


def _runtimes(http, model_id, count, status=200, starting=0):
    """The orchestrator's answers about a model's runtimes: `count` running, `starting` starting
    (asked only once it has answered the first)."""
    for runtime_status, n in (("running", count), ("starting", starting))[:2 if status == 200 else 1]:
        http.get(f"{ORCHESTRATOR}/runtimes", status=status,
                 json={"items": [{"id": str(i)} for i in range(n)]} if status == 200 else {"title": "down"},
                 match=[matchers.query_param_matcher({"model_id": str(model_id), "status": runtime_status})])


def _pending(conn, task_type, n):
    for _ in range(n):
        conn.execute("INSERT INTO request_queue (request_payload, task_type) VALUES ('{}', %s)", (task_type,))


def _running(conn, model_id, n=1, idle_seconds=0):
    for _ in range(n):
        conn.execute("""INSERT INTO container_lifecycle (model_id, driver, status, allocated_cpu, allocated_memory,
                            last_activity) VALUES (%s, 'process', 'running', 1, 768, now() - make_interval(secs => %s))""",
                     (model_id, idle_seconds))


@pytest.fixture
def scale_rule(client, conn, models, no_seed_rules):
    """Scale gemma3 up when more than 2 requests it can serve wait; it runs 1 of at most 4 replicas."""
    gemma = models[GEMMA]["id"]
    conn.execute("UPDATE model_registry SET max_replicas = 4 WHERE id = %s", (gemma,))
    _pending(conn, "summarization", 3)
    _running(conn, gemma)
    return client.post("/rules", json={
        "rule_name": "scale gemma", "scope": "model", "scope_value": str(gemma), "action_type": "scale_up",
        "action_parameters": {"scale_factor": 3}, "cooldown_seconds": 120,
        "conditions": [{"metric": "pending_queue_length", "operator": ">", "threshold": 2}]}).json


def _audit(conn):
    return conn.execute("SELECT * FROM optimization_actions ORDER BY id").fetchall()


def test_dry_run_measures_plans_and_writes_only_a_dry_run_audit_row(client, conn, models, http, scale_rule):
    gemma = str(models[GEMMA]["id"])
    _runtimes(http, gemma, 1)
    response = client.post(f"/rules/{scale_rule['id']}/evaluate")
    assert response.status_code == 200
    (audit,) = _audit(conn)
    assert response.json == {
        "rule_id": scale_rule["id"], "rule_name": "scale gemma", "window_seconds": 600, "scope": "model",
        "scope_value": gemma,
        "conditions": [{"position": 0, "metric": "pending_queue_length", "aggregate": "current", "operator": ">",
                        "threshold": 2.0, "value": 3.0, "holds": True, "note": None}],
        "verdict": True, "reason": "all 1 condition(s) hold", "in_cooldown": False, "cooldown_until": None,
        "action": {"action_type": "scale_up", "parameters": {"scale_factor": 3.0, "step": 1},
                   "would_run": True, "skipped": [], "error": None,
                   "calls": [{"method": "POST", "url": f"{ORCHESTRATOR}/models/{gemma}/scale",
                              "json": {"replicas": 3}, "model_id": gemma}]},
        "audit_id": audit["id"],
    }
    assert (audit["dry_run"], audit["status"], audit["error"]) == (True, "skipped", None)
    assert audit["result"] == {"would_call": response.json["action"]["calls"], "skipped": [], "in_cooldown": False}
    rule = client.get(f"/rules/{scale_rule['id']}").json
    assert (rule["success_count"], rule["last_evaluated_at"], rule["last_triggered_at"]) == (0, None, None)


def test_dry_run_without_data_says_so_and_writes_nothing(client, conn, models, no_seed_rules):
    rule = client.post("/rules", json={
        "rule_name": "slow", "action_type": "switch_model", "scope": "task_type", "scope_value": "classification",
        "conditions": [{"metric": "avg_processing_time_ms", "operator": ">", "threshold": 1000},
                       {"metric": "request_count", "operator": ">=", "threshold": 0}]}).json
    body = client.post(f"/rules/{rule['id']}/evaluate").json
    assert (body["verdict"], body["reason"], body["audit_id"]) == (
        False, "not met: avg_processing_time_ms (avg) has no data", None)
    assert [(c["value"], c["holds"], c["note"]) for c in body["conditions"]] == [
        (None, False, "no data in the window and scope: the condition is false"), (0.0, True, None)]
    assert body["action"] == {"action_type": "switch_model",
                              "parameters": {"max_processing_time_ms": None, "prefer_speed_over_accuracy": True},
                              "would_run": False, "calls": [], "skipped": [], "error": None}
    assert _audit(conn) == []


def test_optimize_acts_with_the_token_audits_counts_then_cools_down(make_app, conn, models, http, scale_rule):
    client = make_app(__import__("services.optimizer", fromlist=["create_app"]).create_app,
                      ORCHESTRATOR_URL=ORCHESTRATOR, REGISTRY_URL=REGISTRY, API_TOKEN="s3cret").test_client()
    auth = {"Authorization": "Bearer s3cret"}
    gemma = str(models[GEMMA]["id"])
    _runtimes(http, gemma, 1)
    http.post(f"{ORCHESTRATOR}/models/{gemma}/scale", json={"replicas": 3},
              match=[matchers.json_params_matcher({"replicas": 3}), matchers.header_matcher(auth)])
    response = client.post("/optimize", headers=auth)
    assert response.status_code == 200
    (audit,) = _audit(conn)
    assert response.json == {"results": [{"rule_id": scale_rule["id"], "rule_name": "scale gemma",
                                          "outcome": "succeeded", "reason": "all 1 condition(s) hold",
                                          "action_id": audit["id"]}]}
    assert {k: audit[k] for k in ("rule_name", "action_type", "action_parameters", "dry_run", "status", "error")} == {
        "rule_name": "scale gemma", "action_type": "scale_up", "action_parameters": {"scale_factor": 3.0, "step": 1},
        "dry_run": False, "status": "succeeded", "error": None}
    assert audit["measured"]["conditions"][0]["value"] == 3.0
    assert audit["result"] == {"skipped": [], "calls": [
        {"method": "POST", "url": f"{ORCHESTRATOR}/models/{gemma}/scale", "json": {"replicas": 3},
         "model_id": gemma, "status": 200}]}
    rule = client.get(f"/rules/{scale_rule['id']}", headers=auth).json
    assert (rule["success_count"], rule["failure_count"]) == (1, 0)
    assert rule["last_evaluated_at"] == rule["last_triggered_at"] is not None

    # In cooldown: no call is made (responses would fail on an unregistered one).
    again = client.post("/optimize", headers=auth).json["results"][0]
    assert (again["outcome"], again["reason"], again["action_id"]) == (
        "cooldown", f"in cooldown until {rule['cooldown_until']}", None)
    assert len(_audit(conn)) == 1

    # Listed in the audit trail.
    listed = client.get("/actions", headers=auth, query_string={"rule_id": scale_rule["id"]}).json["items"]
    assert [a["id"] for a in listed] == [audit["id"]]


def test_cooldown_over_acts_again(client, conn, models, http, scale_rule):
    gemma = str(models[GEMMA]["id"])
    conn.execute("UPDATE optimization_rules SET last_triggered_at = now() - interval '121 seconds' WHERE id = %s",
                 (scale_rule["id"],))
    _runtimes(http, gemma, 3)
    http.post(f"{ORCHESTRATOR}/models/{gemma}/scale", match=[matchers.json_params_matcher({"replicas": 4})])
    assert client.post("/optimize").json["results"][0]["outcome"] == "succeeded"


def test_not_triggered_records_the_evaluation_only(client, conn, scale_rule):
    conn.execute("UPDATE request_queue SET status = 'cancelled', completed_at = now()")
    (result,) = client.post("/optimize").json["results"]
    assert (result["outcome"], result["reason"]) == ("not_triggered", "not met: pending_queue_length (current) = 0, not > 2")
    rule = client.get(f"/rules/{scale_rule['id']}").json
    assert rule["last_evaluated_at"] is not None and rule["last_triggered_at"] is None
    assert _audit(conn) == []


def test_at_max_replicas_is_skipped_and_cools_down(client, conn, models, http, scale_rule):
    _runtimes(http, models[GEMMA]["id"], 4)
    (result,) = client.post("/optimize").json["results"]
    assert (result["outcome"], result["reason"]) == ("skipped", "already at 4 of at most 4 replicas")
    rule = client.get(f"/rules/{scale_rule['id']}").json
    assert (rule["success_count"], rule["failure_count"], rule["last_triggered_at"] is not None) == (0, 0, True)


def test_orchestrator_down_fails_before_any_change(client, conn, models, http, scale_rule):
    _runtimes(http, models[GEMMA]["id"], 0, status=503)
    (result,) = client.post("/optimize").json["results"]
    error = f"GET {ORCHESTRATOR}/runtimes?model_id={models[GEMMA]['id']}&status=running answered 503: " + '{"title": "down"}'
    assert (result["outcome"], result["reason"]) == ("failed", error)
    (audit,) = _audit(conn)
    assert (audit["status"], audit["error"], audit["result"]) == ("failed", error, {"calls": [], "skipped": []})
    assert client.get(f"/rules/{scale_rule['id']}").json["failure_count"] == 1


def test_failing_action_undoes_what_it_did(client, conn, models, http, log, no_seed_rules):
    gemma, smol = models[GEMMA], models[SMOL]
    log(gemma["id"], n=2, task_type="summarization", processing_time_ms=900, cpu_usage_percent=5)
    log(smol["id"], n=2, task_type="summarization", processing_time_ms=300, cpu_usage_percent=5)
    rule = client.post("/rules", json={
        "rule_name": "shrink", "scope": "task_type", "scope_value": "summarization",
        "action_type": "adjust_resources", "action_parameters": {"cpu_reduction": 0.5, "memory_reduction": 0.25},
        "conditions": [{"metric": "avg_cpu_percent", "operator": "<", "threshold": 30}]}).json
    gemma_url, smol_url = f"{REGISTRY}/models/{gemma['id']}", f"{REGISTRY}/models/{smol['id']}"
    # gemma3 is slower, so it comes first; smollm2's PATCH fails; gemma3's is undone.
    http.patch(gemma_url, match=[matchers.json_params_matcher(
        {"base_cpu_requirement": 0.5, "base_memory_requirement": 576})])
    http.patch(smol_url, status=500, body="boom", match=[matchers.json_params_matcher(
        {"base_cpu_requirement": 0.5, "base_memory_requirement": 384})])
    # The failed call is undone too (it may have done part of its work), then gemma3's.
    http.patch(smol_url, match=[matchers.json_params_matcher(
        {"base_cpu_requirement": 1.0, "base_memory_requirement": 512})])
    http.patch(gemma_url, match=[matchers.json_params_matcher(
        {"base_cpu_requirement": 1.0, "base_memory_requirement": 768})])
    (result,) = client.post("/optimize").json["results"]
    error = f"PATCH {smol_url} answered 500: boom"
    assert (result["outcome"], result["reason"]) == ("failed", error)
    (audit,) = _audit(conn)
    assert (audit["status"], audit["error"]) == ("failed", error)
    assert audit["result"] == {
        "calls": [{"method": "PATCH", "url": gemma_url, "model_id": str(gemma["id"]), "status": 200,
                   "json": {"base_cpu_requirement": 0.5, "base_memory_requirement": 576}}],
        "failed_call": {"method": "PATCH", "url": smol_url, "model_id": str(smol["id"]),
                        "json": {"base_cpu_requirement": 0.5, "base_memory_requirement": 384}},
        "undone": [{"url": smol_url, "status": 200,
                    "json": {"base_cpu_requirement": 1.0, "base_memory_requirement": 512}},
                   {"url": gemma_url, "status": 200,
                    "json": {"base_cpu_requirement": 1.0, "base_memory_requirement": 768}}],
        "skipped": [],
    }
    body = client.get(f"/rules/{rule['id']}").json
    assert (body["success_count"], body["failure_count"]) == (0, 1)


def test_switch_model_demotes_only_with_an_alternative(client, conn, models, http, log, no_seed_rules):
    orca, smol = models["orca-mini:3b"], models[SMOL]
    log(orca["id"], n=3, task_type="question-answering", processing_time_ms=40_000)
    log(smol["id"], n=3, task_type="question-answering", processing_time_ms=35_000)
    client.post("/rules", json={
        "rule_name": "switch", "scope": "task_type", "scope_value": "question-answering",
        "action_type": "switch_model", "action_parameters": {"max_processing_time_ms": 30_000},
        "conditions": [{"metric": "avg_processing_time_ms", "operator": ">", "threshold": 30_000}]}).json
    # Both are slow; orca-mini goes first, then smollm2 would leave question-answering unserved.
    http.patch(f"{REGISTRY}/models/{orca['id']}", match=[matchers.json_params_matcher({"active": False})])
    (result,) = client.post("/optimize").json["results"]
    assert result["outcome"] == "succeeded"
    (audit,) = _audit(conn)
    assert audit["result"]["skipped"] == [{"model_id": str(smol["id"]), "reason": (
        "smollm2:135m-instruct-q4_1 stays active: no other active model serves all of its task types")}]


def test_switch_model_without_alternative_is_skipped(client, conn, models, log, no_seed_rules):
    orca = models["orca-mini:3b"]
    conn.execute("UPDATE model_registry SET active = false WHERE name = 'smollm2'")
    log(orca["id"], n=3, task_type="question-answering", processing_time_ms=40_000)
    client.post("/rules", json={
        "rule_name": "switch", "action_type": "switch_model",
        "conditions": [{"metric": "avg_processing_time_ms", "operator": ">", "threshold": 30_000}]})
    (result,) = client.post("/optimize").json["results"]
    assert (result["outcome"], result["reason"]) == (
        "skipped", "orca-mini:3b stays active: no other active model serves all of its task types")


def test_scale_down_idle_models_and_reap(client, conn, models, http, no_seed_rules):
    gemma, smol = models[GEMMA]["id"], models[SMOL]["id"]
    _running(conn, gemma, n=2, idle_seconds=900)
    _running(conn, smol, n=1, idle_seconds=10)
    client.post("/rules", json={
        "rule_name": "down", "action_type": "scale_down",
        "action_parameters": {"min_replicas": 1, "idle_threshold_seconds": 300, "reap": True},
        "conditions": [{"metric": "request_count", "aggregate": "count", "operator": "<", "threshold": 2}]})
    _runtimes(http, gemma, 2)
    http.post(f"{ORCHESTRATOR}/models/{gemma}/scale", match=[matchers.json_params_matcher({"replicas": 1})])
    http.post(f"{ORCHESTRATOR}/runtimes/reap", json={"reaped": []})
    (result,) = client.post("/optimize").json["results"]
    assert result["outcome"] == "succeeded"
    (audit,) = _audit(conn)
    assert audit["result"]["skipped"] == [
        {"model_id": str(smol), "reason": "active 10s ago, under the idle threshold of 300s"}]
    assert [c["url"] for c in audit["result"]["calls"]] == [
        f"{ORCHESTRATOR}/models/{gemma}/scale", f"{ORCHESTRATOR}/runtimes/reap"]


def test_rules_run_in_priority_order(client, conn, no_seed_rules):
    for name, priority in (("low", 1), ("high", 900), ("mid", 50)):
        client.post("/rules", json={"rule_name": name, "priority": priority, "action_type": "scale_up",
                                    "conditions": [{"metric": "running_runtimes", "operator": ">", "threshold": 99}]})
    assert [r["rule_name"] for r in client.post("/optimize").json["results"]] == ["high", "mid", "low"]


def test_list_actions_validates_its_query(client):
    response = client.get("/actions", query_string={"limit": 0, "rule_id": "x"})
    assert response.status_code == 422
    assert response.json["errors"] == {"query": {
        "limit": ["Must be greater than or equal to 1 and less than or equal to 500."],
        "rule_id": ["Not a valid UUID."]}}


def test_a_rule_locked_by_another_optimize_is_skipped(fresh_database_url):
    from services.common.config import Settings
    from services.common.db import SingleConnectionDatabase, connect
    from services.common.http import http_session
    from services.optimizer.rules import optimize

    with connect(fresh_database_url) as holder, connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("UPDATE optimization_rules SET active = (rule_name = 'Scale Up on High Queue')")
        rule_id = holder.execute("SELECT id FROM optimization_rules WHERE active FOR UPDATE").fetchone()["id"]
        results = optimize(SingleConnectionDatabase(conn), http_session(), Settings(database_url=fresh_database_url))
        holder.rollback()
    assert results == [{"rule_id": rule_id, "rule_name": None, "outcome": "busy",
                        "reason": "being evaluated elsewhere, deleted or deactivated", "action_id": None}]


def test_a_rule_that_fails_unexpectedly_is_reported_and_the_rules_after_it_still_run(fresh_database_url, monkeypatch,
                                                                                    caplog):
    from services.common.config import Settings
    from services.common.db import SingleConnectionDatabase, connect
    from services.common.http import http_session
    from services.optimizer import rules

    evaluate = rules.evaluate

    def first_fails(conn, rule):
        if rule["priority"] == top_priority:
            raise ZeroDivisionError("a bug")
        return evaluate(conn, rule)

    monkeypatch.setattr(rules, "evaluate", first_fails)
    with connect(fresh_database_url, autocommit=True) as conn:
        active = conn.execute("SELECT id, priority FROM optimization_rules WHERE active"
                              " ORDER BY priority DESC, rule_name").fetchall()
        assert len(active) >= 2 and active[0]["priority"] > active[1]["priority"]
        top_priority = active[0]["priority"]
        results = rules.optimize(SingleConnectionDatabase(conn), http_session(),
                                 Settings(database_url=fresh_database_url))
        evaluated = conn.execute("SELECT id FROM optimization_rules WHERE last_evaluated_at IS NOT NULL").fetchall()
    others = [r["id"] for r in active[1:]]
    assert results[0] == {"rule_id": active[0]["id"], "rule_name": None, "outcome": "error",
                          "reason": "unexpected ZeroDivisionError; see the optimizer's log", "action_id": None}
    assert [r["rule_id"] for r in results[1:]] == others
    assert all(r["outcome"] != "error" for r in results[1:])
    assert sorted(r["id"] for r in evaluated) == sorted(others)
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == ["optimization rule failed"]


def test_a_model_serving_a_long_request_is_not_idle_for_scale_down(client, conn, models, http, no_seed_rules):
    """last_activity is when its requests began: a runtime busy for 15 minutes is not idle."""
    gemma = str(models[GEMMA]["id"])
    for _ in range(2):
        conn.execute("""INSERT INTO container_lifecycle (model_id, driver, status, allocated_cpu, allocated_memory,
                            active_requests, last_activity)
                        VALUES (%s, 'process', 'running', 1, 768, 1, now() - interval '900 s')""", (gemma,))
    client.post("/rules", json={
        "rule_name": "down", "scope": "model", "scope_value": gemma, "action_type": "scale_down",
        "action_parameters": {"min_replicas": 1, "idle_threshold_seconds": 300},
        "conditions": [{"metric": "request_count", "operator": "<", "threshold": 2}]})
    (result,) = client.post("/optimize").json["results"]
    assert (result["outcome"], result["reason"]) == (
        "skipped", "active 0s ago, under the idle threshold of 300s")


def test_replicas_being_started_count_as_replicas(client, conn, models, http, no_seed_rules):
    """The orchestrator's scale counts starting runtimes: so does the plan, else a step adds nothing."""
    gemma = str(models[GEMMA]["id"])
    conn.execute("UPDATE model_registry SET max_replicas = 4 WHERE id = %s", (gemma,))
    _running(conn, gemma)
    _pending(conn, "summarization", 5)
    _runtimes(http, gemma, 1, starting=1)
    # 2 replicas (one still starting) doubled by the default scale factor.
    http.post(f"{ORCHESTRATOR}/models/{gemma}/scale", match=[matchers.json_params_matcher({"replicas": 4})])
    client.post("/rules", json={
        "rule_name": "up", "scope": "model", "scope_value": gemma, "action_type": "scale_up",
        "action_parameters": {"step": 1}, "conditions": [
            {"metric": "pending_queue_length", "operator": ">", "threshold": 2}]})
    (result,) = client.post("/optimize").json["results"]
    assert result["outcome"] == "succeeded"


def test_a_rule_over_several_models_acts_only_on_those_it_holds_for(client, conn, models, http, no_seed_rules):
    """A queue of summarization requests scales the summarizer up, not an idle code model beside it."""
    gemma, codellama = str(models[GEMMA]["id"]), str(models["codellama:7b"]["id"])
    conn.execute("UPDATE model_registry SET max_replicas = 4")
    _running(conn, gemma)
    _running(conn, codellama)
    _pending(conn, "summarization", 3)
    _runtimes(http, gemma, 1)
    http.post(f"{ORCHESTRATOR}/models/{gemma}/scale", match=[matchers.json_params_matcher({"replicas": 2})])
    client.post("/rules", json={
        "rule_name": "queue", "scope": "all", "action_type": "scale_up", "action_parameters": {"step": 1},
        "conditions": [{"metric": "pending_queue_length", "operator": ">", "threshold": 2}]})
    (result,) = client.post("/optimize").json["results"]
    assert result["outcome"] == "succeeded"
    (audit,) = _audit(conn)
    assert audit["result"]["skipped"] == [
        {"model_id": codellama, "reason": "the rule's conditions do not hold for this model alone"}]


def test_memory_is_never_cut_below_what_was_measured(client, conn, models, http, log, no_seed_rules):
    gemma = models[GEMMA]
    log(gemma["id"], n=2, task_type="summarization", cpu_usage_percent=5, memory_used_mb=700)
    client.post("/rules", json={
        "rule_name": "shrink", "scope": "model", "scope_value": str(gemma["id"]), "action_type": "adjust_resources",
        "action_parameters": {"memory_reduction": 0.5},
        "conditions": [{"metric": "avg_cpu_percent", "operator": "<", "threshold": 30}]})
    http.patch(f"{REGISTRY}/models/{gemma['id']}", match=[matchers.json_params_matcher(
        {"base_memory_requirement": 700})])
    (result,) = client.post("/optimize").json["results"]
    assert result["outcome"] == "succeeded"


def test_a_call_that_timed_out_is_not_undone(client, conn, models, http, no_seed_rules):
    """The orchestrator may still be starting the replica: an undo would stop a warm one in its place."""
    import requests

    gemma = str(models[GEMMA]["id"])
    conn.execute("UPDATE model_registry SET max_replicas = 4 WHERE id = %s", (gemma,))
    _running(conn, gemma)
    _pending(conn, "summarization", 5)
    _runtimes(http, gemma, 1)
    http.post(f"{ORCHESTRATOR}/models/{gemma}/scale", body=requests.exceptions.ReadTimeout("Read timed out."))
    client.post("/rules", json={
        "rule_name": "up", "scope": "model", "scope_value": gemma, "action_type": "scale_up",
        "action_parameters": {"step": 1}, "conditions": [
            {"metric": "pending_queue_length", "operator": ">", "threshold": 2}]})
    (result,) = client.post("/optimize").json["results"]
    assert result["outcome"] == "failed"
    (audit,) = _audit(conn)
    assert audit["result"]["undone"] == []


def test_a_rule_over_a_task_type_measures_each_model_at_that_task(client, conn, models, http, log, no_seed_rules):
    """smollm2 is fast at question answering and slow at code: a rule on question answering leaves it."""
    orca, smol = models["orca-mini:3b"], models[SMOL]
    log(orca["id"], n=4, task_type="question-answering", processing_time_ms=40_000)
    log(smol["id"], n=1, task_type="question-answering", processing_time_ms=100)
    log(smol["id"], n=4, task_type="code-generation", processing_time_ms=100_000)
    client.post("/rules", json={
        "rule_name": "grow", "scope": "task_type", "scope_value": "question-answering",
        "action_type": "adjust_resources", "action_parameters": {"cpu_increase": 0.5},
        "conditions": [{"metric": "avg_processing_time_ms", "operator": ">", "threshold": 30_000}]})
    http.patch(f"{REGISTRY}/models/{orca['id']}")
    (result,) = client.post("/optimize").json["results"]
    assert result["outcome"] == "succeeded"
    (audit,) = _audit(conn)
    assert [call["model_id"] for call in audit["result"]["calls"]] == [str(orca["id"])]
    assert audit["result"]["skipped"] == [
        {"model_id": str(smol["id"]), "reason": "the rule's conditions do not hold for this model alone"}]
