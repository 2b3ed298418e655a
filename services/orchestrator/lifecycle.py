"""Runtime lifecycle: ensure a ready runtime, count its requests, stop, restart, scale, reap, heal, reconcile.

The database is the shared truth between orchestrator processes. Concurrent callers that find a
model cold take a Postgres advisory lock keyed by the model for a few milliseconds: the first
inserts a `starting` row and starts the server, the others see that row and wait for it. Every
status change names the statuses it starts from, so two processes racing on one runtime cannot
both win (e.g. the reaper only stops a runtime whose `active_requests` is 0 in the same UPDATE).
"""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit

from services.common.config import Settings
from services.common.db import Database
from services.common.errors import Conflict, NotFound, Problem, ServiceUnavailable, Unprocessable
from services.orchestrator import queries, request_queue
from services.orchestrator.request_queue import Holder
from services.registry.resources import right_size
from services.registry.selection import checked_state
from services.orchestrator.protocols import OllamaClient, server_ready, served_model_name
from services.orchestrator.runtimes import (Allocation, DriverError, RuntimeDriver, RuntimeStartError,
                                            driver_for)

logger = logging.getLogger(__name__)

START_TIMEOUT_S = {"process": 60.0, "docker": 900.0, "external": 10.0}
PROBE_INTERVAL_S = (0.002, 0.01)  # readiness probes back off from the first to the second
PROBE_CONNECT_TIMEOUT_S = 0.5
ALIVE_CHECK_INTERVAL_S = 0.2
WAIT_INTERVAL_S = 0.02
DRAIN_TIMEOUT_S = 30.0
STOP_ABANDONED_S = DRAIN_TIMEOUT_S + 60.0   # a stop that takes longer was abandoned by its process
# Longer than any request may run (a model's request_timeout_s is at most an hour): a runtime
# untouched that long serves no request its count has no holder for.
QUIET_RECOUNT_S = 2 * 3600.0
MAX_RESTARTS = 3
SCALE_UP_PENDING_PER_REPLICA = 4
PULL_PROGRESS_INTERVAL_S = 0.5
LOG_TAIL_CHARS = 2000


class RuntimeUnavailable(ServiceUnavailable):
    """No runtime can serve the model now (it failed to start, the host is full, ...)."""


def allocation_for(model: dict, expected_load: float, settings: Settings) -> Allocation:
    """Resources for one runtime of `model`, right-sized by the registry for its request slots.

    A runtime serves `runtime_config.parallel` requests at once, so that is the load it is sized
    for (at least `expected_load`).
    """
    slots = max(1, int(model["runtime_config"].get("parallel", 1)))
    sized = right_size(model, max(expected_load, slots), settings)
    return {
        "cpu": sized["cpu"],
        "memory_mb": sized["memory_mb"],
        "gpu": sized["gpu"],
        "threads": max(1, min(int(model["runtime_config"].get("threads", sized["threads"])),
                              int(settings.host_cpu_cores))),
        "parallel_slots": slots,
    }


# Ensuring a runtime.
def ensure_runtime(db: Database, model_id: str, settings: Settings) -> dict:
    """A ready runtime of the model: the least-loaded warm one, else one started now (once for all callers)."""
    with db.connection() as conn:
        warm = queries.pick_warm_runtime(conn, model_id)
    if warm:
        return warm
    return _claim_and_start(db, _model(db, model_id), settings, reuse=True)


def start_runtime(db: Database, model_id: str, settings: Settings) -> dict:
    """Start one more runtime (a replica) of the model, up to its max_replicas."""
    return _claim_and_start(db, _model(db, model_id), settings, reuse=False)


def acquire_runtime(db: Database, runtime_id: str, holder: Holder | None = None) -> dict | None:
    """Count a request on a runtime; None when it is no longer running (ensure another)."""
    with db.connection(autocommit=True) as conn:
        return queries.acquire(conn, runtime_id, holder)


