"""Rule actions, carried out by the services that own the resources, over HTTP.

An action is planned first (read-only: which models, how many replicas, which values) and then
run call by call. A rule measured over several models acts only on those for which its conditions
hold measured on each alone (`holds_for`): one busy model must not scale up its idle neighbours.
Each mutating call carries the body that undoes it, an absolute state; when a call fails, the
calls made before it are undone in reverse order, and so is the failed one when its service
answered the failure (a failed scale may have started some replicas; one that timed out may still
be starting them, and is left to finish), so a failed action leaves nothing half-done.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import psycopg
import requests

from services.common.config import Settings
from services.optimizer import queries
from services.optimizer.metrics import scope_filter
from services.optimizer.schemas import action_parameters


class ActionError(Exception):
    """An owner service could not be reached or refused a call; `answered` when it did answer (a
    call that timed out may still be under way: undoing it would race it)."""

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


class ActionFailed(Exception):
    """A call of a running action failed; `result` tells what was done and undone."""

    def __init__(self, error: str, result: dict) -> None:
        super().__init__(error)
        self.error = error
        self.result = result


@dataclass(frozen=True)
class Call:
    method: str
    url: str
    json: dict
    model_id: str | None = None
    undo: dict | None = None  # the body that restores the previous state

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "undo"}


@dataclass
class Plan:
    calls: list[Call] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def skip(self, model_id: str | None, reason: str) -> None:
        self.skipped.append({"model_id": None if model_id is None else str(model_id), "reason": reason})


HoldsFor = Callable[[str], bool]


def plan_action(conn: psycopg.Connection, session: requests.Session, settings: Settings,
                rule: dict, holds_for: HoldsFor = lambda model_id: True) -> Plan:
    """The calls a rule's action would make now, on the models in its scope that `holds_for`
    accepts; raises ActionError when a lookup fails."""
    params = action_parameters(rule["action_type"], rule["action_parameters"])
    scope = scope_filter(rule["scope"], rule["scope_value"])
    planner = PLANNERS[rule["action_type"]]
    plan = Plan()
    planner(plan, _Targets(plan, holds_for), conn, session, settings, params, scope, rule["window_seconds"])
    return plan


@dataclass
class _Targets:
    """Filters a planner's targets through `holds_for`, noting the ones left out."""

    plan: Plan
    holds_for: HoldsFor

    def __call__(self, rows: list[dict], none_found: str | None = None) -> list[dict]:
        """The rows the rule holds for; `none_found` is noted when there are no rows at all."""
        if not rows and none_found:
            self.plan.skip(None, none_found)
        kept = []
        for row in rows:
            if self.holds_for(str(row["model_id"])):
                kept.append(row)
            else:
                self.plan.skip(row["model_id"], "the rule's conditions do not hold for this model alone")
        return kept


def run_plan(session: requests.Session, plan: Plan) -> dict:
    """Make the planned calls; on a failure undo the ones made and raise ActionFailed."""
    done: list[dict] = []
    for call in plan.calls:
        try:
            status = send(session, call.method, call.url, call.json)
        except ActionError as exc:
            made = plan.calls[:len(done) + 1] if exc.answered else plan.calls[:len(done)]
            undone = [_undo(session, c) for c in reversed(made) if c.undo is not None]
            raise ActionFailed(str(exc), {"calls": done, "failed_call": call.describe(),
                                          "undone": undone, "skipped": plan.skipped}) from exc
        done.append({**call.describe(), "status": status})
    return {"calls": done, "skipped": plan.skipped}


def send(session: requests.Session, method: str, url: str, body: dict | None = None,
         params: dict | None = None) -> int:
    """One call to an owner service; any answer but 2xx is an ActionError."""
    return _request(session, method, url, body, params).status_code


def _request(session: requests.Session, method: str, url: str, body: dict | None,
             params: dict | None) -> requests.Response:
    try:
        response = session.request(method, url, json=body, params=params)
    except requests.RequestException as exc:
        raise ActionError(f"{method} {url} failed: {exc.__class__.__name__}: {exc}") from exc
    if not response.ok:
        raise ActionError(f"{method} {response.url} answered {response.status_code}: {response.text[:300]}",
                          answered=True)
    return response


def _undo(session: requests.Session, call: Call) -> dict:
    try:
        return {"url": call.url, "json": call.undo, "status": send(session, call.method, call.url, call.undo)}
    except ActionError as exc:
        return {"url": call.url, "json": call.undo, "error": str(exc)}


def running_replicas(session: requests.Session, settings: Settings, model_id: str) -> int:
    """How many runtimes of a model run or are starting: the replicas the orchestrator's scale counts."""
    return sum(_runtime_count(session, settings, model_id, status) for status in ("running", "starting"))


