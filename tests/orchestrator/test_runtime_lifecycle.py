"""The lifecycle on the test transaction, with external runtimes pointing at the in-process fake server."""
from __future__ import annotations

from dataclasses import replace
from unittest.mock import ANY

import pytest

from orchestrator_helpers import insert_model
from services.common.errors import Conflict, NotFound, Unprocessable
from services.orchestrator import lifecycle, queries
from services.orchestrator.lifecycle import RuntimeUnavailable


@pytest.fixture
def model(conn, fake_server):
    return insert_model(conn, runtime_config={"endpoint": fake_server.url, "model_alias": "fake"}, max_replicas=2)


def runtime_row(conn, runtime_id) -> dict:
    return queries.get_runtime(conn, runtime_id)


def age(conn, runtime_id, seconds: int) -> None:
    conn.execute("UPDATE container_lifecycle SET last_activity = now() - make_interval(secs => %s) WHERE id = %s",
                 (seconds, runtime_id))


def test_allocation_is_right_sized_for_the_runtimes_request_slots(model, settings):
    assert lifecycle.allocation_for({**model, "runtime_config": {}}, 1.0, settings) == {
        "cpu": 1.0, "memory_mb": 256, "gpu": 0.0, "threads": 1, "parallel_slots": 1}
    # Two slots: the registry's load factor for a load of 2 is 1.5.
    assert lifecycle.allocation_for({**model, "base_cpu_requirement": 2.5, "runtime_config": {"parallel": 2}},
                                    1.0, settings) == {
        "cpu": 3.8, "memory_mb": 384, "gpu": 0.0, "threads": 3, "parallel_slots": 2}


def test_ensure_starts_a_runtime_once_then_reuses_it(db, conn, model, settings, fake_server):
    runtime = lifecycle.ensure_runtime(db, model["id"], settings)

    assert runtime == {**runtime_row(conn, runtime["id"]), "status": "running"}
    assert {key: runtime[key] for key in ("model_id", "driver", "status", "health_status", "endpoint", "host",
                                          "port", "pid", "container_id", "active_requests", "restart_count")} == {
        "model_id": model["id"], "driver": "external", "status": "running", "health_status": "healthy",
        "endpoint": fake_server.url, "host": "127.0.0.1", "port": fake_server.port, "pid": None,
        "container_id": None, "active_requests": 0, "restart_count": 0}
    assert runtime["driver_state"] == {"allocation": {"cpu": 1.0, "memory_mb": 256, "gpu": 0.0, "threads": 1,
                                                      "parallel_slots": 1},
                                       "start_timeout_s": 10.0, "max_restarts": 3}
    assert runtime["load_time_ms"] >= 0 and runtime["ready_at"] is not None
    assert lifecycle.ensure_runtime(db, model["id"], settings)["id"] == runtime["id"]
    assert len(queries.list_runtimes(conn, model_id=model["id"])) == 1


def test_ensure_reuses_the_least_loaded_runtime(db, conn, model, settings):
    first = lifecycle.start_runtime(db, model["id"], settings)
    second = lifecycle.start_runtime(db, model["id"], settings)
    lifecycle.acquire_runtime(db, first["id"])

    assert lifecycle.ensure_runtime(db, model["id"], settings)["id"] == second["id"]
    with pytest.raises(Conflict, match="already runs 2 of its 2 replicas"):
        lifecycle.start_runtime(db, model["id"], settings)