def release_runtime(db: Database, runtime_id: str, settings: Settings, holder: Holder | None = None, *,
                    performance: dict | None = None, result: dict | None = None,
                    ready_at: datetime | None = None) -> dict | None:
    """Count a request as finished; a model with keep-alive 0 stops as soon as it is idle.

    Without a holder, the request is taken off the count of the run it was counted on (the
    runtime's `ready_at` then): after a restart, the new run's count is not the old one's.

    `performance`, the attempt's performance_logs row, is written by the same statement; if it
    cannot be written, the runtime is released all the same (a lost log row must not keep it busy).
    With a `result`, the holder's request is completed by that statement too (row["completed"]).
    After such a failure, the request ends failed instead (row["failure"], its error details):
    left processing, it would be reclaimed and run again.
    """
    try:
        with db.connection(autocommit=True) as conn:
            row = queries.release(conn, runtime_id, holder, performance, result, ready_at=ready_at)
    except Exception as error:  # whatever kept the attempt's record out, the release itself must happen
        if performance is None and result is None:
            raise
        logger.exception("could not record the attempt; releasing its runtime without it",
                         extra={"runtime_id": str(runtime_id)})
        with db.connection(autocommit=True) as conn:
            row = queries.release(conn, runtime_id, holder, ready_at=ready_at)
            if row is not None and result is not None and holder is not None:
                why = _first_line(str(error), type(error).__name__)
                failure = {"error": "unrecordable_answer", "detail": f"The answer could not be recorded: {why}"}
                if request_queue.fail(conn, holder.request_id, owner=holder.owner, error_details=failure):
                    row["failure"] = failure
    if row and row["keep_alive_seconds"] == 0 and row["active_requests"] == 0 and row["status"] == "running":
        _stop_if_idle(db, runtime_id, settings)
    return row


def take_inherited_runtime(db: Database, settings: Settings, holder: Holder | None,
                           model_id: str | None = None) -> dict | None:
    """The runtime the holder's request inherited from its predecessor, once, if it serves `model_id`;
    one serving another model (or any, without `model_id`) is given back."""
    if holder is None or holder.inheritance is None or holder.inheritance.runtime is None:
        return None
    runtime, holder.inheritance.runtime = holder.inheritance.runtime, None
    if model_id is not None and str(runtime["model_id"]) == str(model_id):
        return runtime
    release_runtime(db, runtime["id"], settings, holder)
    return None


def lease_runtime(db: Database, model_id: str, settings: Settings, *, holder: Holder | None = None,
                  selection_state: dict | None = None, attempts: int = 3) -> dict:
    """A ready runtime of the model, counted busy until `release_runtime`.

    With a `holder`, its request notes the model and runtime in the same statement that counts it,
    and only while the holder keeps its lease (LeaseLost otherwise); a holder's admission (a sync
    request not recorded yet) is recorded by that statement, whether a warm runtime was free or not.
    With the `selection_state` the model was selected on, that statement counts nothing if the
    state has changed since, and StaleSelection says the current one. A runtime the holder's request
    inherited, serving this model, is taken as it is: its selection was made on the state current
    when it was claimed.
    """
    inherited = take_inherited_runtime(db, settings, holder, model_id)
    if inherited is not None:
        return inherited
    for _ in range(attempts):
        with db.connection(autocommit=True) as conn:
            runtime = queries.acquire_warm(conn, model_id, holder, selection_state)
            if selection_state is not None:  # checked once: later statements need no check
                checked_state(runtime)
                runtime = runtime if runtime["id"] is not None else None
                selection_state = None
            if not runtime and holder and not request_queue.lease_held(conn, holder):
                raise request_queue.LeaseLost(f"request {holder.request_id} was taken back from this worker "
                                              "(its lease expired)", dispatch_id=holder.request_id)
        if runtime:
            return runtime
        runtime = acquire_runtime(db, ensure_runtime(db, model_id, settings)["id"], holder)
        if runtime:
            return runtime
    raise RuntimeUnavailable(f"no runtime of model {model_id} stayed up long enough to take the request",
                             model_id=str(model_id))


