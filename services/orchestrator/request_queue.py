"""The request queue (`request_queue`): every accepted request, its lease while it runs, its outcome.

A row moves pending -> processing -> completed | failed, or pending -> cancelled. A worker owns a
processing row through its lease; a row whose lease expired (its worker is gone) is reclaimed:
async rows go back to pending until they run out of attempts, sync rows fail (their caller is gone).
Completion is conditional on still holding the lease, so a reclaimed request is never finished twice.

`callback_headers` are secrets (a resume webhook's token): no endpoint returns them, and a request
that has ended drops them (its callback is made from the row its worker already holds).
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field

import psycopg
from psycopg.types.json import Jsonb

from services.common.db import UNFLUSHED
from services.common.errors import Conflict

# Workers LISTEN on this channel; an async enqueue NOTIFYs it when its transaction commits.
# Lease lengths are settings (queue_lease_s, queue_lease_renew_s) passed in by the callers.
CHANNEL = "request_queue"
# An async enqueue NOTIFYs only while fewer requests than this are pending (a backlog keeps workers busy).
NOTIFY_BELOW_BACKLOG = 32

COLUMNS = ("id", "request_payload", "task_type", "priority", "mode", "status", "attempts", "assigned_model_id",
           "assigned_runtime_id", "lease_owner", "lease_expires_at", "callback_url", "callback_headers", "result",
           "error_details", "created_at", "started_at", "completed_at")
RETURNING = f" RETURNING {', '.join(COLUMNS)} "


def claimed(*, holding: str = "") -> str:
    """A CTE leasing the next pending request (highest priority, then oldest) to %(owner)s for
    %(lease)s seconds, saying whether others are pending (`more_pending`); `holding`, a CTE name,
    gives it the runtime (id, model_id) that CTE holds."""
    sets, returned = "", ""
    if holding:
        sets = f""", assigned_model_id = (SELECT model_id FROM {holding}),
                   assigned_runtime_id = (SELECT id FROM {holding}), holds_runtime = EXISTS (SELECT FROM {holding})"""
        returned = ", holds_runtime"
    return f"""claimed AS (
        UPDATE request_queue SET status = 'processing', attempts = attempts + 1, lease_owner = %(owner)s,
                                 lease_expires_at = now() + make_interval(secs => %(lease)s), started_at = now() {sets}
        WHERE id = (SELECT id FROM request_queue WHERE status = 'pending'
                    ORDER BY priority DESC, created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
        {RETURNING}{returned},
        EXISTS (SELECT FROM request_queue other WHERE other.status = 'pending' AND other.id <> request_queue.id)
            AS more_pending)"""


@dataclass
class Admission:
    """A sync request not in the queue yet: the statement that leases its first runtime records it
    (one round trip instead of two on the hot path); `recorded` once that statement has run."""

    payload: dict
    callback_headers: dict | None
    lease_seconds: float
    recorded: bool = False

    def params(self, request_id: str, owner: str) -> dict:
        """The row's values, for the statement recording it (the row's id as `request_id`)."""
        row = _row_params(request_id, self.payload, self.payload["task_type"], self.payload["priority"],
                          self.payload["callback_url"], self.callback_headers)
        row["request_id"] = row.pop("id")   # `id` is the runtime's in the statements that take these
        return {**row, "owner": owner, "lease": self.lease_seconds}


@dataclass
class Inheritance:
    """What a request claimed by its predecessor's completing statement gets from it: that runtime,
    still counted busy, now for this request (None when it was no longer running), and the selection
    state current then. Its first attempt runs on the runtime if it selected that model; otherwise
    the runtime is given back."""

    runtime: dict | None
    state: dict
    uncounted: int = 0   # requests served on the runtime not yet added to its total_requests


@dataclass
class Claim:
    """A request claimed for a worker (`row`), and what it inherited if the statement completing its
    predecessor claimed it: that statement fills in a Claim given to it (`row` stays None when the
    queue was empty). While the queue is not empty, a request so claimed costs two statements fewer:
    no claim, and no lease of a runtime."""

    lease_seconds: float
    row: dict | None = None
    inheritance: Inheritance | None = None
    more_pending: bool = False   # whether other requests were pending when it was claimed


@dataclass(frozen=True)
class Holder:
    """The request an attempt runs for, and the lease owner it runs under: what holds a runtime.

    With an `admission`, the request is a sync one that its first lease records; with a `successor`,
    the statement that completes the request also claims the next one for the same owner into it;
    with an `inheritance`, the request was claimed that way.
    """

    request_id: str
    owner: str
    admission: Admission | None = field(default=None, compare=False)
    successor: Claim | None = field(default=None, compare=False)
    inheritance: Inheritance | None = field(default=None, compare=False)

    @property
    def unrecorded(self) -> bool:
        return self.admission is not None and not self.admission.recorded


class LeaseLost(Conflict):
    """The request's lease lapsed and was reclaimed: this worker must not run it any further."""


_HOST = socket.gethostname()   # once: a system call per request costs a GIL hand-off under load


