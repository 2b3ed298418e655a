"""The orchestrator's runtime endpoints, on the test transaction, with the fake server behind them."""
from __future__ import annotations

from unittest.mock import ANY

import pytest
from psycopg.types.json import Jsonb

from orchestrator_helpers import insert_model
from services.orchestrator import create_app, queries

UNKNOWN = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
def app(make_app, settings):
    return make_app(create_app, RUNTIME_DIR=settings.runtime_dir, MODELS_DIR=settings.models_dir,
                    RUNTIME_DRIVERS=("process", "external"), RECONCILE_ON_START=False)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def model(conn, fake_server):
    return insert_model(conn, runtime_config={"endpoint": fake_server.url, "model_alias": "fake"})


def problem(response, status: int, detail: str, **extra) -> dict:
    titles = {404: "Not Found", 409: "Conflict", 422: "Unprocessable Entity", 502: "Bad Gateway",
              503: "Service Unavailable"}
    return {"type": "about:blank", "title": titles[status], "status": status, "detail": detail,
            "request_id": response.headers["X-Request-ID"], **extra}


def runtime_body(model: dict, fake_server, **fields) -> dict:
    return {"id": ANY, "model_id": str(model["id"]), "model_name": model["name"], "model_version": "1",
            "protocol": "openai", "driver": "external", "container_id": None, "pid": None,
            "driver_state": {"allocation": {"cpu": 1.0, "memory_mb": 256, "gpu": 0.0, "threads": 1,
                                            "parallel_slots": 1}, "start_timeout_s": 10.0, "max_restarts": 3},
            "host": "127.0.0.1", "port": fake_server.port, "endpoint": fake_server.url, "status": "running",
            "health_status": "healthy", "allocated_cpu": 1.0, "allocated_memory": 256, "allocated_gpu": 0.0,
            "active_requests": 0, "total_requests": 0, "restart_count": 0, "load_time_ms": ANY, "log_path": None,
            "error_message": None, "started_at": ANY, "ready_at": ANY, "stopped_at": None, "last_activity": ANY,
            "last_health_check": ANY, "created_at": ANY, "updated_at": ANY, **fields}


def test_ensure_then_read_and_list(client, model, fake_server):
    response = client.post("/runtimes/ensure", json={"model_id": str(model["id"])})

    assert response.status_code == 200
    body = response.get_json()
    assert body == runtime_body(model, fake_server)
    assert client.get(f"/runtimes/{body['id']}").get_json() == body
    assert client.get(f"/runtimes?model_id={model['id']}&status=running").get_json() == {
        "items": [body], "limit": 100, "offset": 0}
    assert client.get(f"/runtimes?model_id={model['id']}&status=stopped").get_json() == {
        "items": [], "limit": 100, "offset": 0}
    assert client.post("/runtimes/ensure", json={"model_id": str(model["id"])}).get_json()["id"] == body["id"]


def test_ensure_validates_its_body(client):
    response = client.post("/runtimes/ensure", json={"model": "x"})

    assert response.status_code == 422
    assert response.get_json() == problem(response, 422, "The request is invalid: see errors for each field.",
                                          errors={"json": {"model": ["Unknown field."],
                                                           "model_id": ["Missing data for required field."]}})


def test_ensure_of_an_unknown_model(client):
    response = client.post("/runtimes/ensure", json={"model_id": UNKNOWN})

    assert response.status_code == 404
    assert response.get_json() == problem(response, 404, f"model {UNKNOWN} does not exist")


def test_ensure_or_generate_on_a_driver_not_enabled_is_a_422_not_an_outage(client, conn):
    """Not a 503: nothing will change by itself, a client should not retry."""
    model = insert_model(conn, runtime_driver="docker", protocol="ollama", runtime_config={"image": "ollama/ollama"})
    detail = (f"model {model['name']}:1 runs on the docker runtime driver, which is not enabled here "
              "(RUNTIME_DRIVERS=process,external)")

    response = client.post("/runtimes/ensure", json={"model_id": str(model["id"])})
    assert response.get_json() == problem(response, 422, detail, model_id=str(model["id"]))
    response = client.post("/generate", json={"model_id": str(model["id"]), "prompt": "hi"})
    assert response.get_json() == problem(response, 422, detail, model_id=str(model["id"]))


def test_ensure_that_fails_to_start_is_503_with_the_runtime(client, conn):
    model = insert_model(conn, runtime_config={"endpoint": "http://127.0.0.1:9", "start_timeout_s": 0.1})

    response = client.post("/runtimes/ensure", json={"model_id": str(model["id"])})

    runtime_id = queries.list_runtimes(conn, model_id=model["id"])[0]["id"]
    assert response.status_code == 503
    assert response.get_json() == problem(
        response, 503, f"runtime {runtime_id} failed to start: the model server was not ready within 0.1 s",
        runtime_id=str(runtime_id), model_id=str(model["id"]))


