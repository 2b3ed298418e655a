"""Leases of running requests: renewed in one statement for all, only while their owner runs them."""
from __future__ import annotations

import time

import pytest
from orchestrator_helpers import insert_model

from services.common.config import Settings
from services.common.db import PooledDatabase
from services.orchestrator import lifecycle, queries, request_queue
from services.orchestrator.pipeline import LeaseRenewer
from services.orchestrator.request_queue import Holder

PAYLOAD = {"prompt": "hi", "task_type": "conversation"}


def sync_request(conn, request_id: str, owner: str, lease_seconds: float = 30.0) -> dict:
    return request_queue.enqueue(conn, request_id=request_id, payload=PAYLOAD, task_type="conversation",
                                 priority=100, mode="sync", callback_url=None, lease_owner=owner,
                                 lease_seconds=lease_seconds)


def lease_left_s(conn, request_id: str) -> float:
    return conn.execute("SELECT extract(epoch FROM lease_expires_at - now())::float8 AS s FROM request_queue"
                        " WHERE id = %s", (request_id,)).fetchone()["s"]


def test_renewing_extends_only_the_leases_their_owners_still_hold(conn):
    held = sync_request(conn, "5f0c7b7e-0000-4000-8000-000000000201", "worker-a", lease_seconds=1)
    taken = sync_request(conn, "5f0c7b7e-0000-4000-8000-000000000202", "worker-b", lease_seconds=1)
    done = sync_request(conn, "5f0c7b7e-0000-4000-8000-000000000203", "worker-a", lease_seconds=1)
    request_queue.complete(conn, done["id"], owner="worker-a", result={})

    renewed = request_queue.renew_leases(conn, [(str(held["id"]), "worker-a"), (str(taken["id"]), "worker-a"),
                                                (str(done["id"]), "worker-a")], lease_seconds=60)

    assert renewed == [held["id"]]
    assert 59 < lease_left_s(conn, held["id"]) <= 60
    assert lease_left_s(conn, taken["id"]) <= 1
    assert request_queue.get(conn, done["id"])["lease_expires_at"] is None


@pytest.fixture
def pooled(fresh_database_url: str):
    database = PooledDatabase(fresh_database_url, min_size=1, max_size=2, name="lease-test")
    database.pool.open(wait=True)
    yield database
    database.close()


def test_a_lease_is_renewed_while_its_block_runs_and_no_longer_after(pooled):
    settings = Settings(queue_lease_renew_s=0.05, queue_lease_s=60.0)
    request_id = "5f0c7b7e-0000-4000-8000-000000000301"
    with pooled.connection() as conn:
        sync_request(conn, request_id, "worker-a", lease_seconds=2)

    with LeaseRenewer().kept(pooled, settings, request_id, "worker-a"):
        time.sleep(0.3)
        with pooled.connection() as conn:
            assert lease_left_s(conn, request_id) > 59
    with pooled.connection() as conn:  # shorten it: a renewal after the block would show
        conn.execute("UPDATE request_queue SET lease_expires_at = now() + interval '2 seconds' WHERE id = %s",
                     (request_id,))
    time.sleep(0.3)

    with pooled.connection() as conn:
        assert lease_left_s(conn, request_id) < 2


def test_a_lease_taken_after_an_idle_spell_is_renewed_in_time(pooled):
    settings = Settings(queue_lease_renew_s=0.2, queue_lease_s=1.0)
    renewer = LeaseRenewer()
    first, second = "5f0c7b7e-0000-4000-8000-000000000302", "5f0c7b7e-0000-4000-8000-000000000303"
    with pooled.connection() as conn:
        sync_request(conn, first, "worker-a", lease_seconds=1)
        sync_request(conn, second, "worker-a", lease_seconds=1)
    with renewer.kept(pooled, settings, first, "worker-a"):
        time.sleep(0.3)
    time.sleep(0.3)   # the renewer wakes with nothing to renew, and sleeps again

    left = []
    with renewer.kept(pooled, settings, second, "worker-a"):
        for _ in range(8):   # a call longer than the lease
            time.sleep(0.2)
            with pooled.connection() as conn:
                left.append(lease_left_s(conn, second))
    assert min(left) > 0, left


# --- runtimes held by requests ---------------------------------------------------------------------

def running_runtime(conn) -> dict:
    model = insert_model(conn)
    return conn.execute(
        "INSERT INTO container_lifecycle (model_id, driver, status, endpoint, allocated_cpu, allocated_memory)"
        " VALUES (%s, 'external', 'running', 'http://127.0.0.1:9', 1, 256) RETURNING *", (model["id"],)).fetchone()


def runtime_and_request(conn, request_id: str, owner: str = "worker-a"):
    runtime = running_runtime(conn)
    sync_request(conn, request_id, owner, lease_seconds=30)
    return runtime, Holder(request_id, owner)


