"""The service app core: problem+json errors, request ids, auth on and off, health, metrics."""
from __future__ import annotations

from http import HTTPStatus

import pytest
from flask.views import MethodView
from marshmallow import Schema, fields, validate

from services.common import errors
from services.common.app import Blueprint, ServiceFlask, after_response, create_service_app
from services.common.db import get_db

PROBLEM = "application/problem+json"
DONE_AFTER_RESPONSE: list[str] = []


class ItemSchema(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=10))


def make_blueprint() -> Blueprint:
    blp = Blueprint("items", __name__)

    @blp.route("/items")
    class Items(MethodView):
        @blp.arguments(ItemSchema)
        @blp.response(201, ItemSchema)
        def post(self, item):
            return item

    @blp.route("/conflict")
    def conflict():
        raise errors.Conflict("Already there.", existing_id="abc")

    @blp.route("/duplicate")
    def duplicate():
        with get_db().connection() as conn:
            conn.execute("CREATE TEMP TABLE t (x int UNIQUE)")
            conn.execute("INSERT INTO t VALUES (1), (1)")

    @blp.route("/boom")
    def boom():
        raise RuntimeError("secret internals")

    @blp.route("/later")
    def later():
        after_response(lambda: DONE_AFTER_RESPONSE.append("first"))
        after_response(lambda: 1 / 0)
        after_response(lambda: DONE_AFTER_RESPONSE.append("after a failed one"))
        return {"done": list(DONE_AFTER_RESPONSE)}

    return blp


@pytest.fixture
def client(db, database_url):
    def build(**config):
        app = create_service_app("test", "Test", [make_blueprint()],
                                 {"TESTING": True, "DATABASE": db, "API_TOKEN": "", **config})
        return app.test_client()
    return build


