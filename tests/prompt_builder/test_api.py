"""The prompt builder's HTTP endpoints, whole bodies."""
from __future__ import annotations

import uuid

import pytest

from services.prompt_builder import create_app
from tests.prompt_builder.conftest import real_output

TASKS = "text-generation, code-generation, question-answering, conversation, summarization, classification"
INVALID = "The request is invalid: see errors for each field."
LOOKAHEAD_SCHEMA = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^(?!test-)"}}}
LOOKAHEAD_PROBLEM = ("json_schema has a pattern at /properties/id/pattern that RE2 cannot compile: '^(?!test-)' "
                     "(invalid perl operator: (?!). Patterns run on RE2, in linear time, which has no lookahead, "
                     "lookbehind or backreferences.")


def problem(response, status: int, detail: str, **members) -> dict:
    titles = {404: "Not Found", 409: "Conflict", 413: "Request Entity Too Large", 422: "Unprocessable Entity"}
    return {"type": "about:blank", "title": titles[status], "status": status, "detail": detail,
            "request_id": response.headers["X-Request-ID"], **members}


def template_id(client, task_type: str, family: str, version: int = 1) -> str:
    items = client.get(f"/templates?task_type={task_type}&model_family={family}").get_json()["items"]
    return next(item["id"] for item in items if item["version"] == version)


# --- templates -----------------------------------------------------------------------------------

def test_list_filters_and_pages(client):
    response = client.get("/templates?task_type=code-generation&active=true&limit=2&offset=1")
    assert response.status_code == 200
    body = response.get_json()
    assert [(item["model_family"], item["version"]) for item in body["items"]] == [
        ("default", 1), ("smollm2", 1)]
    assert {key: body[key] for key in ("total", "limit", "offset")} == {"total": 4, "limit": 2, "offset": 1}
    assert client.get("/templates").get_json()["total"] == 23
    assert client.get("/templates?model_family=gemma3&active=false").get_json() == {
        "items": [], "total": 0, "limit": 50, "offset": 0}


@pytest.mark.parametrize("query, errors", [
    ("task_type=translation", {"task_type": [
        "Must be one of: default, " + TASKS + "."]}),
    ("limit=0&offset=-1", {"limit": ["Must be greater than or equal to 1 and less than or equal to 100."],
                           "offset": ["Must be greater than or equal to 0 and less than or equal to 1000000."]}),
    ("model_family=Bad%20Family", {"model_family": ["String does not match expected pattern."]}),
])
def test_list_rejects_bad_filters(client, query, errors):
    response = client.get(f"/templates?{query}")
    assert (response.status_code, response.get_json()) == (
        422, problem(response, 422, INVALID, errors={"query": errors}))


def test_get_one_and_not_found(client):
    found = client.get("/templates?task_type=default").get_json()["items"][0]
    response = client.get(f"/templates/{found['id']}")
    assert response.status_code == 200
    assert response.get_json() == {**found, "task_type": "default", "model_family": "default", "version": 1,
                                   "system_template": "You are a helpful assistant.",
                                   "user_template": "{prompt}\n\n{format_instructions}",
                                   "description": "Global fallback for any task and model", "active": True,
                                   "placeholders": ["prompt", "format_instructions"]}
    missing = str(uuid.uuid4())
    response = client.get(f"/templates/{missing}")
    assert (response.status_code, response.get_json()) == (
        404, problem(response, 404, f"No prompt template has id {missing}."))


def test_create_then_conflict(client):
    body = {"task_type": "classification", "model_family": "phi3", "system_template": "Labels: {labels}",
            "user_template": "{prompt}", "description": "Phi-3 classifier"}
    response = client.post("/templates", json=body)
    assert response.status_code == 201
    created = response.get_json()
    assert created == {**body, "id": created["id"], "created_at": created["created_at"], "version": 1,
                       "active": True, "placeholders": ["labels", "prompt"]}
    response = client.post("/templates", json={"task_type": "classification", "model_family": "phi3",
                                                "user_template": "Other {prompt}"})
    assert (response.status_code, response.get_json()) == (409, problem(
        response, 409, f"A template for (classification, phi3) exists; PATCH /templates/{created['id']} "
                       "to add a version.", template_id=created["id"]))


@pytest.mark.parametrize("body, errors", [
    ({"task_type": "default", "user_template": "{prompt} {secret}", "system_template": "{model.name}"}, {
        "user_template": ["unknown placeholder {secret}; allowed: prompt, format_instructions, task_type, "
                          "model, model_family, context, language, labels, examples, history"],
        "system_template": ["{model.name} is not a plain name (no attribute or index access, "
                            "no positional fields)"]}),
    ({"task_type": "default", "user_template": "{context}"}, {
        "user_template": ["the user template must contain {prompt}"]}),
    ({"task_type": "default", "user_template": "{prompt} {"}, {
        "user_template": ["unbalanced braces (Single '{' encountered in format string); write a literal "
                          "brace as {{ or }}"]}),
    ({"task_type": "chat", "model_family": "A B", "user_template": "", "extra": 1}, {
        "task_type": ["Must be one of: default, " + TASKS + "."],
        "model_family": ["String does not match expected pattern."],
        "user_template": ["Length must be between 1 and 20000.", "the user template must contain {prompt}"],
        "extra": ["Unknown field."]}),
    ({"task_type": "default", "model_family": "llama2", "user_template": "{prompt}"}, {
        "model_family": ["A model family's template needs a task type: with task_type default, "
                         "model_family must be default."]}),
])
def test_create_validates_templates(client, body, errors):
    response = client.post("/templates", json=body)
    assert (response.status_code, response.get_json()) == (
        422, problem(response, 422, INVALID, errors={"json": errors}))


