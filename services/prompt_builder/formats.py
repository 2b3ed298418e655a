"""Output formats: what to ask the model for, which backend options constrain it, and checking what came back."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema_specifications import REGISTRY as META_SCHEMAS
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from services.common.errors import Unprocessable
from services.common.vocabulary import OUTPUT_FORMATS
from services.prompt_builder.re2_validator import (RE2_FORMAT_CHECKER, Re2Validator, UnsupportedPattern,
                                                  compile_pattern)

FORMATS = OUTPUT_FORMATS
# The name OpenAI's response_format requires for a schema; it only labels the schema.
RESPONSE_SCHEMA_NAME = "response"
MAX_SCHEMA_ERRORS = 20
# Candidate JSON spans tried in prose before giving up: bounds the work on adversarial text.
MAX_JSON_CANDIDATES = 50
REPAIR_QUOTE_CHARS = 1000

_FENCE = re.compile(r"^([ \t]{0,3})(`{3,}|~{3,})[ \t]*([^\s`]*)[^\n]*$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")
_CLOSERS = {"{": "}", "[": "]"}


@dataclass(frozen=True)
class ParsedOutput:
    """What a model returned, checked against the requested format."""

    valid: bool
    value: Any
    reasons: list[dict] = field(default_factory=list)
    language: str | None = None


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block of a text: info-string language, content, whether closed, and its span."""

    language: str | None
    content: str
    closed: bool
    start: int
    end: int


def json_schema_problem(schema: Any) -> str | None:
    """Why `schema` is not a usable Draft 2020-12 JSON Schema, or None when it is."""
    if not isinstance(schema, dict):
        return "json_schema must be a JSON object."
    try:
        Re2Validator.check_schema(schema, format_checker=RE2_FORMAT_CHECKER)
    except SchemaError as error:
        if isinstance(error.cause, UnsupportedPattern):
            return _pattern_problem(error.cause, _json_pointer(error.absolute_path))
        return f"json_schema is not a valid JSON Schema (Draft 2020-12): {error.message}"
    except RecursionError:
        return "json_schema is nested too deeply."
    return _unusable_pattern(schema, ()) or _reference_problem(schema)


# Keywords whose values are data, not schemas: a "pattern" inside them is not a regex.
_DATA_KEYWORDS = frozenset({"const", "enum", "examples", "default"})
# Keywords whose values map names to schemas: a name there is no keyword, "default" included.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def _below(node: dict) -> Iterator[tuple[tuple, Any]]:
    """The values to look into below a schema object, each with its path: all but data, and the
    schemas of a map of schemas one level further down."""
    for key, value in node.items():
        if key in _DATA_KEYWORDS:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            yield from (((key, name), schema) for name, schema in value.items())
        else:
            yield (key,), value


def _patterns_of(node: dict) -> list[tuple[str, str]]:
    """The regexes a schema object carries: (keyword, pattern)."""
    found = [("pattern", node["pattern"])] if isinstance(node.get("pattern"), str) else []
    if isinstance(node.get("patternProperties"), dict):
        found += [("patternProperties", key) for key in node["patternProperties"]]
    return found


def _unusable_pattern(node: Any, path: tuple) -> str | None:
    """The first pattern RE2 cannot compile anywhere in the schema document.

    The meta-schema checks patterns where schemas are expected; a `$ref` may also point into any
    other place of the document, so every `pattern` and `patternProperties` key is checked.
    """
    if isinstance(node, list):
        items = (((index,), item) for index, item in enumerate(node))
    elif isinstance(node, dict):
        for keyword, pattern in _patterns_of(node):
            try:
                compile_pattern(pattern)
            except UnsupportedPattern as error:
                return _pattern_problem(error, _json_pointer((*path, keyword)))
        items = _below(node)
    else:
        return None
    for keys, value in items:
        problem = _unusable_pattern(value, (*path, *keys))
        if problem:
            return problem
    return None


# Keywords applying their schemas to the same place of the answer as the schema holding them.
_IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
_IN_PLACE_ONE = ("not", "if", "then", "else")


