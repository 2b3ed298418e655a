"""Request and response schemas of the dispatch endpoints."""
from __future__ import annotations

import re

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from services.common.validation import WholeMatch, model_ref
from services.common.vocabulary import OUTPUT_FORMATS, TASK_TYPES
from services.orchestrator.schemas import MessageSchema
from services.prompt_builder.formats import json_schema_problem
from services.prompt_builder.templates import EXTRA_VARIABLES
from services.registry.schemas import WeightsSchema   # the same weights as POST /select
from services.registry.selection import COMPLEXITY_LEVELS

MODEL_REF = r"^[a-z0-9][a-z0-9._-]{0,62}(:[a-z0-9][a-z0-9._-]{0,62})?$"
TAG = r"^[a-z0-9][a-z0-9._-]{0,62}$"
STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
# Callback header names are RFC 9110 tokens; values are visible ASCII at both ends, spaces and tabs
# only inside: the HTTP client refuses leading whitespace and line breaks, and its error message
# would carry the value (a secret) into a log line. Matched whole (fullmatch).
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e\t]{0,4094}[\x21-\x7e])?")
# Hop-by-hop headers, and those describing the message, which the HTTP client sets itself.
RESERVED_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                              "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
                              "content-length", "content-type"})
MAX_CALLBACK_HEADERS = 8


def _header_name(name: str) -> None:
    if not HEADER_NAME.fullmatch(name):
        raise ValidationError("Not a valid header name.")
    if name.lower() in RESERVED_HEADERS:
        raise ValidationError("A header the HTTP client sets itself cannot be given.")


def _few_headers(headers: dict) -> None:
    if len(headers) > MAX_CALLBACK_HEADERS:
        raise ValidationError(f"At most {MAX_CALLBACK_HEADERS} headers.")


class Complexity(fields.Field):
    """1-10, or low / medium / high (3 / 6 / 9)."""

    def _deserialize(self, value, attr, data, **kwargs) -> int:
        if isinstance(value, str) and value in COMPLEXITY_LEVELS:
            return COMPLEXITY_LEVELS[value]
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10:
            return value
        raise ValidationError("Must be an integer from 1 to 10, or one of: low, medium, high.")

    def _serialize(self, value, attr, obj, **kwargs):
        return value


class RequirementsSchema(Schema):
    max_memory_mb = fields.Integer(validate=validate.Range(1, 10_000_000))
    max_latency_ms = fields.Integer(validate=validate.Range(1, 3_600_000))
    weights = fields.Nested(WeightsSchema)
    required_tags = fields.List(fields.String(validate=WholeMatch(TAG)), validate=validate.Length(max=20))
    exclude = fields.List(fields.String(validate=model_ref), validate=validate.Length(max=100))
    prefer_warm = fields.Boolean()


