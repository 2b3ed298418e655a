"""Request and response schemas of the registry: the catalogue, selection and right-sizing."""
from __future__ import annotations

import string
from urllib.parse import urlsplit

from marshmallow import (RAISE, Schema, ValidationError, fields, missing, post_load, validate,
                         validates_schema)

from services.common.validation import WholeMatch, model_ref
from services.common.vocabulary import PROTOCOLS, RUNTIME_DRIVERS, TASK_TYPES
from services.registry.selection import COMPLEXITY_LEVELS, OBJECTIVES, SelectionRequest

DRIVERS = RUNTIME_DRIVERS
# What a runtime accepts safely as a model name, a version or a tag (no spaces, slashes, colons).
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
MAX_PAGE_SIZE = 200

_name = WholeMatch(NAME_PATTERN, error="Must match {regex}.")


def _unique(values: list) -> None:
    if len(set(values)) != len(values):
        raise ValidationError("Items must be unique.")


def _absolute_path(value: str) -> None:
    if not value.startswith("/") or "\x00" in value or ".." in value.split("/"):
        raise ValidationError("Must be an absolute path without '..'.")


def _http_url(**kwargs) -> fields.URL:
    return fields.URL(schemes={"http", "https"}, require_tld=False,
                      validate=[validate.Length(max=2048), _port_in_range], **kwargs)


def _port_in_range(url: str) -> None:
    try:
        port = urlsplit(url).port
    except ValueError:
        port = 0
    if port == 0:
        raise ValidationError("The port must be from 1 to 65535.")


class JsonDateTime(fields.AwareDateTime):
    """An aware date and time inside a jsonb document: loaded and checked as one, kept and shown as
    its ISO 8601 text (which is what the document holds, whoever wrote it)."""

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        return super()._deserialize(value, attr, data, **kwargs).isoformat()

    def _serialize(self, value, attr, obj, **kwargs):
        return value if isinstance(value, str) else super()._serialize(value, attr, obj, **kwargs)


def _tags(**kwargs) -> fields.List:
    return fields.List(fields.String(validate=_name), validate=[validate.Length(max=32), _unique],
                       **kwargs)


class _RuntimeOptions(Schema):
    """Options every driver understands."""

    model_alias = fields.String(validate=_name)
    context_length = fields.Integer(strict=True, validate=validate.Range(128, 1_048_576))
    parallel = fields.Integer(strict=True, validate=validate.Range(1, 64))
    threads = fields.Integer(strict=True, validate=validate.Range(1, 256))
    # Orchestrator knobs: start deadline, restart limit, queue length per replica before scaling
    # up, and the generation timeout.
    start_timeout_s = fields.Float(validate=validate.Range(1, 3600))
    max_restarts = fields.Integer(strict=True, validate=validate.Range(0, 100))
    scale_up_pending = fields.Integer(strict=True, validate=validate.Range(1, 10_000))
    request_timeout_s = fields.Float(validate=validate.Range(1, 3600))


