"""Right-sizing: base resources scaled by the load, bounded by the host."""
from __future__ import annotations

import uuid

import pytest
from registry_helpers import INVALID, model_body, problem

from services.common.config import Settings
from services.common.errors import Unprocessable
from services.registry import create_app
from services.registry.resources import load_factor, right_size

HOST = Settings(host_cpu_cores=4.0, host_memory_mb=8192, host_gpu_count=1.0)


def model(**overrides) -> dict:
    return {"id": uuid.UUID(int=1), "name": "m", "version": "1", "runtime_driver": "process",
            "base_cpu_requirement": 1.0, "base_memory_requirement": 512,
            "base_gpu_requirement": 0.0, **overrides}


@pytest.mark.parametrize("load, factor", [(0.5, 1.0), (1, 1.0), (2, 1.5), (4, 2.0), (16, 3.0)])
def test_load_factor_adds_half_the_base_per_doubling(load, factor):
    assert load_factor(load) == factor


def test_base_times_the_load_factor_rounded_up():
    assert right_size(model(base_gpu_requirement=0.2), 3, HOST) == {
        "cpu": 1.8, "memory_mb": 960, "gpu": 0.4, "threads": 1, "parallel_slots": 3,
        "load_factor": pytest.approx(1 + 0.5 * 1.584962500721156), "capped": []}


def test_a_single_request_gets_the_base():
    assert right_size(model(base_cpu_requirement=1.2), 1, HOST) == {
        "cpu": 1.2, "memory_mb": 512, "gpu": 0.0, "threads": 1, "parallel_slots": 1,
        "load_factor": 1.0, "capped": []}


def test_the_host_caps_what_the_load_asks_for():
    assert right_size(model(base_cpu_requirement=2.0, base_memory_requirement=4096), 64, HOST) == {
        "cpu": 4.0, "memory_mb": 8192, "gpu": 0.0, "threads": 4, "parallel_slots": 16,
        "load_factor": 4.0, "capped": ["cpu", "memory_mb"]}


def test_a_model_whose_base_does_not_fit_is_refused():
    with pytest.raises(Unprocessable) as raised:
        right_size(model(base_memory_requirement=16384, base_gpu_requirement=2.0), 1, HOST)
    assert raised.value.detail == ("Model m:1 does not fit on this host even at its base "
                                   "requirements (gpu, memory_mb).")
    assert raised.value.extensions == {"model_id": str(uuid.UUID(int=1)), "exceeds": {
        "memory_mb": {"needs": 16384, "host": 8192}, "gpu": {"needs": 2.0, "host": 1.0}}}


def test_an_external_model_is_not_bounded_by_this_host():
    sized = right_size(model(runtime_driver="external", base_memory_requirement=65536), 2, HOST)
    assert (sized["memory_mb"], sized["capped"]) == (98304, [])


@pytest.fixture
def client(make_app):
    return make_app(create_app, HOST_CPU_CORES=4.0, HOST_MEMORY_MB=8192,
                    HOST_GPU_COUNT=0.0).test_client()


def test_resources_over_http(client):
    model_id = client.post("/models", json=model_body()).get_json()["id"]
    response = client.post("/resources", json={"model_id": model_id, "expected_load": 4})
    assert response.status_code == 200
    assert response.get_json() == {
        "model_id": model_id, "expected_load": 4.0, "load_factor": 2.0, "cpu": 2.0,
        "memory_mb": 1024, "gpu": 0.0, "threads": 2, "parallel_slots": 4, "capped": []}


def test_resources_for_a_model_too_big_for_the_host_is_422(client):
    model_id = client.post("/models", json=model_body(base_memory_requirement=20480)).get_json()["id"]
    response = client.post("/resources", json={"model_id": model_id})
    assert response.status_code == 422
    assert response.get_json() == problem(
        response, 422, "Model tiny:1.0 does not fit on this host even at its base requirements "
                       "(memory_mb).", model_id=model_id,
        exceeds={"memory_mb": {"needs": 20480, "host": 8192}})


def test_resources_for_an_unknown_model_is_404(client):
    missing = uuid.uuid4()
    response = client.post("/resources", json={"model_id": str(missing)})
    assert response.get_json() == problem(response, 404, f"Model {missing} does not exist.")


@pytest.mark.parametrize("body, errors", [
    ({}, {"model_id": ["Missing data for required field."]}),
    ({"model_id": "x"}, {"model_id": ["Not a valid UUID."]}),
    ({"model_id": str(uuid.UUID(int=1)), "expected_load": 0},
     {"expected_load": ["Must be greater than 0 and less than or equal to 10000."]}),
])
def test_resources_rejects_bad_requests(client, body, errors):
    response = client.post("/resources", json=body)
    assert response.get_json() == problem(response, 422, INVALID, errors={"json": errors})