@contextmanager
def leased_runtime(db: Database, model_id: str, settings: Settings, *, holder: Holder | None = None) -> Iterator[dict]:
    """A ready runtime of the model, counted busy for the duration of the block."""
    runtime = lease_runtime(db, model_id, settings, holder=holder)
    try:
        yield runtime
    finally:
        release_runtime(db, runtime["id"], settings, holder, ready_at=runtime["ready_at"])


@dataclass
class _Claim:
    runtime: dict
    mine: bool
    to_stop: list[dict] = field(default_factory=list)


def _claim_and_start(db: Database, model: dict, settings: Settings, *, reuse: bool) -> dict:
    if model["runtime_driver"] not in settings.runtime_drivers:   # not a passing outage: no 503
        raise Unprocessable(f"model {_label(model)} runs on the {model['runtime_driver']} runtime driver, which "
                            f"is not enabled here (RUNTIME_DRIVERS={','.join(settings.runtime_drivers)})",
                            model_id=str(model["id"]))
    allocation = allocation_for(model, 1.0, settings)
    driver = _driver(model["runtime_driver"], settings)
    claim = _claim(db, model, allocation, settings, driver, reuse=reuse)
    for runtime in claim.to_stop:
        _finish_stop(db, runtime, settings)
    if not claim.mine:
        return _await_start(db, claim.runtime, _start_timeout(model))
    return _launch(db, driver, model, claim.runtime, allocation)


def _claim(db: Database, model: dict, allocation: Allocation, settings: Settings,
           driver: RuntimeDriver, *, reuse: bool) -> _Claim:
    """Under the model's lock: reuse what runs or starts, else insert a `starting` row (ours to start)."""
    timeout = _start_timeout(model)
    with db.connection() as conn:
        queries.lock_model_start(conn, model["id"])
        if reuse:
            # One being started first: it can turn running between the two reads (its starter holds
            # no lock), never back, so read in this order it is found either way.
            existing = (queries.find_starting_runtime(conn, model["id"], timeout)
                        or queries.pick_warm_runtime(conn, model["id"]))
            if existing:
                return _Claim(existing, mine=False)
        abandoned = [queries.mark_error(conn, row["id"], "abandoned: its start outlived the start timeout",
                                        ("starting",))
                     for row in queries.stale_starting_runtimes(conn, timeout) if row["model_id"] == model["id"]]
        evicted = _admit(conn, model, allocation, settings, driver)
        runtime = queries.insert_runtime(conn, model["id"], model["runtime_driver"], allocation, {
            "allocation": allocation, "start_timeout_s": timeout,
            "max_restarts": int(model["runtime_config"].get("max_restarts", MAX_RESTARTS))})
    return _Claim(runtime, mine=True, to_stop=[row for row in abandoned if row] + evicted)


def _admit(conn, model: dict, allocation: Allocation, settings: Settings, driver: RuntimeDriver) -> list[dict]:
    """Under the model's start lock, before a runtime of it starts (or starts again): Conflict at
    max_replicas; room made on the host for a managed one. The runtimes evicted for it, to stop."""
    live = [row for row in queries.live_runtimes(conn, model_id=model["id"])
            if row["status"] in ("starting", "running")]
    if len(live) >= model["max_replicas"]:
        raise Conflict(f"model {_label(model)} already runs {len(live)} of its {model['max_replicas']} "
                       "replicas", model_id=str(model["id"]))
    return _make_room(conn, model, allocation, settings) if driver.manages_lifecycle else []