def queued(conn, request_id: str) -> dict:
    return conn.execute("SELECT assigned_model_id, assigned_runtime_id, holds_runtime, status FROM request_queue"
                        " WHERE id = %s", (request_id,)).fetchone()


def busy(conn, runtime_id) -> int:
    return queries.active_requests(conn, runtime_id)


def test_acquiring_for_a_request_notes_the_runtime_on_it_in_the_same_statement(conn):
    runtime, holder = runtime_and_request(conn, "5f0c7b7e-0000-4000-8000-000000000401")

    acquired = queries.acquire_warm(conn, runtime["model_id"], holder)

    assert acquired["id"] == runtime["id"] and busy(conn, runtime["id"]) == 1
    assert queued(conn, holder.request_id) == {"assigned_model_id": runtime["model_id"],
                                               "assigned_runtime_id": runtime["id"], "holds_runtime": True,
                                               "status": "processing"}
    queries.release(conn, runtime["id"], holder)
    assert busy(conn, runtime["id"]) == 0
    assert queued(conn, holder.request_id)["holds_runtime"] is False
    # A second release (a bug, or a retry of the statement) does not count the runtime down again.
    queries.acquire(conn, runtime["id"])
    queries.release(conn, runtime["id"], holder)
    assert busy(conn, runtime["id"]) == 1


@pytest.mark.parametrize("sync", [True, False])
def test_the_end_of_a_sync_request_is_unflushed_and_of_an_async_one_durable(conn, sync):
    """The sync caller holds the answer; an async result exists nowhere else."""
    runtime = running_runtime(conn)
    admission = request_queue.Admission({**PAYLOAD, "priority": 100, "callback_url": None}, None, 30.0)
    holder = Holder("5f0c7b7e-0000-4000-8000-000000000405", "worker-a", admission if sync else None)
    if not sync:
        sync_request(conn, holder.request_id, holder.owner)
    queries.acquire_warm(conn, runtime["model_id"], holder)
    conn.execute("SET LOCAL synchronous_commit = on")   # what the acquiring statement set, undone

    ended = queries.release(conn, runtime["id"], holder, result={"response": "hi"})

    assert ended["completed"] is True
    expected = "off" if sync else "on"
    assert conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == expected


@pytest.mark.parametrize("acquire", [
    lambda conn, runtime, holder: queries.acquire_warm(conn, runtime["model_id"], holder),
    lambda conn, runtime, holder: queries.acquire(conn, runtime["id"], holder),
])
def test_a_sync_request_is_recorded_by_the_statement_that_counts_its_runtime(conn, acquire):
    runtime = running_runtime(conn)
    admission = request_queue.Admission({**PAYLOAD, "priority": 100, "callback_url": None}, None, 30.0)
    holder = Holder("5f0c7b7e-0000-4000-8000-000000000403", "worker-a", admission)

    assert acquire(conn, runtime, holder)["id"] == runtime["id"]

    assert admission.recorded and busy(conn, runtime["id"]) == 1
    assert queued(conn, holder.request_id) == {"assigned_model_id": runtime["model_id"],
                                               "assigned_runtime_id": runtime["id"], "holds_runtime": True,
                                               "status": "processing"}
    assert request_queue.lease_held(conn, holder)


def test_a_request_reclaimed_while_holding_a_runtime_gives_its_busy_count_back_once(conn):
    runtime, holder = runtime_and_request(conn, "5f0c7b7e-0000-4000-8000-000000000402")
    queries.acquire(conn, runtime["id"], holder)
    queries.acquire(conn, runtime["id"])            # another request, alive, on the same runtime
    conn.execute("UPDATE request_queue SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
                 (holder.request_id,))              # its worker was SIGKILLed: the lease lapses

    reclaimed = request_queue.reclaim_expired(conn, max_attempts=3)

    assert [(str(row["id"]), row["status"]) for row in reclaimed] == [(holder.request_id, "failed")]
    assert busy(conn, runtime["id"]) == 1
    assert queued(conn, holder.request_id)["holds_runtime"] is False
    # The dead worker's release, should it still come, finds nothing held.
    queries.release(conn, runtime["id"], holder)
    assert busy(conn, runtime["id"]) == 1


def test_a_request_reclaimed_after_its_attempt_released_the_runtime_gives_nothing_back(conn):
    runtime, holder = runtime_and_request(conn, "5f0c7b7e-0000-4000-8000-000000000403")
    queries.acquire(conn, runtime["id"], holder)
    queries.release(conn, runtime["id"], holder)
    queries.acquire(conn, runtime["id"])
    conn.execute("UPDATE request_queue SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
                 (holder.request_id,))

    request_queue.reclaim_expired(conn, max_attempts=3)

    assert busy(conn, runtime["id"]) == 1