def lease_owner() -> str:
    """Who holds a lease: host, process and thread, so owners never collide."""
    return f"{_HOST}:{os.getpid()}:{threading.get_ident()}"


def enqueue(conn: psycopg.Connection, *, request_id: str, payload: dict, task_type: str, priority: int, mode: str,
            callback_url: str | None, callback_headers: dict | None = None, lease_owner: str | None = None,
            lease_seconds: float | None = None) -> dict:
    """Record a request: pending (async), or already leased to the caller's process (sync)."""
    params = _row_params(request_id, payload, task_type, priority, callback_url, callback_headers)
    if mode == "sync":
        # Unflushed: its caller is waiting (a stream), and `complete`, durable, flushes it too.
        return conn.execute(
            f"WITH {UNFLUSHED} INSERT INTO request_queue (id, request_payload, task_type, priority, mode, status,"
            " attempts, lease_owner, lease_expires_at, started_at, callback_url, callback_headers)"
            " SELECT %(id)s, %(payload)s, %(task_type)s, %(priority)s, 'sync', 'processing', 1, %(owner)s,"
            " now() + make_interval(secs => %(lease)s), now(), %(callback_url)s, %(callback_headers)s"
            " FROM unflushed" + RETURNING,
            {**params, "owner": lease_owner, "lease": lease_seconds},
        ).fetchone()
    # One statement, so the NOTIFY is delivered when the row is committed, even in autocommit. Only
    # while few requests are pending: behind a backlog, workers are busy, and each claim that leaves
    # requests pending wakes another (`more_pending`). Under load this spares the lock that every
    # committing NOTIFY takes in turn, the queue's bottleneck; idle workers poll as well.
    # A request's age is the moment it is queued, not its transaction's start: requests queued in one
    # transaction are still taken in the order they came.
    return conn.execute(
        "WITH queued AS (INSERT INTO request_queue (id, request_payload, task_type, priority, mode, callback_url,"
        " callback_headers, created_at) VALUES (%(id)s, %(payload)s, %(task_type)s, %(priority)s, 'async',"
        " %(callback_url)s, %(callback_headers)s, clock_timestamp())" + RETURNING + ")"
        " SELECT queued.* FROM queued"
        " LEFT JOIN LATERAL (SELECT pg_notify(%(channel)s, '') WHERE (SELECT count(*) FROM"
        "  (SELECT FROM request_queue WHERE status = 'pending' LIMIT %(backlog)s) pending) < %(backlog)s) notified"
        " ON true",
        {**params, "channel": CHANNEL, "backlog": NOTIFY_BELOW_BACKLOG},
    ).fetchone()


def _row_params(request_id: str, payload: dict, task_type: str, priority: int, callback_url: str | None,
                callback_headers: dict | None) -> dict:
    return {"id": request_id, "payload": Jsonb(payload), "task_type": task_type, "priority": priority,
            "callback_url": callback_url,
            "callback_headers": None if callback_headers is None else Jsonb(callback_headers)}


def claim_next(conn: psycopg.Connection, *, owner: str, lease_seconds: float) -> dict | None:
    """Lease the next pending request (highest priority, then oldest), with `more_pending`: whether
    others were pending too; None when the queue is empty."""
    # Unflushed: a claim lost in a crash of Postgres leaves the request pending, to be claimed again.
    return conn.execute(f"WITH {UNFLUSHED}, {claimed()} SELECT claimed.* FROM claimed, unflushed",
                        {"owner": owner, "lease": lease_seconds}).fetchone()


def lease_held(conn: psycopg.Connection, holder: Holder) -> bool:
    """Whether the holder still holds its request's lease."""
    return conn.execute(
        "SELECT 1 FROM request_queue WHERE id = %s AND lease_owner = %s AND status = 'processing'",
        (holder.request_id, holder.owner),
    ).fetchone() is not None


def renew_leases(conn: psycopg.Connection, leases: list[tuple[str, str]], *, lease_seconds: float) -> list:
    """Extend the leases (request id, owner) their owners still hold; the ids of those renewed."""
    rows = conn.execute(
        f"WITH {UNFLUSHED} UPDATE request_queue SET lease_expires_at = now() + make_interval(secs => %s)"
        " FROM unflushed WHERE status = 'processing' AND (id, lease_owner) IN"
        "  (SELECT * FROM unnest(%s::uuid[], %s::text[]))"
        " RETURNING id",
        (lease_seconds, [request_id for request_id, _ in leases], [owner for _, owner in leases]),
    ).fetchall()
    return [row["id"] for row in rows]


def complete(conn: psycopg.Connection, request_id, *, owner: str, result: dict) -> bool:
    """Finish a request this owner still holds; False when its lease was lost meanwhile."""
    row = conn.execute(
        "UPDATE request_queue SET status = 'completed', result = %s, completed_at = now(),"
        " lease_expires_at = NULL, callback_headers = NULL WHERE id = %s AND lease_owner = %s AND status = 'processing'"
        " RETURNING id",
        (Jsonb(result), request_id, owner),
    ).fetchone()
    return row is not None


