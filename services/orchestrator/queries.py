"""SQL of the orchestrator: runtimes (`container_lifecycle`), the models they serve, queue pressure."""
from __future__ import annotations

from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb

from services.common.db import UNFLUSHED
from services.optimizer.queries import INSERT_PERFORMANCE, performance_rows
from services.registry.queries import (SELECTION_STATE, SELECTION_STATE_COLUMNS, SELECTION_STATE_UNCHANGED,
                                      selection_state_params)
from services.orchestrator import request_queue
from services.orchestrator.request_queue import Claim, Holder, Inheritance

# Advisory lock namespaces (the first key of the two-key form); the second key is a hash.
LOCK_MODEL_START = 4_001
LOCK_HOST_CAPACITY = 4_002
LOCK_RECONCILE = 4_003

LIVE_STATUSES = ("starting", "running", "draining", "stopping")

RUNTIME_COLUMNS = """
    r.*, m.name AS model_name, m.version AS model_version, m.protocol
"""
RUNTIME_FROM = "container_lifecycle r JOIN model_registry m ON m.id = r.model_id"
# What the holder of a lease needs of its runtime: reading every column back costs a tenth of the
# statement that takes the lease, on every dispatch.
LEASED_COLUMNS = ", ".join(f"container_lifecycle.{column}" for column in (
    "id", "model_id", "driver", "status", "endpoint", "active_requests", "ready_at", "load_time_ms"))


def _one(conn: psycopg.Connection, query: str, params: dict) -> dict | None:
    return conn.execute(query, params).fetchone()


def _runtime_returning(conn: psycopg.Connection, update: str, params: dict) -> dict | None:
    """Run an UPDATE ... RETURNING id, then read the row with its model columns."""
    row = _one(conn, update, params)
    return get_runtime(conn, row["id"]) if row else None


# Models.
def get_model(conn: psycopg.Connection, model_id: str) -> dict | None:
    return _one(conn, "SELECT * FROM model_registry WHERE id = %(id)s", {"id": model_id})


# Locks: held until the end of the current transaction.
def lock_model_start(conn: psycopg.Connection, model_id: str) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%(ns)s, hashtext(%(id)s))",
                 {"ns": LOCK_MODEL_START, "id": str(model_id)})


def lock_host_capacity(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%(ns)s, 0)", {"ns": LOCK_HOST_CAPACITY})


def try_lock_reconcile(conn: psycopg.Connection) -> bool:
    row = _one(conn, "SELECT pg_try_advisory_xact_lock(%(ns)s, 0) AS locked", {"ns": LOCK_RECONCILE})
    return bool(row["locked"])


# Reading runtimes.
def get_runtime(conn: psycopg.Connection, runtime_id: str) -> dict | None:
    return _one(conn, f"SELECT {RUNTIME_COLUMNS} FROM {RUNTIME_FROM} WHERE r.id = %(id)s", {"id": runtime_id})


def list_runtimes(conn: psycopg.Connection, *, model_id: str | None = None, status: str | None = None,
                  driver: str | None = None, health_status: str | None = None,
                  limit: int = 100, offset: int = 0) -> list[dict]:
    return conn.execute(f"""
        SELECT {RUNTIME_COLUMNS} FROM {RUNTIME_FROM}
        WHERE (%(model_id)s::uuid IS NULL OR r.model_id = %(model_id)s)
          AND (%(status)s::text IS NULL OR r.status = %(status)s)
          AND (%(driver)s::text IS NULL OR r.driver = %(driver)s)
          AND (%(health)s::text IS NULL OR r.health_status = %(health)s)
        ORDER BY r.created_at DESC, r.id
        LIMIT %(limit)s OFFSET %(offset)s
    """, {"model_id": model_id, "status": status, "driver": driver, "health": health_status,
          "limit": limit, "offset": offset}).fetchall()


