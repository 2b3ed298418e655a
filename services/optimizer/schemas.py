"""Request and response schemas of the optimizer: they validate input and document the API."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from services.common.vocabulary import OUTPUT_FORMATS, TASK_TYPES
from services.optimizer.metrics import METRICS, OPERATORS

INT_MAX = 2_147_483_647
MAX_WINDOW_SECONDS = 2_592_000  # 30 days, the CHECK on optimization_rules.window_seconds
ACTION_TYPES = ("scale_up", "scale_down", "switch_model", "adjust_resources")
SCOPES = ("all", "task_type", "model")
MAX_BATCH = 1000


def text(min_len: int = 0, max_len: int = 200, **kwargs) -> fields.String:
    """A bounded string (a NUL never gets this far: the app core refuses it)."""
    return fields.String(validate=validate.Length(min_len, max_len), **kwargs)


def count(max_value: int = INT_MAX, min_value: int = 0, *, strict: bool = True, **kwargs) -> fields.Integer:
    """A bounded integer; strict (no "3" nor 3.0) except in query strings, where all is text."""
    return fields.Integer(strict=strict, validate=validate.Range(min_value, max_value), **kwargs)


class PageQuerySchema(Schema):
    limit = count(500, 1, strict=False, load_default=100)
    offset = count(1_000_000, strict=False, load_default=0)


# --- performance -----------------------------------------------------------------------------

# A log row's time may be a little ahead of the database's clock (another host's), not more: a row
# in the future would count in every window, and outlive every purge.
CLOCK_SKEW = timedelta(minutes=5)


def _not_ahead(moment: datetime) -> None:
    if moment < datetime(2000, 1, 1, tzinfo=timezone.utc):
        raise ValidationError("Must be in 2000 or later.")
    if moment > datetime.now(timezone.utc) + CLOCK_SKEW:
        raise ValidationError("Must not be in the future.")


class PerformanceLogSchema(Schema):
    """One attempt of one model: what it cost and whether it worked."""

    model_id = fields.UUID(required=True)
    runtime_id = fields.UUID(allow_none=True)
    request_id = fields.UUID(allow_none=True)
    task_type = fields.String(required=True, validate=validate.OneOf(TASK_TYPES))
    output_format = fields.String(allow_none=True, validate=validate.OneOf(OUTPUT_FORMATS))
    attempt = count(1000, 1)
    template_id = fields.UUID(allow_none=True)
    template_version = count(min_value=1, allow_none=True)
    input_tokens = count(allow_none=True)
    output_tokens = count(allow_none=True)
    tokens_per_second = fields.Float(allow_none=True, validate=validate.Range(0, 1e9))
    processing_time_ms = count(required=True)
    load_time_ms = count(allow_none=True)
    queue_wait_ms = count(allow_none=True)
    memory_used_mb = count(allow_none=True)
    # numeric(6,2) in the table; a percent of one core, so 4 busy cores are 400.
    cpu_usage_percent = fields.Float(allow_none=True, validate=validate.Range(0, 9999.99))
    success = fields.Boolean(required=True)
    validation_passed = fields.Boolean(allow_none=True)
    error_class = text(1, 100, allow_none=True)
    error_message = text(0, 5000, allow_none=True)
    logged_at = fields.AwareDateTime(default_timezone=timezone.utc, allow_none=True, validate=_not_ahead)

    @post_load
    def _utc(self, data: dict, **kwargs) -> dict:
        # Postgres refuses offsets beyond 15:59 that Python accepts: store UTC.
        if data.get("logged_at"):
            data["logged_at"] = data["logged_at"].astimezone(timezone.utc)
        return data

    @validates_schema
    def _failure_has_class(self, data: dict, **kwargs) -> None:
        if data.get("success") is False and not data.get("error_class"):
            raise ValidationError("A failed attempt needs an error_class.", "error_class")


class PerformanceLogOutSchema(PerformanceLogSchema):
    id = fields.Integer(required=True)
    attempt = fields.Integer(required=True)
    logged_at = fields.DateTime(required=True)


class PerformanceBatchSchema(Schema):
    items = fields.List(fields.Nested(PerformanceLogSchema), required=True,
                        validate=validate.Length(1, MAX_BATCH))


class PerformanceBatchOutSchema(Schema):
    count = fields.Integer(required=True)
    items = fields.List(fields.Nested(PerformanceLogOutSchema), required=True)


class SummaryQuerySchema(PageQuerySchema):
    model_id = fields.UUID()
    task_type = fields.String(validate=validate.OneOf(TASK_TYPES))


class SummaryRowSchema(Schema):
    model_id = fields.UUID(required=True)
    name = fields.String(required=True)
    version = fields.String(required=True)
    task_types = fields.List(fields.String(), required=True)
    active = fields.Boolean(required=True)
    total_requests = fields.Integer(required=True)
    successful_requests = fields.Integer(required=True)
    success_rate = fields.Float(allow_none=True)
    avg_processing_time = fields.Float(allow_none=True)
    p50_processing_time = fields.Float(allow_none=True)
    p95_processing_time = fields.Float(allow_none=True)
    p99_processing_time = fields.Float(allow_none=True)
    avg_tokens_per_second = fields.Float(allow_none=True)
    avg_load_time = fields.Float(allow_none=True)
    avg_memory_usage = fields.Float(allow_none=True)
    avg_cpu_usage = fields.Float(allow_none=True)
    validated_requests = fields.Integer(required=True)
    validation_pass_rate = fields.Float(allow_none=True)
    avg_feedback_score = fields.Float(allow_none=True)
    feedback_count = fields.Integer(required=True)
    last_used = fields.DateTime(allow_none=True)
    refreshed_at = fields.DateTime(required=True)


class SummarySchema(Schema):
    items = fields.List(fields.Nested(SummaryRowSchema), required=True)


class RefreshSchema(Schema):
    refreshed = fields.Boolean(required=True)
    reason = fields.String(allow_none=True)
    duration_ms = fields.Float(allow_none=True)


# --- analysis and rankings -------------------------------------------------------------------

class WindowQuerySchema(Schema):
    window_seconds = count(MAX_WINDOW_SECONDS, 60, strict=False, load_default=86_400)


class RecommendationSchema(Schema):
    kind = fields.String(required=True, metadata={"description": (
        "low_success_rate, low_validation_pass_rate, over_allocated, under_allocated or unused")})
    recommendation = fields.String(required=True, metadata={"description": (
        "replace, demote, prefer_other_model, reduce_cpu, reduce_memory, increase_memory, "
        "increase_cpu or remove")})
    model_id = fields.UUID(required=True)
    model_name = fields.String(required=True)
    output_format = fields.String(allow_none=True)
    detail = fields.String(required=True)
    evidence = fields.Dict(required=True)
    window_seconds = fields.Integer(required=True)


class AnalysisSchema(Schema):
    window_seconds = fields.Integer(required=True)
    recommendations = fields.List(fields.Nested(RecommendationSchema), required=True)


class RankingSchema(Schema):
    model_id = fields.UUID(required=True)
    name = fields.String(required=True)
    version = fields.String(required=True)
    sample_size = fields.Integer(required=True)
    performance_metrics = fields.Dict(required=True)


class RankingsSchema(Schema):
    window_seconds = fields.Integer(required=True)
    updated = fields.List(fields.Nested(RankingSchema), required=True)
    unchanged = fields.Integer(required=True, metadata={"description": "models without data"})


# --- rules -----------------------------------------------------------------------------------

class ScaleUpParameters(Schema):
    max_replicas = count(64, 1, metadata={"description": "cap; defaults to the model's max_replicas"})
    scale_factor = fields.Float(load_default=2.0, validate=validate.Range(1, 10))
    step = count(64, 1, load_default=1)


class ScaleDownParameters(Schema):
    min_replicas = count(64, 0, load_default=1)
    step = count(64, 1, load_default=1)
    idle_threshold_seconds = count(MAX_WINDOW_SECONDS, load_default=0)
    reap = fields.Boolean(load_default=False, metadata={"description": "also ask the orchestrator to reap idle runtimes"})


class SwitchModelParameters(Schema):
    max_processing_time_ms = count(86_400_000, 1, load_default=None,
                                   metadata={"description": "demote models slower than this on average"})
    prefer_speed_over_accuracy = fields.Boolean(load_default=True, metadata={"description": (
        "true: demote the slow models; false: demote the least successful one")})


class AdjustResourcesParameters(Schema):
    cpu_reduction = fields.Float(load_default=0.0, validate=validate.Range(0, 0.9))
    memory_reduction = fields.Float(load_default=0.0, validate=validate.Range(0, 0.9))
    cpu_increase = fields.Float(load_default=0.0, validate=validate.Range(0, 4))
    memory_increase = fields.Float(load_default=0.0, validate=validate.Range(0, 4))
    min_cpu = fields.Float(load_default=0.25, validate=validate.Range(0.01, 64))
    min_memory_mb = count(1_048_576, 16, load_default=256)

    @validates_schema
    def _one_direction(self, data: dict, **kwargs) -> None:
        if not any(data.get(k) for k in ("cpu_reduction", "memory_reduction", "cpu_increase", "memory_increase")):
            raise ValidationError("Set at least one of cpu/memory reduction/increase.")
        for resource in ("cpu", "memory"):
            if data.get(f"{resource}_reduction") and data.get(f"{resource}_increase"):
                raise ValidationError(f"{resource}: a reduction and an increase exclude each other.")


ACTION_PARAMETERS: dict[str, type[Schema]] = {
    "scale_up": ScaleUpParameters,
    "scale_down": ScaleDownParameters,
    "switch_model": SwitchModelParameters,
    "adjust_resources": AdjustResourcesParameters,
}


class ConditionSchema(Schema):
    metric = fields.String(required=True, validate=validate.OneOf(METRICS))
    aggregate = fields.String(load_default=None, metadata={
        "description": "one of the metric's aggregates; defaults to its first"})
    operator = fields.String(required=True, validate=validate.OneOf(OPERATORS))
    threshold = fields.Float(required=True, allow_nan=False, validate=validate.Range(-1e15, 1e15))

    @validates_schema
    def _aggregate_fits_metric(self, data: dict, **kwargs) -> None:
        metric = METRICS.get(data.get("metric"))
        if metric and data.get("aggregate") is not None and data["aggregate"] not in metric.aggregates:
            raise ValidationError(f"{data['metric']} offers the aggregates {list(metric.aggregates)}.",
                                  "aggregate")

    @post_load
    def _default_aggregate(self, data: dict, **kwargs) -> dict:
        if data["aggregate"] is None:
            data["aggregate"] = METRICS[data["metric"]].aggregates[0]
        return data


class RuleSchema(Schema):
    """A rule: when every condition holds over the window and scope, run the action."""

    rule_name = text(1, 200, required=True)
    window_seconds = count(MAX_WINDOW_SECONDS, 1, load_default=600)
    scope = fields.String(load_default="all", validate=validate.OneOf(SCOPES))
    scope_value = text(1, 100, load_default=None, allow_none=True,
                       metadata={"description": "the task type or model id; null for scope all"})
    action_type = fields.String(required=True, validate=validate.OneOf(ACTION_TYPES))
    action_parameters = fields.Dict(keys=fields.String(), load_default=dict)
    priority = count(1000, load_default=100)
    cooldown_seconds = count(MAX_WINDOW_SECONDS, load_default=300)
    active = fields.Boolean(load_default=True)
    conditions = fields.List(fields.Nested(ConditionSchema), required=True,
                             validate=validate.Length(1, 10))

    @validates_schema
    def _scope_and_parameters(self, data: dict, **kwargs) -> None:
        errors = {**_scope_errors(data.get("scope"), data.get("scope_value")),
                  **_parameter_errors(data.get("action_type"), data.get("action_parameters"))}
        if errors:
            raise ValidationError(errors)


def _scope_errors(scope: str | None, value: str | None) -> dict:
    if scope == "all":
        return {"scope_value": ["Must be null when scope is all."]} if value is not None else {}
    if value is None:
        return {"scope_value": [f"Required when scope is {scope}."]}
    if scope == "task_type" and value not in TASK_TYPES:
        return {"scope_value": [f"Must be one of: {', '.join(TASK_TYPES)}."]}
    if scope == "model":
        try:
            uuid.UUID(value)
        except ValueError:
            return {"scope_value": ["Must be a model id (UUID)."]}
    return {}


def _parameter_errors(action_type: str | None, parameters: dict | None) -> dict:
    schema = ACTION_PARAMETERS.get(action_type)
    if schema is None or parameters is None:
        return {}
    errors = schema().validate(parameters)
    return {"action_parameters": errors} if errors else {}


def action_parameters(action_type: str, parameters: dict) -> dict:
    """The parameters of an action with their defaults filled in."""
    return ACTION_PARAMETERS[action_type]().load(parameters)


class RulePatchSchema(Schema):
    """Any subset of a rule; `conditions`, when given, replaces all of them."""

    rule_name = text(1, 200)
    window_seconds = count(MAX_WINDOW_SECONDS, 1)
    scope = fields.String(validate=validate.OneOf(SCOPES))
    scope_value = text(1, 100, allow_none=True)
    action_type = fields.String(validate=validate.OneOf(ACTION_TYPES))
    action_parameters = fields.Dict(keys=fields.String())
    priority = count(1000)
    cooldown_seconds = count(MAX_WINDOW_SECONDS)
    active = fields.Boolean()
    conditions = fields.List(fields.Nested(ConditionSchema), validate=validate.Length(1, 10))


class ConditionOutSchema(Schema):
    metric = fields.String(required=True)
    aggregate = fields.String(required=True)
    operator = fields.String(required=True)
    threshold = fields.Float(required=True)


class RuleOutSchema(Schema):
    id = fields.UUID(required=True)
    rule_name = fields.String(required=True)
    window_seconds = fields.Integer(required=True)
    scope = fields.String(required=True)
    scope_value = fields.String(allow_none=True, required=True)
    action_type = fields.String(required=True)
    action_parameters = fields.Dict(required=True)
    priority = fields.Integer(required=True)
    cooldown_seconds = fields.Integer(required=True)
    active = fields.Boolean(required=True)
    conditions = fields.List(fields.Nested(ConditionOutSchema), required=True)
    success_count = fields.Integer(required=True)
    failure_count = fields.Integer(required=True)
    last_evaluated_at = fields.DateTime(allow_none=True, required=True)
    last_triggered_at = fields.DateTime(allow_none=True, required=True)
    cooldown_until = fields.DateTime(allow_none=True, required=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


class RuleListSchema(Schema):
    items = fields.List(fields.Nested(RuleOutSchema), required=True)


class RulesQuerySchema(PageQuerySchema):
    active = fields.Boolean()


class ConditionResultSchema(ConditionOutSchema):
    position = fields.Integer(required=True)
    value = fields.Float(allow_none=True, required=True)
    holds = fields.Boolean(required=True)
    note = fields.String(allow_none=True, required=True)


class ActionPlanSchema(Schema):
    action_type = fields.String(required=True)
    parameters = fields.Dict(required=True)
    would_run = fields.Boolean(required=True)
    calls = fields.List(fields.Dict(), required=True, metadata={
        "description": "the HTTP calls that would be made: method, url, json, model_id"})
    skipped = fields.List(fields.Dict(), required=True)
    error = fields.String(allow_none=True, required=True)


class EvaluationSchema(Schema):
    rule_id = fields.UUID(required=True)
    rule_name = fields.String(required=True)
    window_seconds = fields.Integer(required=True)
    scope = fields.String(required=True)
    scope_value = fields.String(allow_none=True, required=True)
    conditions = fields.List(fields.Nested(ConditionResultSchema), required=True)
    verdict = fields.Boolean(required=True)
    reason = fields.String(required=True)
    in_cooldown = fields.Boolean(required=True)
    cooldown_until = fields.DateTime(allow_none=True, required=True)
    action = fields.Nested(ActionPlanSchema, required=True)
    audit_id = fields.Integer(allow_none=True, required=True)


class RuleOutcomeSchema(Schema):
    rule_id = fields.UUID(required=True)
    rule_name = fields.String(allow_none=True, required=True)
    outcome = fields.String(required=True, validate=validate.OneOf(
        ("not_triggered", "cooldown", "busy", "succeeded", "failed", "skipped", "error")))
    reason = fields.String(required=True)
    action_id = fields.Integer(allow_none=True, required=True)


class OptimizeSchema(Schema):
    results = fields.List(fields.Nested(RuleOutcomeSchema), required=True)


class ActionAuditSchema(Schema):
    id = fields.Integer(required=True)
    rule_id = fields.UUID(allow_none=True, required=True)
    rule_name = fields.String(required=True)
    measured = fields.Dict(required=True)
    action_type = fields.String(required=True)
    action_parameters = fields.Dict(required=True)
    dry_run = fields.Boolean(required=True)
    status = fields.String(required=True)
    result = fields.Dict(allow_none=True, required=True)
    error = fields.String(allow_none=True, required=True)
    created_at = fields.DateTime(required=True)


class ActionListSchema(Schema):
    items = fields.List(fields.Nested(ActionAuditSchema), required=True)


class ActionsQuerySchema(PageQuerySchema):
    rule_id = fields.UUID()