def test_patch_creates_a_new_version_and_the_old_one_stays_readable(client):
    v1_id = template_id(client, "text-generation", "llama2")
    v1 = client.get(f"/templates/{v1_id}").get_json()
    response = client.patch(f"/templates/{v1_id}", json={"user_template": "Please: {prompt} {format_instructions}"})
    assert response.status_code == 201
    v2 = response.get_json()
    assert v2 == {**v1, "id": v2["id"], "created_at": v2["created_at"], "version": 2,
                  "user_template": "Please: {prompt} {format_instructions}"}
    assert v2["id"] != v1_id
    assert client.get(f"/templates/{v1_id}").get_json() == {**v1, "active": False}
    built = client.post("/prompts/build", json={"prompt": "Hi", "task_type": "text-generation",
                                                "model": "llama2:13b"}).get_json()
    assert built["template"] == {"id": v2["id"], "task_type": "text-generation", "model_family": "llama2",
                                 "version": 2}
    # Toggling v1 back on is a 200 on the same version, and v2 goes inactive.
    response = client.patch(f"/templates/{v1_id}", json={"active": True})
    assert (response.status_code, response.get_json()) == (200, v1)
    assert client.get(f"/templates/{v2['id']}").get_json()["active"] is False


@pytest.mark.parametrize("body, errors", [
    ({}, {"_schema": ["Give at least one of system_template, user_template, description, active."]}),
    ({"user_template": "{language}", "version": 7}, {"user_template": ["the user template must contain {prompt}"],
                                                     "version": ["Unknown field."]}),
])
def test_patch_validates(client, body, errors):
    v1_id = template_id(client, "text-generation", "llama2")
    response = client.patch(f"/templates/{v1_id}", json=body)
    assert (response.status_code, response.get_json()) == (
        422, problem(response, 422, INVALID, errors={"json": errors}))


def test_patch_conflicts_and_not_found(client):
    response = client.patch(f"/templates/{template_id(client, 'default', 'default')}", json={"active": False})
    assert (response.status_code, response.get_json()) == (409, problem(
        response, 409, "The global default template cannot be deactivated; activate another version of "
                       "it instead."))
    missing = str(uuid.uuid4())
    response = client.patch(f"/templates/{missing}", json={"active": False})
    assert (response.status_code, response.get_json()) == (
        404, problem(response, 404, f"No prompt template has id {missing}."))


# --- building --------------------------------------------------------------------------------------

def test_build(client):
    schema = {"type": "object", "required": ["answer"]}
    response = client.post("/prompts/build", json={
        "prompt": "What is {2+2}?", "task_type": "question-answering", "model": "orca-mini:3b",
        "protocol": "ollama", "output_format": "json", "json_schema": schema})
    assert response.status_code == 200
    system = "You are an AI assistant that follows instructions extremely well. Help as much as you can."
    user = ("### Question:\nWhat is {2+2}?\n\nRespond with only valid JSON: no prose before or after it, "
            'no code fences. The JSON must conform to this JSON Schema:\n{"required": ["answer"], "type": "object"}')
    assert response.get_json() == {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "prompt": f"{system}\n\n{user}",
        "options": {"format": schema},
        "template": {"id": template_id(client, "question-answering", "orca-mini"),
                     "task_type": "question-answering", "model_family": "orca-mini", "version": 1},
        "output_format": "json",
    }


@pytest.mark.parametrize("body, errors", [
    ({"prompt": "", "task_type": "translation", "model": "llama2:13b", "output_format": "yaml",
      "protocol": "grpc"}, {
        "prompt": ["Shorter than minimum length 1."],
        "task_type": ["Must be one of: " + TASKS + "."],
        "output_format": ["Must be one of: json, markdown, code, text."],
        "protocol": ["Must be one of: ollama, openai."]}),
    ({"prompt": "x", "task_type": "conversation", "model": "a b", "variables": {"secret": "x", "context": 1}}, {
        "model": ["String does not match expected pattern."],
        "variables": {"secret": ["Unknown field."], "context": ["Not a valid string."]}}),
    ({"prompt": "x", "task_type": "conversation", "model": "phi3", "output_format": "json",
      "json_schema": {"type": "object", "minProperties": -1}}, {
        "json_schema": ["json_schema is not a valid JSON Schema (Draft 2020-12): -1 is less than the "
                        "minimum of 0"]}),
    ({"prompt": "x", "task_type": "conversation", "model": "phi3", "output_format": "json",
      "json_schema": LOOKAHEAD_SCHEMA}, {"json_schema": [LOOKAHEAD_PROBLEM]}),
    ({"task_type": "conversation", "model": "phi3", "max_prompt_chars": 10**9}, {
        "prompt": ["Missing data for required field."], "max_prompt_chars": ["Unknown field."]}),
])
def test_build_rejects_bad_requests(client, body, errors):
    response = client.post("/prompts/build", json=body)
    assert (response.status_code, response.get_json()) == (
        422, problem(response, 422, INVALID, errors={"json": errors}))