def pick_warm_runtime(conn: psycopg.Connection, model_id: str) -> dict | None:
    """The least-loaded running runtime of a model, healthy ones first."""
    return _one(conn, f"""
        SELECT {RUNTIME_COLUMNS} FROM {RUNTIME_FROM}
        WHERE r.model_id = %(model_id)s AND r.status = 'running'
        ORDER BY r.health_status = 'healthy' DESC, r.active_requests, r.total_requests, r.id
        LIMIT 1
    """, {"model_id": model_id})


def find_starting_runtime(conn: psycopg.Connection, model_id: str, fresh_s: float) -> dict | None:
    """A runtime of the model someone is starting now (not one abandoned longer than `fresh_s`)."""
    return _one(conn, f"""
        SELECT {RUNTIME_COLUMNS} FROM {RUNTIME_FROM}
        WHERE r.model_id = %(model_id)s AND r.status = 'starting'
          AND r.updated_at > now() - make_interval(secs => %(fresh_s)s)
        ORDER BY r.created_at
        LIMIT 1
    """, {"model_id": model_id, "fresh_s": fresh_s})


def live_runtimes(conn: psycopg.Connection, *, model_id: str | None = None,
                  driver: str | None = None) -> list[dict]:
    return conn.execute(f"""
        SELECT {RUNTIME_COLUMNS} FROM {RUNTIME_FROM}
        WHERE r.status IN ('starting', 'running', 'draining', 'stopping')
          AND (%(model_id)s::uuid IS NULL OR r.model_id = %(model_id)s)
          AND (%(driver)s::text IS NULL OR r.driver = %(driver)s)
        ORDER BY r.created_at, r.id
    """, {"model_id": model_id, "driver": driver}).fetchall()


def host_usage(conn: psycopg.Connection) -> dict:
    """Resources held by live runtimes that run here (external endpoints hold none)."""
    return _one(conn, """
        SELECT coalesce(sum(allocated_cpu), 0)::float AS cpu,
               coalesce(sum(allocated_memory), 0)::int AS memory_mb,
               coalesce(sum(allocated_gpu), 0)::float AS gpu
        FROM container_lifecycle
        WHERE status IN ('starting', 'running', 'draining', 'stopping') AND driver <> 'external'
    """, {})


def idle_runtimes_lru(conn: psycopg.Connection, *, exclude_model_id: str) -> list[dict]:
    """Running, idle runtimes of other models, least recently used first (eviction candidates)."""
    return conn.execute(f"""
        SELECT {RUNTIME_COLUMNS} FROM {RUNTIME_FROM}
        WHERE r.status = 'running' AND r.active_requests = 0 AND r.driver <> 'external'
          AND r.model_id <> %(model_id)s
        ORDER BY r.last_activity, r.id
    """, {"model_id": exclude_model_id}).fetchall()


def idle_expired_runtimes(conn: psycopg.Connection, default_keep_alive_s: int) -> list[dict]:
    """Running runtimes idle for longer than their model's keep-alive (-1 never expires)."""
    return conn.execute(f"""
        SELECT {RUNTIME_COLUMNS} FROM {RUNTIME_FROM}
        WHERE r.status = 'running' AND r.active_requests = 0
          AND coalesce(m.keep_alive_seconds, %(default)s) >= 0
          AND r.last_activity <= now() - make_interval(secs => coalesce(m.keep_alive_seconds, %(default)s))
        ORDER BY r.last_activity
    """, {"default": default_keep_alive_s}).fetchall()


def stale_starting_runtimes(conn: psycopg.Connection, older_than_s: float) -> list[dict]:
    return conn.execute(f"""
        SELECT {RUNTIME_COLUMNS} FROM {RUNTIME_FROM}
        WHERE r.status = 'starting' AND r.updated_at <= now() - make_interval(secs => %(s)s)
    """, {"s": older_than_s}).fetchall()


