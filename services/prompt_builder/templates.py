"""Prompt templates: versioned storage, resolution by model family, safe rendering, and building prompts."""
from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import psycopg

from services.common.config import Settings
from services.common.errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from services.common.vocabulary import PROTOCOLS, TASK_TYPES
from services.prompt_builder import formats, queries

# 'default' as a task type (with family 'default') is the global fallback template.
DEFAULT = "default"
TEMPLATE_TASK_TYPES = (DEFAULT, *TASK_TYPES)
# Always supplied when rendering.
BUILTIN_VARIABLES = ("prompt", "format_instructions", "task_type", "model", "model_family")
# Supplied by the caller in `variables`; a template that uses one requires it.
EXTRA_VARIABLES = ("context", "language", "labels", "examples", "history")
PLACEHOLDERS = (*BUILTIN_VARIABLES, *EXTRA_VARIABLES)
CONTENT_FIELDS = ("system_template", "user_template", "description")

FAMILY_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}(:[A-Za-z0-9._-]{1,63})?$"
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# The same grammar as a regular expression, for the OpenAPI document (clients and fuzzers).
_TOKEN = r"(?:[^{}]|\{\{|\}\}|\{(?:" + "|".join(PLACEHOLDERS) + r")\})"
TEMPLATE_PATTERN = rf"^{_TOKEN}*$"
USER_TEMPLATE_PATTERN = rf"^{_TOKEN}*\{{prompt\}}{_TOKEN}*$"
_MODEL = re.compile(MODEL_PATTERN)


@dataclass(frozen=True)
class PromptRequest:
    """What to build a prompt for; `variables` fill the extra placeholders (context, language...)."""

    prompt: str
    task_type: str
    model: str
    protocol: str = "openai"
    output_format: str = "text"
    json_schema: dict | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    max_prompt_chars: int = Settings.max_prompt_chars
    history_chars: int = 0   # earlier chat turns sent along with the prompt: they count against the limit


@dataclass(frozen=True)
class BuiltPrompt:
    """The messages (system + user), the same as one text, backend options and the template used."""

    messages: list[dict]
    prompt: str
    options: dict
    template: dict
    output_format: str


# --- parsing and rendering -------------------------------------------------------------------

