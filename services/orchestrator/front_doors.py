"""OpenAI- and Ollama-compatible front doors, so existing clients use the dispatcher unchanged.

`model: "auto"` dispatches (selection, retries, validation); a registered model name pins that
model. Task type and requirements come from headers (`X-Dispatch-Task-Type`,
`X-Dispatch-Complexity`, `X-Dispatch-Max-Retries`), with defaults. Unknown body fields are
ignored here, unlike the rest of the API: clients send many options this server has no use for.
Every call is recorded like POST /dispatch (request_queue, performance_logs), streams included.
A stream's last chunk carries a `dispatch` member (request id, `valid`, and `reasons` when not),
as a whole answer does: clients ignore members they do not know.
Errors stay problem+json, with the `error` member each protocol's clients read added.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

from flask import Response, request, stream_with_context
from flask.views import MethodView
from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate, validates_schema

from services.common.app import Blueprint, after_response, current_settings
from services.common.db import get_db
from services.common.errors import PROBLEM_CONTENT_TYPE, Unprocessable
from services.orchestrator import queries
from services.orchestrator.dispatch_api import dispatch_request_id, enqueue_sync
from services.orchestrator.dispatch_schemas import MODEL_REF, TASK_TYPES, Complexity, MessageSchema
from services.orchestrator.pipeline import check_admissible, run_sync_request, stream_dispatch
from services.orchestrator.schemas import MAX_TEXT_CHARS
from services.prompt_builder.formats import json_schema_problem

blp = Blueprint("front_doors", __name__, description="OpenAI- and Ollama-compatible front doors")

AUTO = "auto"
OLLAMA_VERSION = "0.6.3"
DEFAULT_TASK_TYPE = "conversation"
NDJSON = "application/x-ndjson"


class LenientSchema(Schema):
    class Meta:
        unknown = EXCLUDE


def _none_of(what: str) -> Callable[[list], None]:
    """A validator for a field clients may send empty but that the dispatcher cannot honour otherwise:
    refused rather than dropped, so that a client does not take a reply without them for one with them."""
    def check(values: list) -> None:
        if values:
            raise ValidationError(f"{what} are not supported by the dispatcher.")
    return check


class ChatMessageSchema(MessageSchema, LenientSchema):
    images = fields.List(fields.Raw(), allow_none=True, validate=_none_of("Images"))

    @post_load
    def _text_only(self, data: dict, **kwargs) -> dict:
        data.pop("images", None)
        return data


class Stop(fields.Field):
    """OpenAI's `stop`: one string or a list of up to 4, each ending the answer where it appears."""

    def _deserialize(self, value, attr, data, **kwargs) -> list[str]:
        value = [value] if isinstance(value, str) else value
        if not (isinstance(value, list) and len(value) <= 4
                and all(isinstance(item, str) and 0 < len(item) <= 100 for item in value)):
            raise ValidationError("Must be a string or a list of up to 4 strings of 1 to 100 characters.")
        return value


SEED = validate.Range(-(2**31), 2**31 - 1)


class OpenAIContent(fields.Field):
    """A message's content: text, or a list of text parts (joined); images and audio are not supported."""

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        if isinstance(value, list) and 0 < len(value) <= 100 and all(
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                for part in value):
            value = "".join(part["text"] for part in value)
        if not isinstance(value, str):
            raise ValidationError("Must be text, or a list of text parts.")
        if len(value) > MAX_TEXT_CHARS:
            raise ValidationError(f"Longer than maximum length {MAX_TEXT_CHARS}.")
        return value


class OpenAIMessageSchema(LenientSchema):
    role = fields.String(required=True, validate=validate.OneOf(("system", "developer", "user", "assistant")))
    content = OpenAIContent(required=True)

    @post_load
    def _developer_is_system(self, data: dict, **kwargs) -> dict:
        return {**data, "role": "system" if data["role"] == "developer" else data["role"]}


class ResponseFormatSchema(LenientSchema):
    type = fields.String(required=True, validate=validate.OneOf(("text", "json_object", "json_schema")))
    json_schema = fields.Dict()


class ChatSchema(LenientSchema):
    """A chat request of either protocol: it must end with a user turn."""

    @validates_schema
    def _last_is_user(self, data: dict, **kwargs) -> None:
        if data["messages"][-1]["role"] != "user":
            raise ValidationError("The last message must be a user message.", "messages")