@pytest.mark.parametrize("answer", [None, {"response": "late, but an answer"}])
def test_a_release_from_before_a_restart_leaves_the_new_runs_count_alone(conn, answer):
    runtime, old = runtime_and_request(conn, "5f0c7b7e-0000-4000-8000-000000000407")
    queries.acquire(conn, runtime["id"], old)
    queries.mark_error(conn, runtime["id"], "the health check failed")
    assert queries.begin_restart(conn, runtime["id"]) is not None
    assert queued(conn, old.request_id)["holds_runtime"] is False
    queries.mark_ready(conn, runtime["id"], load_time_ms=5)
    _, new = runtime_and_request(conn, "5f0c7b7e-0000-4000-8000-000000000408")
    queries.acquire(conn, runtime["id"], new)

    released = queries.release(conn, runtime["id"], old, result=answer)   # the old attempt's call ends at last

    assert busy(conn, runtime["id"]) == 1
    assert released["completed"] is (answer is not None)   # an answer that came is recorded all the same
    queries.release(conn, runtime["id"], new)
    assert busy(conn, runtime["id"]) == 0


def test_a_restart_refused_leaves_the_holders_of_a_running_runtime_alone(conn):
    runtime, holder = runtime_and_request(conn, "5f0c7b7e-0000-4000-8000-000000000409")
    queries.acquire(conn, runtime["id"], holder)
    assert queries.begin_restart(conn, runtime["id"]) is None   # running: nothing to restart
    assert queued(conn, holder.request_id)["holds_runtime"] is True
    queries.release(conn, runtime["id"], holder)
    assert busy(conn, runtime["id"]) == 0


def performance_of(conn, request_id: str) -> list[dict]:
    return conn.execute("SELECT runtime_id, attempt, success, error_class FROM performance_logs"
                        " WHERE request_id = %s", (request_id,)).fetchall()


def test_releasing_with_a_performance_row_logs_it_in_the_same_statement(db, conn, settings):
    runtime, holder = runtime_and_request(conn, "5f0c7b7e-0000-4000-8000-000000000404")
    lifecycle.acquire_runtime(db, runtime["id"], holder)
    row = {"model_id": runtime["model_id"], "runtime_id": runtime["id"], "request_id": holder.request_id,
           "task_type": "conversation", "attempt": 1, "processing_time_ms": 3, "success": True}

    lifecycle.release_runtime(db, runtime["id"], settings, holder, performance=row)

    assert busy(conn, runtime["id"]) == 0
    assert performance_of(conn, holder.request_id) == [
        {"runtime_id": runtime["id"], "attempt": 1, "success": True, "error_class": None}]


def test_a_performance_row_that_cannot_be_written_does_not_keep_the_runtime_busy(db, conn, settings):
    runtime, holder = runtime_and_request(conn, "5f0c7b7e-0000-4000-8000-000000000405")
    lifecycle.acquire_runtime(db, runtime["id"], holder)
    failed_without_a_class = {"model_id": runtime["model_id"], "request_id": holder.request_id,
                              "task_type": "conversation", "processing_time_ms": 3, "success": False}  # breaks a CHECK

    lifecycle.release_runtime(db, runtime["id"], settings, holder, performance=failed_without_a_class)

    assert busy(conn, runtime["id"]) == 0 and queued(conn, holder.request_id)["holds_runtime"] is False
    assert performance_of(conn, holder.request_id) == []


def test_a_worker_whose_lease_was_reclaimed_cannot_count_the_runtime_busy(db, conn, settings):
    runtime, holder = runtime_and_request(conn, "5f0c7b7e-0000-4000-8000-000000000406")
    conn.execute("UPDATE request_queue SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
                 (holder.request_id,))
    request_queue.reclaim_expired(conn, max_attempts=3)

    assert queries.acquire_warm(conn, runtime["model_id"], holder) is None
    with pytest.raises(request_queue.LeaseLost):
        lifecycle.lease_runtime(db, runtime["model_id"], settings, holder=holder)
    assert busy(conn, runtime["id"]) == 0
    assert conn.execute("SELECT count(*) AS n FROM container_lifecycle").fetchone()["n"] == 1  # none started


def test_a_late_release_does_not_free_the_hold_of_the_worker_that_took_the_request_over(conn):
    runtime, first = runtime_and_request(conn, "5f0c7b7e-0000-4000-8000-000000000407", owner="worker-a")
    queries.acquire(conn, runtime["id"], first)
    conn.execute("UPDATE request_queue SET lease_expires_at = now() - interval '1 second', mode = 'async'"
                 " WHERE id = %s", (first.request_id,))
    request_queue.reclaim_expired(conn, max_attempts=3)              # back to pending
    claimed = request_queue.claim_next(conn, owner="worker-b", lease_seconds=30)
    second = Holder(str(claimed["id"]), "worker-b")
    queries.acquire(conn, runtime["id"], second)

    queries.release(conn, runtime["id"], first)                      # worker A wakes up late

    assert busy(conn, runtime["id"]) == 1 and queued(conn, second.request_id)["holds_runtime"] is True
    queries.release(conn, runtime["id"], second)
    assert busy(conn, runtime["id"]) == 0