def fail(conn: psycopg.Connection, request_id, *, owner: str, error_details: dict,
         admission: Admission | None = None) -> bool:
    """Mark a request this owner still holds as failed, with every attempt in `error_details`; an
    admission that no lease recorded is recorded failed."""
    if admission is not None and not admission.recorded:
        # Nothing when the id is taken: the request is another's (a repeated X-Request-ID).
        inserted = conn.execute(
            "INSERT INTO request_queue (id, request_payload, task_type, priority, mode, status, attempts,"
            " started_at, completed_at, callback_url, error_details)"
            " VALUES (%(request_id)s, %(payload)s, %(task_type)s, %(priority)s, 'sync', 'failed', 1, now(), now(),"
            " %(callback_url)s, %(error_details)s) ON CONFLICT (id) DO NOTHING RETURNING id",
            {**admission.params(request_id, owner), "error_details": Jsonb(error_details)}).fetchone()
        admission.recorded = inserted is not None
        return admission.recorded
    row = conn.execute(
        "UPDATE request_queue SET status = 'failed', error_details = %s, completed_at = now(),"
        " lease_expires_at = NULL, callback_headers = NULL WHERE id = %s AND lease_owner = %s AND status = 'processing'"
        " RETURNING id",
        (Jsonb(error_details), request_id, owner),
    ).fetchone()
    return row is not None


def cancel(conn: psycopg.Connection, request_id) -> dict | None:
    """Cancel a pending request; None when it is not pending (or does not exist)."""
    return conn.execute(
        "UPDATE request_queue SET status = 'cancelled', completed_at = now(), callback_headers = NULL"
        " WHERE id = %s AND status = 'pending'" + RETURNING,
        (request_id,),
    ).fetchone()


def get(conn: psycopg.Connection, request_id) -> dict | None:
    return conn.execute(
        "SELECT id, request_payload, task_type, priority, mode, status, attempts, assigned_model_id,"
        " assigned_runtime_id, lease_owner, lease_expires_at, callback_url, result, error_details,"
        " created_at, started_at, completed_at FROM request_queue WHERE id = %s",
        (request_id,),
    ).fetchone()


def reclaim_expired(conn: psycopg.Connection, *, max_attempts: int) -> list[dict]:
    """Take back requests whose worker is gone: retry async ones, fail sync ones and spent ones.

    A request that died holding a runtime gives the runtime's busy count back. Each row comes with
    its callback (`callback_url`, `callback_headers`, the secrets the row itself drops when it
    fails): a request ended here is to be called back by the caller.
    """
    return conn.execute(
        "WITH expired AS (SELECT id, holds_runtime, assigned_runtime_id, callback_url, callback_headers"
        "                 FROM request_queue"
        "                 WHERE status = 'processing' AND lease_expires_at < now() FOR UPDATE SKIP LOCKED),"
        " held AS (SELECT assigned_runtime_id AS runtime_id, count(*) AS requests FROM expired"
        "          WHERE holds_runtime GROUP BY assigned_runtime_id),"
        " given_back AS (UPDATE container_lifecycle r"
        "                SET active_requests = greatest(r.active_requests - held.requests, 0)"
        "                FROM held WHERE r.id = held.runtime_id)"
        " UPDATE request_queue SET"
        " status = CASE WHEN mode = 'async' AND attempts < %(max)s THEN 'pending' ELSE 'failed' END,"
        " error_details = CASE WHEN mode = 'async' AND attempts < %(max)s THEN error_details"
        "   ELSE jsonb_build_object('error', 'worker_lost',"
        "        'detail', 'The worker running this request stopped before finishing it.',"
        "        'attempts', attempts) END,"
        " completed_at = CASE WHEN mode = 'async' AND attempts < %(max)s THEN NULL ELSE now() END,"
        " callback_headers = CASE WHEN mode = 'async' AND attempts < %(max)s THEN e.callback_headers END,"
        " lease_owner = NULL, lease_expires_at = NULL, holds_runtime = false"
        " FROM expired e WHERE request_queue.id = e.id"
        " RETURNING request_queue.id, mode, status, attempts, error_details, e.callback_url, e.callback_headers",
        {"max": max_attempts},
    ).fetchall()


def add_feedback(conn: psycopg.Connection, request_id, *, score: float, label: str | None,
                 comment: str | None) -> dict | None:
    """Store a rating of a request's answer against the model that gave it; None if no request with an
    answer has this id. A sync request still processing counts once a model runs it: its answer is out
    before its end is recorded. A queued one has no answer until it completes."""
    return conn.execute(
        "INSERT INTO request_feedback (request_id, model_id, score, label, comment)"
        " SELECT id, assigned_model_id, %s, %s, %s FROM request_queue"
        " WHERE id = %s AND (status = 'completed'"
        "                    OR (status = 'processing' AND mode = 'sync' AND assigned_model_id IS NOT NULL))"
        " RETURNING id, request_id, model_id, score::float AS score, label, comment, created_at",
        (score, label, comment, request_id),
    ).fetchone()
