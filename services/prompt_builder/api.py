"""HTTP endpoints of the prompt builder: templates, building prompts, checking model output."""
from __future__ import annotations

from http import HTTPStatus

from flask.views import MethodView

from services.common.app import Blueprint, current_settings
from services.common.db import get_db
from services.prompt_builder import formats, templates
from services.prompt_builder.schemas import (BuildRequestSchema, BuiltPromptSchema, ParsedOutputSchema,
                                             ParseRequestSchema, TemplateCreateSchema,
                                             TemplatePageSchema, TemplatePatchSchema, TemplateQuerySchema,
                                             TemplateSchema)

blp = Blueprint("prompt_builder", __name__, description="Prompt templates, prompt building, output checks")


def _problem(status: int) -> str:
    """The name of the problem+json response component of a status."""
    return HTTPStatus(status).name


@blp.route("/templates")
class Templates(MethodView):
    @blp.arguments(TemplateQuerySchema, location="query")
    @blp.response(200, TemplatePageSchema)
    def get(self, query: dict):
        """List template versions, filtered by task type, family and active; newest version first."""
        with get_db().connection() as conn:
            items, total = templates.list_templates(conn, **query)
        return {"items": items, "total": total, "limit": query["limit"], "offset": query["offset"]}

    @blp.arguments(TemplateCreateSchema)
    @blp.response(201, TemplateSchema)
    @blp.alt_response(409, response=_problem(409))
    def post(self, data: dict):
        """Create version 1 of a template for a (task type, model family) that has none yet.

        Placeholders: prompt, format_instructions, task_type, model, model_family (always
        supplied) and context, language, labels, examples, history (supplied by the caller's
        `variables`, required when used). Literal braces are written `{{` and `}}`. The user
        template must contain `{prompt}`. A pair that already has versions is a 409: PATCH one
        of its versions instead.
        """
        with get_db().connection() as conn:
            return templates.create_template(conn, **data)


@blp.route("/templates/<uuid:template_id>")
class Template(MethodView):
    @blp.response(200, TemplateSchema)
    @blp.alt_response(404, response=_problem(404))
    def get(self, template_id):
        """One template version."""
        with get_db().connection() as conn:
            return templates.get_template(conn, str(template_id))

    @blp.arguments(TemplatePatchSchema)
    @blp.response(200, TemplateSchema, description="Only `active` changed: the same version")
    @blp.alt_response(201, schema=TemplateSchema, description="A new version was created and is returned")
    @blp.alt_response(404, response=_problem(404))
    @blp.alt_response(409, response=_problem(409))
    def patch(self, changes: dict, template_id):
        """Change a template: a text or description change creates a NEW version (201).

        The new version (next number, built from this version plus the changes) becomes active
        unless `active: false` is given, and the family's previously active version is
        deactivated; no version is ever rewritten, so requests logged with a version stay
        explainable. A body with only `active` toggles this version (200); activating it
        deactivates the family's other active version. The global default cannot be deactivated.
        """
        with get_db().connection() as conn:
            row, created = templates.update_template(conn, str(template_id), changes)
        return (row, 201) if created else row


@blp.route("/prompts/build")
class PromptBuild(MethodView):
    @blp.arguments(BuildRequestSchema)
    @blp.response(200, BuiltPromptSchema)
    @blp.alt_response(413, response=_problem(413))
    def post(self, data: dict):
        """Build the messages, prompt text and backend options for a request to a model.

        The template is the active one for (task_type, family of model), else (task_type,
        default), else the global default; `template` says which version was used. For json, the
        options ask the server for constrained output (OpenAI `response_format`, Ollama `format`).
        A prompt beyond the configured limit (MAX_PROMPT_CHARS) is a 413.
        """
        request = templates.PromptRequest(**data, max_prompt_chars=current_settings().max_prompt_chars)
        with get_db().connection() as conn:
            return templates.build_prompt(conn, request)


@blp.route("/responses/parse")
class ResponseParse(MethodView):
    @blp.arguments(ParseRequestSchema)
    @blp.response(200, ParsedOutputSchema)
    def post(self, data: dict):
        """Extract and check a model's raw output; output that does not validate is a 200 with valid: false."""
        return formats.parse_output(data["raw"], data["output_format"], data["json_schema"], data["language"])
