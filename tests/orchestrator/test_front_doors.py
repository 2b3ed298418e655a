"""The OpenAI and Ollama front doors, used through the official client libraries against a real HTTP server.

The orchestrator app runs in a threaded werkzeug server on a database of the test's own (the
server's threads cannot share the test transaction); fake model servers stand behind external runtimes.
"""
from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from unittest.mock import ANY

import ollama
import openai
import psycopg
import pytest
import requests
from werkzeug.serving import make_server

from fake_model_server import FakeModelServer
from orchestrator_helpers import insert_model, wait_until
from services.common.db import connect
from services.orchestrator import create_app

REPLY = "Hello from the fake model."
JSON_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
TASK_TYPES = ["conversation", "question-answering", "text-generation"]
USER = [{"role": "user", "content": "Say hello."}]
LOOKAHEAD_SCHEMA = {"type": "object", "properties": {"id": {"type": "string", "pattern": "^(?!test-)"}}}
LOOKAHEAD_PROBLEM = ("json_schema has a pattern at /properties/id/pattern that RE2 cannot compile: '^(?!test-)' "
                     "(invalid perl operator: (?!). Patterns run on RE2, in linear time, which has no lookahead, "
                     "lookbehind or backreferences.")


@pytest.fixture
def database(fresh_database_url: str) -> Iterator[psycopg.Connection]:
    """The test's own database, committing every statement (the server sees what the test writes)."""
    with connect(fresh_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def dispatcher(fresh_database_url: str, settings) -> Iterator[str]:
    """The orchestrator app served over real HTTP; its base URL."""
    app = create_app({"TESTING": True, "DATABASE_URL": fresh_database_url, "API_TOKEN": "",
                      "RUNTIME_DRIVERS": ("external",), "RUNTIME_DIR": settings.runtime_dir,
                      "RECONCILE_ON_START": False})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        app.extensions["database"].close()


@pytest.fixture
def fake() -> Iterator[FakeModelServer]:
    with FakeModelServer(reply=REPLY) as server:
        yield server


@pytest.fixture
def model(database, fake) -> dict:
    """The only model the dispatcher can run (the seeded ones need the process or docker driver)."""
    return serve(database, fake, name="fake-chat")


def serve(database, server: FakeModelServer, *, name: str) -> dict:
    return insert_model(database, name=name, task_types=TASK_TYPES,
                        runtime_config={"endpoint": server.url, "model_alias": "fake"})


@pytest.fixture
def gpt(dispatcher) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{dispatcher}/v1", api_key="unused", max_retries=0)


def llama(dispatcher: str, **headers) -> ollama.Client:
    return ollama.Client(host=dispatcher, headers=headers)


def new_id() -> str:
    return str(uuid.uuid4())


def queue_row(database, request_id: str) -> dict:
    """The request's row once it has ended: an answer is recorded just after it is sent."""
    def ended() -> tuple[dict | None] | None:
        row = database.execute(
            "SELECT status, mode, task_type, assigned_model_id, request_payload, result, error_details"
            " FROM request_queue WHERE id = %s", (request_id,)).fetchone()
        return (row,) if row is None or row["status"] != "processing" else None

    return wait_until(ended, timeout_s=10)[0]


def performance_rows(database, request_id: str) -> list[dict]:
    queue_row(database, request_id)   # the answer's row comes with the request's end
    return database.execute(
        "SELECT model_id, attempt, task_type, output_format, success, validation_passed, error_class,"
        " output_tokens FROM performance_logs WHERE request_id = %s ORDER BY attempt", (request_id,)).fetchall()


def ok_row(model: dict, *, task_type: str = "conversation", output_format: str = "text",
           validation_passed: bool | None = True, output_tokens: int = 5) -> dict:
    return {"model_id": model["id"], "attempt": 1, "task_type": task_type, "output_format": output_format,
            "success": True, "validation_passed": validation_passed, "error_class": None,
            "output_tokens": output_tokens}


def runtime_load(database, model: dict) -> list[int]:
    return [row["active_requests"] for row in database.execute(
        "SELECT active_requests FROM container_lifecycle WHERE model_id = %s", (model["id"],))]


def generation_requests(server: FakeModelServer) -> list[dict]:
    return [r["body"] for r in server.requests if r["method"] == "POST"]


# --- OpenAI ----------------------------------------------------------------------------------

def test_openai_chat_with_model_auto_is_dispatched_and_recorded(gpt, database, model, fake):
    request_id = new_id()
    completion = gpt.chat.completions.create(model="auto", messages=USER, extra_headers={"X-Request-ID": request_id})

    assert completion.to_dict() == {
        "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": ANY, "model": "fake-chat:1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": ANY, "completion_tokens": 5, "total_tokens": ANY},
        "dispatch": {"request_id": request_id, "valid": True, "timings": ANY, "decision": ANY},
    }
    assert completion.dispatch["decision"]["chosen"] == "fake-chat:1"
    assert (completion._request_id, completion.usage.total_tokens) == (
        request_id, completion.usage.prompt_tokens + 5)
    row = queue_row(database, request_id)
    assert (row["status"], row["mode"], row["task_type"], row["assigned_model_id"]) == (
        "completed", "sync", "conversation", model["id"])
    assert performance_rows(database, request_id) == [ok_row(model)]
    sent = generation_requests(fake)[-1]
    assert (sent["model"], sent["stream"], sent["messages"][-1]["role"]) == ("fake", False, "user")