def pending_requests_by_model(conn: psycopg.Connection) -> list[dict]:
    """Pending requests by the model they will likely run on: the one a retried request was given,
    else the one given the latest request of its task type (what selection chooses now). A pending
    request of a task type no model has served yet counts for none: its claim starts a runtime."""
    return conn.execute("""
        WITH pending AS (SELECT assigned_model_id, task_type FROM request_queue WHERE status = 'pending'),
        serving AS (
            SELECT kind.task_type, latest.model_id
            FROM (SELECT DISTINCT task_type FROM pending WHERE assigned_model_id IS NULL) kind
            CROSS JOIN LATERAL (SELECT assigned_model_id AS model_id FROM request_queue r
                                WHERE r.task_type = kind.task_type AND r.assigned_model_id IS NOT NULL
                                ORDER BY r.created_at DESC LIMIT 1) latest)
        SELECT coalesce(p.assigned_model_id, s.model_id) AS model_id, count(*)::int AS pending
        FROM pending p LEFT JOIN serving s ON p.assigned_model_id IS NULL AND s.task_type = p.task_type
        WHERE coalesce(p.assigned_model_id, s.model_id) IS NOT NULL
        GROUP BY 1
        ORDER BY pending DESC
    """).fetchall()


# Changing runtimes. Each transition names the statuses it starts from, so two workers racing
# on one runtime cannot both win.
def insert_runtime(conn: psycopg.Connection, model_id: str, driver: str, allocation: dict,
                   driver_state: dict) -> dict:
    row = _one(conn, """
        INSERT INTO container_lifecycle (model_id, driver, status, allocated_cpu, allocated_memory,
                                         allocated_gpu, driver_state)
        VALUES (%(model_id)s, %(driver)s, 'starting', %(cpu)s, %(memory_mb)s, %(gpu)s, %(state)s)
        RETURNING id
    """, {"model_id": model_id, "driver": driver, "cpu": allocation["cpu"],
          "memory_mb": allocation["memory_mb"], "gpu": allocation["gpu"],
          "state": Jsonb(driver_state)})
    return get_runtime(conn, row["id"])


def record_launch(conn: psycopg.Connection, runtime_id: str, *, endpoint: str, host: str, port: int | None,
                  pid: int | None, container_id: str | None, log_path: str | None,
                  driver_state: dict) -> dict | None:
    return _runtime_returning(conn, """
        UPDATE container_lifecycle
        SET endpoint = %(endpoint)s, host = %(host)s, port = %(port)s, pid = %(pid)s,
            container_id = %(container_id)s, log_path = %(log_path)s,
            driver_state = driver_state || %(state)s, started_at = now(), last_activity = now()
        WHERE id = %(id)s AND status = 'starting'
        RETURNING id
    """, {"id": runtime_id, "endpoint": endpoint, "host": host, "port": port, "pid": pid,
          "container_id": container_id, "log_path": log_path, "state": Jsonb(driver_state)})


def merge_driver_state(conn: psycopg.Connection, runtime_id: str, state: dict) -> None:
    conn.execute("UPDATE container_lifecycle SET driver_state = driver_state || %(state)s WHERE id = %(id)s",
                 {"id": runtime_id, "state": Jsonb(state)})


def mark_ready(conn: psycopg.Connection, runtime_id: str, load_time_ms: int) -> dict | None:
    return _runtime_returning(conn, """
        UPDATE container_lifecycle
        -- clock_timestamp(): the moment it became ready, which dispatch compares with its attempt's start.
        SET status = 'running', health_status = 'healthy', ready_at = clock_timestamp(),
            last_health_check = now(), last_activity = now(), load_time_ms = %(load_time_ms)s, error_message = NULL
        WHERE id = %(id)s AND status = 'starting'
        RETURNING id
    """, {"id": runtime_id, "load_time_ms": load_time_ms})


def mark_error(conn: psycopg.Connection, runtime_id: str, message: str,
               from_statuses: tuple[str, ...] = ("starting", "running")) -> dict | None:
    return _runtime_returning(conn, """
        UPDATE container_lifecycle
        SET status = 'error', health_status = 'unhealthy', error_message = %(message)s,
            active_requests = 0
        WHERE id = %(id)s AND status = ANY(%(from)s)
        RETURNING id
    """, {"id": runtime_id, "message": message[:8000], "from": list(from_statuses)})


