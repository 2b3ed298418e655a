"""The model catalogue over HTTP: create, read, list, change, delete, and validation of every field."""
from __future__ import annotations

import uuid

import pytest
from registry_helpers import INVALID, add_runtime, log_requests, model_body, problem

NAME_RULE = "Must match ^[a-z0-9][a-z0-9._-]{0,62}$."
TASK_TYPES = ("text-generation, code-generation, question-answering, conversation, "
              "summarization, classification")


def created(client, **overrides) -> dict:
    response = client.post("/models", json=model_body(**overrides))
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_create_returns_the_model_with_defaults(client):
    body = created(client, tags=["local"], performance_metrics={"accuracy": 0.5})
    assert body == {
        "id": body["id"], "created_at": body["created_at"], "updated_at": body["updated_at"],
        "name": "tiny", "version": "1.0", "task_types": ["text-generation"],
        "complexity_score": 3, "base_cpu_requirement": 1.0, "base_memory_requirement": 512,
        "base_gpu_requirement": 0.0, "storage_requirement": None, "model_size": None,
        "download_url": None, "runtime_driver": "process", "protocol": "openai",
        "runtime_config": {"model_package": "pkg", "model_file": "model.gguf"},
        "keep_alive_seconds": 300, "max_replicas": 1, "performance_metrics": {"accuracy": 0.5},
        "tags": ["local"], "active": True,
    }
    assert client.get(f"/models/{body['id']}").get_json() == body


def test_duplicate_name_and_version_is_409(client):
    created(client)
    response = client.post("/models", json=model_body())
    assert response.status_code == 409
    assert response.get_json() == problem(
        response, 409, "A resource with these unique fields already exists.",
        constraint="model_registry_name_version_key")


def test_unknown_model_is_404(client):
    missing = uuid.uuid4()
    for method in ("get", "patch", "delete"):
        kwargs = {"json": {"active": False}} if method == "patch" else {}
        response = getattr(client, method)(f"/models/{missing}", **kwargs)
        assert response.status_code == 404
        assert response.get_json() == problem(response, 404, f"Model {missing} does not exist.")


def test_a_path_that_is_not_a_uuid_is_404(client):
    response = client.get("/models/not-a-uuid")
    assert response.status_code == 404
    assert response.get_json()["status"] == 404