class ChatCompletionSchema(ChatSchema):
    model = fields.String(required=True, validate=validate.Length(1, 130))
    messages = fields.List(fields.Nested(OpenAIMessageSchema), required=True, validate=validate.Length(1, 200))
    stream = fields.Boolean(load_default=False)
    max_tokens = fields.Integer(allow_none=True, validate=validate.Range(1, 8192))
    max_completion_tokens = fields.Integer(allow_none=True, validate=validate.Range(1, 8192))
    temperature = fields.Float(allow_none=True, validate=validate.Range(0, 2))
    seed = fields.Integer(allow_none=True, validate=SEED)
    stop = Stop(allow_none=True)
    n = fields.Integer(allow_none=True, validate=validate.Equal(1, error="Only one choice (n: 1) is supported."))
    response_format = fields.Nested(ResponseFormatSchema, allow_none=True)
    tools = fields.List(fields.Raw(), allow_none=True, validate=_none_of("Tools"))
    functions = fields.List(fields.Raw(), allow_none=True, validate=_none_of("Functions"))
    logprobs = fields.Boolean(allow_none=True, validate=validate.Equal(
        False, error="Log probabilities are not supported by the dispatcher."))


class OllamaOptionsSchema(LenientSchema):
    temperature = fields.Float(allow_none=True, validate=validate.Range(0, 2))
    num_predict = fields.Integer(allow_none=True, validate=validate.Range(-2, 8192))
    seed = fields.Integer(allow_none=True, validate=SEED)
    stop = fields.List(fields.String(validate=validate.Length(1, 100)), allow_none=True,
                       validate=validate.Length(max=8))


class OllamaFormat(fields.Field):
    """Ollama's `format`: "json", a JSON schema object, or nothing."""

    def _deserialize(self, value, attr, data, **kwargs):
        if value in ("", None) or value == "json" or isinstance(value, dict):
            return value or None
        raise ValidationError('Must be "json" or a JSON schema object.')


class OllamaChatSchema(ChatSchema):
    model = fields.String(required=True, validate=validate.Length(1, 130))
    messages = fields.List(fields.Nested(ChatMessageSchema), required=True, validate=validate.Length(1, 200))
    stream = fields.Boolean(load_default=True)
    format = OllamaFormat(load_default=None, metadata={"description": '"json" or a JSON schema'})
    options = fields.Nested(OllamaOptionsSchema, load_default=dict)
    tools = fields.List(fields.Raw(), allow_none=True, validate=_none_of("Tools"))


class OllamaGenerateSchema(LenientSchema):
    model = fields.String(required=True, validate=validate.Length(1, 130))
    prompt = fields.String(required=True, validate=validate.Length(1, 1_000_000))
    system = fields.String(validate=validate.Length(max=100_000))
    images = fields.List(fields.Raw(), allow_none=True, validate=_none_of("Images"))
    context = fields.List(fields.Raw(), allow_none=True, validate=_none_of("Context tokens"))
    raw = fields.Boolean(allow_none=True, validate=validate.Equal(
        False, error="Raw prompts are not supported: the dispatcher always applies its prompt template."))
    suffix = fields.String(allow_none=True, validate=validate.Length(
        max=0, error="Fill-in-the-middle (suffix) is not supported by the dispatcher."))
    stream = fields.Boolean(load_default=True)
    format = OllamaFormat(load_default=None, metadata={"description": '"json" or a JSON schema'})
    options = fields.Nested(OllamaOptionsSchema, load_default=dict)


class HeaderComplexity(Complexity):
    """Complexity from a header, where a number arrives as text."""

    def _deserialize(self, value, attr, data, **kwargs) -> int:
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
            value = int(value)
        return super()._deserialize(value, attr, data, **kwargs)


class DispatchHeadersSchema(LenientSchema):
    task_type = fields.String(data_key="X-Dispatch-Task-Type", load_default=DEFAULT_TASK_TYPE,
                              validate=validate.OneOf(TASK_TYPES))
    complexity = HeaderComplexity(data_key="X-Dispatch-Complexity", load_default=1)
    max_retries = fields.Integer(data_key="X-Dispatch-Max-Retries", load_default=2, validate=validate.Range(0, 5))


# Instances: given a class, webargs would build a schema per request (half a millisecond each).
DISPATCH_HEADERS = DispatchHeadersSchema()
CHAT_COMPLETION = ChatCompletionSchema()
OLLAMA_CHAT = OllamaChatSchema()
OLLAMA_GENERATE = OllamaGenerateSchema()

