"""Request and response bodies of the prompt builder."""
from __future__ import annotations

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from services.common.validation import WholeMatch
from services.common.vocabulary import PROTOCOLS
from services.prompt_builder import formats, templates

MAX_TEMPLATE_CHARS = 20_000
MAX_DESCRIPTION_CHARS = 1_000
# Raw model output to check; far above what a generation returns, below the request size limit.
MAX_RAW_CHARS = 500_000
MAX_PAGE_SIZE = 100


def _template_text(requires_prompt: bool):
    def check(text: str) -> None:
        problems = templates.template_text_problems(text, requires_prompt=requires_prompt)
        if problems:
            raise ValidationError(problems)
    return check


# The grammar is documented as a description, not a `pattern`: fuzzers cannot generate from a
# pattern this size combined with maxLength. The validator says what is wrong in words.
_GRAMMAR = "Template text matching the regular expression {}"


def _system_template(**kwargs) -> fields.String:
    return fields.String(validate=[validate.Length(max=MAX_TEMPLATE_CHARS), _template_text(False)],
                         metadata={"description": _GRAMMAR.format(templates.TEMPLATE_PATTERN)}, **kwargs)


def _user_template(**kwargs) -> fields.String:
    return fields.String(validate=[validate.Length(min=1, max=MAX_TEMPLATE_CHARS), _template_text(True)],
                         metadata={"description": _GRAMMAR.format(templates.USER_TEMPLATE_PATTERN)}, **kwargs)


JSON_SCHEMA_DOC = {"description": "A JSON Schema (Draft 2020-12) the JSON output must conform to; "
                                  "checked and used only when output_format is json"}


class TemplateSchema(Schema):
    """One stored template version."""

    id = fields.UUID(required=True)
    task_type = fields.String(required=True, metadata={"enum": list(templates.TEMPLATE_TASK_TYPES)})
    model_family = fields.String(required=True)
    version = fields.Integer(required=True)
    system_template = fields.String(required=True)
    user_template = fields.String(required=True)
    description = fields.String(required=True)
    active = fields.Boolean(required=True)
    created_at = fields.DateTime(required=True)
    placeholders = fields.Function(
        lambda row: list(dict.fromkeys(templates.placeholder_names(row["system_template"])
                                       + templates.placeholder_names(row["user_template"]))),
        required=True, metadata={"type": "array", "items": {"type": "string"},
                                 "description": "The placeholders the template uses"})


class TemplatePageSchema(Schema):
    items = fields.List(fields.Nested(TemplateSchema), required=True)
    total = fields.Integer(required=True)
    limit = fields.Integer(required=True)
    offset = fields.Integer(required=True)


class TemplateQuerySchema(Schema):
    task_type = fields.String(validate=validate.OneOf(templates.TEMPLATE_TASK_TYPES))
    model_family = fields.String(validate=WholeMatch(templates.FAMILY_PATTERN))
    active = fields.Boolean()
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=MAX_PAGE_SIZE))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=1_000_000))


class TemplateCreateSchema(Schema):
    task_type = fields.String(required=True, validate=validate.OneOf(templates.TEMPLATE_TASK_TYPES))
    model_family = fields.String(load_default=templates.DEFAULT,
                                 validate=WholeMatch(templates.FAMILY_PATTERN))
    system_template = _system_template(load_default="")
    user_template = _user_template(required=True)
    description = fields.String(load_default="", validate=validate.Length(max=MAX_DESCRIPTION_CHARS))
    active = fields.Boolean(load_default=True)

    @validates_schema
    def _global_default_is_for_every_family(self, data: dict, **kwargs) -> None:
        # No request resolves to (default, family): a family's templates are per task type.
        family = data.get("model_family", templates.DEFAULT)
        if data.get("task_type") == templates.DEFAULT and family != templates.DEFAULT:
            raise ValidationError("A model family's template needs a task type: with task_type default, "
                                  "model_family must be default.", "model_family")


class TemplatePatchSchema(Schema):
    system_template = _system_template()
    user_template = _user_template()
    description = fields.String(validate=validate.Length(max=MAX_DESCRIPTION_CHARS))
    active = fields.Boolean()

    @validates_schema
    def _not_empty(self, data: dict, **kwargs) -> None:
        if not data:
            raise ValidationError("Give at least one of system_template, user_template, description, active.")


# Values of the extra placeholders a template may use; a template that uses one requires it.
VariablesSchema = Schema.from_dict({name: fields.String() for name in templates.EXTRA_VARIABLES},
                                   name="Variables")


class BuildRequestSchema(Schema):
    prompt = fields.String(required=True, validate=validate.Length(min=1))
    task_type = fields.String(required=True, validate=validate.OneOf(templates.TASK_TYPES))
    model = fields.String(required=True, validate=WholeMatch(templates.MODEL_PATTERN),
                          metadata={"example": "llama2:13b"})
    protocol = fields.String(load_default="openai", validate=validate.OneOf(PROTOCOLS))
    output_format = fields.String(load_default="text", validate=validate.OneOf(formats.FORMATS))
    json_schema = fields.Dict(load_default=None, allow_none=True, metadata=JSON_SCHEMA_DOC)
    variables = fields.Nested(VariablesSchema, load_default=dict)

    @validates_schema
    def _check_json_schema(self, data: dict, **kwargs) -> None:
        _check_json_schema(data)


class MessageSchema(Schema):
    role = fields.String(required=True, metadata={"enum": ["system", "user"]})
    content = fields.String(required=True)


class TemplateRefSchema(Schema):
    id = fields.UUID(required=True)
    task_type = fields.String(required=True)
    model_family = fields.String(required=True)
    version = fields.Integer(required=True)


class BuiltPromptSchema(Schema):
    messages = fields.List(fields.Nested(MessageSchema), required=True)
    prompt = fields.String(required=True, metadata={"description": "System and user parts as one text"})
    options = fields.Dict(required=True, metadata={
        "description": "Generation options: response_format (openai) or format (ollama) for json"})
    template = fields.Nested(TemplateRefSchema, required=True)
    output_format = fields.String(required=True)


class ParseRequestSchema(Schema):
    raw = fields.String(required=True, validate=validate.Length(max=MAX_RAW_CHARS))
    output_format = fields.String(required=True, validate=validate.OneOf(formats.FORMATS))
    json_schema = fields.Dict(load_default=None, allow_none=True, metadata=JSON_SCHEMA_DOC)
    language = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=100), metadata={
        "description": "For code: the block in this language is taken, else the first block"})

    @validates_schema
    def _check_json_schema(self, data: dict, **kwargs) -> None:
        _check_json_schema(data)


class ReasonSchema(Schema):
    code = fields.String(required=True, metadata={"enum": [
        "empty_output", "no_json_found", "json_syntax", "schema_violation", "no_code_block",
        "unclosed_code_block", "empty_code_block"]})
    message = fields.String(required=True)
    path = fields.String(metadata={"description": "JSON Pointer into the value (schema_violation)"})


class ParsedOutputSchema(Schema):
    valid = fields.Boolean(required=True)
    value = fields.Raw(required=True, allow_none=True,
                       metadata={"description": "Parsed JSON, code, normalised Markdown or trimmed text"})
    reasons = fields.List(fields.Nested(ReasonSchema), required=True)
    language = fields.String(required=True, allow_none=True)


def _check_json_schema(data: dict) -> None:
    if data.get("output_format") == "json" and data.get("json_schema") is not None:
        problem = formats.json_schema_problem(data["json_schema"])
        if problem:
            raise ValidationError(problem, "json_schema")