@pytest.mark.parametrize("field, value, messages", [
    ("name", "Bad Name", [NAME_RULE]),
    ("name", "x" * 64, [NAME_RULE]),
    ("version", "1.0:latest", [NAME_RULE]),
    ("task_types", [], ["Length must be between 1 and 6."]),
    ("task_types", ["poetry"], {"0": [f"Must be one of: {TASK_TYPES}."]}),
    ("task_types", ["summarization", "summarization"], ["Items must be unique."]),
    ("complexity_score", 0, ["Must be greater than or equal to 1 and less than or equal to 10."]),
    ("complexity_score", 11, ["Must be greater than or equal to 1 and less than or equal to 10."]),
    ("complexity_score", "5", ["Not a valid integer."]),
    ("complexity_score", 5.5, ["Not a valid integer."]),
    ("base_cpu_requirement", 0, ["Must be greater than 0 and less than or equal to 1024."]),
    ("base_memory_requirement", 0,
     ["Must be greater than or equal to 1 and less than or equal to 1048576."]),
    ("base_gpu_requirement", -1, ["Must be greater than or equal to 0 and less than or equal to 64."]),
    ("storage_requirement", -1,
     ["Must be greater than or equal to 0 and less than or equal to 100000000."]),
    ("model_size", -1,
     ["Must be greater than or equal to 0 and less than or equal to 9007199254740992."]),
    ("download_url", "ftp://example.com/m.gguf", ["Not a valid URL."]),
    ("runtime_driver", "k8s", ["Must be one of: process, docker, external."]),
    ("protocol", "grpc", ["Must be one of: ollama, openai."]),
    ("runtime_config", {}, {"_schema": ["Give model_path, or model_package and model_file."]}),
    ("runtime_config", {"model_path": "/models/../etc/passwd"},
     {"model_path": ["Must be an absolute path without '..'."]}),
    ("runtime_config", {"model_path": "/m.gguf", "command": "rm -rf /"},
     {"command": ["Unknown field."]}),
    ("runtime_config", {"model_package": "pkg", "model_file": "../m.gguf"},
     {"model_file": ["String does not match expected pattern."]}),
    ("keep_alive_seconds", -2,
     ["Must be greater than or equal to -1 and less than or equal to 2592000."]),
    ("max_replicas", 65, ["Must be greater than or equal to 1 and less than or equal to 64."]),
    ("performance_metrics", {"accuracy": 2},
     {"accuracy": ["Must be greater than or equal to 0 and less than or equal to 1."]}),
    ("performance_metrics", {"speed": 1}, {"speed": ["Unknown field."]}),
    # Re-ranking smooths toward the priors: out of range, they would push scores out of range.
    ("performance_metrics", {"priors": {"success_rate": 50, "p95_latency_ms": -1, "speed": 1}},
     {"priors": {"success_rate": ["Must be greater than or equal to 0 and less than or equal to 1."],
                 "p95_latency_ms": ["Must be greater than or equal to 0 and less than or equal to 3600000."],
                 "speed": ["Unknown field."]}}),
    ("tags", ["Bad Tag"], {"0": [NAME_RULE]}),
    ("tags", ["tag\n"], {"0": [NAME_RULE]}),
    ("tags", ["a", "a"], ["Items must be unique."]),
    ("tags", [f"t{i}" for i in range(33)], ["Longer than maximum length 32."]),
    ("active", "maybe", ["Not a valid boolean."]),
    ("colour", "red", ["Unknown field."]),
])
def test_every_field_is_validated(client, field, value, messages):
    response = client.post("/models", json={**model_body(), field: value})
    assert response.status_code == 422
    assert response.get_json() == problem(response, 422, INVALID,
                                          errors={"json": {field: messages}})


@pytest.mark.parametrize("driver, config, messages", [
    ("docker", {"image": "ollama/ollama"}, {"model_name": ["Missing data for required field."]}),
    ("docker", {"image": "Ollama Image", "model_name": "llama2:7b"},
     {"image": ["String does not match expected pattern."]}),
    ("docker", {"image": "dispatcher-llm:1", "command": ["serve", "--port", "{port}", "--gpu", "{gpus}"],
                "network_mode": "none", "environment": {"BAD NAME": "x", "OK": "{port"}},
     {"command": {"4": ["Unknown placeholder; use cpu, gpu, host, memory_mb, parallel_slots, port, threads."]},
      "network_mode": ["Must be one of: host, bridge."],
      "environment": {"BAD NAME": {"key": ["String does not match expected pattern."]},
                      "OK": {"value": ["Unbalanced braces; write {{ or }} for a literal brace."]}}}),
    ("external", {"endpoint": "file:///etc/passwd"}, {"endpoint": ["Not a valid URL."]}),
    ("external", {"endpoint": "http://127.0.0.1:99999"}, {"endpoint": ["The port must be from 1 to 65535."]}),
    ("external", {"endpoint": "http://127.0.0.1:0/v1"}, {"endpoint": ["The port must be from 1 to 65535."]}),
    ("external", {}, {"endpoint": ["Missing data for required field."]}),
])
def test_runtime_config_is_validated_for_its_driver(client, driver, config, messages):
    response = client.post("/models", json=model_body(runtime_driver=driver, runtime_config=config))
    assert response.status_code == 422
    assert response.get_json() == problem(response, 422, INVALID,
                                          errors={"json": {"runtime_config": messages}})


@pytest.mark.parametrize("driver, config", [
    ("process", {"model_path": "/models/m.gguf", "threads": 2}),
    ("docker", {"image": "ollama/ollama:0.6", "model_name": "llama2:7b"}),
    ("docker", {"image": "dispatcher-llm:0123abcd", "network_mode": "host", "model_alias": "smollm2",
                "command": ["/venv/bin/python", "server.py", "--host", "{host}", "--port", "{port}",
                            "--threads", "{threads}", "--json", "{{}}"], "environment": {"X": "{memory_mb}"}}),
    ("external", {"endpoint": "https://models.example.com/v1", "model_name": "gpt-x"}),
])
def test_each_driver_accepts_what_it_needs(client, driver, config):
    assert created(client, runtime_driver=driver, runtime_config=config)["runtime_config"] == config


