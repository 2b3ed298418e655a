"""Optimization rules: storing them, evaluating their conditions, acting with an audit trail.

A rule is evaluated by measuring each condition's metric with its fixed query over the rule's
window and scope; the verdict is the AND of the conditions, and a metric without data (NULL)
makes its condition false. `optimize` acts on rules whose verdict holds and that are out of
cooldown; `dry_run` measures and plans the action without running it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import psycopg
import requests
from marshmallow import ValidationError

from services.common.config import Settings
from services.common.db import Database
from services.common.errors import NotFound, Unprocessable
from services.optimizer import queries
from services.optimizer.actions import ActionError, ActionFailed, plan_action, run_plan
from services.optimizer.metrics import compare, measure
from services.optimizer.schemas import RuleSchema, action_parameters

logger = logging.getLogger(__name__)


# --- storage ---------------------------------------------------------------------------------

def list_rules(conn: psycopg.Connection, *, active: bool | None = None, limit: int = 100,
               offset: int = 0) -> list[dict]:
    """Rules with their conditions, in evaluation order."""
    return queries.list_rules(conn, active=active, limit=limit, offset=offset)


def get_rule(conn: psycopg.Connection, rule_id: str) -> dict:
    """One rule with its conditions, or NotFound."""
    rule = queries.get_rule(conn, rule_id)
    if rule is None:
        raise NotFound(f"No optimization rule has the id {rule_id}.")
    return rule


def create_rule(conn: psycopg.Connection, rule: dict) -> dict:
    """Save a rule loaded by RuleSchema, conditions included."""
    _check_scope_model(conn, rule)
    rule_id = queries.insert_rule(conn, rule)
    queries.replace_conditions(conn, rule_id, rule["conditions"])
    return get_rule(conn, rule_id)


def update_rule(conn: psycopg.Connection, rule_id: str, patch: dict) -> dict:
    """Apply a partial update, validating the merged rule as a whole; concurrent updates of a rule
    take turns (each merges into what the one before wrote)."""
    queries.lock_rule(conn, rule_id)
    current = get_rule(conn, rule_id)
    merged = {key: current[key] for key in (*queries.RULE_COLUMNS, "conditions")}
    if patch.get("scope") == "all" and "scope_value" not in patch:
        merged["scope_value"] = None
    merged.update(patch)
    try:
        rule = RuleSchema().load(merged)
    except ValidationError as exc:
        raise Unprocessable("The request is invalid: see errors for each field.",
                            errors={"json": exc.messages}) from exc
    _check_scope_model(conn, rule)
    queries.update_rule(conn, rule_id, rule)
    if "conditions" in patch:
        queries.replace_conditions(conn, rule_id, rule["conditions"])
    return get_rule(conn, rule_id)


def delete_rule(conn: psycopg.Connection, rule_id: str) -> None:
    """Delete a rule; its audit rows stay, with its name."""
    if not queries.delete_rule(conn, rule_id):
        raise NotFound(f"No optimization rule has the id {rule_id}.")


def _check_scope_model(conn: psycopg.Connection, rule: dict) -> None:
    if rule["scope"] == "model" and not queries.model_exists(conn, rule["scope_value"]):
        raise Unprocessable("The request is invalid: see errors for each field.",
                            errors={"json": {"scope_value": ["No model has this id."]}})


def list_actions(conn: psycopg.Connection, *, rule_id: str | None = None, limit: int = 100,
                 offset: int = 0) -> list[dict]:
    """The audit trail, newest first."""
    return queries.list_actions(conn, rule_id=rule_id, limit=limit, offset=offset)


# --- evaluation ------------------------------------------------------------------------------

def evaluate(conn: psycopg.Connection, rule: dict, model_id: str | None = None) -> dict:
    """Measure every condition of a rule (within its scope, on one model with `model_id`); the
    verdict is their AND."""
    conditions = []
    for position, condition in enumerate(rule["conditions"]):
        value = measure(conn, condition["metric"], condition["aggregate"],
                        window_seconds=rule["window_seconds"], scope=rule["scope"],
                        scope_value=rule["scope_value"], model_id=model_id)
        conditions.append({
            **condition, "position": position, "value": value,
            "holds": compare(value, condition["operator"], condition["threshold"]),
            "note": "no data in the window and scope: the condition is false" if value is None else None,
        })
    verdict = all(c["holds"] for c in conditions)
    return {"rule_id": rule["id"], "rule_name": rule["rule_name"],
            "window_seconds": rule["window_seconds"], "scope": rule["scope"],
            "scope_value": rule["scope_value"], "conditions": conditions, "verdict": verdict,
            "reason": _reason(conditions, verdict)}


def _reason(conditions: list[dict], verdict: bool) -> str:
    if verdict:
        return f"all {len(conditions)} condition(s) hold"
    unmet = [f"{c['metric']} ({c['aggregate']}) has no data" if c["value"] is None else
             f"{c['metric']} ({c['aggregate']}) = {c['value']:g}, not {c['operator']} {c['threshold']:g}"
             for c in conditions if not c["holds"]]
    return "not met: " + "; ".join(unmet)


def _measured(evaluation: dict) -> dict:
    return {key: evaluation[key] for key in ("window_seconds", "scope", "scope_value", "conditions")}


def dry_run(conn: psycopg.Connection, session: requests.Session, settings: Settings,
            rule_id: str) -> dict:
    """Measure a rule and plan its action without running it.

    When the verdict holds, the plan is recorded as an audit row with dry_run=true and
    status 'skipped'; the rule's counts and run times are not touched.
    """
    rule = get_rule(conn, rule_id)
    evaluation = evaluate(conn, rule)
    action = {"action_type": rule["action_type"],
              "parameters": action_parameters(rule["action_type"], rule["action_parameters"]),
              "would_run": False, "calls": [], "skipped": [], "error": None}
    audit_id = None
    if evaluation["verdict"]:
        try:
            plan = plan_action(conn, session, settings, rule, _holds_for(conn, rule))
            action.update(calls=[c.describe() for c in plan.calls], skipped=plan.skipped,
                          would_run=bool(plan.calls) and not rule["in_cooldown"])
        except ActionError as exc:
            action["error"] = str(exc)
        audit_id = queries.insert_action(conn, {
            "rule_id": rule["id"], "rule_name": rule["rule_name"], "measured": _measured(evaluation),
            "action_type": rule["action_type"], "action_parameters": action["parameters"],
            "dry_run": True, "status": "skipped", "error": action["error"],
            "result": {"would_call": action["calls"], "skipped": action["skipped"],
                       "in_cooldown": rule["in_cooldown"]},
        })["id"]
    return {**evaluation, "in_cooldown": rule["in_cooldown"], "cooldown_until": rule["cooldown_until"],
            "action": action, "audit_id": audit_id}


# --- acting ----------------------------------------------------------------------------------

def optimize(db: Database, session: requests.Session, settings: Settings) -> list[dict]:
    """Evaluate the active rules in priority order and act on those that trigger.

    Each rule runs in its own transaction with its row locked, so its audit row and counts
    commit together right after its calls, and a concurrent optimize skips it ('busy'). A rule
    that fails unexpectedly is rolled back and reported ('error'); the rules after it still run.
    """
    with db.connection() as conn:
        rule_ids = queries.active_rule_ids(conn)
    return [_optimize_rule_or_error(db, session, settings, rule_id) for rule_id in rule_ids]


def _optimize_rule_or_error(db: Database, session: requests.Session, settings: Settings, rule_id: str) -> dict:
    try:
        return _optimize_rule(db, session, settings, rule_id)
    except Exception as exc:
        logger.exception("optimization rule failed", extra={"rule_id": str(rule_id)})
        return _outcome(rule_id, None, "error", f"unexpected {type(exc).__name__}; see the optimizer's log")


def _optimize_rule(db: Database, session: requests.Session, settings: Settings, rule_id: str) -> dict:
    with db.connection() as conn:
        rule = queries.get_rule(conn, rule_id, lock=True)
        if rule is None or not rule["active"]:
            return _outcome(rule_id, None, "busy", "being evaluated elsewhere, deleted or deactivated")
        if rule["in_cooldown"]:
            return _outcome(rule_id, rule["rule_name"], "cooldown",
                            f"in cooldown until {rule['cooldown_until'].isoformat()}")
        evaluation = evaluate(conn, rule)
        if not evaluation["verdict"]:
            queries.mark_evaluated(conn, rule_id, triggered=False, succeeded=False, failed=False)
            return _outcome(rule_id, rule["rule_name"], "not_triggered", evaluation["reason"])
        status, result, error = _act(conn, session, settings, rule)
        audit = queries.insert_action(conn, {
            "rule_id": rule_id, "rule_name": rule["rule_name"], "measured": _measured(evaluation),
            "action_type": rule["action_type"],
            "action_parameters": action_parameters(rule["action_type"], rule["action_parameters"]),
            "dry_run": False, "status": status, "result": result, "error": error,
        })
        queries.mark_evaluated(conn, rule_id, triggered=True, succeeded=status == "succeeded",
                               failed=status == "failed")
    logger.info("optimization rule acted", extra={"rule": rule["rule_name"], "status": status,
                                                   "error": error, "action_id": audit["id"]})
    reason = error or (evaluation["reason"] if status == "succeeded" else
                       "; ".join(s["reason"] for s in result["skipped"]))
    return _outcome(rule_id, rule["rule_name"], status, reason, audit["id"])


def _act(conn: psycopg.Connection, session: requests.Session, settings: Settings,
         rule: dict) -> tuple[str, dict, str | None]:
    """Plan and run a rule's action: (status, result, error)."""
    try:
        plan = plan_action(conn, session, settings, rule, _holds_for(conn, rule))
    except ActionError as exc:
        return "failed", {"calls": [], "skipped": []}, str(exc)
    if not plan.calls:
        return "skipped", {"calls": [], "skipped": plan.skipped}, None
    try:
        return "succeeded", run_plan(session, plan), None
    except ActionFailed as exc:
        return "failed", exc.result, exc.error


def _holds_for(conn: psycopg.Connection, rule: dict) -> Callable[[str], bool]:
    """Whether the rule's conditions hold, within its scope, for one model measured alone (a rule
    scoped to a model was measured on it already)."""
    if rule["scope"] == "model":
        return lambda model_id: True
    return lambda model_id: evaluate(conn, rule, model_id)["verdict"]


def _outcome(rule_id: str, rule_name: str | None, outcome: str, reason: str,
             action_id: int | None = None) -> dict:
    return {"rule_id": rule_id, "rule_name": rule_name, "outcome": outcome, "reason": reason,
            "action_id": action_id}