def _reference_problem(schema: dict) -> str | None:
    """A `$ref` or `$dynamicRef` that leads nowhere, or references in a loop that applies a schema to
    the same place again and again: found here, not once a model has answered (validating the
    answer would fail then). Only within the document: no remote schema is ever fetched."""
    root = DRAFT202012.create_resource(schema)
    in_place: dict[int, list[dict]] = {}   # schema -> the schemas it applies to the same place
    pending = [(schema, META_SCHEMAS.with_resource(root.id() or "", root).resolver(root.id() or ""))]
    while pending:   # a loop, not recursion: the schema may be nested deep
        node, resolver = pending.pop()
        if isinstance(node, list):
            pending.extend((item, resolver) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        if node is not schema and isinstance(node.get("$id"), str):   # a base URI of its own
            resolver = resolver.in_subresource(DRAFT202012.create_resource(node))
        applied = in_place.setdefault(id(node), [])
        for keyword in ("$ref", "$dynamicRef"):
            if isinstance(node.get(keyword), str):
                try:
                    applied.append(resolver.lookup(node[keyword]).contents)
                except Unresolvable:
                    return f"json_schema has a {keyword} that leads nowhere: {node[keyword]!r}."
        applied += [item for key in _IN_PLACE_LISTS if isinstance(node.get(key), list) for item in node[key]]
        applied += [node[key] for key in _IN_PLACE_ONE if key in node]
        if isinstance(node.get("dependentSchemas"), dict):
            applied += node["dependentSchemas"].values()
        pending.extend((value, resolver) for _, value in _below(node))
    if _loops(in_place):
        return "json_schema has references in a loop: a schema applies itself to the same place, without end."
    return None


def _loops(in_place: dict[int, list[dict]]) -> bool:
    """Whether the graph of schemas applied in place has a cycle (depth-first, without recursion)."""
    state: dict[int, str] = {}
    for start in in_place:
        if start in state:
            continue
        state[start], stack = "open", [iter(in_place[start])]
        path = [start]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = "done"
                stack.pop()
                continue
            if not isinstance(child, dict) or id(child) not in in_place:   # true/false, or a meta-schema
                continue
            if state.get(id(child)) == "open":
                return True
            if id(child) not in state:
                state[id(child)] = "open"
                path.append(id(child))
                stack.append(iter(in_place[id(child)]))
    return False


def check_format(output_format: str, json_schema: dict | None) -> None:
    """Raise Unprocessable for an unknown format, or an invalid schema with json (the one format using it)."""
    if output_format not in FORMATS:
        raise Unprocessable(f"Unknown output_format {output_format!r}.", allowed=list(FORMATS))
    problem = None if json_schema is None or output_format != "json" else json_schema_problem(json_schema)
    if problem:
        raise Unprocessable(problem)


def format_instructions(output_format: str, json_schema: dict | None = None,
                        language: str | None = None) -> str:
    """The sentence(s) that tell the model how to shape its answer."""
    if output_format == "json":
        text = "Respond with only valid JSON: no prose before or after it, no code fences."
        if json_schema is not None:
            text += " The JSON must conform to this JSON Schema:\n" + json.dumps(json_schema, sort_keys=True)
        return text
    if output_format == "code":
        fence = f"```{language}" if language else "```"
        return (f"Respond with only the code, in one fenced code block ({fence} ... ```), "
                "without explanations.")
    if output_format == "markdown":
        return "Format your answer in Markdown."
    return "Answer in plain text, without Markdown."


def backend_options(output_format: str, protocol: str, json_schema: dict | None = None) -> dict:
    """Generation options that make the server constrain the output, where the protocol can."""
    if output_format != "json":
        return {}
    if protocol == "ollama":
        return {"format": json_schema if json_schema is not None else "json"}
    if json_schema is not None:
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": RESPONSE_SCHEMA_NAME, "schema": json_schema}}}
    return {"response_format": {"type": "json_object"}}


def parse_output(raw: str, output_format: str, json_schema: dict | None = None,
                 language: str | None = None) -> ParsedOutput:
    """Extract and check the value of a model's raw answer; invalid output is reported, never raised.

    For code, the first block in the `language` asked for, else the first block."""
    check_format(output_format, json_schema)
    if output_format != "text":
        raw = raw.replace("\r\n", "\n").replace("\r", "\n")   # fences are found line by line
    if not raw.strip():
        return ParsedOutput(False, None if output_format == "json" else "",
                            [_reason("empty_output", "The model returned no content.")])
    if output_format == "json":
        return _parse_json(raw, json_schema)
    if output_format == "code":
        return _parse_code(raw, language)
    if output_format == "markdown":
        return _parse_markdown(raw)
    return ParsedOutput(True, raw.strip())


def repair_prompt(raw: str, parsed: ParsedOutput, output_format: str,
                  json_schema: dict | None = None) -> str:
    """The follow-up user message asking the model to fix an answer that did not validate."""
    problems = "\n".join(_describe(reason) for reason in parsed.reasons) or "- It was not usable."
    quoted = raw if len(raw) <= REPAIR_QUOTE_CHARS else raw[:REPAIR_QUOTE_CHARS] + "\n[...]"
    return (f"Your previous answer could not be used:\n{problems}\n\n"
            f"Previous answer:\n<<<\n{quoted}\n>>>\n\n"
            f"Answer again. {format_instructions(output_format, json_schema, parsed.language)}")


def code_blocks(text: str) -> list[CodeBlock]:
    """The fenced code blocks of a Markdown text, in order; an unclosed one runs to the end."""
    blocks = []
    position = 0
    while opening := _FENCE.search(text, position):
        indent, marker, info = opening.groups()
        start = opening.end() + 1
        closing = re.compile(rf"^[ \t]{{0,3}}{re.escape(marker[0])}{{{len(marker)},}}[ \t]*$", re.MULTILINE)
        end = closing.search(text, start)
        content = _dedented(text[start:end.start() if end else len(text)], len(indent))
        blocks.append(CodeBlock(info.lower() or None, content.rstrip("\n"), end is not None,
                                opening.start(), end.end() if end else len(text)))
        if not end:
            break
        position = end.end()
    return blocks


def _dedented(content: str, indent: int) -> str:
    """A fence's content without the fence's own indent (a fence in a list item, say), as CommonMark reads it."""
    if not indent:
        return content
    return "\n".join(re.sub(rf"^[ \t]{{0,{indent}}}", "", line) for line in content.split("\n"))


def _describe(reason: dict) -> str:
    path = reason.get("path")
    return f"- at {path or '/'}: {reason['message']}" if path is not None else f"- {reason['message']}"


def _reason(code: str, message: str, path: str | None = None) -> dict:
    reason = {"code": code, "message": message}
    if path is not None:
        reason["path"] = path
    return reason


def _parse_json(raw: str, json_schema: dict | None) -> ParsedOutput:
    """The first JSON value found that conforms to the schema (a model's prose may hold other
    brackets first: "see [1]"), else the first found, with its violations."""
    first, first_error = None, None
    for value, error, bracketed in _json_candidates(raw):
        if error is not None:
            if bracketed and first_error is None:
                first_error = error
            continue
        violations = [] if json_schema is None else _schema_violations(value, json_schema)
        if not violations:
            return ParsedOutput(True, value)
        first = first or ParsedOutput(False, value, violations)
    if first is not None:
        return first
    if first_error:
        return ParsedOutput(False, None, [_reason("json_syntax", f"The JSON does not parse: {first_error}")])
    return ParsedOutput(False, None, [_reason("no_json_found", "No JSON object or array was found in the output.")])


def _json_candidates(raw: str) -> Iterator[tuple[Any, str | None, bool]]:
    """(value, parse error, whether it looked like JSON) for the whole text, then each ```json fence,
    then each balanced span in prose."""
    for candidate in [raw.strip(), *(block.content for block in code_blocks(raw) if block.language in (None, "json"))]:
        yield *_loads(candidate), candidate.lstrip()[:1] in ("{", "[")
    for span in _json_spans(raw):
        yield *_loads(span), True


def _loads(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite), None
    except ValueError as error:
        return None, str(error)
    except RecursionError:
        return None, "it is nested too deeply"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    """A JSON number as a float; one beyond a float's range (1e400) would be infinity, which JSON
    cannot hold: the answer would reach the caller as null."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def _json_spans(text: str):
    """Balanced {...} / [...] spans, skipping string contents; a failed span is skipped whole."""
    position = 0
    for _ in range(MAX_JSON_CANDIDATES):
        start = min((i for i in (text.find("{", position), text.find("[", position)) if i >= 0), default=-1)
        if start < 0:
            return
        end = _balanced_end(text, start)
        if end is None:
            # Unbalanced to the end (often a truncated answer): report it rather than a fragment of it.
            yield text[start:]
            return
        yield text[start:end]
        position = end


def _balanced_end(text: str, start: int) -> int | None:
    stack = []
    in_string = escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in _CLOSERS:
            stack.append(_CLOSERS[char])
        elif char in "}]":
            if char != stack.pop():
                return index + 1
            if not stack:
                return index + 1
    return None


def _schema_violations(value: Any, json_schema: dict) -> list[dict]:
    # Only the bundled meta-schemas: jsonschema's default registry would fetch a remote $ref,
    # letting a request make this service call any URL.
    validator = Re2Validator(json_schema, registry=META_SCHEMAS)
    try:
        errors = sorted(validator.iter_errors(value), key=lambda e: ([str(p) for p in e.absolute_path], e.message))
    except Unresolvable as error:
        raise Unprocessable(f"json_schema has a reference that cannot be resolved: {error}") from error
    except UnsupportedPattern as error:
        # Only a pattern outside any subschema, reached through a $ref, gets past json_schema_problem.
        raise Unprocessable(_pattern_problem(error)) from error
    except RecursionError:
        # The schema passed json_schema_problem: the depth is the answer's.
        return [_reason("schema_violation", "The JSON is nested too deeply to check against the schema.")]
    return [_reason("schema_violation", error.message, _json_pointer(error.absolute_path))
            for error in errors[:MAX_SCHEMA_ERRORS]]


def _pattern_problem(error: UnsupportedPattern, where: str | None = None) -> str:
    location = f" at {where}" if where else ""
    return (f"json_schema has a pattern{location} that RE2 cannot compile: {error}. Patterns run on RE2, "
            "in linear time, which has no lookahead, lookbehind or backreferences.")


def _json_pointer(path) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def _parse_code(raw: str, language: str | None) -> ParsedOutput:
    blocks = code_blocks(raw)
    if not blocks:
        return ParsedOutput(False, raw.strip(),
                            [_reason("no_code_block", "The output has no fenced code block.")])
    wanted = (language or "").strip().lower()
    block = next((b for b in blocks if wanted and b.language == wanted), blocks[0])
    reasons = []
    if not block.closed:
        reasons.append(_reason("unclosed_code_block", "The code block is not closed (truncated output?)."))
    if not block.content.strip():
        reasons.append(_reason("empty_code_block", "The code block is empty."))
    return ParsedOutput(not reasons, block.content, reasons, block.language)


def _parse_markdown(raw: str) -> ParsedOutput:
    text = raw.strip()
    blocks = code_blocks(text)
    # Small models often wrap a whole Markdown answer in one ```markdown fence.
    if len(blocks) == 1 and blocks[0].language in ("markdown", "md") and blocks[0].closed \
            and blocks[0].start == 0 and blocks[0].end == len(text):
        text = blocks[0].content.strip()
        blocks = code_blocks(text)
    text = _normalise_markdown(text, blocks)
    if blocks and not blocks[-1].closed:
        return ParsedOutput(False, text, [_reason("unclosed_code_block",
                                                  "A code block is not closed (truncated output?).")])
    return ParsedOutput(True, text)


def _normalise_markdown(text: str, blocks: list[CodeBlock]) -> str:
    """Trailing spaces off every line and at most one blank line in a row, code blocks untouched."""
    parts = []
    position = 0
    for block in blocks:
        parts += [_tidy_prose(text[position:block.start]), text[block.start:block.end]]
        position = block.end
    parts.append(_tidy_prose(text[position:]))
    return "".join(parts).strip()


def _tidy_prose(text: str) -> str:
    lines = text.split("\n")
    # Two trailing spaces before a line of text are a hard line break: kept, as exactly two.
    tidy = [line.rstrip() + ("  " if line.endswith("  ") and line.strip() and following.strip() else "")
            for line, following in zip(lines, [*lines[1:], ""])]
    return _BLANK_RUN.sub("\n\n", "\n".join(tidy))
