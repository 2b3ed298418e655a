"""Selection: eligibility and its reasons, ranking on measured data, exploration, cold starts."""
from __future__ import annotations

import math

import pytest
from registry_helpers import (INVALID, add_model, add_runtime, log_requests, model_body, problem,
                              refresh)

from services.common.config import Settings
from services.registry import create_app
from services.registry import selection
from services.registry.selection import NoCandidate, SelectionRequest, select_models

SETTINGS = Settings()
PRIORS = {"avg_latency_ms": 500, "accuracy": 0.8, "load_time_ms": 1000}


@pytest.fixture
def empty(conn):
    """No model but the ones the test adds (the seeds come back at rollback)."""
    conn.execute("DELETE FROM model_registry")
    return conn


def summarizer(conn, name: str, **overrides) -> dict:
    fields = {"task_types": ["summarization"], "complexity_score": 5,
              "base_memory_requirement": 1024, "performance_metrics": PRIORS, **overrides}
    return add_model(conn, name, **fields)


def select(conn, **request) -> list[str]:
    selection = select_models(conn, SelectionRequest(task_type="summarization", **request), SETTINGS)
    return [c.model["name"] for c in selection.candidates]


def test_measured_data_ranks_models_per_objective(empty):
    fast, slow, flaky = (summarizer(empty, name) for name in ("fast", "slow", "flaky"))
    log_requests(empty, fast["id"], 100, 300, validation_passed=True)
    log_requests(empty, slow["id"], 100, 3000)
    log_requests(empty, flaky["id"], 50, 300)
    log_requests(empty, flaky["id"], 50, 300, success=False)
    refresh(empty)

    assert select(empty, weights={"accuracy": 1}) == ["fast", "slow", "flaky"]
    # Equal latency: the tie is broken by name.
    assert select(empty, weights={"speed": 1}) == ["fast", "flaky", "slow"]

    best = select_models(empty, SelectionRequest(task_type="summarization"), SETTINGS).candidates[0]
    prior_weight, samples = 20, 100
    success = (samples * 1.0 + prior_weight * 0.9) / (samples + prior_weight)
    p95 = (samples * 300 + prior_weight * 500 * 1.5) / (samples + prior_weight)
    validation = (samples * 1.0 + prior_weight * 0.8) / (samples + prior_weight)
    bonus = 0.1 * math.sqrt(math.log1p(300) / (1 + samples))
    assert best.model == fast
    assert best.data == pytest.approx({
        "success_rate": success, "p95_latency_ms": p95, "tokens_per_second": None,
        "validation_pass_rate": validation, "feedback_score": 0.8, "sample_size": 100,
        "warm": False, "load_time_ms": 1000.0, "expected_latency_ms": p95 + 1000,
        "exploration_bonus": bonus})
    assert best.breakdown == pytest.approx({
        "speed": 0.3 / (1 + (p95 + 1000) / 1000), "accuracy": 0.4 * success * (2 * validation + 0.8) / 3,
        "memory": 0.15 / (1 + 1024 / 4096), "cost": 0.15 / (1 + (5 - 1) / 3), "exploration": bonus,
        "warm": 0.0})
    assert best.score == pytest.approx(sum(best.breakdown.values()))


def rate(conn, model_id, count: int, score: float) -> None:
    for _ in range(count):
        request_id = conn.execute("INSERT INTO request_queue (request_payload, task_type)"
                                  " VALUES ('{}', 'summarization') RETURNING id").fetchone()["id"]
        conn.execute("INSERT INTO request_feedback (request_id, model_id, score) VALUES (%s, %s, %s)",
                     (request_id, model_id, score))