@lru_cache(maxsize=128)  # the templates in use, each parsed several times per prompt built
def parse_template(text: str) -> tuple[tuple[str, str | None], ...]:
    """The template as (literal text, placeholder name or None) pairs; ValueError says what is wrong."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as error:
        raise ValueError(f"unbalanced braces ({error}); write a literal brace as {{{{ or }}}}") from None
    pieces = []
    for literal, name, spec, conversion in parsed:
        if name is not None:
            if conversion is not None or spec:
                raise ValueError(f"{{{name}}} has a conversion or format spec; only {{name}} is allowed")
            if not _NAME.fullmatch(name):
                raise ValueError(f"{{{name}}} is not a plain name (no attribute or index access, "
                                 "no positional fields)")
        pieces.append((literal, name))
    return tuple(pieces)


def placeholder_names(text: str) -> list[str]:
    """The distinct placeholders a template uses, in order of first use ([] if it does not parse)."""
    try:
        pieces = parse_template(text)
    except ValueError:
        return []
    return list(dict.fromkeys(name for _, name in pieces if name))


def template_text_problems(text: str, *, requires_prompt: bool = False) -> list[str]:
    """Why a template text cannot be saved: bad syntax, unknown placeholders, no {prompt}."""
    try:
        names = [name for _, name in parse_template(text) if name]
    except ValueError as error:
        return [str(error)]
    problems = [f"unknown placeholder {{{name}}}; allowed: {', '.join(PLACEHOLDERS)}"
                for name in dict.fromkeys(names) if name not in PLACEHOLDERS]
    if requires_prompt and "prompt" not in names:
        problems.append("the user template must contain {prompt}")
    return problems


def validate_template(system_template: str, user_template: str) -> None:
    """Raise Unprocessable, per field, when either part of a template cannot be saved."""
    errors = {name: problems for name, problems in (
        ("system_template", template_text_problems(system_template)),
        ("user_template", template_text_problems(user_template, requires_prompt=True)),
    ) if problems}
    if errors:
        raise Unprocessable("The template is invalid: see errors for each field.", errors=errors)


def render(text: str, values: Mapping[str, str]) -> str:
    """Fill placeholders with values inserted verbatim (a value's own braces are never interpreted)."""
    missing = missing_variables(text, values)
    if missing:
        raise Unprocessable(f"Missing template variable(s): {', '.join(missing)}.", missing=missing)
    try:
        pieces = parse_template(text)
    except ValueError as error:
        # Only a template written to the table by hand, past validation, gets here.
        raise Unprocessable(f"The stored template does not parse: {error}.") from None
    return "".join(literal + (values[name] if name else "") for literal, name in pieces)


def missing_variables(text: str, values: Mapping[str, str]) -> list[str]:
    """The placeholders of `text` that `values` does not supply."""
    return [name for name in placeholder_names(text) if name not in values]


# --- storage and versions --------------------------------------------------------------------

def list_templates(conn: psycopg.Connection, *, task_type: str | None = None,
                   model_family: str | None = None, active: bool | None = None,
                   limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
    """A page of templates (newest version first within a family) and the total matching."""
    return queries.list_templates(conn, task_type=task_type, model_family=model_family,
                                  active=active, limit=limit, offset=offset)


def get_template(conn: psycopg.Connection, template_id: str) -> dict:
    """One template version; NotFound if there is none with this id."""
    row = queries.get_template(conn, template_id)
    if row is None:
        raise NotFound(f"No prompt template has id {template_id}.")
    return row


def create_template(conn: psycopg.Connection, *, task_type: str, model_family: str = DEFAULT,
                    system_template: str = "", user_template: str, description: str = "",
                    active: bool = True) -> dict:
    """Version 1 of a new (task type, family) template; Conflict if that pair already has versions."""
    validate_template(system_template, user_template)
    queries.lock_family(conn, task_type, model_family)
    latest = queries.latest_version(conn, task_type, model_family)
    if latest:
        raise Conflict(f"A template for ({task_type}, {model_family}) exists; PATCH /templates/"
                       f"{latest['id']} to add a version.", template_id=str(latest["id"]))
    return queries.insert_template(conn, task_type=task_type, model_family=model_family, version=1,
                                   system_template=system_template, user_template=user_template,
                                   description=description, active=active)


def update_template(conn: psycopg.Connection, template_id: str, changes: Mapping[str, Any]) -> tuple[dict, bool]:
    """Apply a PATCH: content changes make a new version, `active` alone toggles; (row, created)."""
    current = get_template(conn, template_id)
    task_type, family = current["task_type"], current["model_family"]
    queries.lock_family(conn, task_type, family)
    current = get_template(conn, template_id)  # as the previous lock holder left it
    content = {name: changes[name] for name in CONTENT_FIELDS if name in changes}
    if not content and "active" not in changes:
        raise Unprocessable("Nothing to change: give template text, a description or active.")
    if content:
        merged = {name: current[name] for name in CONTENT_FIELDS} | content
        validate_template(merged["system_template"], merged["user_template"])
        active = changes.get("active", True)
        if active:
            queries.deactivate_family(conn, task_type, family)
        version = queries.latest_version(conn, task_type, family)["version"] + 1
        row = queries.insert_template(conn, task_type=task_type, model_family=family, version=version,
                                      active=active, **merged)
        return row, True
    if changes["active"] == current["active"]:
        return current, False
    if changes["active"]:
        queries.deactivate_family(conn, task_type, family)
        return queries.set_active(conn, template_id, True), False
    if (task_type, family) == (DEFAULT, DEFAULT):
        raise Conflict("The global default template cannot be deactivated; activate another "
                       "version of it instead.")
    return queries.set_active(conn, template_id, False), False


def model_family(model: str) -> str:
    """The family of a model name: 'llama2:13b' -> 'llama2'."""
    if not _MODEL.fullmatch(model):
        raise Unprocessable(f"{model!r} is not a model name like 'llama2:13b'.")
    return model.split(":", 1)[0].lower()


def resolve_template(conn: psycopg.Connection, task_type: str, family: str) -> dict:
    """The active template for (task, family), else (task, default), else the global default."""
    return _applicable(queries.resolve_active(conn, task_type, family), task_type, family)


def _applicable(row: dict | None, task_type: str, family: str) -> dict:
    if row is None:
        raise Unprocessable(f"No active template applies to ({task_type}, {family}) and there is "
                            "no active global default.")
    return row


class ActiveTemplates:
    """The active templates of one templates version, resolved in memory as `resolve_active` does."""

    def __init__(self, version: str, rows: list[dict]) -> None:
        self.version = version
        self._by_pair = {(row["task_type"], row["model_family"]): row for row in rows}

    def resolve(self, task_type: str, family: str) -> dict | None:
        for pair in ((task_type, family), (task_type, DEFAULT), (DEFAULT, DEFAULT)):
            if pair in self._by_pair:
                return self._by_pair[pair]
        return None


class _TemplateCache:
    """The active templates of the latest templates version this process read.

    A write to prompt_templates gives them a new version (a trigger), which a dispatch reads with
    its selection state: an attempt that brings that version builds its prompt without a read.
    """

    def __init__(self) -> None:
        self._entry: ActiveTemplates | None = None

    def get(self, conn: psycopg.Connection, version: str) -> ActiveTemplates:
        entry = self._entry
        if entry is None or entry.version != version:
            # Another thread may load them too; every load is a consistent (version, templates)
            # pair and is never changed after, so whichever is kept is correct.
            entry = ActiveTemplates(*queries.active_templates(conn))
            self._entry = entry
        return entry


_active_templates = _TemplateCache()


def _template_for(conn: psycopg.Connection, task_type: str, family: str,
                  templates_version: str | None) -> dict:
    if templates_version is None:
        return resolve_template(conn, task_type, family)
    templates = _active_templates.get(conn, templates_version)
    return _applicable(templates.resolve(task_type, family), task_type, family)


# --- building ------------------------------------------------------------------------------

def build_prompt(conn: psycopg.Connection, request: PromptRequest | Mapping[str, Any], *,
                 templates_version: str | None = None) -> BuiltPrompt:
    """Render the template that applies to the request's task and model into messages and options.

    With the `templates_version` a dispatch read at its start, the template comes from memory when
    this process holds the active templates of that version (else they are all read again, in one
    statement); without it, the one template is read.
    """
    if not isinstance(request, PromptRequest):
        request = PromptRequest(**request)
    _check_request(request)
    family = model_family(request.model)
    template = _template_for(conn, request.task_type, family, templates_version)
    instructions = formats.format_instructions(request.output_format, request.json_schema,
                                               request.variables.get("language"))
    values = {**request.variables, "prompt": request.prompt, "format_instructions": instructions,
              "task_type": request.task_type, "model": request.model, "model_family": family}
    system, user = _render_parts(template, values)
    text = f"{system}\n\n{user}" if system else user
    _check_size(len(text) + request.history_chars, request.max_prompt_chars)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return BuiltPrompt(
        messages=messages,
        prompt=text,
        options=formats.backend_options(request.output_format, request.protocol, request.json_schema),
        template={"id": str(template["id"]), "task_type": template["task_type"],
                  "model_family": template["model_family"], "version": template["version"]},
        output_format=request.output_format,
    )


def _render_parts(template: Mapping[str, Any], values: Mapping[str, str]) -> tuple[str, str]:
    """The rendered system and user parts; every missing variable of both is named at once."""
    parts = (template["system_template"], template["user_template"])
    missing = list(dict.fromkeys(name for part in parts for name in missing_variables(part, values)))
    if missing:
        raise Unprocessable(f"Missing template variable(s): {', '.join(missing)}.", missing=missing)
    system, user = (render(part, values).strip() for part in parts)
    if not any("format_instructions" in placeholder_names(part) for part in parts):
        # The format must reach the model even when a template leaves the placeholder out.
        user = f"{user}\n\n{values['format_instructions']}"
    return system, user


def _check_request(request: PromptRequest) -> None:
    if request.task_type not in TASK_TYPES:
        raise Unprocessable(f"Unknown task_type {request.task_type!r}.", allowed=list(TASK_TYPES))
    if request.protocol not in PROTOCOLS:
        raise Unprocessable(f"Unknown protocol {request.protocol!r}.", allowed=list(PROTOCOLS))
    formats.check_format(request.output_format, request.json_schema)
    unknown = sorted(set(request.variables) - set(EXTRA_VARIABLES))
    if unknown:
        raise Unprocessable(f"Unknown variable(s): {', '.join(unknown)}.", allowed=list(EXTRA_VARIABLES))
    if not all(isinstance(value, str) for value in request.variables.values()):
        raise Unprocessable("Variable values must be strings.")
    # Before rendering, so an oversized request costs no work.
    check_prompt_size(request.prompt, request.variables, request.max_prompt_chars, request.history_chars)


def check_prompt_size(prompt: str, variables: Mapping[str, str], limit: int, history_chars: int = 0) -> None:
    """PayloadTooLarge when the text a template is to wrap (with the chat turns sent along) is over
    `limit` characters already."""
    _check_size(len(prompt) + sum(map(len, variables.values())) + history_chars, limit)


def _check_size(size: int, limit: int) -> None:
    if size > limit:
        raise PayloadTooLarge(f"The prompt is {size} characters; the limit is {limit}.",
                              limit=limit, size=size)