def test_a_runtime_that_turns_running_while_ensure_looks_for_one_is_reused(db, conn, settings, fake_server,
                                                                           monkeypatch):
    """Its starter holds no lock: it may turn running between two reads of the caller that waits for
    the model's start lock. It is reused, not counted as a replica too many."""
    model = insert_model(conn, runtime_config={"endpoint": fake_server.url, "model_alias": "fake"}, max_replicas=1)
    starting = queries.insert_runtime(conn, model["id"], "external", {"cpu": 1, "memory_mb": 256, "gpu": 0}, {})
    locked, flipped = [], []

    def turns_running_after(read):
        def wrapper(*args, **kwargs):
            row = read(*args, **kwargs)
            if locked and not flipped:  # the first read under the lock; then the starter marks it ready
                flipped.append(queries.mark_ready(conn, starting["id"], load_time_ms=5))
            return row
        return wrapper

    lock = queries.lock_model_start
    monkeypatch.setattr(queries, "lock_model_start", lambda *args: (locked.append(True), lock(*args))[1])
    for name in ("pick_warm_runtime", "find_starting_runtime"):
        monkeypatch.setattr(queries, name, turns_running_after(getattr(queries, name)))

    runtime = lifecycle.ensure_runtime(db, model["id"], settings)
    assert flipped and (runtime["id"], runtime["status"]) == (starting["id"], "running")


def test_ensure_of_an_unknown_or_inactive_model(db, conn, model, settings):
    with pytest.raises(NotFound, match="model 00000000-0000-0000-0000-000000000000 does not exist"):
        lifecycle.ensure_runtime(db, "00000000-0000-0000-0000-000000000000", settings)
    conn.execute("UPDATE model_registry SET active = false WHERE id = %s", (model["id"],))
    with pytest.raises(Conflict, match="is not active"):
        lifecycle.ensure_runtime(db, model["id"], settings)


def test_a_driver_not_enabled_here_is_unprocessable(db, conn, settings):
    model = insert_model(conn, runtime_driver="docker", protocol="ollama", runtime_config={"image": "ollama/ollama"})

    with pytest.raises(Unprocessable, match=r"runs on the docker runtime driver, which is not enabled here "
                                            r"\(RUNTIME_DRIVERS=process,external\)"):
        lifecycle.ensure_runtime(db, model["id"], replace(settings, runtime_drivers=("process", "external")))


def test_a_model_bigger_than_the_host_is_unprocessable(db, conn, settings):
    model = insert_model(conn, runtime_driver="process", base_memory_requirement=100_000,
                         runtime_config={"server": "fake"})

    with pytest.raises(Unprocessable, match=r"does not fit on this host even at its base requirements \(memory_mb\)"):
        lifecycle.ensure_runtime(db, model["id"], settings)
    assert queries.list_runtimes(conn, model_id=model["id"]) == []


def test_a_runtime_that_never_gets_ready_is_marked_error_and_the_next_call_tries_again(db, conn, settings, fake_server):
    fake_server.config.load_ms = 60_000  # answers 503 Loading model
    model = insert_model(conn, runtime_config={"endpoint": fake_server.url, "start_timeout_s": 0.2})

    with pytest.raises(RuntimeUnavailable) as raised:
        lifecycle.ensure_runtime(db, model["id"], settings)

    failed = queries.list_runtimes(conn, model_id=model["id"])[0]
    assert raised.value.detail == f"runtime {failed['id']} failed to start: the model server was not ready within 0.2 s"
    assert (failed["status"], failed["health_status"], failed["error_message"]) == (
        "error", "unhealthy", "the model server was not ready within 0.2 s")
    fake_server.config.load_ms = 0
    assert lifecycle.ensure_runtime(db, model["id"], settings)["status"] == "running"


def test_a_lease_counts_the_request_and_keeps_the_runtime_warm(db, conn, model, settings):
    runtime = lifecycle.ensure_runtime(db, model["id"], settings)
    age(conn, runtime["id"], 60)
    aged = runtime_row(conn, runtime["id"])

    with lifecycle.leased_runtime(db, model["id"], settings) as leased:
        assert leased["id"] == runtime["id"]
        assert (leased["active_requests"], runtime_row(conn, runtime["id"])["total_requests"]) == (1, 1)

    after = runtime_row(conn, runtime["id"])
    assert (after["active_requests"], after["total_requests"], after["status"]) == (0, 1, "running")
    assert after["last_activity"] > aged["last_activity"]


def test_a_lease_is_released_when_the_block_fails(db, conn, model, settings):
    with pytest.raises(RuntimeError):
        with lifecycle.leased_runtime(db, model["id"], settings) as leased:
            raise RuntimeError("generation failed")
    assert runtime_row(conn, leased["id"])["active_requests"] == 0


