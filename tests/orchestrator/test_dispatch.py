"""POST /dispatch end to end on the test transaction, with fake model servers behind external runtimes.

Streamed requests (the front doors' streams) go through `stream_dispatch` directly, on the same transaction.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from unittest.mock import ANY

import psycopg
import pytest

from fake_model_server import FakeModelServer
from orchestrator_helpers import insert_model
from services.common.config import Settings
from services.common.db import connect
from services.orchestrator import create_app, pipeline, queries, request_queue
from services.orchestrator import worker as worker_module
from services.orchestrator.dispatch_schemas import DispatchSchema
from services.orchestrator.pipeline import stream_dispatch
from services.orchestrator.worker import WorkerPool
from services.prompt_builder import queries as template_queries, templates
from services.registry import selection
from services.registry.selection import StaleSelection

JSON_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


@pytest.fixture
def app(make_app, settings):
    # Only external runtimes: the seeded process and docker models are filtered out.
    return make_app(create_app, RUNTIME_DIR=settings.runtime_dir, RUNTIME_DRIVERS=("external",),
                    RECONCILE_ON_START=False)


@pytest.fixture
def client(app):
    return app.test_client()


def served_by(conn, server: FakeModelServer, *, complexity: int = 3, name: str | None = None, **fields) -> dict:
    extra = {"name": name} if name else {}
    return insert_model(conn, runtime_config={"endpoint": server.url, "model_alias": "fake"},
                        task_types=["question-answering"], complexity_score=complexity, **extra, **fields)


def dispatch_body(**fields) -> dict:
    return {"prompt": "What is 6 times 7?", "task_type": "question-answering", "max_tokens": 32, **fields}


def performance_rows(conn, request_id: str) -> list[dict]:
    return conn.execute(
        "SELECT model_id, attempt, success, validation_passed, error_class, template_version, output_tokens"
        " FROM performance_logs WHERE request_id = %s ORDER BY attempt", (request_id,)).fetchall()


def queue_row(conn, request_id: str) -> dict:
    return request_queue.get(conn, request_id)


def test_a_dispatch_answers_with_the_decision_and_leaves_a_record(client, conn, fake_server):
    model = served_by(conn, fake_server)

    response = client.post("/dispatch", json=dispatch_body())

    assert response.status_code == 200
    body = response.get_json()
    assert body == {
        "request_id": response.headers["X-Request-ID"], "status": "completed",
        "response": "Hello from the fake model.", "raw": "Hello from the fake model.", "valid": True,
        "output_format": "text", "finish_reason": "stop",
        "model": {"id": str(model["id"]), "name": model["name"], "version": "1"},
        "runtime_id": ANY, "template": {"id": ANY, "task_type": "question-answering",
                                        "model_family": "default", "version": 1},
        "timings": {"queue_wait_ms": ANY, "selection_ms": ANY, "cold_start_ms": ANY, "ensure_ms": ANY,
                    "generation_ms": ANY, "total_ms": ANY},
        "tokens": {"input": ANY, "output": 5, "per_second": ANY},
        "attempts": [{"number": 1, "model": f"{model['name']}:1", "model_id": str(model["id"]),
                      "runtime_id": body["runtime_id"], "outcome": "ok", "error": None, "reasons": [],
                      "repair": False, "duration_ms": ANY}],
        "decision": ANY,
    }
    decision = body["decision"]
    assert decision["chosen"] == f"{model['name']}:1"
    assert [c["model"] for c in decision["candidates"]] == [f"{model['name']}:1"]
    assert set(decision["candidates"][0]["breakdown"]) >= {"speed", "accuracy", "memory", "cost"}
    assert any("driver" in group["reason"] for group in decision["filtered"])

    row = queue_row(conn, body["request_id"])
    assert (row["status"], row["mode"], row["assigned_model_id"]) == ("completed", "sync", model["id"])
    assert row["result"]["response"] == "Hello from the fake model."
    assert performance_rows(conn, body["request_id"]) == [
        {"model_id": model["id"], "attempt": 1, "success": True, "validation_passed": True,
         "error_class": None, "template_version": 1, "output_tokens": 5}]


def test_stop_strings_and_the_seed_reach_the_model(client, conn, fake_server):
    served_by(conn, fake_server)
    response = client.post("/dispatch", json=dispatch_body(stop=["END"], seed=-1))
    assert response.status_code == 200
    sent = [r["body"] for r in fake_server.requests if r["method"] == "POST"][-1]
    assert (sent["stop"], sent["seed"]) == (["END"], -1)


def test_the_answer_goes_out_before_its_record_is_written(client, conn, fake_server):
    model = served_by(conn, fake_server)

    # Unbuffered: the response is not closed yet, as when a server has sent it but not yet closed it.
    response = client.post("/dispatch", json=dispatch_body(), buffered=False)

    body = response.get_json()
    assert (response.status_code, body["status"], body["valid"]) == (200, "completed", True)
    busy = "SELECT active_requests FROM container_lifecycle WHERE id = %s"
    assert queue_row(conn, body["request_id"])["status"] == "processing"
    assert (performance_rows(conn, body["request_id"]), conn.execute(busy, (body["runtime_id"],)).fetchone()) == (
        [], {"active_requests": 1})

    response.close()

    row = queue_row(conn, body["request_id"])
    assert (row["status"], row["result"], row["lease_expires_at"]) == ("completed", body, None)
    assert [r["model_id"] for r in performance_rows(conn, body["request_id"])] == [model["id"]]
    assert conn.execute(busy, (body["runtime_id"],)).fetchone() == {"active_requests": 0}


def counted_statements(monkeypatch) -> list[str]:
    statements = []
    execute = psycopg.Connection.execute

    def counted(self, query, *args, **kwargs):
        statements.append(" ".join(str(query).split())[:60])
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", counted)
    return statements


@pytest.mark.parametrize("pinned", [False, True])
def test_a_warm_dispatch_takes_two_statements(client, conn, fake_server, monkeypatch, pinned):
    """The hot path's round trips: record the request while counting its runtime busy, if what the
    selection was made on is still current (catalogue, templates, warm runtimes: a pinned model is
    found in the catalogue too); release the runtime, log the attempt and complete the request."""
    model = served_by(conn, fake_server)
    body = dispatch_body(model=model["name"]) if pinned else dispatch_body()
    assert client.post("/dispatch", json=body).status_code == 200   # starts the runtime
    assert client.post("/dispatch", json=body).status_code == 200   # sees it running
    statements = counted_statements(monkeypatch)
    response = client.post("/dispatch", json=body)

    assert response.status_code == 200
    assert len(statements) == 2, statements
    request_id = response.get_json()["request_id"]
    assert (queue_row(conn, request_id)["status"], len(performance_rows(conn, request_id))) == ("completed", 1)


def test_a_selection_made_on_an_old_state_is_made_again_before_anything_runs(client, conn, fake_server):
    """The state a dispatch selects on without reading it is checked by its first lease: a model
    deactivated since is neither leased nor tried, and the request is not one attempt short."""
    first = served_by(conn, fake_server, name="first-choice", complexity=2)
    assert client.post("/dispatch", json=dispatch_body()).status_code == 200
    assert client.post("/dispatch", json=dispatch_body()).status_code == 200
    conn.execute("UPDATE model_registry SET active = false WHERE id = %s", (first["id"],))
    second = served_by(conn, fake_server, name="second-choice", complexity=4)
    busy_before = conn.execute("SELECT total_requests FROM container_lifecycle WHERE model_id = %s",
                               (first["id"],)).fetchone()["total_requests"]

    response = client.post("/dispatch", json=dispatch_body())

    assert response.status_code == 200
    answer = response.get_json()
    assert (answer["model"]["id"], len(answer["attempts"])) == (str(second["id"]), 1)
    assert first["name"] + ":1" not in [c["model"] for c in answer["decision"]["candidates"]]
    assert conn.execute("SELECT total_requests FROM container_lifecycle WHERE model_id = %s",
                        (first["id"],)).fetchone()["total_requests"] == busy_before
    assert performance_rows(conn, answer["request_id"])[0]["model_id"] == second["id"]


def test_an_attempt_that_ran_is_kept_when_a_later_one_finds_the_selection_stale(client, conn, fake_server,
                                                                               monkeypatch):
    served_by(conn, fake_server)
    assert client.post("/dispatch", json=dispatch_body()).status_code == 200   # warm; the state is known
    real_run_attempt, checked = pipeline.run_attempt, []

    def first_fails_to_start_then_the_state_is_stale(db, settings, request_id, request, candidate, attempt,
                                                     **kwargs):
        checked.append(kwargs["selection_state"])
        if len(checked) == 1:
            attempt.outcome, attempt.error = "start_failed", "no room for it"
            return pipeline.Outcome(attempt=attempt)
        if len(checked) == 2:
            raise StaleSelection(selection.last_state())
        return real_run_attempt(db, settings, request_id, request, candidate, attempt, **kwargs)

    monkeypatch.setattr(pipeline, "run_attempt", first_fails_to_start_then_the_state_is_stale)
    response = client.post("/dispatch", json=dispatch_body())

    assert response.status_code == 200
    attempts = response.get_json()["attempts"]
    assert [(a["number"], a["outcome"]) for a in attempts] == [(1, "start_failed"), (2, "ok")]
    assert checked[0] is not None and checked[1] is not None and checked[2] is None


def test_a_selection_whose_models_were_deleted_meanwhile_is_a_409(client, conn, fake_server, monkeypatch):
    served_by(conn, fake_server)
    empty = pipeline.Selection(task_type="question-answering", complexity=1, weights={}, eligible_count=1)
    monkeypatch.setattr(pipeline, "select_models", lambda *args, **kwargs: empty)

    response = client.post("/dispatch", json=dispatch_body())

    assert (response.status_code, response.mimetype) == (409, "application/problem+json")
    assert "deleted meanwhile" in response.get_json()["detail"]


def busy_counts(conn, model: dict) -> list[int]:
    return [r["active_requests"] for r in conn.execute(
        "SELECT active_requests FROM container_lifecycle WHERE model_id = %s", (model["id"],))]


@pytest.mark.parametrize("reply, output_format, answer", [
    ("a\x00b", "text", "a{}b"),
    ('{"answer": "\\u0000"}', "json", {"answer": "{}"}),
])
def test_an_answer_with_a_nul_is_recorded_with_a_replacement_character(client, conn, reply, output_format, answer):
    """Postgres refuses U+0000 in jsonb: the stored answer has U+FFFD; the caller gets the answer as is."""
    def with_char(char: str):
        return answer.format(char) if isinstance(answer, str) else {"answer": answer["answer"].format(char)}

    with FakeModelServer(reply=reply) as server:
        model = served_by(conn, server)
        response = client.post("/dispatch", json=dispatch_body(output_format=output_format))
    assert response.status_code == 200
    body = response.get_json()
    assert body["response"] == with_char("\x00")
    row = queue_row(conn, body["request_id"])
    assert (row["status"], row["result"]["response"]) == ("completed", with_char("\ufffd"))
    assert busy_counts(conn, model) == [0]


@pytest.mark.parametrize("error, said", [(psycopg.errors.DataError("refused\nDETAIL: x"), "refused"),
                                         (psycopg.errors.DataError(), "DataError")])
def test_an_answer_that_cannot_be_recorded_still_frees_its_runtime(client, conn, fake_server, monkeypatch,
                                                                   error, said):
    model = served_by(conn, fake_server)
    release = queries.release

    def refusing(conn, runtime_id, holder=None, performance=None, result=None, **kwargs):
        if result is not None:
            raise error
        return release(conn, runtime_id, holder, performance, result, **kwargs)

    monkeypatch.setattr(queries, "release", refusing)
    response = client.post("/dispatch", json=dispatch_body())

    assert response.status_code == 200     # the caller has its answer; its record says it failed
    row = queue_row(conn, response.get_json()["request_id"])
    assert (row["status"], row["error_details"]) == ("failed", {
        "error": "unrecordable_answer", "detail": f"The answer could not be recorded: {said}"})
    assert busy_counts(conn, model) == [0]


def test_a_repeated_request_id_is_a_409_and_leaves_the_first_request_alone(client, conn, fake_server):
    served_by(conn, fake_server)
    request_id = str(uuid.uuid4())
    first = client.post("/dispatch", json=dispatch_body(), headers={"X-Request-ID": request_id})
    again = client.post("/dispatch", json=dispatch_body(), headers={"X-Request-ID": request_id})
    unservable = client.post("/dispatch", json=dispatch_body(complexity="high"), headers={"X-Request-ID": request_id})
    assert (first.status_code, again.status_code, unservable.status_code) == (200, 409, 422)
    assert again.content_type == "application/problem+json"
    assert queue_row(conn, request_id)["status"] == "completed"


def test_json_output_is_parsed_and_validated_against_the_schema(client, conn):
    with FakeModelServer(reply='Sure! ```json\n{"answer": 42}\n```') as server:
        served_by(conn, server)
        response = client.post("/dispatch", json=dispatch_body(output_format="json", json_schema=JSON_SCHEMA))
    body = response.get_json()
    assert (response.status_code, body["response"], body["valid"]) == (200, {"answer": 42}, True)
    sent = server.state.requests[-1]["body"]
    assert sent["response_format"]["type"] == "json_schema"


def template_reads(monkeypatch) -> list[str]:
    """The names of the template queries run from now on, in order."""
    reads = []

    def noted(name: str, read):
        def noted_read(*args):
            reads.append(name)
            return read(*args)
        return noted_read

    for name in ("resolve_active", "active_templates"):
        monkeypatch.setattr(template_queries, name, noted(name, getattr(template_queries, name)))
    return reads


def test_attempts_take_the_template_from_memory_until_a_template_write(client, conn, fake_server, monkeypatch):
    reads = template_reads(monkeypatch)
    model = served_by(conn, fake_server)
    family = templates.create_template(conn, task_type="question-answering", model_family=model["name"],
                                       user_template="Q: {prompt}")
    fake_server.config.fault, fake_server.config.fault_count = "error", 2

    def dispatched() -> dict:
        response = client.post("/dispatch", json=dispatch_body(max_retries=2))
        assert response.status_code == 200
        return response.get_json()

    first = dispatched()
    assert [a["outcome"] for a in first["attempts"]] == ["server_error", "server_error", "ok"]
    # The write gave the templates a new version: read once, for the three attempts.
    assert (first["template"]["id"], reads) == (str(family["id"]), ["active_templates"])
    assert dispatched()["template"]["id"] == str(family["id"])
    assert reads == ["active_templates"]
    second, _ = templates.update_template(conn, family["id"], {"user_template": "Question: {prompt}"})
    assert dispatched()["template"] == {"id": str(second["id"]), "task_type": "question-answering",
                                        "model_family": model["name"], "version": 2}
    assert reads == ["active_templates", "active_templates"]
    assert fake_server.state.requests[-1]["body"]["messages"][-1]["content"].startswith("Question: What is")


@pytest.mark.parametrize("code, status, outcome, reasons", [
    ("EUR-2024", 200, "ok", []),
    ("eur-2024", 502, "invalid_output", [{"code": "schema_violation", "path": "/code",
                                          "message": "'eur-2024' does not match '^[A-Z]{3}-[0-9]{4}$'"}]),
])
def test_a_schema_pattern_is_checked_on_the_output(client, conn, code, status, outcome, reasons):
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}}
    with FakeModelServer(reply=f'{{"code": "{code}"}}') as server:
        served_by(conn, server)
        response = client.post("/dispatch", json=dispatch_body(output_format="json", json_schema=schema,
                                                               max_retries=0))
    assert response.status_code == status
    assert [(a["outcome"], a["reasons"]) for a in response.get_json()["attempts"]] == [(outcome, reasons)]


def test_a_pattern_reached_only_through_a_ref_is_refused_before_any_model_runs(client, conn):
    schema = {"$ref": "#/x", "x": {"type": "string", "pattern": "(?=a)"}}
    with FakeModelServer(reply='"a"') as server:
        served_by(conn, server)
        response = client.post("/dispatch", json=dispatch_body(output_format="json", json_schema=schema))
    assert response.status_code == 422
    assert "/x/pattern" in json.dumps(response.get_json()["errors"])
    assert not [r for r in server.state.requests if r["method"] == "POST"]


@pytest.mark.parametrize("run_async", [False, True])
def test_a_schema_whose_reference_leads_nowhere_is_a_422_before_any_model_runs(client, conn, run_async):
    schema = {"$ref": "#/nowhere"}       # well-formed; no answer could ever be checked against it
    with FakeModelServer(reply='{"answer": 42}') as server:
        served_by(conn, server)
        response = client.post("/dispatch", json=dispatch_body(output_format="json", json_schema=schema,
                                                               **{"async": run_async}))
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["errors"] == {
        "json": {"json_schema": ["json_schema has a $ref that leads nowhere: '#/nowhere'."]}}
    assert not [r for r in server.state.requests if r["method"] == "POST"]
    assert queue_row(conn, response.headers["X-Request-ID"]) is None


def test_a_prompt_over_the_limit_is_a_413_and_blames_no_model(make_app, settings, conn, fake_server):
    """Over the limit as sent: refused before it is recorded. Over it only once a template wraps it:
    no model can run it, so no model is blamed for it (no performance row), and the caller gets the 413."""
    served_by(conn, fake_server)
    client = make_app(create_app, RUNTIME_DIR=settings.runtime_dir, RUNTIME_DRIVERS=("external",),
                      RECONCILE_ON_START=False, MAX_PROMPT_CHARS=60).test_client()

    refused = client.post("/dispatch", json=dispatch_body(prompt="x" * 61, **{"async": True}))
    assert (refused.status_code, refused.get_json()["detail"]) == (
        413, "The prompt is 61 characters; the limit is 60.")
    assert queue_row(conn, refused.headers["X-Request-ID"]) is None

    wrapped = client.post("/dispatch", json=dispatch_body(prompt="x" * 55))
    assert wrapped.status_code == 413, wrapped.get_json()
    assert wrapped.get_json()["detail"].endswith("characters; the limit is 60.")
    row = queue_row(conn, wrapped.headers["X-Request-ID"])
    assert (row["status"], row["error_details"]["status"]) == ("failed", 413)
    assert performance_rows(conn, wrapped.headers["X-Request-ID"]) == []
    assert not [r for r in fake_server.requests if r["method"] == "POST"]

    # Earlier chat turns go to the model too: they count.
    history = [{"role": "user", "content": "y" * 40}, {"role": "assistant", "content": "z" * 20},
               {"role": "user", "content": "hi"}]
    chat = client.post("/dispatch", json={"messages": history, "task_type": "question-answering",
                                          "async": True})
    assert (chat.status_code, chat.get_json()["detail"]) == (413, "The prompt is 62 characters; the limit is 60.")


def test_invalid_output_is_repaired_once_then_escalated_to_a_stronger_model(client, conn):
    with FakeModelServer(reply="forty-two") as weak, FakeModelServer(reply='{"answer": 42}') as strong:
        small = served_by(conn, weak, complexity=3, name="aaa-small")
        large = served_by(conn, strong, complexity=5, name="zzz-large")
        response = client.post("/dispatch", json=dispatch_body(
            output_format="json", json_schema=JSON_SCHEMA,
            requirements={"weights": {"speed": 0, "accuracy": 0, "memory": 0, "cost": 1}}))
        repair_turn = weak.state.requests[-1]["body"]["messages"]

    body = response.get_json()
    assert response.status_code == 200
    assert [(a["model"], a["outcome"], a["repair"]) for a in body["attempts"]] == [
        ("aaa-small:1", "invalid_output", False), ("aaa-small:1", "invalid_output", True),
        ("zzz-large:1", "ok", False)]
    assert body["response"] == {"answer": 42}
    assert repair_turn[-2] == {"role": "assistant", "content": "forty-two"}
    assert repair_turn[-1]["content"].startswith("Your previous answer could not be used:")
    assert [(r["model_id"], r["validation_passed"], r["error_class"]) for r in
            performance_rows(conn, body["request_id"])] == [
        (small["id"], False, "invalid_output"), (small["id"], False, "invalid_output"), (large["id"], True, None)]


def test_a_failing_runtime_moves_the_request_to_the_next_candidate(client, conn):
    with FakeModelServer(fault="error") as broken, FakeModelServer(reply="42") as healthy:
        served_by(conn, broken, name="aaa-broken")
        served_by(conn, healthy, name="zzz-healthy")
        response = client.post("/dispatch", json=dispatch_body(
            requirements={"weights": {"speed": 0, "accuracy": 0, "memory": 0, "cost": 1}}))
    body = response.get_json()
    assert response.status_code == 200
    assert [(a["model"], a["outcome"]) for a in body["attempts"]] == [
        ("aaa-broken:1", "server_error"), ("zzz-healthy:1", "ok")]


def test_when_every_attempt_fails_the_answer_is_a_502_with_every_attempt(client, conn):
    with FakeModelServer(fault="garbage") as server:
        model = served_by(conn, server)
        response = client.post("/dispatch", json=dispatch_body(max_retries=1))
    body = response.get_json()
    assert response.status_code == 502
    assert response.content_type == "application/problem+json"
    assert body == {
        "type": "about:blank", "title": "Bad Gateway", "status": 502,
        "detail": f"No model produced a usable answer ({model['name']}:1: server_error, "
                  f"{model['name']}:1: server_error).",
        "request_id": response.headers["X-Request-ID"], "dispatch_id": response.headers["X-Request-ID"],
        "attempts": [ANY, ANY]}
    row = queue_row(conn, body["request_id"])
    assert row["status"] == "failed"
    assert row["error_details"]["status"] == 502 and len(row["error_details"]["attempts"]) == 2
    assert [r["error_class"] for r in performance_rows(conn, body["request_id"])] == ["server_error"] * 2


def test_a_timeout_is_a_504(client, conn):
    with FakeModelServer(fault="slow", delay_ms=3000) as server:
        served_by(conn, server)
        response = client.post("/dispatch", json=dispatch_body(max_retries=0, timeout_s=1))
    assert response.status_code == 504
    assert response.get_json()["attempts"][0]["outcome"] == "timeout"


def test_no_candidate_is_a_422_that_says_why_and_the_request_is_failed(client, conn):
    response = client.post("/dispatch", json=dispatch_body(complexity="high"))
    body = response.get_json()
    assert response.status_code == 422
    assert body["detail"].startswith("No model can take this question-answering request")
    assert queue_row(conn, body["request_id"])["status"] == "failed"


def test_a_pinned_model_skips_selection(client, conn, fake_server):
    model = served_by(conn, fake_server)
    response = client.post("/dispatch", json=dispatch_body(model=f"{model['name']}:1"))
    body = response.get_json()
    assert response.status_code == 200
    assert body["decision"]["candidates"] == [{"model": f"{model['name']}:1", "model_id": str(model["id"]),
                                               "score": 1.0, "breakdown": {}, "data": {"pinned": True}}]
    unknown = client.post("/dispatch", json=dispatch_body(model="nope:1"))
    assert unknown.status_code == 404


@pytest.mark.parametrize("body, errors", [
    ({"task_type": "question-answering"}, {"prompt": ["Give exactly one of prompt or messages."]}),
    (dispatch_body(complexity="extreme"),
     {"complexity": ["Must be an integer from 1 to 10, or one of: low, medium, high."]}),
    (dispatch_body(json_schema={"type": "object"}), {"json_schema": ["json_schema needs output_format json."]}),
    (dispatch_body(output_format="json", json_schema={"type": "object", "minProperties": -1}), {"json_schema": [
        "json_schema is not a valid JSON Schema (Draft 2020-12): -1 is less than the minimum of 0"]}),
    (dispatch_body(output_format="json", json_schema={"properties": {"id": {"pattern": "^(?!test-)"}}}), {
        "json_schema": ["json_schema has a pattern at /properties/id/pattern that RE2 cannot compile: "
                        "'^(?!test-)' (invalid perl operator: (?!). Patterns run on RE2, in linear time, which "
                        "has no lookahead, lookbehind or backreferences."]}),
    (dispatch_body(output_format="json", json_schema={"pattern": "(a)\\1"}, **{"async": True}), {"json_schema": [
        "json_schema has a pattern at /pattern that RE2 cannot compile: '(a)\\\\1' (invalid escape sequence: \\1). "
        "Patterns run on RE2, in linear time, which has no lookahead, lookbehind or backreferences."]}),
    (dispatch_body(callback_url="file:///etc/passwd"), {"callback_url": ["Not a valid URL."]}),
    (dispatch_body(variables={"contexte": "typo"}, **{"async": True}),
     {"variables": {"contexte": {"key": ["Must be one of: context, language, labels, examples, history."]}}}),
    (dispatch_body(requirements={"weights": {"speed": 0, "cost": 0}}, **{"async": True}),
     {"requirements": {"weights": {"_schema": ["At least one weight must be above 0."]}}}),
    # The same weights as POST /select: relative, up to 1000.
    (dispatch_body(requirements={"weights": {"speed": 1001}}, **{"async": True}),
     {"requirements": {"weights": {"speed": ["Must be greater than or equal to 0 and less than or equal to 1000."]}}}),
    (dispatch_body(colour="red"), {"colour": ["Unknown field."]}),
    # An entry no model could match would exclude nothing, silently.
    (dispatch_body(requirements={"exclude": ["victim", "Victim:1.0"]}, **{"async": True}),
     {"requirements": {"exclude": {"0": ["Must be a model id or name:version."],
                                   "1": ["Must be a model id or name:version."]}}}),
    ({"messages": [{"role": "assistant", "content": "hi"}]},
     {"messages": ["The last message must be a user message."]}),
])
def test_bad_requests_are_422_and_record_nothing(client, conn, body, errors):
    before = conn.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"]
    response = client.post("/dispatch", json=body)
    assert response.status_code == 422
    assert response.get_json()["errors"] == {"json": errors}
    assert conn.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"] == before


def test_async_dispatch_is_queued_run_by_a_worker_and_readable(client, conn, db, settings, fake_server):
    served_by(conn, fake_server)
    accepted = client.post("/dispatch", json=dispatch_body(**{"async": True}))
    assert accepted.status_code == 202
    request_id = accepted.get_json()["request_id"]
    assert accepted.get_json() == {"request_id": request_id, "status": "pending",
                                   "status_url": f"/requests/{request_id}"}
    assert accepted.headers["Location"] == f"/requests/{request_id}"
    assert client.get(f"/requests/{request_id}").get_json()["status"] == "pending"

    pool = WorkerPool(db, client.application.extensions["settings"], workers=1)
    assert pool.run_once() is True
    assert pool.run_once() is False

    status = client.get(f"/requests/{request_id}").get_json()
    assert (status["status"], status["mode"], status["attempts"]) == ("completed", "async", 1)
    assert status["result"]["response"] == "Hello from the fake model."


def test_a_claimed_request_spends_its_wake_up(client, conn, db, fake_server):
    served_by(conn, fake_server)
    for _ in range(2):
        assert client.post("/dispatch", json=dispatch_body(**{"async": True})).status_code == 202
    pool = WorkerPool(db, client.application.extensions["settings"], workers=1)
    pool.wakeups.release(2)          # the two NOTIFYs, as the listener turns them into wake-ups

    assert pool.run_once() is True   # the first request's end claimed the second
    assert conn.execute("SELECT count(*) AS n FROM request_queue WHERE status = 'completed'").fetchone()["n"] == 2
    # Nothing left to wake up for: an idle worker sleeps instead of claiming from an empty queue.
    assert pool.wakeups.acquire(blocking=False) is False


def runtime_counts(conn, model_id) -> list[tuple]:
    return [(row["active_requests"], row["total_requests"]) for row in conn.execute(
        "SELECT active_requests, total_requests FROM container_lifecycle WHERE model_id = %s", (model_id,))]


def test_a_request_claimed_by_its_predecessors_end_runs_on_the_same_runtime(client, conn, db, fake_server,
                                                                            monkeypatch):
    """While the queue is not empty, the statement completing a request claims the next one onto
    its runtime: no claim and no lease of its own, and the runtime's counts stay right."""
    model = served_by(conn, fake_server)
    assert client.post("/dispatch", json=dispatch_body()).status_code == 200   # starts the runtime
    assert client.post("/dispatch", json=dispatch_body()).status_code == 200   # sees it running
    ids = [client.post("/dispatch", json=dispatch_body(**{"async": True})).get_json()["request_id"]
           for _ in range(3)]
    statements = counted_statements(monkeypatch)

    assert WorkerPool(db, client.application.extensions["settings"], workers=1).run_once() is True

    # A claim and a lease for the first; each end claims the next; the last end finds none.
    assert len(statements) == 5, statements
    rows = [queue_row(conn, request_id) for request_id in ids]
    assert [(row["status"], row["attempts"]) for row in rows] == [("completed", 1)] * 3
    assert len({row["assigned_runtime_id"] for row in rows}) == 1
    assert [len(performance_rows(conn, request_id)) for request_id in ids] == [1, 1, 1]
    assert runtime_counts(conn, model["id"]) == [(0, 5)]