def test_openai_chat_with_a_pinned_model_and_dispatch_headers(gpt, database, model, fake):
    request_id = new_id()
    completion = gpt.chat.completions.create(
        model="fake-chat:1", messages=[{"role": "system", "content": "Be brief."}, *USER], max_tokens=2,
        temperature=0.5, seed=7,
        extra_headers={"X-Request-ID": request_id, "X-Dispatch-Task-Type": "question-answering",
                       "X-Dispatch-Complexity": "2", "X-Dispatch-Max-Retries": "0"})

    assert (completion.model, completion.choices[0].message.content) == ("fake-chat:1", "Hello from")
    assert completion.dispatch["decision"]["candidates"] == [
        {"model": "fake-chat:1", "model_id": str(model["id"]), "score": 1.0, "breakdown": {},
         "data": {"pinned": True}}]
    sent = generation_requests(fake)[-1]
    assert (sent["max_tokens"], sent["temperature"], sent["seed"]) == (2, 0.5, 7)
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    payload = queue_row(database, request_id)["request_payload"]
    assert (payload["task_type"], payload["complexity"], payload["max_retries"], payload["model"]) == (
        "question-answering", 2, 0, "fake-chat:1")
    assert performance_rows(database, request_id) == [ok_row(model, task_type="question-answering",
                                                             output_tokens=2)]


def test_openai_text_parts_and_the_developer_role_are_understood(gpt, model, fake):
    gpt.chat.completions.create(model="auto", messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello."}]}])
    sent = generation_requests(fake)[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert "Say hello." in sent[-1]["content"]

    with pytest.raises(openai.UnprocessableEntityError) as caught:
        gpt.chat.completions.create(model="auto", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}])
    assert caught.value.response.json()["errors"] == {
        "json": {"messages": {"0": {"content": ["Must be text, or a list of text parts."]}}}}


def test_openai_streaming_sends_the_answer_as_server_sent_events(gpt, database, model):
    request_id = new_id()
    stream = gpt.chat.completions.create(model="auto", messages=USER, stream=True,
                                         stream_options={"include_usage": True},
                                         extra_headers={"X-Request-ID": request_id})
    chunks = [chunk.to_dict() for chunk in stream]

    base = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": ANY,
            "model": "fake-chat:1"}
    pieces = ["Hello", " from", " the", " fake", " model."]
    assert chunks == [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        *[{**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces],
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": ANY, "completion_tokens": 5, "total_tokens": ANY},
         "dispatch": {"request_id": request_id, "valid": True}},
    ]
    row = queue_row(database, request_id)
    assert (row["status"], row["assigned_model_id"], row["result"]["valid"]) == ("completed", model["id"], True)
    assert performance_rows(database, request_id) == [ok_row(model)]
    assert runtime_load(database, model) == [0]