def _runtime_count(session: requests.Session, settings: Settings, model_id: str, status: str) -> int:
    url = f"{settings.orchestrator_url}/runtimes"
    response = _request(session, "GET", url, None, {"model_id": str(model_id), "status": status})
    try:
        return len(response.json()["items"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ActionError(f"GET {url} answered an unexpected body: {response.text[:300]}") from exc


def _scale_url(settings: Settings, model_id: str) -> str:
    return f"{settings.orchestrator_url}/models/{model_id}/scale"


def _plan_scale_up(plan: Plan, targets: _Targets, conn: psycopg.Connection, session: requests.Session,
                   settings: Settings, params: dict, scope: dict, window_seconds: int) -> None:
    for target in targets(queries.scale_up_targets(conn, **scope),
                          "no active model in scope runs or has pending requests assigned to it"):
        current = running_replicas(session, settings, target["model_id"])
        cap = min(params.get("max_replicas") or target["max_replicas"], target["max_replicas"])
        wanted = min(cap, max(current + params["step"], math.ceil(current * params["scale_factor"])))
        if wanted <= current:
            plan.skip(target["model_id"], f"already at {current} of at most {cap} replicas")
            continue
        plan.calls.append(Call("POST", _scale_url(settings, target["model_id"]), {"replicas": wanted},
                               str(target["model_id"]), undo={"replicas": current}))


def _plan_scale_down(plan: Plan, targets: _Targets, conn: psycopg.Connection, session: requests.Session,
                     settings: Settings, params: dict, scope: dict, window_seconds: int) -> None:
    for target in targets(queries.scale_down_targets(conn, **scope), "no model in scope has running runtimes"):
        if target["idle_seconds"] < params["idle_threshold_seconds"]:
            plan.skip(target["model_id"], f"active {target['idle_seconds']:.0f}s ago, under the idle "
                                          f"threshold of {params['idle_threshold_seconds']}s")
            continue
        current = running_replicas(session, settings, target["model_id"])
        wanted = max(params["min_replicas"], current - params["step"])
        if wanted >= current:
            plan.skip(target["model_id"], f"already at {current} of at least {params['min_replicas']} replicas")
            continue
        plan.calls.append(Call("POST", _scale_url(settings, target["model_id"]), {"replicas": wanted},
                               str(target["model_id"]), undo={"replicas": current}))
    if params["reap"]:
        plan.calls.append(Call("POST", f"{settings.orchestrator_url}/runtimes/reap", {}))


def _plan_switch_model(plan: Plan, targets: _Targets, conn: psycopg.Connection, session: requests.Session,
                       settings: Settings, params: dict, scope: dict, window_seconds: int) -> None:
    candidates = targets([m for m in queries.models_with_logs(conn, window_seconds=window_seconds, **scope)
                          if m["active"]])
    limit = params["max_processing_time_ms"]
    if not params["prefer_speed_over_accuracy"]:
        candidates = sorted(candidates, key=lambda m: m["success_rate"])[:1]
    elif limit is None:
        candidates = candidates[:1]  # the slowest: the query orders by average time, slowest first
    else:
        candidates = [m for m in candidates if m["avg_processing_time_ms"] > limit]
    if not candidates:
        plan.skip(None, "no active model in scope matches the switch criteria in the window")
    demoted: list[str] = []
    for model in candidates:
        model_id = str(model["model_id"])
        if not queries.has_alternative(conn, model_id, [model_id, *demoted]):
            plan.skip(model_id, f"{model['name']}:{model['version']} stays active: no other active "
                                "model serves all of its task types")
            continue
        demoted.append(model_id)
        plan.calls.append(Call("PATCH", f"{settings.registry_url}/models/{model_id}", {"active": False},
                               model_id, undo={"active": True}))


def _plan_adjust_resources(plan: Plan, targets: _Targets, conn: psycopg.Connection, session: requests.Session,
                           settings: Settings, params: dict, scope: dict, window_seconds: int) -> None:
    for model in targets(queries.models_with_logs(conn, window_seconds=window_seconds, **scope),
                         "no model in scope has performance data in the window"):
        old = {"base_cpu_requirement": model["base_cpu_requirement"],
               "base_memory_requirement": model["base_memory_requirement"]}
        new = {
            "base_cpu_requirement": round(_resize(
                old["base_cpu_requirement"], params["cpu_reduction"], params["cpu_increase"],
                params["min_cpu"], settings.host_cpu_cores), 2),
            # Never below the most it was measured to use in the window.
            "base_memory_requirement": int(_resize(
                old["base_memory_requirement"], params["memory_reduction"], params["memory_increase"],
                max(params["min_memory_mb"], model["peak_memory_mb"] or 0), settings.host_memory_mb)),
        }
        changed = {key: value for key, value in new.items() if value != old[key]}
        if not changed:
            plan.skip(model["model_id"], "already at the floor or ceiling of its resources")
            continue
        plan.calls.append(Call("PATCH", f"{settings.registry_url}/models/{model['model_id']}", changed,
                               str(model["model_id"]), undo={key: old[key] for key in changed}))


def _resize(value: float, reduction: float, increase: float, floor: float, ceiling: float) -> float:
    """Shrink or grow a requirement, never below the floor nor above the host."""
    target = value * (1 - reduction) * (1 + increase)
    if increase:
        return min(max(target, value), max(ceiling, value))
    return max(min(target, value), min(floor, value))


PLANNERS = {
    "scale_up": _plan_scale_up,
    "scale_down": _plan_scale_down,
    "switch_model": _plan_switch_model,
    "adjust_resources": _plan_adjust_resources,
}