def transition(conn: psycopg.Connection, runtime_id: str, to_status: str,
               from_statuses: tuple[str, ...]) -> dict | None:
    return _runtime_returning(conn, """
        UPDATE container_lifecycle SET status = %(to)s
        WHERE id = %(id)s AND status = ANY(%(from)s)
        RETURNING id
    """, {"id": runtime_id, "to": to_status, "from": list(from_statuses)})


def begin_stop_if_idle(conn: psycopg.Connection, runtime_id: str) -> dict | None:
    """running -> stopping, only while nothing runs on it (so an acquire never loses its runtime)."""
    return _runtime_returning(conn, """
        UPDATE container_lifecycle SET status = 'stopping'
        WHERE id = %(id)s AND status = 'running' AND active_requests = 0
        RETURNING id
    """, {"id": runtime_id})


def begin_stop_if_expired(conn: psycopg.Connection, runtime_id: str, default_keep_alive_s: int) -> dict | None:
    """running -> stopping, only while idle for longer than its model's keep-alive (-1 never)."""
    return _runtime_returning(conn, """
        UPDATE container_lifecycle r SET status = 'stopping'
        FROM model_registry m
        WHERE r.id = %(id)s AND m.id = r.model_id AND r.status = 'running' AND r.active_requests = 0
          AND coalesce(m.keep_alive_seconds, %(default)s) >= 0
          AND r.last_activity <= now() - make_interval(secs => coalesce(m.keep_alive_seconds, %(default)s))
        RETURNING r.id
    """, {"id": runtime_id, "default": default_keep_alive_s})


def recount_quiet_runtimes(conn: psycopg.Connection, quiet_s: float) -> list[dict]:
    """Running runtimes untouched for `quiet_s` (longer than any request may run) whose busy count
    exceeds the requests holding them: counted to those. The excess is requests without a holder
    (POST /generate) whose process died before releasing; an acquire meanwhile moves last_activity
    and so keeps the row out (the UPDATE re-checks it)."""
    return conn.execute("""
        UPDATE container_lifecycle r SET active_requests = held.n
        FROM (SELECT c.id, (SELECT count(*) FROM request_queue q
                            WHERE q.assigned_runtime_id = c.id AND q.holds_runtime) AS n
              FROM container_lifecycle c
              WHERE c.status = 'running' AND c.last_activity < now() - make_interval(secs => %(quiet)s)) held
        WHERE r.id = held.id AND r.active_requests > held.n
          AND r.last_activity < now() - make_interval(secs => %(quiet)s)
        RETURNING r.id, r.model_id, r.active_requests
    """, {"quiet": quiet_s}).fetchall()


def mark_stopped(conn: psycopg.Connection, runtime_id: str) -> dict | None:
    return _runtime_returning(conn, """
        UPDATE container_lifecycle
        SET status = 'stopped', health_status = 'unknown', stopped_at = now(), active_requests = 0,
            pid = NULL, container_id = NULL
        WHERE id = %(id)s AND status <> 'stopped'
        RETURNING id
    """, {"id": runtime_id})


def begin_restart(conn: psycopg.Connection, runtime_id: str) -> dict | None:
    """stopped/error -> starting again on the same row, counting the restart.

    Requests still holding the runtime from its last run hold it no more: their late releases would
    take requests of the new run off its count. (Stopped or failed, it takes no new holder meanwhile.)
    Their rows are locked before the runtime's, the order every lease and release takes them in.
    """
    return _runtime_returning(conn, """
        WITH dropped AS (
            UPDATE request_queue SET holds_runtime = false
            WHERE assigned_runtime_id = %(id)s AND holds_runtime
              AND EXISTS (SELECT FROM container_lifecycle WHERE id = %(id)s AND status IN ('stopped', 'error'))
            RETURNING id)
        UPDATE container_lifecycle
        SET status = 'starting', health_status = 'unknown', restart_count = restart_count + 1,
            pid = NULL, container_id = NULL, port = NULL, endpoint = NULL, error_message = NULL,
            started_at = NULL, ready_at = NULL, stopped_at = NULL, active_requests = 0
        WHERE id = %(id)s AND status IN ('stopped', 'error') AND (SELECT count(*) FROM dropped) >= 0
        RETURNING id
    """, {"id": runtime_id})