def test_a_runtime_handed_to_a_request_for_another_model_is_given_back(client, conn, db, fake_server):
    first = served_by(conn, fake_server, name="first")
    second = served_by(conn, fake_server, name="second")
    for model in (first, second):   # a running runtime each
        assert client.post("/dispatch", json=dispatch_body(model=model["name"])).status_code == 200
    ids = [client.post("/dispatch", json=dispatch_body(model=model["name"], **{"async": True})).get_json()
           ["request_id"] for model in (first, second)]

    assert WorkerPool(db, client.application.extensions["settings"], workers=1).run_once() is True

    rows = [queue_row(conn, request_id) for request_id in ids]
    assert [row["status"] for row in rows] == ["completed", "completed"]
    assert [row["assigned_model_id"] for row in rows] == [first["id"], second["id"]]
    # Leases: a sync and an async request each, and the second's, handed over and given back.
    assert runtime_counts(conn, first["id"]) == [(0, 3)]
    assert runtime_counts(conn, second["id"]) == [(0, 2)]


def test_a_runtime_handed_to_a_request_that_fails_before_any_attempt_is_given_back(client, conn, db, fake_server):
    model = served_by(conn, fake_server)
    assert client.post("/dispatch", json=dispatch_body()).status_code == 200
    ids = [client.post("/dispatch", json=dispatch_body(**{"async": True})).get_json()["request_id"]
           for _ in range(2)]
    # The second asks for a complexity no model has by the time it runs.
    conn.execute("UPDATE request_queue SET request_payload = request_payload || '{\"complexity\": 10}'"
                 " WHERE id = %s", (ids[1],))

    assert WorkerPool(db, client.application.extensions["settings"], workers=1).run_once() is True

    assert [queue_row(conn, request_id)["status"] for request_id in ids] == ["completed", "failed"]
    assert runtime_counts(conn, model["id"]) == [(0, 3)]   # the second's lease, handed over, counts