def test_the_time_of_a_re_ranking_in_the_metrics_is_kept_as_its_text(client, conn):
    """The optimizer writes it as ISO text into the jsonb, as a caller's is stored."""
    model = created(client, performance_metrics={"updated_at": "2026-01-02T03:04:05+01:00"})
    assert model["performance_metrics"] == {"updated_at": "2026-01-02T03:04:05+01:00"}
    conn.execute("UPDATE model_registry SET performance_metrics = performance_metrics"
                 " || jsonb_build_object('updated_at', now()::text) WHERE id = %s", (model["id"],))
    shown = client.get(f"/models/{model['id']}")
    assert shown.status_code == 200 and isinstance(shown.get_json()["performance_metrics"]["updated_at"], str)
    assert client.get("/models").status_code == 200
    refused = client.post("/models", json=model_body(name="naive", performance_metrics={"updated_at": "2026-01-02"}))
    assert refused.status_code == 422


def test_runtime_config_is_stored_as_its_driver_reads_it(client):
    sent = {"image": "ollama/ollama", "model_name": "x:1", "pull": "false", "start_timeout_s": "10"}
    model = created(client, runtime_driver="docker", runtime_config=sent)
    read = {"image": "ollama/ollama", "model_name": "x:1", "pull": False, "start_timeout_s": 10.0}
    assert model["runtime_config"] == read
    assert client.get(f"/models/{model['id']}").get_json()["runtime_config"] == read
    patched = client.patch(f"/models/{model['id']}", json={"runtime_config": {**sent, "pull": "true"}})
    assert patched.get_json()["runtime_config"] == {**read, "pull": True}


def test_missing_required_fields_are_named(client):
    response = client.post("/models", json={"name": "x"})
    missing = ["Missing data for required field."]
    assert response.get_json() == problem(response, 422, INVALID, errors={"json": {
        field: missing for field in ("version", "task_types", "complexity_score",
                                     "base_memory_requirement", "runtime_driver", "protocol",
                                     "runtime_config")}})


def test_patch_changes_only_the_given_fields_and_replaces_metrics(client):
    model = created(client, performance_metrics={"accuracy": 0.5, "avg_latency_ms": 100})
    response = client.patch(f"/models/{model['id']}", json={
        "active": False, "base_cpu_requirement": 2.5, "tags": ["x"], "max_replicas": 3,
        "performance_metrics": {"p95_latency_ms": 90, "success_rate": 0.99, "sample_size": 40}})
    assert response.status_code == 200
    body = response.get_json()
    assert body == {**model, "active": False, "base_cpu_requirement": 2.5, "tags": ["x"],
                    "max_replicas": 3, "updated_at": body["updated_at"],
                    "performance_metrics": {"p95_latency_ms": 90.0, "success_rate": 0.99,
                                            "sample_size": 40}}


def test_patch_checks_the_runtime_config_against_the_new_driver(client):
    model = created(client)
    response = client.patch(f"/models/{model['id']}", json={"runtime_driver": "docker"})
    assert response.status_code == 422
    assert response.get_json() == problem(response, 422, INVALID, errors={"json": {
        "runtime_config": {"image": ["Missing data for required field."],
                           "model_name": ["Missing data for required field."],
                           "model_file": ["Unknown field."], "model_package": ["Unknown field."]}}})
    response = client.patch(f"/models/{model['id']}", json={
        "runtime_driver": "docker",
        "runtime_config": {"image": "ollama/ollama", "model_name": "tiny:1.0"}})
    assert response.status_code == 200
    assert response.get_json()["runtime_driver"] == "docker"