# --- OpenAI ----------------------------------------------------------------------------------

@blp.route("/v1/chat/completions")
class ChatCompletions(MethodView):
    @blp.arguments(DISPATCH_HEADERS, location="headers")
    @blp.arguments(CHAT_COMPLETION)
    @blp.response(200, content_type="application/json")
    @blp.alt_response(200, content_type="text/event-stream", success=True, description="stream: true")
    def post(self, headers, body):
        """OpenAI chat completions; `model: "auto"` lets the dispatcher choose."""
        output_format, json_schema = _openai_format(body.get("response_format"))
        dispatch = _dispatch_request(headers, body, messages=body["messages"], output_format=output_format,
                                     json_schema=json_schema,
                                     max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
                                     temperature=body.get("temperature"), seed=body.get("seed"),
                                     stop=body.get("stop"))
        if body["stream"]:
            return _streamed(dispatch, _sse_lines, "text/event-stream")
        result = _run(dispatch)
        return _openai_completion(result)


@blp.route("/v1/models")
class OpenAIModels(MethodView):
    @blp.response(200, content_type="application/json")
    def get(self):
        """The models a client may name: "auto" and every active model (name:version)."""
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(created), "owned_by": "dispatcher"}
            for name, created in _model_names()]}


# --- Ollama ----------------------------------------------------------------------------------

@blp.route("/api/chat")
class OllamaChat(MethodView):
    @blp.arguments(DISPATCH_HEADERS, location="headers")
    @blp.arguments(OLLAMA_CHAT)
    @blp.response(200, content_type="application/json")
    @blp.alt_response(200, content_type="application/x-ndjson", success=True, description="stream: true")
    def post(self, headers, body):
        """Ollama chat (NDJSON stream by default); model "auto" lets the dispatcher choose."""
        dispatch = _dispatch_request(headers, body, messages=body["messages"], **_ollama_options(body))
        if body["stream"]:
            return _streamed(dispatch, _ndjson_lines(body["model"], chat=True), NDJSON)
        return _ollama_answer(_run(dispatch), body["model"], chat=True)


@blp.route("/api/generate")
class OllamaGenerate(MethodView):
    @blp.arguments(DISPATCH_HEADERS, location="headers")
    @blp.arguments(OLLAMA_GENERATE)
    @blp.response(200, content_type="application/json")
    @blp.alt_response(200, content_type="application/x-ndjson", success=True, description="stream: true")
    def post(self, headers, body):
        """Ollama generate (NDJSON stream by default); model "auto" lets the dispatcher choose."""
        messages = ([{"role": "system", "content": body["system"]}] if body.get("system") else []) + \
                   [{"role": "user", "content": body["prompt"]}]
        dispatch = _dispatch_request(headers, body, messages=messages, **_ollama_options(body))
        if body["stream"]:
            return _streamed(dispatch, _ndjson_lines(body["model"], chat=False), NDJSON)
        return _ollama_answer(_run(dispatch), body["model"], chat=False)


@blp.route("/api/tags")
class OllamaTags(MethodView):
    @blp.response(200, content_type="application/json")
    def get(self):
        """The models a client may name, in Ollama's shape."""
        return {"models": [_ollama_model(name, created) for name, created in _model_names()]}


@blp.route("/api/ps")
class OllamaRunning(MethodView):
    @blp.response(200, content_type="application/json")
    def get(self):
        """Models with a running runtime, in Ollama's shape."""
        with get_db().connection() as conn:
            rows = queries.running_models(conn)
        return {"models": [{**_ollama_model(f"{row['name']}:{row['version']}", row["started"]),
                            "size_vram": 0, "expires_at": None} for row in rows]}


@blp.route("/api/version")
class OllamaVersion(MethodView):
    @blp.response(200, content_type="application/json")
    def get(self):
        """The Ollama API version this front door speaks."""
        return {"version": OLLAMA_VERSION}


def ollama_bodies_as_json(wsgi_app: Callable) -> Callable:
    """WSGI middleware: the Ollama API reads a body as JSON whatever its Content-Type (its own curl
    examples send none), so its paths here do too."""
    def app(environ: dict, start_response: Callable):
        if environ.get("REQUEST_METHOD") == "POST" and environ.get("PATH_INFO", "").startswith("/api/"):
            environ["CONTENT_TYPE"] = "application/json"
        return wsgi_app(environ, start_response)
    return app


