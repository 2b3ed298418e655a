"""The docker driver against the Docker Engine API, mocked with `responses` (a real daemon is another test)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import responses
from responses import matchers

from orchestrator_helpers import insert_model
from services.orchestrator import lifecycle
from services.orchestrator.runtimes import DriverError, Launched, Managed, RuntimeStartError
from services.orchestrator.runtimes.docker import DockerDriver

DOCKER = "http://127.0.0.1:2375"
API = f"{DOCKER}/v1.43"
ALLOCATION = {"cpu": 2.0, "memory_mb": 8192, "gpu": 0.0, "threads": 2, "parallel_slots": 1}
MODEL = {"id": "6f1c1f8e-0000-4000-8000-000000000001", "name": "llama2", "version": "7b",
         "runtime_config": {"image": "ollama/ollama", "model_name": "llama2:7b"}}
RUNTIME = {"id": "7a2d2f9e-0000-4000-8000-000000000002"}
LABELS = {"dispatcher.managed": "true", "dispatcher.scope": "scope1",
          "dispatcher.model_id": MODEL["id"], "dispatcher.runtime_id": RUNTIME["id"]}


@pytest.fixture
def docker_api():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        mock.get(f"{DOCKER}/version", json={"ApiVersion": "1.43", "Version": "24.0.0"})
        yield mock


@pytest.fixture
def driver(settings):
    return DockerDriver(settings, "scope1")


def inspect(container_id: str = "c1", status: str = "running", host_port: str = "49153") -> dict:
    return {"Id": container_id, "State": {"Status": status, "Running": status == "running"},
            "Config": {"Labels": LABELS},
            "NetworkSettings": {"Ports": {"11434/tcp": [{"HostIp": "127.0.0.1", "HostPort": host_port}]}}}


def create_body(**host_config) -> dict:
    return {"ExposedPorts": {"11434/tcp": {}}, "Tty": False, "OpenStdin": False, "StdinOnce": False,
            "AttachStdin": False, "AttachStdout": False, "AttachStderr": False,
            "Env": ["OLLAMA_HOST=0.0.0.0:11434"], "Image": "ollama/ollama", "NetworkDisabled": False,
            "Volumes": {"/root/.ollama": {}},
            "HostConfig": {"Memory": 8192 * 1024 * 1024, "NetworkMode": "default",
                           "Binds": ["dispatcher-ollama-models:/root/.ollama:rw"],
                           "PortBindings": {"11434/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
                           "NanoCpus": 2_000_000_000, **host_config},
            "Labels": LABELS}


def expect_start(mock, body: dict, *, host_port: str = "49153") -> None:
    mock.post(f"{API}/containers/create", status=201, json={"Id": "c1", "Warnings": []},
              match=[matchers.query_param_matcher({"name": f"dispatcher-{RUNTIME['id']}"}),
                     matchers.json_params_matcher(body)])
    mock.get(f"{API}/containers/c1/json", json=inspect(host_port=host_port))
    mock.post(f"{API}/containers/c1/start", status=204)


def test_start_creates_a_labelled_container_with_limits_and_a_published_port(docker_api, driver):
    expect_start(docker_api, create_body())

    launched = driver.start(RUNTIME, MODEL, ALLOCATION)

    assert launched == Launched(endpoint="http://127.0.0.1:49153", port=49153, container_id="c1",
                                driver_state={"image": "ollama/ollama", "network_mode": "bridge",
                                              "container_name": f"dispatcher-{RUNTIME['id']}"})


def test_start_asks_for_gpus_when_the_allocation_has_them(docker_api, driver):
    gpus = [{"Driver": "", "Count": 2, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
    expect_start(docker_api, create_body(DeviceRequests=gpus))

    driver.start(RUNTIME, MODEL, {**ALLOCATION, "gpu": 1.5})


def test_start_with_host_networking_binds_a_free_port_on_loopback(docker_api, driver):
    model = {**MODEL, "runtime_config": {"image": "dispatcher-llm:1", "network_mode": "host",
                                         "command": ["/venv/bin/python", "-m", "llama", "--port", "{port}",
                                                     "--host", "{host}", "--threads", "{threads}"]}}
    docker_api.post(f"{API}/containers/create", status=201, json={"Id": "c1", "Warnings": []})
    docker_api.get(f"{API}/containers/c1/json", json=inspect())
    docker_api.post(f"{API}/containers/c1/start", status=204)

    launched = driver.start(RUNTIME, model, ALLOCATION)

    body = json.loads(docker_api.calls[1].request.body)
    assert body["Cmd"] == ["/venv/bin/python", "-m", "llama", "--port", str(launched.port),
                           "--host", "127.0.0.1", "--threads", "2"]
    assert body["HostConfig"]["NetworkMode"] == "host"
    assert "PortBindings" not in body["HostConfig"] and "Env" not in body
    assert launched.endpoint == f"http://127.0.0.1:{launched.port}"
    assert launched.driver_state["network_mode"] == "host"


def test_on_a_docker_network_the_server_is_reached_by_container_name(docker_api, settings):
    driver = DockerDriver(replace(settings, docker_network="dispatcher"), "scope1")
    body = create_body(NetworkMode="dispatcher")
    del body["HostConfig"]["PortBindings"], body["ExposedPorts"]  # nothing published on the host
    expect_start(docker_api, {**body, "NetworkingConfig": {"EndpointsConfig": {"dispatcher": {}}}})

    launched = driver.start(RUNTIME, MODEL, ALLOCATION)

    name = f"dispatcher-{RUNTIME['id']}"
    assert launched == Launched(endpoint=f"http://{name}:11434", host=name, port=11434, container_id="c1",
                                driver_state={"image": "ollama/ollama", "network_mode": "dispatcher",
                                              "container_name": name})


def test_an_unknown_placeholder_is_a_start_error_before_docker_is_asked(driver):
    model = {**MODEL, "runtime_config": {"image": "dispatcher-llm:1", "command": ["serve", "--gpus={gpus}"]}}

    with pytest.raises(RuntimeStartError) as raised:
        driver.start(RUNTIME, model, ALLOCATION)

    assert str(raised.value) == ("runtime_config value '--gpus={gpus}' has an unknown placeholder "
                                 "('gpus'); known: cpu, gpu, host, memory_mb, parallel_slots, port, threads")


def test_a_missing_image_is_a_clear_start_error(docker_api, driver):
    docker_api.post(f"{API}/containers/create", status=404,
                    json={"message": "No such image: ollama/ollama:latest"})

    with pytest.raises(RuntimeStartError) as raised:
        driver.start(RUNTIME, MODEL, ALLOCATION)

    assert str(raised.value) == "image ollama/ollama is not on the Docker host; load or pull it there first"


def test_a_refused_start_says_what_docker_said_and_removes_the_container(docker_api, driver):
    docker_api.post(f"{API}/containers/create", status=201, json={"Id": "c1", "Warnings": []})
    docker_api.get(f"{API}/containers/c1/json", json=inspect())
    docker_api.post(f"{API}/containers/c1/start", status=500,
                    json={"message": "cannot set memory limit: cgroup not mounted"})
    removed = docker_api.delete(f"{API}/containers/c1", status=204,
                                match=[matchers.query_param_matcher({"v": "False", "link": "False", "force": "True"})])

    with pytest.raises(RuntimeStartError, match="Docker could not start ollama/ollama: cannot set memory limit"):
        driver.start(RUNTIME, MODEL, ALLOCATION)
    assert removed.call_count == 1


def test_a_started_container_without_a_published_port_is_removed(docker_api, driver):
    docker_api.post(f"{API}/containers/create", status=201, json={"Id": "c1", "Warnings": []})
    docker_api.get(f"{API}/containers/c1/json", json={**inspect(), "NetworkSettings": {"Ports": {}}})
    docker_api.post(f"{API}/containers/c1/start", status=204)
    removed = docker_api.delete(f"{API}/containers/c1", status=204)

    with pytest.raises(RuntimeStartError, match="Docker published no host port for container port 11434"):
        driver.start(RUNTIME, MODEL, ALLOCATION)
    assert removed.call_count == 1


def test_is_running_inspects_the_container(docker_api, driver):
    docker_api.get(f"{API}/containers/c1/json", json=inspect(status="running"))
    docker_api.get(f"{API}/containers/c2/json", json=inspect("c2", status="exited"))
    docker_api.get(f"{API}/containers/c3/json", status=404, json={"message": "No such container: c3"})

    assert driver.is_running({"container_id": "c1"}) is True
    assert driver.is_running({"container_id": "c2"}) is False
    assert driver.is_running({"container_id": "c3"}) is False
    assert driver.is_running({"container_id": None}) is False


def test_stop_stops_and_removes_the_container(docker_api, driver):
    docker_api.get(f"{API}/containers/c1/json", json=inspect())
    docker_api.post(f"{API}/containers/c1/stop", status=204, match=[matchers.query_param_matcher({"t": "10"})])
    docker_api.delete(f"{API}/containers/c1", status=204,
                      match=[matchers.query_param_matcher({"v": "False", "link": "False", "force": "True"})])

    driver.stop({"id": RUNTIME["id"], "container_id": "c1"})


def test_stopping_a_container_that_is_gone_is_fine(docker_api, driver):
    docker_api.get(f"{API}/containers/c9/json", status=404, json={"message": "No such container: c9"})

    driver.stop({"id": RUNTIME["id"], "container_id": "c9"})


def test_find_managed_lists_our_containers_by_label(docker_api, driver):
    filters = json.dumps({"label": ["dispatcher.managed=true", "dispatcher.scope=scope1"]})
    docker_api.get(f"{API}/containers/json", match=[matchers.query_param_matcher(
        {"all": "1", "limit": "-1", "size": "0", "trunc_cmd": "0", "filters": filters})], json=[
        {"Id": "c1", "State": "running", "Labels": LABELS},
        {"Id": "c2", "State": "exited", "Labels": {**LABELS, "dispatcher.runtime_id": "r2"}},
    ])

    assert driver.find_managed() == [
        Managed(runtime_id=RUNTIME["id"], identity="c1", alive=True, ref={"id": RUNTIME["id"], "container_id": "c1"}),
        Managed(runtime_id="r2", identity="c2", alive=False, ref={"id": "r2", "container_id": "c2"}),
    ]


def test_an_unreachable_daemon_is_a_driver_error(settings):
    with responses.RequestsMock() as mock:
        mock.get(f"{DOCKER}/version", body=ConnectionRefusedError("refused"))
        with pytest.raises(DriverError, match="the Docker daemon at tcp://127.0.0.1:2375 is not reachable"):
            DockerDriver(settings, "scope1").find_managed()


def test_log_tail(docker_api, driver):
    tty = inspect()
    tty["Config"]["Tty"] = True  # a tty container's log is plain text, not multiplexed frames
    docker_api.get(f"{API}/containers/c1/json", json=tty)
    docker_api.get(f"{API}/containers/c1/logs", body=b"loading\nready\n")

    assert driver.log_tail({"container_id": "c1"}, max_chars=6) == "ready\n"


def test_log_tail_says_why_a_container_exited(docker_api, driver):
    killed = inspect(status="exited")
    killed["Config"]["Tty"] = True
    killed["State"].update(ExitCode=137, OOMKilled=True)
    docker_api.get(f"{API}/containers/c1/json", json=killed)
    docker_api.get(f"{API}/containers/c1/logs", body=b"loading\n")

    assert driver.log_tail({"container_id": "c1"}) == (
        "loading\n[container exited with code 137, killed for going over its memory limit (OOMKilled)]\n")


def test_ensure_starts_a_container_probes_it_and_pulls_the_model(docker_api, db, conn, settings, fake_server):
    """The whole cold start on docker: create, start, readiness probe, Ollama pull with progress, stop."""
    model = insert_model(conn, runtime_driver="docker", protocol="ollama", base_memory_requirement=8192,
                         base_cpu_requirement=2,
                         runtime_config={"image": "ollama/ollama", "model_name": "orca-mini:3b"})
    settings = type(settings)(**{**settings.__dict__, "host_memory_mb": 16384})
    docker_api.add_passthru(fake_server.url)
    docker_api.post(f"{API}/containers/create", status=201, json={"Id": "c1", "Warnings": []})
    docker_api.get(f"{API}/containers/c1/json", json=inspect(host_port=str(fake_server.port)))
    docker_api.post(f"{API}/containers/c1/start", status=204)

    runtime = lifecycle.ensure_runtime(db, model["id"], settings)

    labels = json.loads(docker_api.calls[1].request.body)["Labels"]
    assert labels == {"dispatcher.managed": "true", "dispatcher.scope": lifecycle.driver_for("docker", settings).scope,
                      "dispatcher.model_id": str(model["id"]), "dispatcher.runtime_id": str(runtime["id"])}
    assert (runtime["status"], runtime["health_status"], runtime["container_id"], runtime["endpoint"]) == (
        "running", "healthy", "c1", fake_server.url)
    assert runtime["driver_state"]["pull"] == {"status": "success"}
    assert fake_server.requests[-1] == {"method": "POST", "path": "/api/pull",
                                        "body": {"model": "orca-mini:3b", "stream": True}}

    docker_api.post(f"{API}/containers/c1/stop", status=204)
    docker_api.delete(f"{API}/containers/c1", status=204)
    stopped = lifecycle.stop_runtime(db, runtime["id"], settings)
    assert (stopped["status"], stopped["container_id"]) == ("stopped", None)


def test_ensure_with_a_missing_image_marks_the_runtime_error(docker_api, db, conn, settings):
    model = insert_model(conn, runtime_driver="docker", protocol="ollama",
                         runtime_config={"image": "ollama/ollama", "model_name": "orca-mini:3b"})
    docker_api.post(f"{API}/containers/create", status=404, json={"message": "No such image: ollama/ollama"})

    with pytest.raises(lifecycle.RuntimeUnavailable) as raised:
        lifecycle.ensure_runtime(db, model["id"], settings)

    runtime = lifecycle.queries.list_runtimes(conn, model_id=model["id"])[0]
    assert raised.value.detail == (f"runtime {runtime['id']} failed to start: image ollama/ollama is not on the "
                                   "Docker host; load or pull it there first")
    assert raised.value.extensions == {"runtime_id": str(runtime["id"]), "model_id": str(model["id"])}
    assert (runtime["status"], runtime["error_message"]) == (
        "error", "image ollama/ollama is not on the Docker host; load or pull it there first")