def record_health(conn: psycopg.Connection, runtime_id: str, health_status: str) -> None:
    conn.execute("""
        UPDATE container_lifecycle SET health_status = %(health)s, last_health_check = now()
        WHERE id = %(id)s
    """, {"id": runtime_id, "health": health_status})


def acquire(conn: psycopg.Connection, runtime_id: str, holder: Holder | None = None) -> dict | None:
    """Count a request on a running runtime; None when it is no longer running."""
    return _acquire(conn, "%(id)s", {"id": runtime_id}, holder)


def acquire_warm(conn: psycopg.Connection, model_id: str, holder: Holder | None = None,
                 selection_state: dict | None = None) -> dict | None:
    """Count a request on the least-loaded running runtime of a model, in one statement."""
    return _acquire(conn, """(SELECT id FROM container_lifecycle
                              WHERE model_id = %(model_id)s AND status = 'running'
                              ORDER BY health_status = 'healthy' DESC, active_requests, total_requests, id
                              LIMIT 1)""", {"model_id": model_id}, holder, selection_state)


def _acquire(conn: psycopg.Connection, target: str, params: dict, holder: Holder | None,
             selection_state: dict | None = None) -> dict | None:
    """The runtime `target` selects, counted busy.

    With a holder, only while its request's lease is held, and noted on the request in the same
    statement (which locks the request first, then the runtime: the order reclaiming an expired
    lease takes them in too); a holder's admission (a sync request not recorded yet) is recorded by
    it, whether a runtime was free or not. With the `selection_state` the caller selected on, only if
    that state is still current: the row then always comes, with the current state's columns and
    `state_unchanged` (and the runtime's columns all NULL when none was counted).
    """
    ctes, condition, params = [], "", dict(params)
    if holder is not None:
        # Unflushed: a busy count lost in a crash of Postgres went with the request that held it.
        # Without a holder, durable: a lost count would make a busy runtime look idle.
        ctes.append(UNFLUSHED)
    if selection_state is not None:
        ctes.append(f"state AS MATERIALIZED ({SELECTION_STATE})")
        condition += f" AND EXISTS (SELECT 1 FROM state WHERE {SELECTION_STATE_UNCHANGED})"
        params.update(selection_state_params(selection_state))
    if holder is not None and not holder.unrecorded:
        ctes.append("""held AS (SELECT id FROM request_queue
                                WHERE id = %(request_id)s AND lease_owner = %(owner)s AND status = 'processing'
                                FOR UPDATE)""")
        condition += " AND EXISTS (SELECT 1 FROM held)"
        params.update(request_id=holder.request_id, owner=holder.owner)
    ctes.append(f"""acquired AS (
        UPDATE container_lifecycle
        SET active_requests = active_requests + 1, total_requests = total_requests + 1, last_activity = now()
        {"FROM unflushed" if holder is not None else ""}
        WHERE id = {target} AND status = 'running' {condition}
        RETURNING {LEASED_COLUMNS})""")
    if holder is not None and holder.unrecorded:
        ctes.append(ADMITTED)
        params.update(holder.admission.params(holder.request_id, holder.owner))
    elif holder is not None:
        ctes.append("""noted AS (UPDATE request_queue q
                                 SET assigned_model_id = a.model_id, assigned_runtime_id = a.id, holds_runtime = true
                                 FROM acquired a, held h
                                 WHERE q.id = h.id)""")
    result = "SELECT * FROM acquired"
    if selection_state is not None:
        result = f"""SELECT a.*, s.*, {SELECTION_STATE_UNCHANGED} AS state_unchanged
                     FROM state s LEFT JOIN acquired a ON true"""
    row = _one(conn, f"WITH {', '.join(ctes)} {result}", params)
    if holder is not None and holder.unrecorded:
        holder.admission.recorded = True
    return row