def test_keep_alive_zero_stops_the_runtime_right_after_use(db, conn, settings, fake_server):
    model = insert_model(conn, runtime_config={"endpoint": fake_server.url}, keep_alive_seconds=0)

    with lifecycle.leased_runtime(db, model["id"], settings) as leased:
        assert runtime_row(conn, leased["id"])["status"] == "running"

    assert runtime_row(conn, leased["id"])["status"] == "stopped"


def test_reap_idle_stops_only_runtimes_idle_past_their_keep_alive(db, conn, settings, fake_server):
    config = {"endpoint": fake_server.url}
    short, forever, busy = (insert_model(conn, runtime_config=config, keep_alive_seconds=keep)
                            for keep in (60, -1, 60))
    runtimes = {name: lifecycle.ensure_runtime(db, m["id"], settings)
                for name, m in (("short", short), ("forever", forever), ("busy", busy))}
    fresh = insert_model(conn, runtime_config=config, keep_alive_seconds=60)
    lifecycle.ensure_runtime(db, fresh["id"], settings)
    for name in ("short", "forever", "busy"):
        age(conn, runtimes[name]["id"], 3600)
    lifecycle.acquire_runtime(db, runtimes["busy"]["id"])

    actions = lifecycle.reap_idle(db, settings)

    assert actions == [{"model_id": short["id"], "runtime_id": runtimes["short"]["id"], "action": "stopped",
                        "detail": ANY}]
    assert actions[0]["detail"].startswith("idle since ")
    assert {name: runtime_row(conn, rt["id"])["status"] for name, rt in runtimes.items()} == {
        "short": "stopped", "forever": "running", "busy": "running"}


def test_stop_drains_then_stops_and_ensure_no_longer_picks_it(db, conn, model, settings):
    runtime = lifecycle.ensure_runtime(db, model["id"], settings)
    lifecycle.acquire_runtime(db, runtime["id"])

    stopped = lifecycle.stop_runtime(db, runtime["id"], settings, drain_timeout_s=0.05)

    assert (stopped["status"], stopped["active_requests"], stopped["health_status"]) == ("stopped", 0, "unknown")
    assert stopped["stopped_at"] is not None
    assert lifecycle.stop_runtime(db, runtime["id"], settings) == stopped  # stopping twice changes nothing
    assert lifecycle.acquire_runtime(db, runtime["id"]) is None
    assert lifecycle.ensure_runtime(db, model["id"], settings)["id"] != runtime["id"]


def test_stop_of_an_unknown_runtime(db, settings):
    with pytest.raises(NotFound, match="runtime 00000000-0000-0000-0000-000000000000 does not exist"):
        lifecycle.stop_runtime(db, "00000000-0000-0000-0000-000000000000", settings)


def test_restart_keeps_the_id_and_counts(db, conn, model, settings):
    runtime = lifecycle.ensure_runtime(db, model["id"], settings)

    restarted = lifecycle.restart_runtime(db, runtime["id"], settings)

    assert (restarted["id"], restarted["status"], restarted["restart_count"]) == (runtime["id"], "running", 1)


def test_scale_up_and_down(db, conn, model, settings):
    up = lifecycle.scale_model(db, model["id"], 2, settings)
    busy, idle = up["started"]
    assert up == {"model_id": model["id"], "replicas": 2, "started": [busy, idle], "stopped": []}
    assert {row["id"] for row in queries.live_runtimes(conn, model_id=model["id"])} == {busy, idle}

    lifecycle.acquire_runtime(db, busy)
    down = lifecycle.scale_model(db, model["id"], 1, settings)
    assert down == {"model_id": model["id"], "replicas": 1, "started": [], "stopped": [idle]}

    assert lifecycle.scale_model(db, model["id"], 1, settings) == {
        "model_id": model["id"], "replicas": 1, "started": [], "stopped": []}
    with pytest.raises(Unprocessable) as raised:
        lifecycle.scale_model(db, model["id"], 3, settings)
    assert raised.value.errors == {"json": {"replicas": ["Must be at most 2."]}}