def test_patch_needs_a_field_and_rejects_bad_values(client):
    model = created(client)
    response = client.patch(f"/models/{model['id']}", json={})
    assert response.get_json() == problem(response, 422, INVALID, errors={"json": {
        "_schema": ["Give at least one field to change."]}})
    response = client.patch(f"/models/{model['id']}", json={"complexity_score": 12, "id": "x"})
    assert response.get_json() == problem(response, 422, INVALID, errors={"json": {
        "complexity_score": ["Must be greater than or equal to 1 and less than or equal to 10."],
        "id": ["Unknown field."]}})


def test_patch_to_an_existing_name_and_version_is_409(client):
    created(client, name="one")
    two = created(client, name="two")
    response = client.patch(f"/models/{two['id']}", json={"name": "one"})
    assert response.status_code == 409
    assert response.get_json()["constraint"] == "model_registry_name_version_key"


def test_delete_without_history_removes_the_model(client):
    model = created(client)
    response = client.delete(f"/models/{model['id']}")
    assert response.get_json() == {"id": model["id"], "outcome": "deleted"}
    assert client.get(f"/models/{model['id']}").status_code == 404


def test_delete_with_history_deactivates_unless_hard(client, conn):
    model = created(client)
    log_requests(conn, model["id"], 1, 100)
    response = client.delete(f"/models/{model['id']}")
    assert response.get_json() == {"id": model["id"], "outcome": "deactivated"}
    assert client.get(f"/models/{model['id']}").get_json()["active"] is False
    response = client.delete(f"/models/{model['id']}?hard=true")
    assert response.get_json() == {"id": model["id"], "outcome": "deleted"}
    assert conn.execute("SELECT count(*) AS n FROM performance_logs WHERE model_id = %s",
                        (model["id"],)).fetchone()["n"] == 0


def test_hard_delete_of_a_model_with_a_live_runtime_is_409(client, conn):
    model = created(client)
    add_runtime(conn, model["id"])
    response = client.delete(f"/models/{model['id']}?hard=true")
    assert response.status_code == 409
    assert response.get_json() == problem(
        response, 409, f"Model {model['id']} has live runtimes; stop them before a hard delete.",
        live_runtimes=1)


def test_list_filters_and_pages_in_a_stable_order(client, conn):
    conn.execute("DELETE FROM model_registry")
    for name in ("delta", "alpha", "charlie", "bravo"):
        created(client, name=name, task_types=["summarization"], tags=["t"] if name < "c" else [])
    created(client, name="alpha", version="2.0", task_types=["classification"], active=False)

    def names(query: str) -> list[str]:
        body = client.get(f"/models?{query}").get_json()
        return [f"{m['name']}:{m['version']}" for m in body["items"]]

    assert names("") == ["alpha:1.0", "alpha:2.0", "bravo:1.0", "charlie:1.0", "delta:1.0"]
    assert names("task_type=summarization&limit=2&offset=1") == ["bravo:1.0", "charlie:1.0"]
    assert names("page=2&page_size=2") == ["bravo:1.0", "charlie:1.0"]
    assert names("tag=t") == ["alpha:1.0", "bravo:1.0"]
    assert names("active=false") == ["alpha:2.0"]
    assert names("name=alpha") == ["alpha:1.0", "alpha:2.0"]
    body = client.get("/models?task_type=summarization&limit=1").get_json()
    assert (body["total"], body["limit"], body["offset"]) == (4, 1, 0)


@pytest.mark.parametrize("query, errors", [
    ("limit=0", {"limit": ["Must be greater than or equal to 1 and less than or equal to 200."]}),
    ("page_size=201", {"page_size": [
        "Must be greater than or equal to 1 and less than or equal to 200."]}),
    ("task_type=poetry", {"task_type": [f"Must be one of: {TASK_TYPES}."]}),
    ("limit=5&page=2", {"_schema": ["Use limit/offset or page/page_size, not both."]}),
    ("colour=red", {"colour": ["Unknown field."]}),
])
def test_list_rejects_bad_queries(client, query, errors):
    response = client.get(f"/models?{query}")
    assert response.status_code == 422
    assert response.get_json() == problem(response, 422, INVALID, errors={"query": errors})