def test_a_feedback_score_weighs_as_the_ratings_it_rests_on(empty):
    """Not as the requests served: one rating of many requests barely moves the prior, and ratings of
    a model not used in the window still count."""
    used, rated = summarizer(empty, "used"), summarizer(empty, "rated")
    log_requests(empty, used["id"], 200, 300)
    rate(empty, used["id"], 1, 0.0)
    rate(empty, rated["id"], 50, 0.0)
    refresh(empty)

    scores = {c.model["name"]: c.data["feedback_score"]
              for c in select_models(empty, SelectionRequest(task_type="summarization"), SETTINGS).candidates}
    assert scores == pytest.approx({"used": 20 * 0.8 / 21, "rated": 20 * 0.8 / 70})


def test_a_new_model_gets_an_exploration_bonus_that_shrinks_as_it_is_measured(empty):
    known, new = summarizer(empty, "known"), summarizer(empty, "new")
    log_requests(empty, known["id"], 200, 750, validation_passed=True)
    refresh(empty)
    first, second = select_models(empty, SelectionRequest(task_type="summarization"),
                                  SETTINGS).candidates
    assert (first.model["name"], second.model["name"]) == ("new", "known")
    assert first.data["exploration_bonus"] == pytest.approx(0.1 * math.sqrt(math.log1p(200)))
    assert second.data["exploration_bonus"] == pytest.approx(
        0.1 * math.sqrt(math.log1p(200) / 201))

    log_requests(empty, new["id"], 200, 750, validation_passed=True)
    refresh(empty)
    first, second = select_models(empty, SelectionRequest(task_type="summarization"),
                                  SETTINGS).candidates
    assert first.data["exploration_bonus"] == second.data["exploration_bonus"]
    assert (first.model["name"], second.model["name"]) == ("known", "new")


def test_a_cold_model_pays_its_load_time(empty):
    cold, warm = summarizer(empty, "cold"), summarizer(empty, "warm")
    unhealthy = summarizer(empty, "unhealthy")
    add_runtime(empty, warm["id"])
    add_runtime(empty, unhealthy["id"], health="unhealthy")
    add_runtime(empty, cold["id"], status="stopped")
    candidates = select_models(empty, SelectionRequest(task_type="summarization",
                                                       weights={"speed": 1}), SETTINGS).candidates
    by_name = {c.model["name"]: c.data for c in candidates}
    assert [c.model["name"] for c in candidates] == ["warm", "cold", "unhealthy"]
    assert {name: (d["warm"], d["expected_latency_ms"]) for name, d in by_name.items()} == {
        "warm": (True, 750.0), "cold": (False, 1750.0), "unhealthy": (False, 1750.0)}


def test_a_measured_load_time_replaces_the_prior(empty):
    model = summarizer(empty, "loaded")
    log_requests(empty, model["id"], 10, 200, load_time_ms=4000)
    refresh(empty)
    data = select_models(empty, SelectionRequest(task_type="summarization"),
                         SETTINGS).candidates[0].data
    assert data["load_time_ms"] == 4000.0
    assert data["expected_latency_ms"] == pytest.approx(data["p95_latency_ms"] + 4000)


def test_prefer_warm_adds_a_bonus_to_warm_models(empty):
    # Memory scores 0.889 and 0.8: less apart than the warm bonus (0.1).
    summarizer(empty, "cold", base_memory_requirement=512)
    warm = summarizer(empty, "warm", base_memory_requirement=1024)
    add_runtime(empty, warm["id"])
    assert select(empty, weights={"memory": 1}) == ["cold", "warm"]
    assert select(empty, weights={"memory": 1}, prefer_warm=True) == ["warm", "cold"]
    candidate = select_models(empty, SelectionRequest(task_type="summarization", prefer_warm=True),
                              SETTINGS).candidates[0]
    assert candidate.breakdown["warm"] == 0.1


def test_cost_prefers_the_smallest_capable_model(empty):
    summarizer(empty, "big", complexity_score=9)
    summarizer(empty, "small", complexity_score=6)
    summarizer(empty, "weak", complexity_score=5)
    assert select(empty, complexity=6, weights={"cost": 1}) == ["small", "big"]