def burst_started(monkeypatch, wakeups: int) -> tuple[dict, float]:
    """Two requests arrive while both workers of a pool sleep on an empty queue, announced by
    `wakeups` wake-ups; when each request started, and when they were announced."""
    pending, started = [], {}

    def claim_next(conn, **_):
        return {"id": pending.pop(0), "more_pending": bool(pending)} if pending else None

    def run_for_a_while(db, settings, row, owner, **_):
        started[row["id"]] = time.monotonic()
        time.sleep(0.6)

    monkeypatch.setattr(request_queue, "claim_next", claim_next)
    monkeypatch.setattr(worker_module, "run_queued_request", run_for_a_while)

    class NoDatabase:
        @contextmanager
        def connection(self, autocommit=False):
            yield None

    pool = WorkerPool(NoDatabase(), Settings(queue_poll_s=5.0), workers=2)
    workers = [threading.Thread(target=pool._work, daemon=True) for _ in range(2)]
    for worker in workers:
        worker.start()
    time.sleep(0.1)                  # both asleep on an empty queue, until a wake-up or 5 s
    pending.extend(["a", "b"])
    announced = time.monotonic()
    pool.wakeups.release(wakeups)
    deadline = announced + 2.0
    while len(started) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.stop(timeout_s=2.0)
    return started, announced