def test_unknown_runtime(client):
    for response in (client.get(f"/runtimes/{UNKNOWN}"), client.delete(f"/runtimes/{UNKNOWN}"),
                     client.post(f"/runtimes/{UNKNOWN}/restart")):
        assert response.status_code == 404
        assert response.get_json() == problem(response, 404, f"runtime {UNKNOWN} does not exist")


def test_list_filters_are_validated(client):
    response = client.get("/runtimes?status=sleeping&limit=0")

    assert response.status_code == 422
    assert response.get_json() == problem(response, 422, "The request is invalid: see errors for each field.",
                                          errors={"query": {
                                              "status": ["Must be one of: starting, running, draining, stopping, "
                                                         "stopped, error."],
                                              "limit": ["Must be greater than or equal to 1 and less than or equal "
                                                        "to 500."]}})


def test_delete_drains_and_stops_restart_brings_it_back(client, model, fake_server):
    runtime_id = client.post("/runtimes/ensure", json={"model_id": str(model["id"])}).get_json()["id"]

    stopped = client.delete(f"/runtimes/{runtime_id}")
    assert stopped.status_code == 200
    assert stopped.get_json() == runtime_body(model, fake_server, id=runtime_id, status="stopped",
                                              health_status="unknown", stopped_at=ANY)

    restarted = client.post(f"/runtimes/{runtime_id}/restart")
    assert restarted.status_code == 200
    assert restarted.get_json() == runtime_body(model, fake_server, id=runtime_id, restart_count=1)


def test_scale(client, conn, model):
    up = client.post(f"/models/{model['id']}/scale", json={"replicas": 1})
    assert up.get_json() == {"model_id": str(model["id"]), "replicas": 1, "started": [ANY], "stopped": []}

    too_many = client.post(f"/models/{model['id']}/scale", json={"replicas": 2})
    assert too_many.status_code == 422
    assert too_many.get_json() == problem(too_many, 422, f"model {model['name']}:1 allows at most 1 replicas",
                                          errors={"json": {"replicas": ["Must be at most 1."]}})

    down = client.post(f"/models/{model['id']}/scale", json={"replicas": 0})
    assert down.get_json() == {"model_id": str(model["id"]), "replicas": 0, "started": [],
                               "stopped": up.get_json()["started"]}

    unknown = client.post(f"/models/{UNKNOWN}/scale", json={"replicas": 1})
    assert unknown.status_code == 404
    invalid = client.post(f"/models/{model['id']}/scale", json={"replicas": -1})
    assert invalid.get_json()["errors"] == {"json": {"replicas": [
        "Must be greater than or equal to 0 and less than or equal to 64."]}}


def test_periodic_endpoints_say_what_they_did(client, conn, model):
    runtime_id = client.post("/runtimes/ensure", json={"model_id": str(model["id"])}).get_json()["id"]

    assert client.post("/runtimes/health").get_json() == {"checked": 1, "healthy": 1, "actions": []}
    assert client.post("/runtimes/autoscale").get_json() == {"actions": []}
    assert client.post("/runtimes/reap").get_json() == {"actions": []}
    conn.execute("UPDATE container_lifecycle SET last_activity = now() - interval '1 hour' WHERE id = %s",
                 (runtime_id,))
    assert client.post("/runtimes/reap").get_json() == {"actions": [
        {"model_id": str(model["id"]), "runtime_id": runtime_id, "action": "stopped", "detail": ANY}]}


def test_generate_by_name_starts_a_runtime_and_answers(client, conn, model, fake_server):
    response = client.post("/generate", json={"model": f"{model['name']}:1", "prompt": "Say hi",
                                              "options": {"max_tokens": 2, "temperature": 0, "format": "json"}})

    runtime = queries.list_runtimes(conn, model_id=model["id"])[0]
    assert response.status_code == 200
    assert response.get_json() == {
        "model_id": str(model["id"]), "model": f"{model['name']}:1", "runtime_id": str(runtime["id"]),
        "ensure_ms": ANY, "text": "Hello from", "input_tokens": 2, "output_tokens": 2, "finish_reason": "length",
        "timings": {"load_ms": None, "prompt_ms": 0.5, "generation_ms": 2.0, "total_ms": ANY,
                    "tokens_per_second": 1000.0}}
    assert fake_server.requests[-1]["body"] == {
        "model": "fake", "messages": [{"role": "user", "content": "Say hi"}], "stream": False, "max_tokens": 2,
        "temperature": 0.0, "response_format": {"type": "json_object"}}
    assert (runtime["active_requests"], runtime["total_requests"]) == (0, 1)