def test_every_filter_reason_is_reported_with_counts_and_examples(empty):
    summarizer(empty, "good")
    summarizer(empty, "off", active=False)
    summarizer(empty, "boxed", runtime_driver="docker",
               runtime_config={"image": "ollama/ollama", "model_name": "boxed:1"})
    summarizer(empty, "weak", complexity_score=2)
    summarizer(empty, "weak2", complexity_score=1)
    summarizer(empty, "huge", base_memory_requirement=65536)
    summarizer(empty, "plain", tags=[])
    summarizer(empty, "banned", tags=["fast"])
    summarizer(empty, "slow", tags=["fast"], performance_metrics={"p95_latency_ms": 9000})
    add_model(empty, "other", task_types=["classification"])
    request = SelectionRequest(task_type="summarization", complexity=4, max_memory_mb=4096,
                               max_latency_ms=5000, required_tags=("fast",),
                               exclude=("banned:1.0",))
    empty.execute("UPDATE model_registry SET tags = '{fast}' WHERE name IN ('good', 'off', "
                  "'boxed', 'weak', 'weak2', 'huge')")

    selection = select_models(empty, request, SETTINGS)
    assert [c.model["name"] for c in selection.candidates] == ["good"]
    assert selection.eligible_count == 1
    assert [vars(group) for group in selection.filtered] == [
        {"constraint": "active", "reason": "inactive", "count": 1, "models": ["off:1.0"]},
        {"constraint": "runtime_driver", "reason": "driver docker not enabled", "count": 1,
         "models": ["boxed:1.0"]},
        {"constraint": "complexity", "reason": "complexity_score below 4", "count": 2,
         "models": ["weak:1.0", "weak2:1.0"]},
        {"constraint": "max_memory_mb", "reason": "base_memory_requirement above max_memory_mb 4096",
         "count": 1, "models": ["huge:1.0"]},
        {"constraint": "required_tags", "reason": "missing one of the required tags", "count": 1,
         "models": ["plain:1.0"]},
        {"constraint": "exclude", "reason": "excluded by the request", "count": 1,
         "models": ["banned:1.0"]},
        {"constraint": "max_latency_ms", "reason": "expected latency above max_latency_ms 5000",
         "count": 1, "models": ["slow:1.0"]},
    ]


def test_exclude_takes_ids_too(empty):
    first = summarizer(empty, "first")
    summarizer(empty, "second")
    assert select(empty, exclude=(str(first["id"]).upper(),)) == ["second"]


def test_a_name_version_that_reads_as_an_id_too_names_the_model(empty):
    summarizer(empty, "urn", version="0123456789abcdef0123456789abcdef")
    summarizer(empty, "other")
    assert select(empty, exclude=("urn:0123456789abcdef0123456789abcdef",)) == ["other"]


def test_no_candidate_says_which_constraints_eliminated_the_models(empty):
    summarizer(empty, "weak", complexity_score=2)
    with pytest.raises(NoCandidate) as raised:
        select_models(empty, SelectionRequest(task_type="summarization", complexity=9), SETTINGS)
    assert raised.value.status == 422
    assert raised.value.detail == ("No model can take this summarization request: "
                                   "1 complexity_score below 9.")
    with pytest.raises(NoCandidate) as raised:
        select_models(empty, SelectionRequest(task_type="classification"), SETTINGS)
    assert raised.value.extensions["filtered"] == [{
        "constraint": "task_type", "reason": "task type classification not served", "count": 1,
        "models": []}]


def test_changes_are_seen_at_once_in_the_same_transaction(empty):
    one, two = summarizer(empty, "one"), summarizer(empty, "two")
    assert select(empty, weights={"accuracy": 1}) == ["one", "two"]
    empty.execute("UPDATE model_registry SET performance_metrics = %s::jsonb WHERE id = %s",
                  ('{"accuracy": 0.99}', two["id"]))
    assert select(empty, weights={"accuracy": 1}) == ["two", "one"]
    log_requests(empty, two["id"], 100, 100, success=False)
    refresh(empty)
    assert select(empty, weights={"accuracy": 1}) == ["one", "two"]
    log_requests(empty, one["id"], 400, 100, success=False)
    refresh(empty)
    assert select(empty, weights={"accuracy": 1}) == ["two", "one"]
    add_runtime(empty, one["id"])
    assert select(empty, weights={"speed": 1}) == ["one", "two"]


