"""Leases of running requests: renewed in one statement for all, only while their owner runs them."""
from __future__ import annotations

import time

import pytest

from services.common.config import Settings
from services.common.db import PooledDatabase
from services.orchestrator import request_queue
from services.orchestrator.pipeline import LeaseRenewer

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