def test_health_marks_an_external_runtime_that_stops_answering_unhealthy_never_restarts_it(
        db, conn, model, settings, fake_server):
    runtime = lifecycle.ensure_runtime(db, model["id"], settings)
    assert lifecycle.check_health(db, settings) == {"checked": 1, "healthy": 1, "actions": []}

    fake_server.config.load_ms = 60_000  # answers 503 Loading model from now on
    report = lifecycle.check_health(db, settings)

    assert report == {"checked": 1, "healthy": 0, "actions": [
        {"model_id": model["id"], "runtime_id": runtime["id"], "action": "unhealthy",
         "detail": "not answering its probe"}]}
    row = runtime_row(conn, runtime["id"])
    assert (row["status"], row["health_status"], row["restart_count"]) == ("running", "unhealthy", 0)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:99999", "ftp://127.0.0.1:9"])
def test_an_endpoint_no_server_can_have_fails_the_start_and_leaves_no_runtime_starting(db, conn, settings,
                                                                                       endpoint):
    model = insert_model(conn, runtime_config={"endpoint": endpoint})   # written around the registry
    with pytest.raises(RuntimeUnavailable, match="no usable http"):
        lifecycle.ensure_runtime(db, model["id"], settings)
    assert [row["status"] for row in conn.execute(
        "SELECT status FROM container_lifecycle WHERE model_id = %s", (model["id"],))] == ["error"]


def test_autoscale_adds_a_replica_when_the_queue_is_long(db, conn, model, settings):
    first = lifecycle.ensure_runtime(db, model["id"], settings)
    for _ in range(5):
        conn.execute("INSERT INTO request_queue (request_payload, task_type, assigned_model_id) "
                     "VALUES ('{}', 'text-generation', %s)", (model["id"],))

    actions = lifecycle.autoscale(db, settings)

    [added] = [row for row in queries.live_runtimes(conn, model_id=model["id"]) if row["id"] != first["id"]]
    assert actions == [{"model_id": model["id"], "runtime_id": added["id"], "action": "started",
                        "detail": "5 pending for 1 replica(s)"}]
    assert lifecycle.autoscale(db, settings) == []  # 5 pending for 2 replicas is within 4 per replica


def test_autoscale_counts_fresh_requests_for_the_model_serving_their_task_type(db, conn, model, settings):
    first = lifecycle.ensure_runtime(db, model["id"], settings)
    conn.execute("INSERT INTO request_queue (request_payload, task_type, assigned_model_id, status, attempts,"
                 " started_at, completed_at, result) VALUES ('{}', 'text-generation', %s, 'completed', 1, now(),"
                 " now(), '{}')", (model["id"],))
    for task_type in ["text-generation"] * 5 + ["summarization"] * 9:   # none served summaries yet
        conn.execute("INSERT INTO request_queue (request_payload, task_type) VALUES ('{}', %s)", (task_type,))

    assert queries.pending_requests_by_model(conn) == [{"model_id": model["id"], "pending": 5}]
    actions = lifecycle.autoscale(db, settings)

    [added] = [row for row in queries.live_runtimes(conn, model_id=model["id"]) if row["id"] != first["id"]]
    assert actions == [{"model_id": model["id"], "runtime_id": added["id"], "action": "started",
                        "detail": "5 pending for 1 replica(s)"}]


def test_autoscale_stops_at_max_replicas(db, conn, settings, fake_server):
    model = insert_model(conn, runtime_config={"endpoint": fake_server.url, "scale_up_pending": 1})
    lifecycle.ensure_runtime(db, model["id"], settings)
    for _ in range(2):
        conn.execute("INSERT INTO request_queue (request_payload, task_type, assigned_model_id) "
                     "VALUES ('{}', 'text-generation', %s)", (model["id"],))

    assert lifecycle.autoscale(db, settings) == [{"model_id": model["id"], "runtime_id": None, "action": "at_max",
                                                  "detail": "2 pending; already 1 of 1"}]