def _make_room(conn, model: dict, allocation: Allocation, settings: Settings) -> list[dict]:
    """Fit the allocation on the host, evicting idle runtimes of other models, least recently used first.

    The allocation itself never exceeds the host: `right_size` refuses a model that cannot fit.
    """
    queries.lock_host_capacity(conn)
    usage = queries.host_usage(conn)
    over = {"cpu": usage["cpu"] + allocation["cpu"] - settings.host_cpu_cores,
            "memory_mb": usage["memory_mb"] + allocation["memory_mb"] - settings.host_memory_mb,
            "gpu": usage["gpu"] + allocation["gpu"] - settings.host_gpu_count}
    evicted = []
    for candidate in queries.idle_runtimes_lru(conn, exclude_model_id=model["id"]):
        if max(over.values()) <= 0:
            break
        row = queries.begin_stop_if_idle(conn, candidate["id"])
        if row:
            evicted.append(row)
            over["cpu"] -= float(row["allocated_cpu"])
            over["memory_mb"] -= row["allocated_memory"]
            over["gpu"] -= float(row["allocated_gpu"])
    if max(over.values()) > 0:  # raising rolls the evictions back too
        raise RuntimeUnavailable(
            f"the host has no room for model {_label(model)} and no idle runtime to evict "
            f"(in use: {usage['cpu']:g} CPU, {usage['memory_mb']} MB)", model_id=str(model["id"]))
    for row in evicted:
        logger.info("evicting idle runtime", extra={"runtime_id": str(row["id"]), "for_model": str(model["id"])})
    return evicted


def _launch(db: Database, driver: RuntimeDriver, model: dict, runtime: dict, allocation: Allocation) -> dict:
    """Start the server for a `starting` row we own, wait until it is ready, mark it running."""
    started = time.monotonic()
    deadline = started + _start_timeout(model)
    try:
        launched = driver.start(runtime, model, allocation)
    except Exception as exc:   # whatever it was, the row must not stay `starting`
        failure = _start_failed(db, runtime, str(exc))
        if isinstance(exc, DriverError):
            raise failure from exc
        raise
    with db.connection() as conn:
        row = queries.record_launch(conn, runtime["id"], endpoint=launched.endpoint, host=launched.host,
                                    port=launched.port, pid=launched.pid, container_id=launched.container_id,
                                    log_path=launched.log_path, driver_state=launched.driver_state)
    target = row or {**runtime, "pid": launched.pid, "container_id": launched.container_id,
                     "driver_state": {**runtime["driver_state"], **launched.driver_state}}
    try:
        if row is None:
            raise RuntimeStartError("the runtime was stopped while it was starting")
        _wait_ready(driver, model, row, deadline)
        _prepare(db, model, row)
    except Exception as exc:
        reason = str(exc.detail if isinstance(exc, Problem) else exc)
        tail = driver.log_tail(target, LOG_TAIL_CHARS)
        _stop_quietly(driver, target)
        failure = _start_failed(db, runtime, f"{reason}\n--- log tail ---\n{tail}" if tail else reason)
        if isinstance(exc, (DriverError, Problem)):
            raise failure from exc
        raise
    with db.connection() as conn:
        ready = queries.mark_ready(conn, row["id"], int((time.monotonic() - started) * 1000))
    if ready is None:
        raise RuntimeUnavailable(f"runtime {row['id']} was stopped while it was starting",
                                 runtime_id=str(row["id"]))
    logger.info("runtime ready", extra={"runtime_id": str(row["id"]), "model_id": str(model["id"]),
                                        "load_time_ms": ready["load_time_ms"]})
    return ready


def _wait_ready(driver: RuntimeDriver, model: dict, runtime: dict, deadline: float) -> None:
    """Probe with a short, growing interval until the server answers, it dies, or the deadline passes."""
    interval, next_alive_check = PROBE_INTERVAL_S[0], 0.0
    while not (_listening(runtime["endpoint"]) and server_ready(model["protocol"], runtime["endpoint"])):
        now = time.monotonic()
        if now >= next_alive_check:
            if not driver.is_running(runtime):
                raise RuntimeStartError("the model server exited before it was ready")
            next_alive_check = now + ALIVE_CHECK_INTERVAL_S
        if now > deadline:
            raise RuntimeStartError(f"the model server was not ready within {_start_timeout(model):g} s")
        time.sleep(interval)
        interval = min(interval * 1.5, PROBE_INTERVAL_S[1])