def problem(response, status, detail, **extra):
    """The whole expected problem body, with the request id the response carries."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
            "detail": detail, "request_id": response.headers["X-Request-ID"], **extra}
    return body


def test_validation_errors_are_problems_with_field_messages(client):
    response = client().post("/items", json={"name": "", "colour": "red"})
    assert response.status_code == 422
    assert response.content_type == PROBLEM
    assert response.get_json() == problem(
        response, 422, "The request is invalid: see errors for each field.",
        errors={"json": {"name": ["Length must be between 1 and 10."], "colour": ["Unknown field."]}})


def test_raised_problem_carries_its_extensions(client):
    response = client().get("/conflict")
    assert response.status_code == 409
    assert response.get_json() == problem(response, 409, "Already there.", existing_id="abc")


def test_unique_violation_becomes_409(client):
    response = client().get("/duplicate")
    assert response.status_code == 409
    assert response.get_json() == problem(
        response, 409, "A resource with these unique fields already exists.", constraint="t_x_key")


def test_unexpected_error_is_a_logged_500_without_internals(client, caplog):
    response = client().get("/boom")
    assert response.status_code == 500
    assert response.get_json() == problem(response, 500, "An unexpected error occurred; it has been logged.")
    assert "secret internals" not in response.get_data(as_text=True)
    assert any(record.exc_info for record in caplog.records)


@pytest.mark.parametrize("method, path, kwargs, status", [
    ("get", "/nowhere", {}, 404),
    ("delete", "/items", {}, 405),
    ("post", "/items", {"data": "name=x", "content_type": "application/x-www-form-urlencoded"}, 415),
    ("post", "/items", {"data": "{not json", "content_type": "application/json"}, 400),
])
def test_http_errors_are_problems(client, method, path, kwargs, status):
    response = getattr(client(), method)(path, **kwargs)
    assert response.status_code == status
    assert response.content_type == PROBLEM
    body = response.get_json()
    assert body["status"] == status and body["request_id"] == response.headers["X-Request-ID"]


def test_oversized_body_is_413(client):
    response = client(MAX_REQUEST_BYTES=100).post("/items", json={"name": "x" * 200})
    assert response.status_code == 413
    assert response.get_json()["status"] == 413


@pytest.mark.parametrize("body, status", [
    ('{"name": "a\\u0000"}', 422),            # a NUL: no text or jsonb column can hold it
    ('{"name": "a\\\\u0000"}', 201),         # a backslash, then "u0000": plain text
    ('{"name": "a\\\\\\u0000"}', 422),     # a backslash, then a NUL
])
def test_a_nul_character_in_a_body_is_a_422(client, body, status):
    response = client().post("/items", data=body, content_type="application/json")
    assert response.status_code == status
    if status == 422:
        assert response.get_json() == problem(
            response, 422, "Strings cannot contain the character U+0000: the database cannot store it.")


@pytest.mark.parametrize("body, status", [
    ('{"name": "a\\ud800"}', 422),             # an unpaired high surrogate
    ('{"name": "a\\udfff"}', 422),             # an unpaired low one
    ('{"x": {"\\udc00": 1}, "name": "a"}', 422),  # in a key, nested
    (b'{"name": "a\xed\xa0\x80"}', 400),      # in its UTF-8 form: not UTF-8 at all
    ('{"name": "a\\ud800"}'.encode("utf-16"), 400),    # bodies are UTF-8 (json reads UTF-16 too)
    ('{"name": "a\\u0000"}'.encode("utf-16-le"), 400),
    ('{"name": "\\ud83d\\ude00"}', 201),      # a pair: one character
    ('{"name": "\\\\ud800"}', 201),          # a backslash, then "ud800": plain text
    ('{"name": "\ud55c\uad6d"}', 201),         # Hangul, whose UTF-8 starts as a surrogate's does
])
def test_an_unpaired_surrogate_in_a_body_is_a_422(client, body, status):
    response = client().post("/items", data=body, content_type="application/json")
    assert response.status_code == status, response.get_json()
    if status == 422:
        assert response.get_json() == problem(
            response, 422, "Strings cannot contain unpaired surrogates (\\ud800 to \\udfff): they are not Unicode text.")


def test_json_nested_too_deeply_to_read_is_a_400(client):
    response = client().post("/items", data='{"name": ' + "[" * 5000 + "]" * 5000 + "}",
                             content_type="application/json")
    assert response.get_json() == {**problem(response, 400, "The body is not valid JSON: nested too deeply: line 1 "
                                                            "column 1 (char 0)."),
                                   "errors": {"json": ["Invalid JSON body."]}}


def test_an_integer_too_long_for_python_to_read_is_a_400(client):
    response = client().post("/items", data='{"name": "a", "n": ' + "9" * 5000 + "}",
                             content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["detail"].startswith("The body is not valid JSON: Exceeds the limit (4300 digits)")


@pytest.mark.parametrize("path", ["/conflict?q=a%00b", "/conflict%00"])
def test_a_nul_character_in_the_path_or_query_is_a_422(client, path):
    response = client().get(path)
    assert response.status_code == 422
    assert response.content_type == PROBLEM


def test_request_id_is_echoed_or_generated(client):
    c = client()
    assert c.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    generated = c.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["X-Request-ID"]
    assert generated != "bad id with spaces" and len(generated) == 36


def test_without_a_token_configured_everything_is_open(client):
    assert client().post("/items", json={"name": "a"}).status_code == 201


def test_with_a_token_every_endpoint_but_health_needs_it(client):
    c = client(API_TOKEN="s3cret")
    denied = c.post("/items", json={"name": "a"})
    assert denied.status_code == 401
    assert denied.headers["WWW-Authenticate"] == 'Bearer realm="dispatcher"'
    assert denied.get_json() == problem(
        denied, 401, "A valid bearer token is required (Authorization: Bearer <token>).")
    assert c.get("/openapi.json").status_code == 401
    assert c.post("/items", json={"name": "a"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.post("/items", json={"name": "a"}, headers={"Authorization": "Bearer s3cret"}).status_code == 201
    for public in ("/healthz", "/readyz", "/metrics"):
        assert c.get(public).status_code == 200


def test_health_readiness_and_openapi(client):
    c = client()
    assert c.get("/healthz").get_json() == {"status": "ok", "service": "test"}
    assert c.get("/readyz").get_json() == {"status": "ready", "service": "test"}
    spec = c.get("/openapi.json").get_json()
    assert spec["openapi"] == "3.0.3"
    assert set(spec["paths"]) >= {"/healthz", "/readyz", "/metrics", "/items"}
    default_error = spec["components"]["responses"]["DEFAULT_ERROR"]
    assert list(default_error["content"]) == [PROBLEM]


def test_readiness_is_503_when_the_database_is_unreachable(db):
    app = create_service_app("test", "Test", [], {
        "TESTING": True, "API_TOKEN": "", "DB_POOL_TIMEOUT_S": 0.5,
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1"})
    try:
        response = app.test_client().get("/readyz")
    finally:
        app.extensions["database"].close()
    assert response.status_code == 503
    assert response.get_json()["detail"] == "No database connection is available."


def test_metrics_count_requests_per_endpoint(client):
    c = client()
    c.post("/items", json={"name": "a"})
    text = c.get("/metrics").get_data(as_text=True)
    assert 'dispatcher_http_requests_total{endpoint="/items",method="POST",service="test",status="201"}' in text
    assert 'dispatcher_http_request_duration_seconds_bucket{endpoint="/items"' in text


def test_jobs_after_a_response_run_once_it_is_closed_in_order_and_a_failure_is_only_logged(client, caplog):
    DONE_AFTER_RESPONSE.clear()
    response = client().get("/later", buffered=False)
    assert (response.status_code, response.get_json(), DONE_AFTER_RESPONSE) == (200, {"done": []}, [])

    response.close()

    assert DONE_AFTER_RESPONSE == ["first", "after a failed one"]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["a job run after the response failed"]


def test_views_and_hooks_are_called_as_they_are_and_a_coroutine_still_goes_through_flask():
    app = ServiceFlask(__name__)

    class View(MethodView):
        def get(self):
            return "ok"

    async def coroutine():
        return "ok"

    first, second = View().get, View().get   # a bound method is a new object per request
    assert (app.ensure_sync(first), app.ensure_sync(second)) == (first, second)
    for _ in range(2):   # asked again: still Flask's own path, which needs Flask's async extra here
        with pytest.raises(RuntimeError, match="async"):
            app.ensure_sync(coroutine)