class DispatchSchema(Schema):
    """One request for an answer; give `prompt`, or `messages` ending with a user turn."""

    prompt = fields.String(validate=validate.Length(min=1, max=1_000_000))
    messages = fields.List(fields.Nested(MessageSchema), validate=validate.Length(1, 200))
    task_type = fields.String(load_default="text-generation", validate=validate.OneOf(TASK_TYPES))
    complexity = Complexity(load_default=1, metadata={
        "description": "1-10 or low/medium/high; only models at least this capable are chosen",
        "oneOf": [{"type": "integer", "minimum": 1, "maximum": 10},
                  {"type": "string", "enum": list(COMPLEXITY_LEVELS)}]})
    output_format = fields.String(load_default="text", validate=validate.OneOf(OUTPUT_FORMATS))
    json_schema = fields.Dict(allow_none=True, load_default=None)
    variables = fields.Dict(keys=fields.String(validate=validate.OneOf(EXTRA_VARIABLES)),
                            values=fields.String(validate=validate.Length(max=100_000)),
                            load_default=dict, validate=validate.Length(max=20))
    max_tokens = fields.Integer(load_default=256, validate=validate.Range(1, 8192))
    temperature = fields.Float(load_default=None, allow_none=True, validate=validate.Range(0, 2))
    seed = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(-(2**31), 2**31 - 1))
    stop = fields.List(fields.String(validate=validate.Length(1, 100)), load_default=list,
                       validate=validate.Length(max=8), metadata={"description": "Strings that end the answer"})
    priority = fields.Integer(load_default=100, validate=validate.Range(0, 1000))
    requirements = fields.Nested(RequirementsSchema, load_default=dict)
    max_retries = fields.Integer(load_default=2, validate=validate.Range(0, 5))
    timeout_s = fields.Float(load_default=120.0, validate=validate.Range(1, 600))
    model = fields.String(load_default=None, allow_none=True, validate=WholeMatch(MODEL_REF),
                          metadata={"description": "Pin one model (name or name:version) instead of selecting"})
    run_async = fields.Boolean(data_key="async", load_default=False)
    callback_url = fields.Url(load_default=None, allow_none=True, schemes={"http", "https"},
                              require_tld=False, validate=validate.Length(max=2000))
    callback_headers = fields.Dict(
        keys=fields.String(validate=_header_name), load_default=None, allow_none=True, validate=_few_headers,
        # The error never quotes the value: it is a secret.
        values=fields.String(
            validate=WholeMatch(HEADER_VALUE, error="A header value is 1 to 4096 visible ASCII characters "
                                                    "(spaces and tabs only inside)."),
            metadata={"pattern": "^[!-~]([ -~\t]*[!-~])?$", "maxLength": 4096}),
        metadata={"maxProperties": MAX_CALLBACK_HEADERS, "description": (
            "Headers sent with the callback, and its retries (say, the token a resume webhook requires); needs "
            "callback_url. Secrets: stored apart from the request, never returned or logged, dropped once it ends")})

    @validates_schema
    def _prompt_or_messages(self, data: dict, **kwargs) -> None:
        if ("prompt" in data) == ("messages" in data):
            raise ValidationError("Give exactly one of prompt or messages.", "prompt")
        if "messages" in data and data["messages"][-1]["role"] != "user":
            raise ValidationError("The last message must be a user message.", "messages")
        if data.get("json_schema") is not None:
            _check_json_schema(data["json_schema"], data.get("output_format"))
        if data.get("callback_headers") is not None:
            _check_callback_headers(data["callback_headers"], data.get("callback_url"))


def _check_json_schema(json_schema: dict, output_format: str | None) -> None:
    if output_format != "json":
        raise ValidationError("json_schema needs output_format json.", "json_schema")
    # Checked here too, not only when the prompt is built: a queued request must not fail later for it.
    if problem := json_schema_problem(json_schema):
        raise ValidationError(problem, "json_schema")


def _check_callback_headers(headers: dict, callback_url: str | None) -> None:
    if callback_url is None:
        raise ValidationError("callback_headers needs a callback_url.", "callback_headers")
    names = [name.lower() for name in headers]
    if len(set(names)) < len(names):
        raise ValidationError("Each header may be given once (names are case-insensitive).", "callback_headers")


class AcceptedSchema(Schema):
    request_id = fields.UUID(required=True)
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    status_url = fields.String(required=True)


class DispatchResultSchema(Schema):
    """The answer and the decision that produced it."""

    request_id = fields.UUID(required=True)
    status = fields.String(required=True)
    response = fields.Raw(allow_none=True, metadata={"description": "The parsed value (JSON for json)"})
    raw = fields.String(required=True)
    valid = fields.Boolean(required=True)
    output_format = fields.String(required=True)
    finish_reason = fields.String(allow_none=True, metadata={
        "description": "Why the model stopped: stop, or length when max_tokens cut the answer"})
    model = fields.Dict(required=True)
    runtime_id = fields.String(allow_none=True)
    template = fields.Dict(allow_none=True)
    timings = fields.Dict(keys=fields.String(), values=fields.Float(), required=True)
    tokens = fields.Dict(required=True)
    attempts = fields.List(fields.Dict(), required=True)
    decision = fields.Dict(required=True)


class RequestStatusSchema(Schema):
    id = fields.UUID(required=True)
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    mode = fields.String(required=True)
    task_type = fields.String(required=True)
    priority = fields.Integer(required=True)
    attempts = fields.Integer(required=True)
    assigned_model_id = fields.UUID(allow_none=True)
    assigned_runtime_id = fields.UUID(allow_none=True)
    created_at = fields.DateTime(required=True)
    started_at = fields.DateTime(allow_none=True)
    completed_at = fields.DateTime(allow_none=True)
    result = fields.Dict(allow_none=True)
    error_details = fields.Dict(allow_none=True)


class FeedbackSchema(Schema):
    score = fields.Float(required=True, validate=validate.Range(0, 1))
    label = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=100))
    comment = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=5000))


class FeedbackOutSchema(FeedbackSchema):
    id = fields.Integer(required=True)
    request_id = fields.UUID(required=True)
    model_id = fields.UUID(allow_none=True)
    created_at = fields.DateTime(required=True)