# --- shared ----------------------------------------------------------------------------------

def _dispatch_request(headers: dict, body: dict, *, messages: list[dict], output_format: str = "text",
                      json_schema: dict | None = None, max_tokens: int | None = None,
                      temperature: float | None = None, seed: int | None = None,
                      stop: list[str] | None = None) -> dict:
    """The stored form of a dispatch (the same payload POST /dispatch stores). Without `max_tokens`,
    as in both APIs, the answer is as long as the model makes it (within the request's timeout)."""
    model = body["model"].removesuffix(":latest")
    if model != AUTO and not _is_model_ref(model):
        raise Unprocessable(f"model {body['model']!r} is neither 'auto' nor a model name.",
                            errors={"json": {"model": ["Unknown model name syntax."]}})
    if json_schema is not None and (problem := json_schema_problem(json_schema)):
        raise Unprocessable(problem)
    payload = {
        "task_type": headers["task_type"], "complexity": headers["complexity"],
        "max_retries": headers["max_retries"], "messages": messages, "output_format": output_format,
        "json_schema": json_schema, "variables": {}, "max_tokens": max_tokens,
        "temperature": temperature, "seed": seed, "stop": stop or [], "priority": 100, "requirements": {},
        "timeout_s": 120.0, "model": None if model == AUTO else model, "callback_url": None,
    }
    check_admissible(payload, current_settings())
    return payload


def _run(payload: dict) -> dict:
    """Record and run the request like POST /dispatch does."""
    return run_sync_request(get_db(), current_settings(), dispatch_request_id(), payload,
                            after_answer=after_response)


def _streamed(payload: dict, to_lines: Callable[[dict, Iterator[dict]], Iterator[str]], mimetype: str) -> Response:
    """Record and stream the request; problems before the first token are HTTP errors, as for `_run`."""
    row = enqueue_sync(dispatch_request_id(), payload)
    events = stream_dispatch(get_db(), current_settings(), row, owner=row["lease_owner"])
    start = next(events)        # the model has started answering, or a Problem was raised

    def body() -> Iterator[str]:
        try:
            yield from to_lines(start, events)
        finally:
            events.close()      # a client gone mid-stream: release the runtime, end the request

    response = Response(stream_with_context(body()), mimetype=mimetype,
                        headers={"Cache-Control": "no-cache", "X-Dispatch-Model": start["model"]})
    response.call_on_close(events.close)   # also when the server closes the body before reading any of it
    return response


def _sse_lines(start: dict, events: Iterator[dict]) -> Iterator[str]:
    for chunk in _openai_chunks(start, events):
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def _openai_chunks(start: dict, events: Iterator[dict]) -> Iterator[dict]:
    base = {"id": f"chatcmpl-{start['request_id']}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": start["model"]}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    for event in events:
        if "text" in event:
            yield {**base, "choices": [{"index": 0, "delta": {"content": event["text"]}, "finish_reason": None}]}
        elif "error" in event:   # the OpenAI client raises on an error chunk
            yield {"error": _openai_error(event["error"]["status"], event["error"]["detail"])}
        else:
            yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": event["finish_reason"]}],
                   "usage": _usage(event["tokens"]), "dispatch": _stream_verdict(start, event)}


def _stream_verdict(start: dict, end: dict) -> dict:
    """What a stream's last chunk says of the answer: it could not be repaired, only judged."""
    return {"request_id": start["request_id"], "valid": end["valid"],
            **({} if end["valid"] else {"reasons": end["reasons"]})}


def _openai_completion(result: dict) -> dict:
    return {
        "id": f"chatcmpl-{result['request_id']}", "object": "chat.completion", "created": int(time.time()),
        "model": f"{result['model']['name']}:{result['model']['version']}",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": _content(result)},
                     "finish_reason": result["finish_reason"] or "stop"}],
        "usage": _usage(result["tokens"]),
        "dispatch": {"request_id": result["request_id"], "valid": result["valid"], "timings": result["timings"],
                     "decision": result["decision"]},
    }


def _content(result: dict) -> str:
    """The answer's text; for JSON output the validated value, without the prose around it."""
    if result["output_format"] == "json" and result["valid"]:
        return json.dumps(result["response"])
    return result["raw"]