# Records a sync request (processing, leased) holding the runtime `acquired` counted busy, if any.
ADMITTED = """admitted AS (
    INSERT INTO request_queue (id, request_payload, task_type, priority, mode, status, attempts, lease_owner,
                               lease_expires_at, started_at, callback_url, callback_headers,
                               assigned_model_id, assigned_runtime_id, holds_runtime)
    SELECT %(request_id)s, %(payload)s, %(task_type)s, %(priority)s, 'sync', 'processing', 1, %(owner)s,
           now() + make_interval(secs => %(lease)s), now(), %(callback_url)s, %(callback_headers)s,
           a.model_id, a.id, a.id IS NOT NULL
    FROM unflushed LEFT JOIN acquired a ON true)"""


def release(conn: psycopg.Connection, runtime_id: str, holder: Holder | None = None,
            performance: dict | None = None, result: dict | None = None, *,
            ready_at: datetime | None = None) -> dict | None:
    """Count a request as finished; also says the model's keep-alive (0 stops at once).

    With a holder, the count drops only if its request still holds the runtime under the holder's
    lease: a request whose lease was reclaimed meanwhile has already given it back. `performance`
    is a performance_logs row written by the same statement; with a `result`, the same statement
    also completes the request (`completed` says whether it did: only while the lease is held).
    Without a holder, with `ready_at`, only while the runtime is still in the run it was counted on.
    """
    params: dict = {"id": runtime_id, "ready_at": ready_at}
    same_run = " AND r.ready_at IS NOT DISTINCT FROM %(ready_at)s" if holder is None and ready_at else ""
    steps, drop, completed, unflushed = [], "1", "false", False
    if holder is not None and holder.admission is not None:
        # A sync request's end is unflushed: its caller holds the answer; a crash of Postgres
        # could lose the record of an answer given, never the answer (lease expiry then fails it).
        steps.append(UNFLUSHED)
        unflushed = True
    if holder is not None:
        # The lease owner too: after a reclaim, the request may hold this runtime for another worker.
        holding = "id = %(request_id)s AND lease_owner = %(owner)s AND holds_runtime AND assigned_runtime_id = %(id)s"
        if result is None:
            steps.append(f"freed AS (UPDATE request_queue SET holds_runtime = false WHERE {holding} RETURNING id)")
            drop = "(SELECT count(*) FROM freed)"
        else:
            # The answer completes the request while its lease is held, even if its hold was dropped (the
            # runtime restarted meanwhile); only a hold still there is taken off the count. `held`
            # locks the row before `freed` changes it (`freed` waits for it), so it reads the hold as it was.
            steps.append(f"held AS (SELECT id FROM request_queue WHERE {holding} FOR UPDATE)")
            steps.append("""freed AS (UPDATE request_queue
                                      SET holds_runtime = false, status = 'completed', result = %(result)s,
                                          completed_at = now(), lease_expires_at = NULL, callback_headers = NULL
                                      WHERE id = %(request_id)s AND lease_owner = %(owner)s
                                        AND assigned_runtime_id = %(id)s AND status = 'processing'
                                        AND (SELECT count(*) FROM held) >= 0
                                      RETURNING id)""")
            params["result"] = Jsonb(result)
            drop, completed = "(SELECT count(*) FROM held)", "EXISTS (SELECT 1 FROM freed)"
        params.update(request_id=holder.request_id, owner=holder.owner)
    if performance is not None:
        steps.append(f"logged AS ({INSERT_PERFORMANCE})")
        params["rows"] = performance_rows([performance])
    inheritance = holder.inheritance if holder is not None else None
    uncounted = inheritance.uncounted if inheritance is not None else 0
    if holder is not None and holder.successor is not None and result is not None:
        row = _released_to_successor(conn, steps, drop, completed, params, holder.successor, uncounted)
    else:
        row = _one(conn, f"""
            {"WITH " + ", ".join(steps) if steps else ""}
            UPDATE container_lifecycle r
            SET active_requests = greatest(r.active_requests - {drop}, 0), last_activity = now(),
                total_requests = r.total_requests + %(uncounted)s
            FROM model_registry m {", unflushed" if unflushed else ""}
            WHERE r.id = %(id)s AND m.id = r.model_id{same_run}
            RETURNING r.id, r.model_id, r.active_requests, r.status, m.keep_alive_seconds, {completed} AS completed
        """, {**params, "uncounted": uncounted})
    if inheritance is not None:
        inheritance.uncounted = 0   # added by the first release of the request that ran
    return row