def test_generate_with_messages_by_id_and_json_schema(client, model, fake_server):
    schema = {"type": "object"}
    response = client.post("/generate", json={"model_id": str(model["id"]),
                                              "messages": [{"role": "user", "content": "Hi"}],
                                              "options": {"json_schema": schema}})

    assert response.status_code == 200
    assert response.get_json()["text"] == "Hello from the fake model."
    assert fake_server.requests[-1]["body"]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


@pytest.mark.parametrize(("body", "errors"), [
    ({"prompt": "x"}, {"_schema": ["Give exactly one of model_id and model."]}),
    ({"model": "a", "model_id": UNKNOWN, "prompt": "x"}, {"_schema": ["Give exactly one of model_id and model."]}),
    ({"model": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
     {"_schema": ["Give exactly one of prompt and messages."]}),
    ({"model": "Bad Name", "prompt": "x"}, {"model": ["String does not match expected pattern."]}),
    ({"model": "a", "prompt": ""}, {"prompt": ["Length must be between 1 and 100000."]}),
    ({"model": "a", "messages": [{"role": "tool", "content": "y"}]},
     {"messages": {"0": {"role": ["Must be one of: system, user, assistant."]}}}),
    ({"model": "a", "prompt": "x", "options": {"max_tokens": 0, "top_k": 3}},
     {"options": {"max_tokens": ["Must be greater than or equal to 1 and less than or equal to 32768."],
                  "top_k": ["Unknown field."]}}),
])
def test_generate_rejects_bad_input(client, body, errors):
    response = client.post("/generate", json=body)

    assert response.status_code == 422
    assert response.get_json() == problem(response, 422, "The request is invalid: see errors for each field.",
                                          errors={"json": errors})


def test_generate_for_an_unknown_model(client):
    response = client.post("/generate", json={"model": "no-such-model", "prompt": "x"})

    assert response.status_code == 404
    assert response.get_json() == problem(response, 404, "model no-such-model does not exist")


def test_a_failing_model_server_is_a_502_and_the_runtime_is_released(client, conn, model, fake_server):
    fake_server.config.fault = "error"

    response = client.post("/generate", json={"model_id": str(model["id"]), "prompt": "x"})

    assert response.status_code == 502
    assert response.get_json() == problem(
        response, 502, f'{fake_server.url}/v1/chat/completions answered 500: {{"error": "fake failure"}}',
        upstream_status=500)
    assert queries.list_runtimes(conn, model_id=model["id"])[0]["active_requests"] == 0


def test_create_app_reconciles_at_start(make_app, conn, settings):
    model = insert_model(conn, runtime_driver="process", runtime_config={"server": "fake"})
    ghost = conn.execute("""
        INSERT INTO container_lifecycle (model_id, driver, status, pid, allocated_cpu, allocated_memory,
                                         driver_state, updated_at)
        VALUES (%s, 'process', 'running', 999999, 1, 256, %s, now()) RETURNING id
    """, (model["id"], Jsonb({"start_time": 1}))).fetchone()["id"]

    make_app(create_app, RUNTIME_DIR=settings.runtime_dir, RUNTIME_DRIVERS=("process",))

    row = queries.get_runtime(conn, ghost)
    assert (row["status"], row["error_message"]) == ("error", "its model server was not running at reconcile")


def test_reconcile_at_start_can_be_turned_off(make_app, conn, settings):
    model = insert_model(conn, runtime_driver="process", runtime_config={"server": "fake"})
    ghost = conn.execute("""
        INSERT INTO container_lifecycle (model_id, driver, status, pid, allocated_cpu, allocated_memory)
        VALUES (%s, 'process', 'running', 999999, 1, 256) RETURNING id
    """, (model["id"],)).fetchone()["id"]

    make_app(create_app, RUNTIME_DIR=settings.runtime_dir, RUNTIME_DRIVERS=("process",), RECONCILE_ON_START=False)

    assert queries.get_runtime(conn, ghost)["status"] == "running"


def test_openapi_documents_every_endpoint(client):
    paths = client.get("/openapi.json").get_json()["paths"]

    operations = {path: sorted(op for op in ops if op != "parameters") for path, ops in paths.items()
                  if path not in ("/healthz", "/readyz", "/metrics")}
    assert operations == {
        "/runtimes": ["get"], "/runtimes/ensure": ["post"], "/runtimes/{runtime_id}": ["delete", "get"],
        "/runtimes/{runtime_id}/restart": ["post"], "/models/{model_id}/scale": ["post"],
        "/runtimes/reap": ["post"], "/runtimes/health": ["post"], "/runtimes/autoscale": ["post"],
        "/generate": ["post"], "/dispatch": ["post"], "/requests/{request_id}": ["delete", "get"],
        "/requests/{request_id}/feedback": ["post"], "/v1/chat/completions": ["post"], "/v1/models": ["get"],
        "/api/chat": ["post"], "/api/generate": ["post"], "/api/tags": ["get"], "/api/ps": ["get"],
        "/api/version": ["get"]}