def _listening(endpoint: str) -> bool:
    """Whether anything accepts connections at the endpoint: a TCP connect, far cheaper than an HTTP
    probe, so frequent probes do not steal CPU from a server that is loading its model."""
    parts = urlsplit(endpoint)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=PROBE_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _prepare(db: Database, model: dict, runtime: dict) -> None:
    """Pull the model into an Ollama server (docker runtimes by default), recording progress."""
    config = model["runtime_config"]
    if model["protocol"] != "ollama" or not config.get("pull", runtime["driver"] == "docker"):
        return
    last_write = 0.0

    def record(progress: dict) -> None:
        nonlocal last_write
        if time.monotonic() - last_write >= PULL_PROGRESS_INTERVAL_S or progress.get("status") == "success":
            last_write = time.monotonic()
            with db.connection() as conn:
                queries.merge_driver_state(conn, runtime["id"], {"pull": progress})

    client = OllamaClient(runtime["endpoint"], served_model_name(model))
    record(client.pull(record))


def _await_start(db: Database, runtime: dict, timeout_s: float) -> dict:
    """Wait for a runtime someone else is starting."""
    deadline = time.monotonic() + timeout_s
    while True:
        with db.connection() as conn:
            row = queries.get_runtime(conn, runtime["id"])
        if row and row["status"] == "running":
            return row
        if not row or row["status"] != "starting":
            raise RuntimeUnavailable(
                f"runtime {runtime['id']} failed to start: {(row or {}).get('error_message') or 'it was removed'}",
                runtime_id=str(runtime["id"]))
        if time.monotonic() > deadline:
            raise RuntimeUnavailable(f"runtime {runtime['id']} was not ready within {timeout_s:g} s",
                                     runtime_id=str(runtime["id"]))
        time.sleep(WAIT_INTERVAL_S)


def _start_failed(db: Database, runtime: dict, message: str) -> RuntimeUnavailable:
    with db.connection() as conn:
        queries.mark_error(conn, runtime["id"], message, ("starting",))
    logger.warning("runtime failed to start", extra={"runtime_id": str(runtime["id"]), "reason": message[:500]})
    return RuntimeUnavailable(f"runtime {runtime['id']} failed to start: {_first_line(message, 'unknown reason')}",
                              runtime_id=str(runtime["id"]), model_id=str(runtime["model_id"]))


# Stopping, restarting, scaling.
def stop_runtime(db: Database, runtime_id: str, settings: Settings, *,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S) -> dict:
    """Take the runtime out of rotation, wait for its requests to finish (up to a deadline), stop it."""
    row = get_runtime(db, runtime_id)
    if row["status"] == "stopped":
        return row
    with db.connection() as conn:
        queries.transition(conn, runtime_id, "draining", ("running", "starting"))
        row = queries.get_runtime(conn, runtime_id)
    if row is not None and row["status"] == "draining":   # by this call, or by a stop under way already
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            with db.connection() as conn:
                if queries.active_requests(conn, runtime_id) == 0:
                    break
            time.sleep(WAIT_INTERVAL_S)
    with db.connection() as conn:
        stopping = queries.transition(conn, runtime_id, "stopping", ("draining", "error", "starting", "running"))
    if stopping is None:  # someone else is stopping it, or it is stopped already
        return get_runtime(db, runtime_id)
    return _finish_stop(db, stopping, settings)


def restart_runtime(db: Database, runtime_id: str, settings: Settings) -> dict:
    """Stop the runtime (draining it) and start it again on the same row, counting the restart."""
    row = get_runtime(db, runtime_id)
    if row["status"] not in ("stopped", "error"):
        row = stop_runtime(db, runtime_id, settings)
    model = _model(db, row["model_id"])
    driver = _driver(row["driver"], settings)
    if row["status"] == "error":
        _stop_quietly(driver, row)  # whatever is left of it
    allocation = row["driver_state"].get("allocation") or allocation_for(model, 1.0, settings)
    with db.connection() as conn:
        queries.lock_model_start(conn, model["id"])
        evicted = _admit(conn, model, allocation, settings, driver)
        restarting = queries.begin_restart(conn, runtime_id)
        if restarting is None:   # raising rolls the evictions back
            raise Conflict(f"runtime {runtime_id} is being changed by another request", runtime_id=str(runtime_id))
    for runtime in evicted:
        _finish_stop(db, runtime, settings)
    return _launch(db, driver, model, restarting, allocation)