def test_each_request_a_burst_announces_wakes_a_worker_of_its_own(monkeypatch):
    """A worker woken by a request's wake-up has spent it: its claim must not spend another's."""
    started, announced = burst_started(monkeypatch, wakeups=2)   # two NOTIFYs

    assert sorted(started) == ["a", "b"]
    assert max(started.values()) - announced < 0.4   # not after the other's run, nor at the next poll


def test_a_claim_leaving_requests_pending_wakes_another_worker(monkeypatch):
    """An enqueue behind a backlog NOTIFYs no one: the worker a claim wakes passes the word on."""
    started, announced = burst_started(monkeypatch, wakeups=1)

    assert sorted(started) == ["a", "b"]
    assert max(started.values()) - announced < 0.4


def test_an_enqueue_behind_a_backlog_notifies_no_one(fresh_database_url, monkeypatch):
    monkeypatch.setattr(request_queue, "NOTIFY_BELOW_BACKLOG", 2)
    with psycopg.connect(fresh_database_url, autocommit=True) as listener, \
            connect(fresh_database_url, autocommit=True) as conn:
        listener.execute(f"LISTEN {request_queue.CHANNEL}")

        def enqueue() -> None:
            request_queue.enqueue(conn, request_id=str(uuid.uuid4()), payload=dispatch_body(),
                                  task_type="question-answering", priority=5, mode="async", callback_url=None)

        def notifications() -> int:
            return len(list(listener.notifies(timeout=0.3)))

        for _ in range(3):
            enqueue()
        assert notifications() == 2      # the third came behind two pending
        claims = [request_queue.claim_next(conn, owner="w", lease_seconds=30) for _ in range(3)]
        assert [claim["more_pending"] for claim in claims] == [True, True, False]
        enqueue()                        # into an empty queue again
        assert notifications() == 1