def test_openai_json_schema_response_format_returns_the_validated_json(gpt, database):
    with FakeModelServer(reply='Sure! ```json\n{"answer": 42}\n```') as server:
        model = serve(database, server, name="fake-json")
        request_id = new_id()
        completion = gpt.chat.completions.create(
            model="auto", messages=USER, extra_headers={"X-Request-ID": request_id},
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": JSON_SCHEMA}})
    assert json.loads(completion.choices[0].message.content) == {"answer": 42}
    assert completion.dispatch["valid"] is True
    assert generation_requests(server)[-1]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": JSON_SCHEMA}}
    assert performance_rows(database, request_id) == [ok_row(model, output_format="json", output_tokens=3)]


def test_openai_streamed_json_is_validated_when_the_stream_ends(gpt, database):
    with FakeModelServer(reply='{"answer": 42}') as server:
        model = serve(database, server, name="fake-json")
        request_id = new_id()
        stream = gpt.chat.completions.create(
            model="auto", messages=USER, stream=True, extra_headers={"X-Request-ID": request_id},
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": JSON_SCHEMA}})
        chunks = list(stream)
    assert json.loads("".join(chunk.choices[0].delta.content or "" for chunk in chunks)) == {"answer": 42}
    assert chunks[-1].dispatch == {"request_id": request_id, "valid": True}
    result = queue_row(database, request_id)["result"]
    assert (result["valid"], result["reasons"], result["response"]) == (True, [], {"answer": 42})
    assert performance_rows(database, request_id) == [ok_row(model, output_format="json", output_tokens=2)]


def test_openai_schema_with_a_pattern_re2_cannot_run_is_a_422_and_records_nothing(gpt, database, model):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        gpt.chat.completions.create(model="auto", messages=USER, response_format={
            "type": "json_schema", "json_schema": {"name": "answer", "schema": LOOKAHEAD_SCHEMA}})
    assert caught.value.response.json()["error"] == {
        "message": LOOKAHEAD_PROBLEM, "type": "invalid_request_error", "code": 422}
    assert database.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"] == 0


def test_openai_models_lists_auto_and_the_models_the_dispatcher_can_run(gpt, model):
    assert [(m.id, m.object, m.owned_by) for m in gpt.models.list()] == [
        ("auto", "model", "dispatcher"), ("fake-chat:1", "model", "dispatcher")]


def test_openai_unknown_model_is_a_404_problem_and_a_failed_request(gpt, database, model):
    request_id = new_id()
    with pytest.raises(openai.NotFoundError) as caught:
        gpt.chat.completions.create(model="nope:1", messages=USER, extra_headers={"X-Request-ID": request_id})

    error = caught.value
    assert (error.status_code, error.response.headers["content-type"]) == (404, "application/problem+json")
    assert error.response.json() == {
        "type": "about:blank", "title": "Not Found", "status": 404, "detail": "model nope:1 does not exist",
        "request_id": request_id,
        "error": {"message": "model nope:1 does not exist", "type": "invalid_request_error", "code": 404}}
    assert (error.message, error.type) == ("Error code: 404 - model nope:1 does not exist", "invalid_request_error")
    row = queue_row(database, request_id)
    assert (row["status"], row["error_details"]) == ("failed", {"status": 404,
                                                                "detail": "model nope:1 does not exist"})


def test_openai_streaming_with_an_unknown_model_fails_before_the_stream(gpt, database, model):
    with pytest.raises(openai.NotFoundError) as caught:
        gpt.chat.completions.create(model="nope", messages=USER, stream=True)
    assert caught.value.response.json()["detail"] == "model nope does not exist"


@pytest.mark.parametrize("headers, errors", [
    ({"X-Dispatch-Task-Type": "poetry"}, {"X-Dispatch-Task-Type": [
        "Must be one of: text-generation, code-generation, question-answering, conversation, summarization,"
        " classification."]}),
    ({"X-Dispatch-Complexity": "extreme"}, {"X-Dispatch-Complexity": [
        "Must be an integer from 1 to 10, or one of: low, medium, high."]}),
    ({"X-Dispatch-Complexity": "11"}, {"X-Dispatch-Complexity": [
        "Must be an integer from 1 to 10, or one of: low, medium, high."]}),
    ({"X-Dispatch-Max-Retries": "9"}, {"X-Dispatch-Max-Retries": [
        "Must be greater than or equal to 0 and less than or equal to 5."]}),
])
def test_openai_bad_dispatch_headers_are_422_and_record_nothing(gpt, database, model, headers, errors):
    request_id = new_id()
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        gpt.chat.completions.create(model="auto", messages=USER,
                                    extra_headers={"X-Request-ID": request_id, **headers})
    assert caught.value.response.json() == {
        "type": "about:blank", "title": "Unprocessable Entity", "status": 422,
        "detail": "The request is invalid: see errors for each field.", "request_id": request_id,
        "errors": {"headers": errors},
        "error": {"message": "The request is invalid: see errors for each field.",
                  "type": "invalid_request_error", "code": 422}}
    assert queue_row(database, request_id) is None


def test_openai_bad_model_name_and_body_are_422(gpt, database, model):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        gpt.chat.completions.create(model="Not A Model!", messages=USER)
    assert caught.value.response.json()["errors"] == {"json": {"model": ["Unknown model name syntax."]}}
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        gpt.chat.completions.create(model="auto", messages=[{"role": "assistant", "content": "hi"}])
    assert caught.value.response.json()["errors"] == {"json": {"messages": ["The last message must be a user message."]}}
    assert database.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"] == 0


def test_without_a_token_limit_the_answer_is_as_long_as_the_model_makes_it(gpt, dispatcher, database):
    """OpenAI without max_tokens, Ollama with num_predict -1 (its default): no limit is made up."""
    long_reply = " ".join(f"w{n}" for n in range(300))
    with FakeModelServer(reply=long_reply) as server:
        serve(database, server, name="fake-long")
        completion = gpt.chat.completions.create(model="auto", messages=USER, max_tokens=None)
        answer = llama(dispatcher).chat(model="auto", messages=USER, stream=False, options={"num_predict": -1})
        sent = [body.get("max_tokens") for body in generation_requests(server)]
    assert (completion.choices[0].finish_reason, completion.usage.completion_tokens) == ("stop", 300)
    assert (answer.done_reason, answer.eval_count) == ("stop", 300)
    assert sent == [None, None]


def test_stop_strings_and_any_seed_reach_the_model(gpt, dispatcher, model, fake):
    gpt.chat.completions.create(model="auto", messages=USER, stop="END", seed=-1)
    llama(dispatcher).chat(model="auto", messages=USER, stream=False, options={"stop": ["END", "\n\n"], "seed": -1})
    assert [(body["stop"], body["seed"]) for body in generation_requests(fake)] == [
        (["END"], -1), (["END", "\n\n"], -1)]


def test_tools_images_and_several_choices_are_refused_not_dropped(gpt, dispatcher, database, model, fake):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        gpt.chat.completions.create(model="auto", messages=USER, tools=tools, n=2)
    assert caught.value.response.json()["errors"] == {"json": {
        "tools": ["Tools are not supported by the dispatcher."], "n": ["Only one choice (n: 1) is supported."]}}
    with pytest.raises(ollama.ResponseError) as caught:
        llama(dispatcher).chat(model="auto", messages=[{**USER[0], "images": ["aGVsbG8="]}], tools=tools,
                               stream=False)
    assert caught.value.status_code == 422
    with pytest.raises(ollama.ResponseError) as caught:
        llama(dispatcher).generate(model="auto", prompt="What is this?", images=["aGVsbG8="])
    assert caught.value.status_code == 422
    for refused in ({"raw": True}, {"suffix": "return x"}, {"context": [1, 2, 3]}):
        with pytest.raises(ollama.ResponseError) as caught:
            llama(dispatcher).generate(model="auto", prompt="def f():", **refused)
        assert caught.value.status_code == 422, refused
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        gpt.chat.completions.create(model="auto", messages=USER, logprobs=True)
    assert caught.value.response.json()["errors"] == {"json": {"logprobs": [
        "Log probabilities are not supported by the dispatcher."]}}
    assert generation_requests(fake) == []
    assert database.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"] == 0

    # The ollama client sends an empty tool list with every chat: that one is fine.
    assert llama(dispatcher).chat(model="auto", messages=USER, stream=False).message.content == REPLY


def test_a_model_the_dispatcher_cannot_run_is_a_404_not_a_502_the_client_retries(dispatcher, database, model):
    client = openai.OpenAI(base_url=f"{dispatcher}/v1", api_key="unused")   # retries 5xx answers
    assert "codellama:7b" not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="codellama:7b", messages=USER)
    assert caught.value.response.json()["detail"] == (
        "model codellama:7b is not served here: its runtime driver docker is not enabled.")
    assert database.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"] == 1
    assert database.execute("SELECT count(*) AS n FROM performance_logs").fetchone()["n"] == 0


def test_openai_when_every_attempt_fails_the_client_gets_a_502(gpt, database):
    with FakeModelServer(fault="error") as broken:
        model = serve(database, broken, name="fake-broken")
        request_id = new_id()
        with pytest.raises(openai.InternalServerError) as caught:
            gpt.chat.completions.create(model="auto", messages=USER,
                                        extra_headers={"X-Request-ID": request_id, "X-Dispatch-Max-Retries": "1"})
    body = caught.value.response.json()
    assert (body["status"], body["dispatch_id"], len(body["attempts"])) == (502, request_id, 2)
    assert queue_row(database, request_id)["status"] == "failed"
    assert [r["error_class"] for r in performance_rows(database, request_id)] == ["server_error"] * 2
    assert runtime_load(database, model) == [0]


def test_openai_stream_broken_off_by_the_model_raises_in_the_client(gpt, database):
    with FakeModelServer(fault="drop") as dropping:
        model = serve(database, dropping, name="fake-drop")
        request_id = new_id()
        stream = gpt.chat.completions.create(model="auto", messages=USER, stream=True,
                                             extra_headers={"X-Request-ID": request_id})
        contents = []
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                contents.append(chunk.choices[0].delta.content)
    assert contents == ["", "Hello"]
    assert caught.value.message == "the model server broke off its stream: Response ended prematurely"
    row = queue_row(database, request_id)
    assert (row["status"], row["error_details"]["status"]) == ("failed", 502)
    assert [r["error_class"] for r in performance_rows(database, request_id)] == ["server_error"]
    assert runtime_load(database, model) == [0]


def test_a_stream_that_fails_before_its_first_token_is_retried_unseen(gpt, database):
    with FakeModelServer(reply=REPLY, fault="garbage", fault_count=1) as flaky:
        model = serve(database, flaky, name="fake-flaky")
        request_id = new_id()
        stream = gpt.chat.completions.create(model="auto", messages=USER, stream=True,
                                             extra_headers={"X-Request-ID": request_id})
        contents = [chunk.choices[0].delta.content or "" for chunk in stream]
    assert "".join(contents) == REPLY
    assert [(r["attempt"], r["success"], r["error_class"]) for r in performance_rows(database, request_id)] == [
        (1, False, "server_error"), (2, True, None)]
    row = queue_row(database, request_id)
    assert (row["status"], row["assigned_model_id"]) == ("completed", model["id"])


def test_a_client_that_disconnects_mid_stream_releases_the_runtime(dispatcher, database):
    words = " ".join(f"w{n}" for n in range(200))
    with FakeModelServer(reply=words, fault="slow", delay_ms=20) as slow:
        model = serve(database, slow, name="fake-slow")
        request_id = new_id()
        with requests.post(f"{dispatcher}/v1/chat/completions", stream=True, timeout=10,
                           json={"model": "auto", "messages": USER, "stream": True},
                           headers={"X-Request-ID": request_id}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith(b"data: ")
            assert runtime_load(database, model) == [1]
        # The server notices at its next write; then the runtime is released and the request ends.
        queue_row(database, request_id)
    assert runtime_load(database, model) == [0]
    assert queue_row(database, request_id)["error_details"] == {
        "error": "client_disconnected", "detail": "The client disconnected before the answer was complete.",
        "attempts": [{"number": 1, "model": "fake-slow:1", "model_id": str(model["id"]), "runtime_id": ANY,
                      "outcome": "client_disconnected",
                      "error": "The client disconnected before the answer was complete.", "reasons": [],
                      "repair": False, "duration_ms": ANY}]}
    assert [r["error_class"] for r in performance_rows(database, request_id)] == ["client_disconnected"]


def test_a_stream_closed_before_any_of_it_is_read_releases_the_runtime(fresh_database_url, settings, database,
                                                                     model):
    app = create_app({"TESTING": True, "DATABASE_URL": fresh_database_url, "API_TOKEN": "",
                      "RUNTIME_DRIVERS": ("external",), "RUNTIME_DIR": settings.runtime_dir,
                      "RECONCILE_ON_START": False})
    try:
        request_id = new_id()
        response = app.test_client().post("/v1/chat/completions", buffered=False, headers={"X-Request-ID": request_id},
                                          json={"model": "auto", "messages": USER, "stream": True})
        assert runtime_load(database, model) == [1]
        response.close()    # as a server does when its client has gone before the first write
    finally:
        app.extensions["database"].close()
    assert runtime_load(database, model) == [0]
    assert queue_row(database, request_id)["error_details"]["error"] == "client_disconnected"


# --- Ollama ----------------------------------------------------------------------------------

def test_ollama_chat_without_streaming(dispatcher, database, model):
    request_id = new_id()
    answer = llama(dispatcher, **{"X-Request-ID": request_id}).chat(model="auto", messages=USER, stream=False)

    assert answer.model_dump(exclude_none=True) == {
        "model": "auto", "created_at": ANY, "done": True, "done_reason": "stop", "total_duration": ANY,
        "load_duration": ANY, "prompt_eval_count": ANY, "eval_count": 5, "eval_duration": ANY,
        "message": {"role": "assistant", "content": REPLY}}
    assert queue_row(database, request_id)["status"] == "completed"
    assert performance_rows(database, request_id) == [ok_row(model)]


def test_ollama_chat_streams_ndjson(dispatcher, database, model):
    request_id = new_id()
    parts = list(llama(dispatcher, **{"X-Request-ID": request_id}).chat(model="fake-chat:latest", messages=USER,
                                                                        stream=True))

    assert [(p.message.content, p.done) for p in parts] == [
        ("Hello", False), (" from", False), (" the", False), (" fake", False), (" model.", False), ("", True)]
    assert (parts[-1].model, parts[-1].done_reason, parts[-1].eval_count) == ("fake-chat:latest", "stop", 5)
    assert queue_row(database, request_id)["status"] == "completed"
    assert performance_rows(database, request_id) == [ok_row(model)]
    assert runtime_load(database, model) == [0]


def test_ollama_generate_with_and_without_streaming(dispatcher, database, model, fake):
    client = llama(dispatcher, **{"X-Dispatch-Task-Type": "text-generation"})
    answer = client.generate(model="auto", prompt="Say hello.", system="Be brief.",
                             options={"num_predict": 3, "temperature": 0.1})
    assert (answer.response, answer.done, answer.done_reason, answer.eval_count) == ("Hello from the", True,
                                                                                     "length", 3)
    sent = generation_requests(fake)[-1]
    assert (sent["max_tokens"], sent["temperature"], sent["messages"][0]) == (
        3, 0.1, {"role": "system", "content": "Be brief."})

    parts = list(client.generate(model="auto", prompt="Say hello.", stream=True))
    assert "".join(p.response for p in parts) == REPLY
    assert [p.done for p in parts] == [False] * 5 + [True]
    rows = database.execute("SELECT task_type, status FROM request_queue ORDER BY created_at").fetchall()
    assert rows == [{"task_type": "text-generation", "status": "completed"}] * 2


@pytest.mark.parametrize("output_format", ["json", JSON_SCHEMA])
def test_ollama_format_asks_for_json_and_validates_it(dispatcher, database, output_format):
    with FakeModelServer(reply='{"answer": 42}') as server:
        model = serve(database, server, name="fake-json")
        request_id = new_id()
        answer = llama(dispatcher, **{"X-Request-ID": request_id}).chat(
            model="auto", messages=USER, format=output_format)
    assert json.loads(answer.message.content) == {"answer": 42}
    expected = {"type": "json_object"} if output_format == "json" else {
        "type": "json_schema", "json_schema": {"name": "output", "schema": JSON_SCHEMA}}
    assert generation_requests(server)[-1]["response_format"] == expected
    assert performance_rows(database, request_id) == [ok_row(model, output_format="json", output_tokens=2)]


def test_ollama_streamed_json_that_does_not_validate_says_so_in_its_last_line(dispatcher, database):
    reasons = [{"code": "no_json_found", "message": "No JSON object or array was found in the output."}]
    with FakeModelServer(reply="forty-two") as server:
        model = serve(database, server, name="fake-prose")
        request_id, raw_id = new_id(), new_id()
        parts = list(llama(dispatcher, **{"X-Request-ID": request_id}).chat(
            model="auto", messages=USER, format=JSON_SCHEMA, stream=True))
        with requests.post(f"{dispatcher}/api/chat", timeout=10, headers={"X-Request-ID": raw_id},
                           json={"model": "auto", "messages": USER, "format": "json"}) as raw:
            last = json.loads(raw.text.splitlines()[-1])
    assert [(p.message.content, p.done) for p in parts] == [("forty-two", False), ("", True)]
    assert (last["done"], last["dispatch"]) == (
        True, {"request_id": raw_id, "valid": False, "reasons": reasons})
    row = queue_row(database, request_id)
    assert (row["status"], row["result"]["valid"], row["result"]["reasons"]) == ("completed", False, reasons)
    assert performance_rows(database, request_id) == [{
        **ok_row(model, output_format="json", validation_passed=False, output_tokens=1),
        "error_class": "invalid_output"}]
    assert len(generation_requests(server)) == 2     # one per request: a streamed answer is never repaired


def test_ollama_bodies_are_json_whatever_their_content_type(dispatcher, model):
    """As Ollama's own: its curl examples send no JSON content type."""
    response = requests.post(f"{dispatcher}/api/chat", data=json.dumps({"model": "auto", "messages": USER,
                                                                       "stream": False}),
                             headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert (response.status_code, response.json()["message"]["content"]) == (200, REPLY)


def test_a_complexity_header_too_long_to_be_one_is_a_422(gpt, model):
    with pytest.raises(openai.UnprocessableEntityError):
        gpt.chat.completions.create(model="auto", messages=USER,
                                    extra_headers={"X-Dispatch-Complexity": "9" * 5000})


def test_ollama_tags_ps_and_version(dispatcher, database, model):
    client = llama(dispatcher)
    assert [(m.model, m.size, m.details.family) for m in client.list().models] == [
        ("auto", 0, "auto"), ("fake-chat:1", 0, "fake-chat")]
    assert client.ps().models == []

    client.chat(model="auto", messages=USER, stream=False)
    running = client.ps().models
    assert [(m.model, m.name, m.size_vram) for m in running] == [("fake-chat:1", "fake-chat:1", 0)]
    version = requests.get(f"{dispatcher}/api/version", timeout=5)
    assert (version.status_code, version.json()) == (200, {"version": "0.6.3"})


def test_ollama_unknown_model_is_a_404_the_client_reports(dispatcher, database, model):
    request_id = new_id()
    with pytest.raises(ollama.ResponseError) as caught:
        llama(dispatcher, **{"X-Request-ID": request_id}).chat(model="nope", messages=USER, stream=False)
    assert (caught.value.status_code, caught.value.error) == (404, "model nope does not exist")
    assert queue_row(database, request_id)["status"] == "failed"

    with pytest.raises(ollama.ResponseError) as caught:
        list(llama(dispatcher).generate(model="nope", prompt="hi", stream=True))
    assert (caught.value.status_code, caught.value.error) == (404, "model nope does not exist")


def test_ollama_bad_header_is_a_422_the_client_reports(dispatcher, database, model):
    with pytest.raises(ollama.ResponseError) as caught:
        llama(dispatcher, **{"X-Dispatch-Complexity": "0"}).chat(model="auto", messages=USER, stream=False)
    assert (caught.value.status_code, caught.value.error) == (
        422, "The request is invalid: see errors for each field.")
    assert database.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"] == 0


def test_ollama_format_with_a_pattern_re2_cannot_run_is_a_422_the_client_reports(dispatcher, database, model):
    with pytest.raises(ollama.ResponseError) as caught:
        llama(dispatcher).chat(model="auto", messages=USER, format=LOOKAHEAD_SCHEMA, stream=False)
    assert (caught.value.status_code, caught.value.error) == (422, LOOKAHEAD_PROBLEM)
    assert database.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"] == 0


def test_ollama_stream_broken_off_by_the_model_raises_in_the_client(dispatcher, database):
    with FakeModelServer(fault="drop") as dropping:
        serve(database, dropping, name="fake-drop")
        parts = []
        with pytest.raises(ollama.ResponseError) as caught:
            for part in llama(dispatcher).chat(model="auto", messages=USER, stream=True):
                parts.append(part.message.content)
    assert parts == ["Hello"]
    assert caught.value.error == "the model server broke off its stream: Response ended prematurely"