def scale_model(db: Database, model_id: str, replicas: int, settings: Settings) -> dict:
    """Run exactly `replicas` runtimes of the model: start the missing ones, stop the idlest extras."""
    model = _model(db, model_id, require_active=replicas > 0)
    if replicas > model["max_replicas"]:
        raise Unprocessable(f"model {_label(model)} allows at most {model['max_replicas']} replicas",
                            errors={"json": {"replicas": [f"Must be at most {model['max_replicas']}."]}})
    with db.connection() as conn:
        live = [row for row in queries.live_runtimes(conn, model_id=model_id)
                if row["status"] in ("starting", "running")]
    started = [start_runtime(db, model_id, settings)["id"] for _ in range(replicas - len(live))]
    # Idlest first: running before starting, fewest requests, least recently used.
    extras = sorted(live, key=lambda r: (r["status"] == "running", -r["active_requests"],
                                         -r["last_activity"].timestamp()), reverse=True)
    stopped = [stop_runtime(db, row["id"], settings)["id"] for row in extras[:max(0, len(live) - replicas)]]
    return {"model_id": model["id"], "replicas": len(live) + len(started) - len(stopped),
            "started": started, "stopped": stopped}


# Periodic work (called by the scheduler and n8n through the API).
def reap_idle(db: Database, settings: Settings) -> list[dict]:
    """Stop runtimes idle longer than their model's keep-alive (0 at once, -1 never)."""
    with db.connection() as conn:
        expired = queries.idle_expired_runtimes(conn, settings.default_keep_alive_s)
    actions = []
    for row in expired:
        # Checked again as it stops: stopping the ones before it may have taken seconds.
        with db.connection() as conn:
            stopping = queries.begin_stop_if_expired(conn, row["id"], settings.default_keep_alive_s)
        if stopping:
            _finish_stop(db, stopping, settings)
            actions.append(_action(row, "stopped", f"idle since {row['last_activity'].isoformat()}"))
    return actions


def check_health(db: Database, settings: Settings) -> dict:
    """Probe every running runtime; restart dead ones up to their restart limit; fail abandoned starts."""
    with db.connection() as conn:
        running = queries.list_runtimes(conn, status="running", limit=10_000)
        stale = [row for row in queries.stale_starting_runtimes(conn, 0)
                 if _age_s(row["updated_at"]) > _start_timeout_for(row)]
        # A stop that its process did not live to finish: the server may still run, holding its share.
        stuck = [row for row in queries.live_runtimes(conn)
                 if row["status"] in ("draining", "stopping") and _age_s(row["updated_at"]) > STOP_ABANDONED_S]
    actions, healthy = [], 0
    for row in running:
        action = _check_one(db, row, settings)
        healthy += action is None
        if action:
            actions.append(action)
    for row in stale:
        with db.connection() as conn:
            failed = queries.mark_error(conn, row["id"], "abandoned: its start outlived the start timeout",
                                        ("starting",))
        if failed:
            _finish_stop(db, failed, settings)
            actions.append(_action(row, "abandoned", "start outlived the start timeout"))
    for row in stuck:
        _finish_stop(db, row, settings)
        actions.append(_action(row, "stop_finished", f"left {row['status']} since {row['updated_at'].isoformat()}"))
    with db.connection() as conn:   # counts left by requests whose process died (they never release)
        recounted = queries.recount_quiet_runtimes(conn, QUIET_RECOUNT_S)
    actions += [_action(row, "recounted", f"busy count set to the {row['active_requests']} requests holding it")
                for row in recounted]
    return {"checked": len(running), "healthy": healthy, "actions": actions}