def test_prefer_respond_async_queues_too(client, conn):
    response = client.post("/dispatch", json=dispatch_body(), headers={"Prefer": "respond-async"})
    assert response.status_code == 202


def test_only_a_pending_request_can_be_cancelled(client, conn, fake_server):
    queued = client.post("/dispatch", json=dispatch_body(**{"async": True})).get_json()["request_id"]
    cancelled = client.delete(f"/requests/{queued}")
    assert (cancelled.status_code, cancelled.get_json()["status"]) == (200, "cancelled")
    again = client.delete(f"/requests/{queued}")
    assert again.status_code == 409
    assert again.get_json()["detail"] == f"Request {queued} is cancelled; only a pending request can be cancelled."
    assert client.delete("/requests/00000000-0000-4000-8000-000000000000").status_code == 404


def test_an_unpaired_surrogate_in_an_answer_is_stored_as_a_replacement_character(client, conn, db, fake_server):
    """Valid in JSON, refused by jsonb: the record keeps the answer, with U+FFFD in its place."""
    served_by(conn, fake_server)
    fake_server.config.reply = "caf\ud800"
    answered = client.post("/dispatch", json=dispatch_body())
    assert (answered.status_code, answered.get_json()["response"]) == (200, "caf\ud800")
    assert queue_row(conn, answered.get_json()["request_id"])["result"]["response"] == "caf\ufffd"

    request_id = client.post("/dispatch", json=dispatch_body(**{"async": True})).get_json()["request_id"]
    assert WorkerPool(db, client.application.extensions["settings"], workers=1).run_once() is True
    row = queue_row(conn, request_id)
    assert (row["status"], row["attempts"], row["result"]["response"]) == ("completed", 1, "caf\ufffd")