# --- stops, restarts and counts under concurrency (review findings) ------------------------------

def test_a_second_stop_waits_for_the_drain_the_first_began(pooled_db, fresh_settings, fake_server):
    import threading
    import time

    with pooled_db.connection() as conn:
        model = insert_model(conn, runtime_config={"endpoint": fake_server.url, "model_alias": "fake"})
    runtime = lifecycle.ensure_runtime(pooled_db, model["id"], fresh_settings)
    lifecycle.acquire_runtime(pooled_db, runtime["id"])   # a request runs on it
    first = threading.Thread(target=lifecycle.stop_runtime, args=(pooled_db, runtime["id"], fresh_settings),
                             kwargs={"drain_timeout_s": 5})
    first.start()
    deadline = time.monotonic() + 5
    while lifecycle.get_runtime(pooled_db, runtime["id"])["status"] != "draining" and time.monotonic() < deadline:
        time.sleep(0.01)

    released = threading.Event()

    def request_ends() -> None:
        time.sleep(0.3)
        lifecycle.release_runtime(pooled_db, runtime["id"], fresh_settings)
        released.set()

    ending = threading.Thread(target=request_ends)
    ending.start()
    second = lifecycle.stop_runtime(pooled_db, runtime["id"], fresh_settings, drain_timeout_s=5)
    stopped_after_the_request = released.is_set()
    ending.join()
    first.join()

    assert stopped_after_the_request and second["status"] == "stopped"


def test_a_restart_keeps_to_max_replicas(db, conn, settings, fake_server):
    model = insert_model(conn, runtime_config={"endpoint": fake_server.url, "model_alias": "fake"}, max_replicas=1)
    first = lifecycle.ensure_runtime(db, model["id"], settings)
    lifecycle.stop_runtime(db, first["id"], settings)
    lifecycle.ensure_runtime(db, model["id"], settings)   # the next request started another

    with pytest.raises(Conflict, match="already runs 1 of its 1 replicas"):
        lifecycle.restart_runtime(db, first["id"], settings)
    assert runtime_row(conn, first["id"])["status"] == "stopped"


def test_a_restart_makes_room_on_the_host_or_is_refused(db, conn, settings):
    from orchestrator_helpers import fake_process_model

    settings = replace(settings, runtime_drivers=("process", "external"), host_memory_mb=1024)
    big = fake_process_model(conn, base_memory_requirement=768)
    other = fake_process_model(conn, base_memory_requirement=512)
    first = lifecycle.ensure_runtime(db, big["id"], settings)
    lifecycle.stop_runtime(db, first["id"], settings)
    busy = lifecycle.ensure_runtime(db, other["id"], settings)
    lifecycle.acquire_runtime(db, busy["id"])   # busy: not to be evicted
    try:
        with pytest.raises(RuntimeUnavailable, match="the host has no room"):
            lifecycle.restart_runtime(db, first["id"], settings)
        assert queries.host_usage(conn)["memory_mb"] <= 1024
        lifecycle.release_runtime(db, busy["id"], settings)

        restarted = lifecycle.restart_runtime(db, first["id"], settings)   # the idle one is evicted now
        assert (restarted["status"], runtime_row(conn, busy["id"])["status"]) == ("running", "stopped")
    finally:
        for row in queries.live_runtimes(conn):
            lifecycle.stop_runtime(db, row["id"], settings)


@pytest.mark.parametrize("status", ["draining", "stopping"])
def test_a_stop_its_process_did_not_finish_is_finished_by_the_health_check(db, conn, settings, status,
                                                                          monkeypatch):
    from orchestrator_helpers import fake_process_model
    from services.orchestrator.runtimes.process import process_start_time

    settings = replace(settings, runtime_drivers=("process", "external"))
    runtime = lifecycle.ensure_runtime(db, fake_process_model(conn)["id"], settings)
    conn.execute("UPDATE container_lifecycle SET status = %s WHERE id = %s", (status, runtime["id"]))
    monkeypatch.setattr(lifecycle, "STOP_ABANDONED_S", -1.0)   # its stopper died long ago

    actions = lifecycle.check_health(db, settings)["actions"]

    assert [a["action"] for a in actions] == ["stop_finished"]
    assert runtime_row(conn, runtime["id"])["status"] == "stopped"
    assert process_start_time(runtime["pid"]) is None