def _check_one(db: Database, row: dict, settings: Settings) -> dict | None:
    """None when healthy, else what was done about it."""
    try:
        driver = _driver(row["driver"], settings)
        alive = driver.is_running(row)
    except (DriverError, RuntimeUnavailable) as exc:
        return _action(row, "unknown", str(getattr(exc, "detail", exc)))
    if alive and row["endpoint"] and server_ready(row["protocol"], row["endpoint"]):
        with db.connection() as conn:
            queries.record_health(conn, row["id"], "healthy")
        return None
    # A managed server that answers no probe twice in a row is as good as dead.
    if not driver.manages_lifecycle or (alive and row["health_status"] != "unhealthy"):
        with db.connection() as conn:
            queries.record_health(conn, row["id"], "unhealthy")
        return _action(row, "unhealthy", "not answering its probe")
    tail = driver.log_tail(row, LOG_TAIL_CHARS)
    _stop_quietly(driver, row)
    reason = "exited" if not alive else "stopped answering"
    with db.connection() as conn:
        failed = queries.mark_error(conn, row["id"], f"the model server {reason}\n--- log tail ---\n{tail}",
                                    ("running",))
    if failed is None:
        return None  # someone else changed it meanwhile
    limit = int(failed["driver_state"].get("max_restarts", MAX_RESTARTS))
    if failed["restart_count"] >= limit:
        return _action(row, "failed", f"the model server {reason}; restart limit {limit} reached")
    try:
        restart_runtime(db, row["id"], settings)
    except Problem as exc:
        return _action(row, "restart_failed", exc.detail)
    return _action(row, "restarted", f"the model server {reason}")


def autoscale(db: Database, settings: Settings) -> list[dict]:
    """Add a replica to each model whose pending queue is long, within max_replicas and host capacity."""
    with db.connection() as conn:
        pressure = queries.pending_requests_by_model(conn)
    actions = []
    for item in pressure:
        with db.connection() as conn:
            model = queries.get_model(conn, item["model_id"])
            live = [row for row in queries.live_runtimes(conn, model_id=item["model_id"])
                    if row["status"] in ("starting", "running")]
        if not model or not model["active"]:
            continue
        per_replica = int(model["runtime_config"].get("scale_up_pending", SCALE_UP_PENDING_PER_REPLICA))
        if item["pending"] <= per_replica * max(len(live), 1):
            continue
        base = {"model_id": model["id"], "runtime_id": None}
        if len(live) >= model["max_replicas"]:
            actions.append({**base, "action": "at_max",
                            "detail": f"{item['pending']} pending; already {len(live)} of {model['max_replicas']}"})
            continue
        try:
            runtime = start_runtime(db, model["id"], settings)
        except Problem as exc:
            actions.append({**base, "action": "skipped", "detail": exc.detail})
            continue
        actions.append({**base, "runtime_id": runtime["id"], "action": "started",
                        "detail": f"{item['pending']} pending for {len(live)} replica(s)"})
    return actions


def reconcile(db: Database, settings: Settings) -> dict:
    """Make the table and what really runs agree: stop orphans and duplicates, fail rows whose server is gone."""
    actions: list[dict] = []
    with db.connection() as lock_conn:
        if not queries.try_lock_reconcile(lock_conn):
            return {"skipped": True, "actions": actions}
        for name in settings.runtime_drivers:
            driver = driver_for(name, settings)
            if driver.manages_lifecycle:
                try:
                    actions.extend(_reconcile_driver(db, driver))
                except DriverError as exc:
                    actions.append({"model_id": None, "runtime_id": None, "action": "error",
                                    "detail": f"{name}: {exc}"})
    return {"skipped": False, "actions": actions}