def test_an_answer_that_cannot_be_recorded_fails_its_request_instead_of_running_it_again(
        client, conn, db, fake_server, monkeypatch):
    served_by(conn, fake_server)
    release = queries.release

    def release_refusing_results(conn, runtime_id, holder=None, performance=None, result=None, **kwargs):
        if result is not None:
            raise psycopg.errors.DataException("jsonb refuses this answer\nDETAIL: internals")
        return release(conn, runtime_id, holder, performance, result, **kwargs)

    monkeypatch.setattr(queries, "release", release_refusing_results)
    request_id = client.post("/dispatch", json=dispatch_body(**{"async": True})).get_json()["request_id"]
    assert WorkerPool(db, client.application.extensions["settings"], workers=1).run_once() is True

    row = queue_row(conn, request_id)
    assert (row["status"], row["attempts"], row["lease_expires_at"]) == ("failed", 1, None)
    assert row["error_details"] == {"error": "unrecordable_answer",
                                    "detail": "The answer could not be recorded: jsonb refuses this answer"}
    assert conn.execute("SELECT holds_runtime FROM request_queue WHERE id = %s",
                        (request_id,)).fetchone()["holds_runtime"] is False
    assert conn.execute("SELECT sum(active_requests) AS n FROM container_lifecycle").fetchone()["n"] == 0
    assert request_queue.reclaim_expired(conn, max_attempts=3) == []   # nothing to run again