def test_a_selection_carries_the_templates_version_that_a_template_write_changes(empty):
    summarizer(empty, "one")
    before = select_models(empty, SelectionRequest(task_type="summarization"), SETTINGS)
    empty.execute("UPDATE prompt_templates SET description = 'changed' WHERE task_type = 'default'")
    after = select_models(empty, SelectionRequest(task_type="summarization"), SETTINGS)
    versions = [row["version"] for row in empty.execute("SELECT version::text FROM prompt_templates_version")]
    assert after.templates_version == versions[0]
    assert before.templates_version not in (None, after.templates_version)


def test_the_same_data_gives_the_same_selection(empty):
    for name in ("a", "b", "c"):
        summarizer(empty, name)
    request = SelectionRequest(task_type="summarization", limit=2)
    first = select_models(empty, request, SETTINGS)
    assert select_models(empty, request, SETTINGS) == first
    assert [c.model["name"] for c in first.candidates] == ["a", "b"]
    assert first.eligible_count == 3


def test_a_repeated_request_on_the_same_state_is_ranked_once(empty, monkeypatch):
    one = summarizer(empty, "one")
    rankings = []
    rank = selection._rank
    monkeypatch.setattr(selection, "_rank", lambda *args: rankings.append(args[1]) or rank(*args))
    request = SelectionRequest(task_type="summarization", weights={"speed": 1, "memory": 0.5})

    first = select_models(empty, request, SETTINGS)
    assert select_models(empty, SelectionRequest(task_type="summarization",
                                                 weights={"memory": 0.5, "speed": 1}), SETTINGS) is first
    assert len(rankings) == 1
    select_models(empty, SelectionRequest(task_type="summarization", complexity=2), SETTINGS)   # another request
    add_runtime(empty, one["id"])                                                             # warm now
    assert select_models(empty, request, SETTINGS).candidates[0].data["warm"] is True
    summarizer(empty, "two")                                                                  # the catalogue
    assert [c.model["name"] for c in select_models(empty, request, SETTINGS).candidates] == ["one", "two"]
    assert len(rankings) == 4


def test_a_name_finds_its_newest_active_version(empty):
    older = summarizer(empty, "named", version="1")
    newer = summarizer(empty, "named", version="2")
    empty.execute("UPDATE model_registry SET created_at = created_at - interval '1 day' WHERE id = %s",
                  (older["id"],))
    found = lambda ref: (selection.find_model(empty, ref)[0] or {}).get("version")
    assert (found("named"), found("named:1"), found("named:3"), found("other")) == ("2", "1", None, None)
    empty.execute("UPDATE model_registry SET active = false WHERE id = %s", (newer["id"],))
    assert (found("named"), found("named:2")) == ("1", None)
    versions = [row["version"] for row in empty.execute("SELECT version::text FROM prompt_templates_version")]
    assert selection.find_model(empty, "named")[1] == versions[0]


def test_select_over_http_on_the_seeded_catalogue(client):
    response = client.post("/select", json={"task_type": "text-generation", "complexity": "low",
                                            "limit": 1})
    assert response.status_code == 200
    body = response.get_json()
    assert [c["model"]["name"] for c in body["candidates"]] == ["smollm2"]
    assert body["eligible_count"] == 1
    assert body["weights"] == {"speed": 0.3, "accuracy": 0.4, "memory": 0.15, "cost": 0.15}
    assert body["filtered"] == [
        {"constraint": "runtime_driver", "reason": "driver docker not enabled", "count": 3,
         "models": ["llama2:13b", "llama2:7b", "mistral:7b"]},
        {"constraint": "complexity", "reason": "complexity_score below 3", "count": 1,
         "models": ["gemma3:270m-q4_k_m"]}]
    assert set(body["candidates"][0]) == {"model", "score", "breakdown", "data"}


