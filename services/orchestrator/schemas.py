"""Request and response schemas of the orchestrator's runtime endpoints."""
from __future__ import annotations

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from services.common.validation import WholeMatch
from services.orchestrator.runtimes import DRIVERS

STATUSES = ("starting", "running", "draining", "stopping", "stopped", "error")
HEALTH = ("unknown", "healthy", "unhealthy")
MAX_PAGE_SIZE = 500
MAX_TEXT_CHARS = 100_000
MODEL_REF = r"^[a-z0-9][a-z0-9._-]{0,62}(:[a-z0-9][a-z0-9._-]{0,62})?$"


class EnsureSchema(Schema):
    model_id = fields.UUID(required=True)


class ScaleSchema(Schema):
    replicas = fields.Integer(strict=True, required=True, validate=validate.Range(0, 64))


class RuntimeListArgsSchema(Schema):
    model_id = fields.UUID()
    status = fields.String(validate=validate.OneOf(STATUSES))
    driver = fields.String(validate=validate.OneOf(DRIVERS))
    health_status = fields.String(validate=validate.OneOf(HEALTH))
    limit = fields.Integer(load_default=100, validate=validate.Range(1, MAX_PAGE_SIZE))
    offset = fields.Integer(load_default=0, validate=validate.Range(0, 1_000_000))


class RuntimeSchema(Schema):
    """A model runtime: a process, a container or an external endpoint."""

    id = fields.UUID(required=True)
    model_id = fields.UUID(required=True)
    model_name = fields.String(required=True)
    model_version = fields.String(required=True)
    protocol = fields.String(required=True)
    driver = fields.String(required=True)
    container_id = fields.String(allow_none=True)
    pid = fields.Integer(allow_none=True)
    driver_state = fields.Dict(required=True, metadata={"description": "Driver details: allocation, "
                                                        "process start time, image, pull progress"})
    host = fields.String(required=True)
    port = fields.Integer(allow_none=True)
    endpoint = fields.String(allow_none=True)
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    health_status = fields.String(required=True, validate=validate.OneOf(HEALTH))
    allocated_cpu = fields.Float(required=True)
    allocated_memory = fields.Integer(required=True, metadata={"description": "MB"})
    allocated_gpu = fields.Float(required=True)
    active_requests = fields.Integer(required=True)
    total_requests = fields.Integer(required=True)
    restart_count = fields.Integer(required=True)
    load_time_ms = fields.Integer(allow_none=True)
    log_path = fields.String(allow_none=True)
    error_message = fields.String(allow_none=True)
    started_at = fields.DateTime(allow_none=True)
    ready_at = fields.DateTime(allow_none=True)
    stopped_at = fields.DateTime(allow_none=True)
    last_activity = fields.DateTime(required=True)
    last_health_check = fields.DateTime(allow_none=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


class RuntimeListSchema(Schema):
    items = fields.List(fields.Nested(RuntimeSchema), required=True)
    limit = fields.Integer(required=True)
    offset = fields.Integer(required=True)


class ActionSchema(Schema):
    """One thing a periodic job did (or decided not to do) to a runtime."""

    model_id = fields.UUID(allow_none=True)
    runtime_id = fields.UUID(allow_none=True)
    action = fields.String(required=True)
    detail = fields.String(required=True)


class ActionsSchema(Schema):
    actions = fields.List(fields.Nested(ActionSchema), required=True)


class HealthReportSchema(ActionsSchema):
    checked = fields.Integer(required=True)
    healthy = fields.Integer(required=True)


class ScaleResultSchema(Schema):
    model_id = fields.UUID(required=True)
    replicas = fields.Integer(required=True)
    started = fields.List(fields.UUID(), required=True)
    stopped = fields.List(fields.UUID(), required=True)


class MessageSchema(Schema):
    role = fields.String(required=True, validate=validate.OneOf(["system", "user", "assistant"]))
    content = fields.String(required=True, validate=validate.Length(max=MAX_TEXT_CHARS))


class OptionsSchema(Schema):
    max_tokens = fields.Integer(strict=True, validate=validate.Range(1, 32_768))
    temperature = fields.Float(validate=validate.Range(0, 2))
    seed = fields.Integer(strict=True, validate=validate.Range(-(2**31), 2**31 - 1))
    stop = fields.List(fields.String(validate=validate.Length(1, 100)), validate=validate.Length(max=8))
    format = fields.String(validate=validate.OneOf(["text", "json"]))
    json_schema = fields.Dict(metadata={"description": "A JSON schema the output must match"})

    @validates_schema
    def _one_format(self, data: dict, **kwargs) -> None:
        if data.get("format") == "text" and "json_schema" in data:
            raise ValidationError("json_schema needs format json (or no format).", "json_schema")


class GenerateSchema(Schema):
    """One generation: a model by id or "name[:version]", and a prompt or chat messages."""

    model_id = fields.UUID()
    model = fields.String(validate=WholeMatch(MODEL_REF))
    prompt = fields.String(validate=validate.Length(1, MAX_TEXT_CHARS))
    messages = fields.List(fields.Nested(MessageSchema), validate=validate.Length(1, 200))
    options = fields.Nested(OptionsSchema, load_default=dict)

    @validates_schema
    def _exactly_one_of_each(self, data: dict, **kwargs) -> None:
        if ("model_id" in data) == ("model" in data):
            raise ValidationError("Give exactly one of model_id and model.", "_schema")
        if ("prompt" in data) == ("messages" in data):
            raise ValidationError("Give exactly one of prompt and messages.", "_schema")


class TimingsSchema(Schema):
    load_ms = fields.Float(allow_none=True)
    prompt_ms = fields.Float(allow_none=True)
    generation_ms = fields.Float(allow_none=True)
    total_ms = fields.Float(required=True)
    tokens_per_second = fields.Float(allow_none=True)


class GenerationSchema(Schema):
    model_id = fields.UUID(required=True)
    model = fields.String(required=True)
    runtime_id = fields.UUID(required=True)
    ensure_ms = fields.Float(required=True, metadata={"description": "Time to a leased runtime (cold start)"})
    text = fields.String(required=True)
    input_tokens = fields.Integer(allow_none=True)
    output_tokens = fields.Integer(allow_none=True)
    finish_reason = fields.String(allow_none=True)
    timings = fields.Nested(TimingsSchema, required=True)