def test_feedback_is_stored_against_the_model_that_answered(client, conn, fake_server):
    model = served_by(conn, fake_server)
    request_id = client.post("/dispatch", json=dispatch_body()).get_json()["request_id"]
    response = client.post(f"/requests/{request_id}/feedback", json={"score": 0.25, "label": "wrong"})
    assert response.status_code == 201
    assert response.get_json() == {"id": ANY, "request_id": request_id, "model_id": str(model["id"]),
                                   "score": 0.25, "label": "wrong", "comment": None, "created_at": ANY}
    assert client.post("/requests/00000000-0000-4000-8000-000000000000/feedback",
                       json={"score": 1}).status_code == 404
    assert client.post(f"/requests/{request_id}/feedback", json={"score": 1.5}).status_code == 422


def test_a_request_taken_back_from_its_worker_blames_no_model(client, conn, db, settings, fake_server):
    served_by(conn, fake_server)
    assert client.post("/dispatch", json=dispatch_body()).status_code == 200   # a running runtime
    client.post("/dispatch", json=dispatch_body(**{"async": True}))
    row = request_queue.claim_next(conn, owner="worker-a", lease_seconds=30)
    conn.execute("UPDATE request_queue SET lease_owner = 'worker-b' WHERE id = %s", (row["id"],))  # reclaimed, retaken
    posts = len([r for r in fake_server.requests if r["method"] == "POST"])

    assert pipeline.run_queued_request(db, replace(settings, runtime_drivers=("external",)), row,
                                       owner="worker-a") is None

    assert performance_rows(conn, str(row["id"])) == []
    assert len([r for r in fake_server.requests if r["method"] == "POST"]) == posts
    assert queue_row(conn, row["id"])["status"] == "processing"   # still worker-b's


def test_a_request_without_an_answer_takes_no_feedback(client, conn, fake_server):
    model = served_by(conn, fake_server)
    pending = client.post("/dispatch", json=dispatch_body(**{"async": True})).get_json()["request_id"]
    cancelled = client.post("/dispatch", json=dispatch_body(**{"async": True})).get_json()["request_id"]
    client.delete(f"/requests/{cancelled}")
    fake_server.config.fault = "error"
    failed = client.post("/dispatch", json=dispatch_body(max_retries=0)).headers["X-Request-ID"]
    # A queued request a worker runs has no answer yet, whatever model its attempt runs on.
    running = client.post("/dispatch", json=dispatch_body(**{"async": True})).get_json()["request_id"]
    conn.execute("UPDATE request_queue SET status = 'processing', lease_owner = 'w', attempts = 1,"
                 " lease_expires_at = now() + interval '1 minute', assigned_model_id = %s WHERE id = %s",
                 (model["id"], running))

    for request_id, status in ((pending, "pending"), (cancelled, "cancelled"), (failed, "failed"),
                               (running, "processing")):
        refused = client.post(f"/requests/{request_id}/feedback", json={"score": 0})
        assert (refused.status_code, refused.get_json()["detail"], refused.get_json()["request_status"]) == (
            409, f"Request {request_id} is {status}: it has no answer to rate.", status)
    assert conn.execute("SELECT count(*) AS n FROM request_feedback").fetchone()["n"] == 0


def test_an_expired_lease_is_reclaimed_and_a_spent_request_fails(conn):
    row = request_queue.enqueue(conn, request_id="5f0c7b7e-0000-4000-8000-000000000001",
                                payload=dispatch_body(), task_type="question-answering", priority=100,
                                mode="async", callback_url=None)
    for attempt in range(1, 4):
        claimed = request_queue.claim_next(conn, owner="dead-worker", lease_seconds=0.001)
        assert (claimed["id"], claimed["attempts"]) == (row["id"], attempt)
        conn.execute("SELECT pg_sleep(0.01)")
        conn.execute("UPDATE request_queue SET lease_expires_at = clock_timestamp() - interval '1 second'"
                     " WHERE id = %s", (row["id"],))
        reclaimed = request_queue.reclaim_expired(conn, max_attempts=3)
        assert [(r["id"], r["status"]) for r in reclaimed] == [
            (row["id"], "pending" if attempt < 3 else "failed")]
    final = request_queue.get(conn, row["id"])
    assert final["error_details"]["error"] == "worker_lost"
    # The dead worker cannot finish it afterwards.
    assert request_queue.complete(conn, row["id"], owner="dead-worker", result={"x": 1}) is False


def test_claims_go_by_priority_then_age_even_for_requests_queued_in_one_transaction(conn):
    rows = []
    for priority in (100, 500, 100, 100, 500):
        rows.append(request_queue.enqueue(
            conn, request_id=f"5f0c7b7e-0000-4000-8000-00000000010{len(rows)}", payload=dispatch_body(),
            task_type="question-answering", priority=priority, mode="async", callback_url=None))
    ages = [row["created_at"] for row in rows]
    assert ages == sorted(set(ages))   # all in this test's transaction, yet none tied
    order = [request_queue.claim_next(conn, owner="w", lease_seconds=30)["id"] for _ in range(5)]
    assert order == [rows[i]["id"] for i in (1, 4, 0, 2, 3)]
    assert request_queue.claim_next(conn, owner="w", lease_seconds=30) is None