def _usage(tokens: dict) -> dict:
    prompt, completion = tokens.get("input") or 0, tokens.get("output") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _openai_format(response_format: dict | None) -> tuple[str, dict | None]:
    if not response_format or response_format["type"] == "text":
        return "text", None
    if response_format["type"] == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return "json", schema if isinstance(schema, dict) else None
    return "json", None


def _ollama_options(body: dict) -> dict:
    options = body.get("options") or {}
    fmt = body.get("format")
    num_predict = options.get("num_predict")
    return {"output_format": "json" if fmt else "text", "json_schema": fmt if isinstance(fmt, dict) else None,
            "max_tokens": num_predict if num_predict and num_predict > 0 else None,
            "temperature": options.get("temperature"), "seed": options.get("seed"), "stop": options.get("stop")}


def _ndjson_lines(requested_model: str, *, chat: bool) -> Callable[[dict, Iterator[dict]], Iterator[str]]:
    def lines(start: dict, events: Iterator[dict]) -> Iterator[str]:
        for event in events:
            if "text" in event:
                line = _ollama_part(requested_model, event["text"], chat=chat)
            elif "error" in event:   # Ollama's own way to end a broken stream; its clients raise on it
                line = {"error": event["error"]["detail"]}
            else:
                line = {**_ollama_done(requested_model, "", event, chat=chat),
                        "dispatch": _stream_verdict(start, event)}
            yield json.dumps(line) + "\n"

    return lines


def _ollama_answer(result: dict, requested_model: str, *, chat: bool) -> dict:
    end = {"finish_reason": result["finish_reason"], "tokens": result["tokens"], "timings": result["timings"]}
    return {**_ollama_done(requested_model, _content(result), end, chat=chat),
            "dispatch": {"request_id": result["request_id"], "valid": result["valid"],
                         "model": f"{result['model']['name']}:{result['model']['version']}",
                         "decision": result["decision"]}}


def _ollama_part(model: str, text: str, *, chat: bool) -> dict:
    part = {"model": model, "created_at": _now(), "done": False}
    if chat:
        part["message"] = {"role": "assistant", "content": text}
    else:
        part["response"] = text
    return part


def _ollama_done(model: str, text: str, end: dict, *, chat: bool) -> dict:
    tokens, timings = end["tokens"], end.get("timings") or {}
    ns = 1_000_000
    return {**_ollama_part(model, text, chat=chat), "done": True, "done_reason": end["finish_reason"] or "stop",
            "total_duration": int((timings.get("total_ms") or 0) * ns),
            "load_duration": int((timings.get("cold_start_ms") or 0) * ns),
            "prompt_eval_count": tokens.get("input") or 0, "eval_count": tokens.get("output") or 0,
            "eval_duration": int((timings.get("generation_ms") or 0) * ns)}


def _ollama_model(name: str, created) -> dict:
    return {"name": name, "model": name, "modified_at": _iso(created), "size": 0, "digest": "",
            "details": {"format": "gguf", "family": name.split(":")[0], "families": None,
                        "parameter_size": "", "quantization_level": ""}}


def _model_names() -> list[tuple[str, object]]:
    """"auto" and the active models this orchestrator can run (its runtime drivers)."""
    with get_db().connection() as conn:
        rows = queries.active_models(conn, current_settings().runtime_drivers)
    return [(AUTO, 0)] + [(f"{row['name']}:{row['version']}", row["created_at"].timestamp()) for row in rows]


def _iso(moment) -> str:
    if isinstance(moment, (int, float)):
        moment = datetime.fromtimestamp(moment, timezone.utc)
    return moment.isoformat()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _is_model_ref(value: str) -> bool:
    return re.fullmatch(MODEL_REF, value) is not None


@blp.after_request
def _add_client_error(response: Response) -> Response:
    """Problems carry the `error` member OpenAI and Ollama clients show (Ollama's a string)."""
    if response.mimetype != PROBLEM_CONTENT_TYPE:
        return response
    problem = response.get_json()
    if request.path.startswith("/v1/"):
        problem["error"] = _openai_error(problem["status"], problem["detail"])
    else:
        problem["error"] = problem["detail"]
    response.set_data(json.dumps(problem))
    return response


def _openai_error(status: int, detail: str) -> dict:
    return {"message": detail, "type": "invalid_request_error" if status < 500 else "server_error",
            "code": status}