def test_no_candidate_over_http_is_a_whole_problem(client):
    response = client.post("/select", json={"task_type": "code-generation", "complexity": "high"})
    assert response.status_code == 422
    assert response.get_json() == problem(
        response, 422, "No model can take this code-generation request: "
                       "3 driver docker not enabled; 1 complexity_score below 9.",
        task_type="code-generation", complexity=9, filtered=[
            {"constraint": "runtime_driver", "reason": "driver docker not enabled", "count": 3,
             "models": ["codellama:13b", "codellama:7b", "wizard-coder:15b"]},
            {"constraint": "complexity", "reason": "complexity_score below 9", "count": 1,
             "models": ["smollm2:135m-instruct-q4_1"]}])


def test_enabling_docker_makes_the_design_models_candidates(make_app):
    client = make_app(create_app, RUNTIME_DRIVERS=("process", "docker")).test_client()
    body = client.post("/select", json={"task_type": "code-generation", "complexity": "high"})
    assert [c["model"]["name"] for c in body.get_json()["candidates"]] == ["wizard-coder"]


@pytest.mark.parametrize("body, errors", [
    ({}, {"task_type": ["Missing data for required field."]}),
    ({"task_type": "poetry"}, {"task_type": [
        "Must be one of: text-generation, code-generation, question-answering, conversation, "
        "summarization, classification."]}),
    ({"task_type": "summarization", "complexity": "extreme"}, {"complexity": [
        "Must be an integer from 1 to 10, or low, medium or high."]}),
    ({"task_type": "summarization", "complexity": 11}, {"complexity": [
        "Must be an integer from 1 to 10, or low, medium or high."]}),
    ({"task_type": "summarization", "complexity": True}, {"complexity": [
        "Must be an integer from 1 to 10, or low, medium or high."]}),
    ({"task_type": "summarization", "limit": 51}, {"limit": [
        "Must be greater than or equal to 1 and less than or equal to 50."]}),
    ({"task_type": "summarization", "requirements": {"weights": {"speed": 0}}},
     {"requirements": {"weights": {"_schema": ["At least one weight must be above 0."]}}}),
    ({"task_type": "summarization", "requirements": {"weights": {"speed": -1}}},
     {"requirements": {"weights": {"speed": [
         "Must be greater than or equal to 0 and less than or equal to 1000."]}}}),
    ({"task_type": "summarization", "requirements": {"exclude": ["nope"]}},
     {"requirements": {"exclude": {"0": ["Must be a model id or name:version."]}}}),
    ({"task_type": "summarization", "requirements": {"max_memory_mb": 0}},
     {"requirements": {"max_memory_mb": [
         "Must be greater than or equal to 1 and less than or equal to 1048576."]}}),
    ({"task_type": "summarization", "requirements": {"max_latency_ms": "fast"}},
     {"requirements": {"max_latency_ms": ["Not a valid integer."]}}),
    ({"task_type": "summarization", "requirements": {"required_tags": ["No Spaces"]}},
     {"requirements": {"required_tags": {"0": [
         "Must match ^[a-z0-9][a-z0-9._-]{0,62}$."]}}}),
    ({"task_type": "summarization", "requirements": {"gpu": True}},
     {"requirements": {"gpu": ["Unknown field."]}}),
])
def test_select_rejects_bad_requests(client, body, errors):
    response = client.post("/select", json=body)
    assert response.status_code == 422
    assert response.get_json() == problem(response, 422, INVALID, errors={"json": errors})


def test_select_accepts_named_and_numeric_complexity(client):
    for complexity in ("medium", 6):
        response = client.post("/select", json={"task_type": "summarization",
                                                "complexity": complexity})
        assert response.status_code == 422
        assert response.get_json()["complexity"] == 6


def test_model_body_helper_is_valid(client):
    assert client.post("/models", json=model_body("helper")).status_code == 201