def test_the_attempt_that_starts_a_runtime_logs_its_load_time(client, conn, fake_server):
    served_by(conn, fake_server)
    cold = client.post("/dispatch", json=dispatch_body()).get_json()
    warm = client.post("/dispatch", json=dispatch_body()).get_json()

    load_times = {body["request_id"]: conn.execute(
        "SELECT load_time_ms FROM performance_logs WHERE request_id = %s", (body["request_id"],)
    ).fetchone()["load_time_ms"] for body in (cold, warm)}
    runtime = conn.execute("SELECT load_time_ms FROM container_lifecycle WHERE id = %s",
                           (cold["runtime_id"],)).fetchone()
    assert load_times == {cold["request_id"]: runtime["load_time_ms"], warm["request_id"]: None}
    assert cold["timings"]["cold_start_ms"] > 0 and warm["timings"]["cold_start_ms"] == 0


def test_a_cold_attempt_logs_its_processing_time_without_the_start(client, conn, fake_server, monkeypatch):
    """Selection adds load_time_ms to a cold model's p95: the start must not be in processing_time_ms too."""
    served_by(conn, fake_server)
    lease_runtime = pipeline.lease_runtime

    def slow_to_start(*args, **kwargs):
        runtime = lease_runtime(*args, **kwargs)
        time.sleep(0.3)
        return runtime

    monkeypatch.setattr(pipeline, "lease_runtime", slow_to_start)
    cold = client.post("/dispatch", json=dispatch_body()).get_json()

    row = conn.execute("SELECT processing_time_ms, load_time_ms FROM performance_logs WHERE request_id = %s",
                       (cold["request_id"],)).fetchone()
    assert cold["timings"]["cold_start_ms"] >= 300 and row["load_time_ms"] is not None
    assert row["processing_time_ms"] < 300 <= cold["attempts"][0]["duration_ms"]


def streamed(conn, db, settings, **fields) -> tuple[str, list[dict]]:
    """A request streamed through the pipeline as the front doors stream it: its id and every event."""
    payload = DispatchSchema().load(dispatch_body(**fields))
    row = request_queue.enqueue(conn, request_id=str(uuid.uuid4()), payload=payload, task_type=payload["task_type"],
                                priority=payload["priority"], mode="sync", callback_url=None,
                                lease_owner="streamer", lease_seconds=30)
    external_only = replace(settings, runtime_drivers=("external",))
    return str(row["id"]), list(stream_dispatch(db, external_only, row, owner="streamer"))


def test_a_streamed_answer_is_validated_when_it_ends(conn, db, settings):
    with FakeModelServer(reply='{"answer": 42}') as server:
        model = served_by(conn, server)
        request_id, events = streamed(conn, db, settings, output_format="json", json_schema=JSON_SCHEMA)

    assert events == [
        {"request_id": request_id, "model": f"{model['name']}:1", "runtime_id": ANY},
        {"text": '{"answer":'}, {"text": " 42}"},
        {"finish_reason": "stop", "tokens": {"input": ANY, "output": 2}, "timings": ANY, "valid": True}]
    result = queue_row(conn, request_id)["result"]
    assert (result["status"], result["response"], result["raw"], result["valid"], result["reasons"]) == (
        "completed", {"answer": 42}, '{"answer": 42}', True, [])
    assert performance_rows(conn, request_id) == [
        {"model_id": model["id"], "attempt": 1, "success": True, "validation_passed": True,
         "error_class": None, "template_version": 1, "output_tokens": 2}]


def test_streamed_attempts_take_the_template_from_memory(conn, db, settings, fake_server, monkeypatch):
    reads = template_reads(monkeypatch)
    model = served_by(conn, fake_server)
    family = templates.create_template(conn, task_type="question-answering", model_family=model["name"],
                                       user_template="Q: {prompt}")
    fake_server.config.fault, fake_server.config.fault_count = "error", 1
    request_id, events = streamed(conn, db, settings, max_retries=1)
    assert [a["outcome"] for a in queue_row(conn, request_id)["result"]["attempts"]] == ["server_error", "ok"]
    assert reads == ["active_templates"]  # once for both attempts: the write gave a new version
    streamed(conn, db, settings)
    assert reads == ["active_templates"]
    assert conn.execute("SELECT DISTINCT template_id FROM performance_logs WHERE model_id = %s",
                        (model["id"],)).fetchall() == [{"template_id": family["id"]}]


def test_a_stream_that_fails_unforeseen_ends_its_request_at_once(conn, db, settings, fake_server, monkeypatch):
    model = served_by(conn, fake_server)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "parse_output", broken)
    with pytest.raises(RuntimeError):
        streamed(conn, db, settings)
    row = conn.execute("SELECT status, error_details, lease_expires_at FROM request_queue"
                       " WHERE lease_owner = 'streamer'").fetchone()
    assert (row["status"], row["error_details"]["status"], row["lease_expires_at"]) == ("failed", 500, None)
    assert [a["outcome"] for a in row["error_details"]["attempts"]] == ["pending"]
    assert conn.execute("SELECT active_requests FROM container_lifecycle WHERE model_id = %s",
                        (model["id"],)).fetchone()["active_requests"] == 0


def test_an_invalid_streamed_answer_is_reported_but_never_repaired(conn, db, settings):
    reasons = [{"code": "schema_violation", "message": "'forty-two' is not of type 'integer'", "path": "/answer"}]
    with FakeModelServer(reply='{"answer": "forty-two"}') as server:
        model = served_by(conn, server)
        request_id, events = streamed(conn, db, settings, output_format="json", json_schema=JSON_SCHEMA,
                                      max_retries=2)

    assert events[-1] == {"finish_reason": "stop", "tokens": {"input": ANY, "output": 2}, "timings": ANY,
                          "valid": False, "reasons": reasons}
    assert len([r for r in server.requests if r["method"] == "POST"]) == 1
    row = queue_row(conn, request_id)
    assert (row["status"], row["result"]["valid"], row["result"]["reasons"], row["result"]["response"]) == (
        "completed", False, reasons, {"answer": "forty-two"})
    assert [(a["outcome"], a["reasons"]) for a in row["result"]["attempts"]] == [("invalid_output", reasons)]
    assert performance_rows(conn, request_id) == [
        {"model_id": model["id"], "attempt": 1, "success": True, "validation_passed": False,
         "error_class": "invalid_output", "template_version": 1, "output_tokens": 2}]