class ProcessConfigSchema(_RuntimeOptions):
    """A model file the process driver serves: a path, or a file inside a Python package."""

    model_path = fields.String(validate=[validate.Length(max=4096), _absolute_path])
    model_package = fields.String(validate=WholeMatch(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$"))
    model_file = fields.String(validate=WholeMatch(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"))
    assemble = fields.Boolean()
    server = fields.String(validate=_name, metadata={"description": "Which server command runs the model"})

    @validates_schema
    def _has_model(self, data: dict, **kwargs) -> None:
        if "model_path" not in data and not ("model_package" in data and "model_file" in data):
            raise ValidationError("Give model_path, or model_package and model_file.", "_schema")


# What the docker driver fills into a command or environment value (runtimes/docker.py).
DOCKER_PLACEHOLDERS = frozenset({"host", "port", "cpu", "memory_mb", "gpu", "threads", "parallel_slots"})


def _docker_template(value: str) -> None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError:
        raise ValidationError("Unbalanced braces; write {{ or }} for a literal brace.") from None
    if names - DOCKER_PLACEHOLDERS:
        raise ValidationError(f"Unknown placeholder; use {', '.join(sorted(DOCKER_PLACEHOLDERS))}.")


def _docker_value(max_length: int) -> fields.String:
    return fields.String(validate=[validate.Length(max=max_length), _docker_template])


class DockerConfigSchema(_RuntimeOptions):
    """An image and the model its server loads: an Ollama image pulls `model_name` (`name:tag`);
    an image with its own `command` (e.g. llama.cpp's server) serves the model it was built with."""

    image = fields.String(required=True, validate=WholeMatch(
        r"^[a-z0-9][a-z0-9._/-]{0,199}(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?$"))
    model_name = fields.String(validate=WholeMatch(
        r"^[a-z0-9][a-z0-9._/-]{0,126}(:[a-z0-9][a-z0-9._-]{0,62})?$"))
    pull = fields.Boolean(metadata={"description": "Pull the model through the server's API at start"})
    # A server must be reachable: on the host's loopback, or through Docker's networking.
    network_mode = fields.String(validate=validate.OneOf(("host", "bridge")))
    container_port = fields.Integer(strict=True, validate=validate.Range(1, 65535))
    command = fields.List(_docker_value(1000), validate=validate.Length(1, 64))
    environment = fields.Dict(keys=fields.String(validate=WholeMatch(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")),
                              values=_docker_value(4000), validate=validate.Length(max=64))

    @validates_schema(skip_on_field_errors=False)
    def _names_its_model(self, data: dict, **kwargs) -> None:
        if "model_name" not in data and "command" not in data:
            raise ValidationError("Missing data for required field.", "model_name")


class ExternalConfigSchema(_RuntimeOptions):
    """A model server someone else runs."""

    endpoint = _http_url(required=True)
    model_name = fields.String(validate=WholeMatch(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,199}$"))


RUNTIME_CONFIG_SCHEMAS = {"process": ProcessConfigSchema, "docker": DockerConfigSchema,
                          "external": ExternalConfigSchema}


def load_runtime_config(driver: str, config: dict) -> dict:
    """The runtime_config as the driver reads it (`"pull": "false"` becomes false); ValidationError
    with the field messages when the driver cannot use it."""
    return RUNTIME_CONFIG_SCHEMAS[driver]().load(config)


class FiguresSchema(Schema):
    """A model's performance figures, as a prior from the catalogue or as measured."""

    avg_latency_ms = fields.Float(allow_none=True, validate=validate.Range(0, 3_600_000))
    p50_latency_ms = fields.Float(allow_none=True, validate=validate.Range(0, 3_600_000))
    p95_latency_ms = fields.Float(allow_none=True, validate=validate.Range(0, 3_600_000))
    accuracy = fields.Float(allow_none=True, validate=validate.Range(0, 1))
    success_rate = fields.Float(allow_none=True, validate=validate.Range(0, 1))
    validation_pass_rate = fields.Float(allow_none=True, validate=validate.Range(0, 1))
    feedback_score = fields.Float(allow_none=True, validate=validate.Range(0, 1))
    tokens_per_second = fields.Float(allow_none=True, validate=validate.Range(0, 1_000_000))
    load_time_ms = fields.Float(allow_none=True, validate=validate.Range(0, 3_600_000))


class PerformanceMetricsSchema(FiguresSchema):
    """Priors from the catalogue; the optimizer overwrites them with measured figures."""

    p99_latency_ms = fields.Float(allow_none=True, validate=validate.Range(0, 3_600_000))
    sample_size = fields.Integer(strict=True, allow_none=True, validate=validate.Range(0, 2**53))
    context_length = fields.Integer(strict=True, allow_none=True,
                                    validate=validate.Range(1, 10_000_000))
    # Written by the optimizer's re-ranking: its window, when, and the catalogue priors it kept.
    window_seconds = fields.Integer(strict=True, allow_none=True, validate=validate.Range(1, 2**31 - 1))
    updated_at = JsonDateTime(allow_none=True)
    priors = fields.Nested(FiguresSchema)


class ModelSchema(Schema):
    """A catalogue entry: what the model serves, what it needs and how it is run."""

    class Meta:
        unknown = RAISE

    id = fields.UUID(dump_only=True)
    name = fields.String(required=True, validate=_name)
    version = fields.String(required=True, validate=_name)
    task_types = fields.List(fields.String(validate=validate.OneOf(TASK_TYPES)), required=True,
                             validate=[validate.Length(1, len(TASK_TYPES)), _unique])
    complexity_score = fields.Integer(strict=True, required=True, validate=validate.Range(1, 10))
    base_cpu_requirement = fields.Float(load_default=1.0, validate=validate.Range(
        0, 1024, min_inclusive=False))
    base_memory_requirement = fields.Integer(strict=True, required=True, metadata={
        "description": "MB"}, validate=validate.Range(1, 1_048_576))
    base_gpu_requirement = fields.Float(load_default=0.0, validate=validate.Range(0, 64))
    storage_requirement = fields.Integer(strict=True, allow_none=True, load_default=None,
                                         metadata={"description": "MB"},
                                         validate=validate.Range(0, 100_000_000))
    model_size = fields.Integer(strict=True, allow_none=True, load_default=None,
                                metadata={"description": "bytes"}, validate=validate.Range(0, 2**53))
    download_url = _http_url(allow_none=True, load_default=None)
    runtime_driver = fields.String(required=True, validate=validate.OneOf(DRIVERS))
    protocol = fields.String(required=True, validate=validate.OneOf(PROTOCOLS))
    runtime_config = fields.Dict(keys=fields.String(), required=True, metadata={
        "description": "process: model_path, or model_package and model_file; "
                       "docker: image and model_name; external: endpoint (http or https)"})
    keep_alive_seconds = fields.Integer(strict=True, load_default=300, metadata={
        "description": "-1 keeps the runtime forever"}, validate=validate.Range(-1, 2_592_000))
    max_replicas = fields.Integer(strict=True, load_default=1, validate=validate.Range(1, 64))
    performance_metrics = fields.Nested(PerformanceMetricsSchema, load_default=dict)
    tags = _tags(load_default=list)
    active = fields.Boolean(load_default=True)
    created_at = fields.DateTime(dump_only=True)
    updated_at = fields.DateTime(dump_only=True)

    @post_load
    def _runtime_config_fits_driver(self, data: dict, **kwargs) -> dict:
        if "runtime_driver" in data and isinstance(data.get("runtime_config"), dict):
            try:
                data["runtime_config"] = load_runtime_config(data["runtime_driver"], data["runtime_config"])
            except ValidationError as error:
                raise ValidationError(error.messages, "runtime_config") from None
        return data


class ModelPatchSchema(ModelSchema):
    """Any subset of the writable fields; no defaults are applied."""

    def __init__(self, **kwargs) -> None:
        super().__init__(partial=True, **kwargs)
        for field in self.load_fields.values():
            field.load_default = missing

    @validates_schema
    def _not_empty(self, data: dict, **kwargs) -> None:
        if not data:
            raise ValidationError("Give at least one field to change.", "_schema")


class ModelListArgsSchema(Schema):
    """Filters and paging of `GET /models` (limit/offset or page/page_size)."""

    task_type = fields.String(validate=validate.OneOf(TASK_TYPES))
    tag = fields.String(validate=_name)
    active = fields.Boolean()
    name = fields.String(validate=_name)
    limit = fields.Integer(validate=validate.Range(1, MAX_PAGE_SIZE))
    offset = fields.Integer(validate=validate.Range(0, 1_000_000))
    page = fields.Integer(validate=validate.Range(1, 100_000))
    page_size = fields.Integer(validate=validate.Range(1, MAX_PAGE_SIZE))

    @validates_schema
    def _one_paging_style(self, data: dict, **kwargs) -> None:
        if ({"limit", "offset"} & data.keys()) and ({"page", "page_size"} & data.keys()):
            raise ValidationError("Use limit/offset or page/page_size, not both.", "_schema")

    @post_load
    def _to_limit_offset(self, data: dict, **kwargs) -> dict:
        if "page" in data or "page_size" in data:
            size = data.pop("page_size", 50)
            data["limit"], data["offset"] = size, (data.pop("page", 1) - 1) * size
        data.setdefault("limit", 50)
        data.setdefault("offset", 0)
        return data


class ModelPageSchema(Schema):
    items = fields.List(fields.Nested(ModelSchema), required=True)
    total = fields.Integer(required=True)
    limit = fields.Integer(required=True)
    offset = fields.Integer(required=True)


class DeleteArgsSchema(Schema):
    hard = fields.Boolean(load_default=False, metadata={
        "description": "Delete a model with history (its logs and runtimes go with it)"})


class DeletionSchema(Schema):
    id = fields.UUID(required=True)
    outcome = fields.String(required=True, validate=validate.OneOf(("deleted", "deactivated")))


class Complexity(fields.Field):
    """1-10, or low/medium/high."""

    def __init__(self, **kwargs) -> None:
        super().__init__(metadata={"oneOf": [
            {"type": "integer", "minimum": 1, "maximum": 10},
            {"type": "string", "enum": list(COMPLEXITY_LEVELS)}]}, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs) -> int:
        if isinstance(value, str) and value in COMPLEXITY_LEVELS:
            return COMPLEXITY_LEVELS[value]
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10:
            return value
        raise ValidationError("Must be an integer from 1 to 10, or low, medium or high.")


class WeightsSchema(Schema):
    """Relative weights of the objectives; missing ones count as 0, the rest are normalised."""

    speed = fields.Float(validate=validate.Range(0, 1000))
    accuracy = fields.Float(validate=validate.Range(0, 1000))
    memory = fields.Float(validate=validate.Range(0, 1000))
    cost = fields.Float(validate=validate.Range(0, 1000))

    @validates_schema
    def _some_weight(self, data: dict, **kwargs) -> None:
        if not any(data.get(name) for name in OBJECTIVES):
            raise ValidationError("At least one weight must be above 0.", "_schema")


class RequirementsSchema(Schema):
    max_memory_mb = fields.Integer(strict=True, allow_none=True, load_default=None,
                                   validate=validate.Range(1, 1_048_576))
    max_latency_ms = fields.Integer(strict=True, allow_none=True, load_default=None, metadata={
        "description": "Expected latency, including a cold start"},
        validate=validate.Range(1, 3_600_000))
    weights = fields.Nested(WeightsSchema, allow_none=True, load_default=None)
    required_tags = _tags(load_default=list)
    exclude = fields.List(fields.String(validate=model_ref), load_default=list, metadata={
        "description": "Model ids or name:version"}, validate=validate.Length(max=100))
    prefer_warm = fields.Boolean(load_default=False)


class SelectionRequestSchema(Schema):
    task_type = fields.String(required=True, validate=validate.OneOf(TASK_TYPES))
    complexity = Complexity(load_default=1)
    requirements = fields.Nested(RequirementsSchema, load_default=lambda: RequirementsSchema().load({}))
    limit = fields.Integer(strict=True, load_default=5, metadata={
        "description": "How many ranked candidates to return"}, validate=validate.Range(1, 50))

    @post_load
    def _to_request(self, data: dict, **kwargs) -> SelectionRequest:
        req = data["requirements"]
        return SelectionRequest(
            task_type=data["task_type"], complexity=data["complexity"],
            max_memory_mb=req["max_memory_mb"], max_latency_ms=req["max_latency_ms"],
            weights={name: req["weights"].get(name, 0.0) for name in OBJECTIVES}
            if req["weights"] else None,
            required_tags=tuple(req["required_tags"]), exclude=tuple(req["exclude"]),
            prefer_warm=req["prefer_warm"], limit=data["limit"])


class BreakdownSchema(Schema):
    """Points each part adds to the score (they sum to it)."""

    speed = fields.Float(required=True)
    accuracy = fields.Float(required=True)
    memory = fields.Float(required=True)
    cost = fields.Float(required=True)
    exploration = fields.Float(required=True)
    warm = fields.Float(required=True)


class EvidenceSchema(Schema):
    """The data a score was computed from: measured figures blended with the catalogue's priors."""

    success_rate = fields.Float(required=True)
    p95_latency_ms = fields.Float(required=True)
    tokens_per_second = fields.Float(required=True, allow_none=True)
    validation_pass_rate = fields.Float(required=True)
    feedback_score = fields.Float(required=True)
    sample_size = fields.Integer(required=True)
    warm = fields.Boolean(required=True)
    load_time_ms = fields.Float(required=True)
    expected_latency_ms = fields.Float(required=True)
    exploration_bonus = fields.Float(required=True)


class CandidateSchema(Schema):
    model = fields.Nested(ModelSchema, required=True)
    score = fields.Float(required=True)
    breakdown = fields.Nested(BreakdownSchema, required=True)
    data = fields.Nested(EvidenceSchema, required=True)


class FilterGroupSchema(Schema):
    constraint = fields.String(required=True)
    reason = fields.String(required=True)
    count = fields.Integer(required=True)
    models = fields.List(fields.String(), required=True, metadata={
        "description": "A few of them, as name:version"})


class SelectionSchema(Schema):
    task_type = fields.String(required=True)
    complexity = fields.Integer(required=True)
    weights = fields.Dict(keys=fields.String(), values=fields.Float(), required=True)
    eligible_count = fields.Integer(required=True)
    candidates = fields.List(fields.Nested(CandidateSchema), required=True)
    filtered = fields.List(fields.Nested(FilterGroupSchema), required=True)


class ResourcesRequestSchema(Schema):
    model_id = fields.UUID(required=True)
    expected_load = fields.Float(load_default=1.0, metadata={
        "description": "Concurrent requests the runtime should absorb"},
        validate=validate.Range(0, 10_000, min_inclusive=False))


class ResourcesSchema(Schema):
    model_id = fields.UUID(required=True)
    expected_load = fields.Float(required=True)
    load_factor = fields.Float(required=True)
    cpu = fields.Float(required=True)
    memory_mb = fields.Integer(required=True)
    gpu = fields.Float(required=True)
    threads = fields.Integer(required=True)
    parallel_slots = fields.Integer(required=True)
    capped = fields.List(fields.String(), required=True, metadata={
        "description": "Resources held down to the host's capacity"})