def test_build_names_missing_variables(client):
    client.post("/templates", json={"task_type": "question-answering", "model_family": "phi3",
                                    "user_template": "Context: {context}\n\n{prompt}"})
    response = client.post("/prompts/build", json={"prompt": "Why?", "task_type": "question-answering",
                                                   "model": "phi3:mini"})
    assert (response.status_code, response.get_json()) == (422, problem(
        response, 422, "Missing template variable(s): context.", missing=["context"]))


def test_build_bounds_the_prompt_size(make_app):
    client = make_app(create_app, MAX_PROMPT_CHARS=50).test_client()
    response = client.post("/prompts/build", json={"prompt": "x" * 51, "task_type": "conversation",
                                                   "model": "phi3"})
    assert (response.status_code, response.get_json()) == (413, problem(
        response, 413, "The prompt is 51 characters; the limit is 50.", limit=50, size=51))


# --- parsing ---------------------------------------------------------------------------------------

def test_parse_valid_and_invalid_real_outputs(client):
    response = client.post("/responses/parse", json={"raw": real_output("json_fenced"), "output_format": "json",
                                                     "json_schema": {"required": ["title", "author"]}})
    assert (response.status_code, response.get_json()) == (200, {
        "valid": False, "value": {"title": "1984", "year": 1940}, "language": None,
        "reasons": [{"code": "schema_violation", "message": "'author' is a required property", "path": ""}]})
    response = client.post("/responses/parse", json={"raw": real_output("code_python"), "output_format": "code"})
    assert (response.status_code, response.get_json()) == (200, {
        "valid": True, "value": "def add(a, b):\n    return a + b", "language": "python", "reasons": []})
    response = client.post("/responses/parse", json={"raw": real_output("json_truncated"), "output_format": "json"})
    assert (response.status_code, response.get_json()) == (200, {
        "valid": False, "value": None, "language": None, "reasons": [{
            "code": "json_syntax",
            "message": "The JSON does not parse: Unterminated string starting at: line 3 column 10 (char 29)"}]})
    response = client.post("/responses/parse", json={"raw": "", "output_format": "text"})
    assert (response.status_code, response.get_json()) == (200, {
        "valid": False, "value": "", "language": None,
        "reasons": [{"code": "empty_output", "message": "The model returned no content."}]})


@pytest.mark.parametrize("body, errors", [
    ({"raw": "x", "output_format": "yaml"}, {"output_format": ["Must be one of: json, markdown, code, text."]}),
    ({"output_format": "json", "json_schema": []}, {"raw": ["Missing data for required field."],
                                                    "json_schema": ["Not a valid mapping type."]}),
    ({"raw": "{}", "output_format": "json", "json_schema": {"type": "nope"}}, {
        "json_schema": ["json_schema is not a valid JSON Schema (Draft 2020-12): 'nope' is not valid under "
                        "any of the given schemas"]}),
    ({"raw": '{"id": "x"}', "output_format": "json", "json_schema": LOOKAHEAD_SCHEMA},
     {"json_schema": [LOOKAHEAD_PROBLEM]}),
    ({"raw": "x" * 500_001, "output_format": "text"}, {"raw": ["Longer than maximum length 500000."]}),
])
def test_parse_rejects_bad_requests(client, body, errors):
    response = client.post("/responses/parse", json=body)
    assert (response.status_code, response.get_json()) == (
        422, problem(response, 422, INVALID, errors={"json": errors}))


@pytest.mark.parametrize("code, reasons", [
    ("EUR-2024", []),
    ("eur-2024", [{"code": "schema_violation", "path": "/code",
                   "message": "'eur-2024' does not match '^[A-Z]{3}-[0-9]{4}$'"}]),
])
def test_parse_checks_patterns(client, code, reasons):
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}}
    response = client.post("/responses/parse", json={"raw": f'{{"code": "{code}"}}', "output_format": "json",
                                                     "json_schema": schema})
    assert (response.status_code, response.get_json()) == (200, {
        "valid": not reasons, "value": {"code": code}, "language": None, "reasons": reasons})


def test_parse_with_an_unresolvable_reference_is_a_422(client):
    response = client.post("/responses/parse", json={"raw": "{}", "output_format": "json",
                                                     "json_schema": {"$ref": "#/$defs/missing"}})
    assert response.status_code == 422
    assert response.get_json()["errors"] == {
        "json": {"json_schema": ["json_schema has a $ref that leads nowhere: '#/$defs/missing'."]}}