def _reconcile_driver(db: Database, driver: RuntimeDriver) -> list[dict]:
    managed = driver.find_managed()
    with db.connection() as conn:
        rows = {str(row["id"]): row for row in queries.live_runtimes(conn, driver=driver.name)}
    actions, claimed = [], set()
    for found in managed:
        row = rows.get(found.runtime_id)
        unrecorded_start = row is not None and row["status"] == "starting" and driver.identity(row) is None
        if row is not None and found.alive and (driver.identity(row) == found.identity or unrecorded_start):
            claimed.add(found.runtime_id)
            continue
        driver.stop(found.ref)
        if found.alive:
            actions.append({"model_id": row["model_id"] if row else None, "runtime_id": found.runtime_id or None,
                            "action": "stopped_orphan", "detail": f"{driver.name} {found.identity} had no live row"})
    for runtime_id, row in rows.items():
        young_start = row["status"] == "starting" and _age_s(row["updated_at"]) < _start_timeout_for(row)
        if runtime_id in claimed or young_start:
            continue
        with db.connection() as conn:
            if row["status"] in ("draining", "stopping"):
                done, action = queries.mark_stopped(conn, runtime_id), "marked_stopped"
            else:
                done = queries.mark_error(conn, runtime_id, "its model server was not running at reconcile")
                action = "marked_dead"
        if done:
            actions.append(_action(row, action, f"{driver.name} found nothing running for it"))
    return actions


# Reading.
def get_runtime(db: Database, runtime_id: str) -> dict:
    with db.connection() as conn:
        row = queries.get_runtime(conn, runtime_id)
    if row is None:
        raise NotFound(f"runtime {runtime_id} does not exist")
    return row


# Helpers.
def _stop_if_idle(db: Database, runtime_id: str, settings: Settings) -> dict | None:
    with db.connection() as conn:
        row = queries.begin_stop_if_idle(conn, runtime_id)
    return _finish_stop(db, row, settings) if row else None


def _finish_stop(db: Database, row: dict, settings: Settings) -> dict:
    """Stop what runs for a row we moved to stopping (or error), then mark it stopped."""
    try:
        _driver(row["driver"], settings).stop(row)
    except (DriverError, RuntimeUnavailable) as exc:
        with db.connection() as conn:
            failed = queries.mark_error(conn, row["id"], f"could not stop: {getattr(exc, 'detail', exc)}",
                                        ("stopping", "draining", "running", "starting", "error"))
        return failed or row
    logger.info("runtime stopped", extra={"runtime_id": str(row["id"])})
    with db.connection() as conn:
        stopped = queries.mark_stopped(conn, row["id"])
        return stopped or queries.get_runtime(conn, row["id"]) or row


def _first_line(text: str, otherwise: str) -> str:
    return (text.splitlines() or [otherwise])[0]


def _stop_quietly(driver: RuntimeDriver, runtime: dict) -> None:
    try:
        driver.stop(runtime)
    except DriverError:
        logger.warning("could not stop runtime", extra={"runtime_id": str(runtime["id"])}, exc_info=True)


def _model(db: Database, model_id: str, *, require_active: bool = True) -> dict:
    with db.connection() as conn:
        model = queries.get_model(conn, model_id)
    if model is None:
        raise NotFound(f"model {model_id} does not exist")
    if require_active and not model["active"]:
        raise Conflict(f"model {_label(model)} is not active", model_id=str(model_id))
    return model


def _driver(name: str, settings: Settings) -> RuntimeDriver:
    try:
        return driver_for(name, settings)
    except DriverError as exc:
        raise RuntimeUnavailable(str(exc)) from exc


def _start_timeout(model: dict) -> float:
    return float(model["runtime_config"].get("start_timeout_s", START_TIMEOUT_S[model["runtime_driver"]]))


def _start_timeout_for(runtime: dict) -> float:
    return float(runtime["driver_state"].get("start_timeout_s", START_TIMEOUT_S[runtime["driver"]]))


def _age_s(moment: datetime) -> float:
    return (datetime.now(timezone.utc) - moment).total_seconds()


def _label(model: dict) -> str:
    return f"{model['name']}:{model['version']}"


def _action(row: dict, action: str, detail: str) -> dict:
    return {"model_id": row["model_id"], "runtime_id": row["id"], "action": action, "detail": detail}