def _released_to_successor(conn: psycopg.Connection, steps: list[str], drop: str, completed: str, params: dict,
                           successor: Claim, uncounted: int) -> dict | None:
    """The release that completes a queued request, claiming the next one for the same owner in the
    same statement, onto the same runtime if it is still running, with the selection state current
    then. A runtime handed over stays as busy: its row is left alone (no lock on it, the queue's
    hot spot), except about once a second for its last activity and the requests it served meanwhile.
    """
    handed = "(SELECT count(*) FROM claimed WHERE holds_runtime)"
    params.update(lease=successor.lease_seconds, uncounted=uncounted)
    row = _one(conn, f"""
        WITH {", ".join(steps)},
        state AS MATERIALIZED ({SELECTION_STATE}),
        running AS (SELECT r.*, m.keep_alive_seconds FROM {RUNTIME_FROM} WHERE r.id = %(id)s AND r.status = 'running'),
        {request_queue.claimed(holding="running")},
        released AS (
            UPDATE container_lifecycle r
            SET active_requests = greatest(r.active_requests - {drop}, 0) + {handed},
                total_requests = r.total_requests + {handed} + %(uncounted)s, last_activity = now()
            FROM model_registry m
            WHERE r.id = %(id)s AND m.id = r.model_id
              AND ({drop} <> {handed} OR r.last_activity < now() - interval '1 second')
            RETURNING r.*, m.keep_alive_seconds),
        runtime AS (SELECT * FROM released UNION ALL SELECT * FROM running WHERE NOT EXISTS (SELECT FROM released))
        SELECT r.*, {completed} AS completed, EXISTS (SELECT FROM released) AS counted, s.*,
               {", ".join(f"c.{column} AS next_{column}" for column in request_queue.COLUMNS)},
               c.holds_runtime AS next_holds_runtime, c.more_pending AS next_more_pending
        FROM state s LEFT JOIN runtime r ON true LEFT JOIN claimed c ON true
    """, params)
    state = {column: row.pop(column) for column in SELECTION_STATE_COLUMNS}
    next_request = {column: row.pop(f"next_{column}") for column in request_queue.COLUMNS}
    handed_over, counted = row.pop("next_holds_runtime"), row.pop("counted")
    more_pending = row.pop("next_more_pending")
    runtime = row if row["id"] is not None else None
    if next_request["id"] is not None:
        successor.row, successor.more_pending = next_request, more_pending
        successor.inheritance = Inheritance(runtime if handed_over else None, state,
                                            uncounted=0 if counted or not handed_over else uncounted + 1)
    return runtime


def active_requests(conn: psycopg.Connection, runtime_id: str) -> int:
    row = _one(conn, "SELECT active_requests FROM container_lifecycle WHERE id = %(id)s", {"id": runtime_id})
    return row["active_requests"] if row else 0


# Front doors.
def active_models(conn: psycopg.Connection, drivers: tuple[str, ...]) -> list[dict]:
    """Active models on these runtime drivers, for the OpenAI and Ollama model lists."""
    return conn.execute(
        "SELECT name, version, created_at FROM model_registry WHERE active AND runtime_driver = ANY(%s)"
        " ORDER BY name, version", (list(drivers),)
    ).fetchall()


def running_models(conn: psycopg.Connection) -> list[dict]:
    """Models with at least one running runtime, and since when."""
    return conn.execute("""
        SELECT m.name, m.version, min(r.ready_at) AS started
        FROM container_lifecycle r JOIN model_registry m ON m.id = r.model_id
        WHERE r.status = 'running'
        GROUP BY m.id ORDER BY m.name, m.version
    """).fetchall()