def test_the_reaper_leaves_a_runtime_used_since_it_listed_it(db, conn, settings, fake_server, monkeypatch):
    model = insert_model(conn, runtime_config={"endpoint": fake_server.url, "model_alias": "fake"},
                         keep_alive_seconds=300)
    runtime = lifecycle.ensure_runtime(db, model["id"], settings)
    age(conn, runtime["id"], 600)
    listed = queries.idle_expired_runtimes

    def a_request_runs_meanwhile(*args):
        rows = listed(*args)
        lifecycle.release_runtime(db, lifecycle.acquire_runtime(db, runtime["id"])["id"], settings)
        return rows

    monkeypatch.setattr(queries, "idle_expired_runtimes", a_request_runs_meanwhile)
    assert lifecycle.reap_idle(db, settings) == []
    assert runtime_row(conn, runtime["id"])["status"] == "running"


def test_a_release_without_a_holder_counts_off_only_the_run_it_was_counted_on(db, conn, settings, fake_server):
    model = insert_model(conn, runtime_config={"endpoint": fake_server.url, "model_alias": "fake"},
                         keep_alive_seconds=0)
    runtime = lifecycle.ensure_runtime(db, model["id"], settings)
    old = lifecycle.acquire_runtime(db, runtime["id"])   # a long POST /generate
    lifecycle.stop_runtime(db, runtime["id"], settings, drain_timeout_s=0.1)   # its drain timed out
    lifecycle.restart_runtime(db, runtime["id"], settings)
    lifecycle.acquire_runtime(db, runtime["id"])   # another request runs on the new run

    lifecycle.release_runtime(db, old["id"], settings, ready_at=old["ready_at"])   # the long one ends

    row = runtime_row(conn, runtime["id"])
    assert (row["status"], row["active_requests"]) == ("running", 1)


def test_an_https_endpoint_without_a_port_is_probed_on_443(monkeypatch):
    import socket

    dialled = []

    def create_connection(address, timeout):
        dialled.append(address)
        raise OSError("refused")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    lifecycle._listening("https://models.example")
    lifecycle._listening("http://models.example")
    assert dialled == [("models.example", 443), ("models.example", 80)]


def test_a_busy_count_no_request_holds_is_set_right_once_the_runtime_is_quiet(db, conn, settings, fake_server):
    """A POST /generate whose process died never releases its runtime: the health check recounts a
    runtime untouched for longer than any request may run, to the requests holding it."""
    model = insert_model(conn, runtime_config={"endpoint": fake_server.url, "model_alias": "fake"})
    quiet = lifecycle.ensure_runtime(db, model["id"], settings)
    conn.execute("""INSERT INTO request_queue (request_payload, task_type, status, lease_owner, lease_expires_at,
                        assigned_model_id, assigned_runtime_id, holds_runtime)
                    VALUES ('{}', 'conversation', 'processing', 'w', now() + interval '1 minute', %s, %s, true)""",
                 (model["id"], quiet["id"]))
    conn.execute("UPDATE container_lifecycle SET active_requests = 3, last_activity = now() - interval '3 hours'"
                 " WHERE id = %s", (quiet["id"],))

    actions = lifecycle.check_health(db, settings)["actions"]

    assert [(a["runtime_id"], a["action"]) for a in actions] == [(quiet["id"], "recounted")]
    assert runtime_row(conn, quiet["id"])["active_requests"] == 1
    # One in use lately is left alone: a request without a holder may still run on it.
    conn.execute("UPDATE container_lifecycle SET active_requests = 3, last_activity = now() WHERE id = %s",
                 (quiet["id"],))
    assert lifecycle.check_health(db, settings)["actions"] == []
    assert runtime_row(conn, quiet["id"])["active_requests"] == 3
