"""The Ollama and OpenAI clients against the fake model server: answers, streams, options and faults."""
from __future__ import annotations

import json
import os
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from unittest.mock import ANY

import pytest

from fake_model_server import FakeModelServer
from services.orchestrator import protocols
from services.orchestrator.protocols import (ModelServerError, ModelServerTimeout, OllamaClient, OpenAIClient,
                                             Options, client_for, served_model_name, server_ready)

REPLY = "Hello from the fake model."


def test_openai_generate_sends_options_and_returns_tokens_and_timings(fake_server):
    client = OpenAIClient(fake_server.url, "fake")
    options = Options(max_tokens=3, temperature=0.2, stop=("\n",), response_format="json", seed=7)

    generation = client.generate("Say hello please", options=options)

    assert generation.as_dict() == {
        "text": "Hello from the", "input_tokens": 3, "output_tokens": 3, "finish_reason": "length",
        "timings": {"load_ms": None, "prompt_ms": 0.5, "generation_ms": 3.0, "total_ms": ANY,
                    "tokens_per_second": 1000.0}}
    assert generation.timings.total_ms > 0
    assert fake_server.requests[-1] == {"method": "POST", "path": "/v1/chat/completions", "body": {
        "model": "fake", "messages": [{"role": "user", "content": "Say hello please"}], "stream": False,
        "max_tokens": 3, "temperature": 0.2, "stop": ["\n"], "seed": 7, "response_format": {"type": "json_object"}}}


def test_openai_json_schema_and_chat_messages(fake_server):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]

    generation = OpenAIClient(fake_server.url, "fake").generate(messages=messages,
                                                                options=Options(response_format=schema))

    assert generation.text == REPLY
    assert generation.finish_reason == "stop"
    assert fake_server.requests[-1]["body"] == {
        "model": "fake", "messages": messages, "stream": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}}


def test_openai_stream_yields_chunks_then_the_whole_generation(fake_server):
    stream = OpenAIClient(fake_server.url, "fake").stream("Hi", options=Options(max_tokens=2))

    assert list(stream) == ["Hello", " from"]
    assert stream.result.as_dict() == {
        "text": "Hello from", "input_tokens": 1, "output_tokens": 2, "finish_reason": "length",
        "timings": {"load_ms": None, "prompt_ms": 0.5, "generation_ms": 2.0, "total_ms": ANY,
                    "tokens_per_second": 1000.0}}
    assert fake_server.requests[-1]["body"]["stream_options"] == {"include_usage": True}


def test_ollama_generate_maps_options_and_nanosecond_timings(fake_server):
    client = OllamaClient(fake_server.url, "llama2:7b")
    options = Options(max_tokens=2, temperature=0.0, stop=("END",), response_format="json", seed=1)

    generation = client.generate("one two three", options=options)

    assert generation.as_dict() == {
        "text": "Hello from", "input_tokens": 3, "output_tokens": 2, "finish_reason": "length",
        "timings": {"load_ms": 1.0, "prompt_ms": 0.5, "generation_ms": 2.0, "total_ms": ANY,
                    "tokens_per_second": 1000.0}}
    assert fake_server.requests[-1] == {"method": "POST", "path": "/api/generate", "body": {
        "model": "llama2:7b", "stream": False, "prompt": "one two three", "format": "json",
        "options": {"num_predict": 2, "temperature": 0.0, "seed": 1, "stop": ["END"]}}}


def test_ollama_chat_and_stream(fake_server):
    client = OllamaClient(fake_server.url, "llama2:7b")
    messages = [{"role": "user", "content": "Hi there"}]

    assert client.generate(messages=messages).text == REPLY
    assert fake_server.requests[-1]["path"] == "/api/chat"
    stream = client.stream(messages=messages)
    assert "".join(stream) == REPLY
    assert (stream.result.text, stream.result.input_tokens, stream.result.output_tokens) == (REPLY, 2, 5)


def test_ollama_pull_reports_progress_and_lists_models(fake_server):
    client = OllamaClient(fake_server.url, "orca-mini:3b")
    progress = []

    last = client.pull(progress.append)

    assert last == {"status": "success"}
    assert [line["status"] for line in progress] == ["pulling manifest", "downloading", "downloading", "success"]
    assert progress[2] == {"status": "downloading", "digest": "sha256:fake", "total": 100, "completed": 100}
    assert client.models() == ["fake", "orca-mini:3b"]
    assert [model["name"] for model in client.running()] == ["fake"]


def test_openai_models(fake_server):
    assert OpenAIClient(fake_server.url, "fake").models() == ["fake"]


def test_ready_is_false_while_loading_and_when_nothing_listens():
    with FakeModelServer(load_ms=60_000) as server:
        assert server_ready("openai", server.url) is False
        assert server.requests == [{"method": "GET", "path": "/health", "body": None}]
        server.config.load_ms = 0
        assert server_ready("openai", server.url) is True
        assert server_ready("ollama", server.url) is True
        url = server.url
    assert server_ready("openai", url) is False
    assert server_ready("ollama", url) is False


@pytest.mark.parametrize("client_class", [OpenAIClient, OllamaClient])
def test_a_500_is_a_bad_gateway(fake_server, client_class):
    fake_server.config.fault = "error"

    with pytest.raises(ModelServerError) as raised:
        client_class(fake_server.url, "fake").generate("Hi")

    path = "/v1/chat/completions" if client_class is OpenAIClient else "/api/generate"
    assert raised.value.status == 502
    assert raised.value.detail == f'{fake_server.url}{path} answered 500: {{"error": "fake failure"}}'
    assert raised.value.extensions == {"upstream_status": 500}


@pytest.mark.parametrize("client_class", [OpenAIClient, OllamaClient])
def test_garbage_json_is_a_bad_gateway(fake_server, client_class):
    fake_server.config.fault = "garbage"

    with pytest.raises(ModelServerError, match="answered something that is not JSON"):
        client_class(fake_server.url, "fake").generate("Hi")
    with pytest.raises(ModelServerError):
        list(client_class(fake_server.url, "fake").stream("Hi"))


@pytest.fixture
def canned_server():
    """A server answering every POST with the body set in `answer` (a stream: text/event-stream)."""
    answer = {"body": b"{}"}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer["body"])))
            self.end_headers()
            self.wfile.write(answer["body"])

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answer
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("client_class, body", [
    (OpenAIClient, {"choices": [{"message": "hi"}]}),
    (OpenAIClient, {"choices": [{"message": {"content": [{"type": "text", "text": "hi"}]}}]}),
    (OpenAIClient, {"choices": [{"message": {"content": "hi"}}], "usage": {"completion_tokens": "2"}}),
    (OpenAIClient, {"choices": "hi"}),
    (OllamaClient, {"message": ["hi"]}),
    (OllamaClient, {"response": 42, "done": True}),
    (OllamaClient, {"response": "hi", "done": True, "eval_count": -1}),
])
def test_an_answer_of_another_shape_is_a_bad_gateway(canned_server, client_class, body):
    url, answer = canned_server
    answer["body"] = json.dumps(body).encode()
    with pytest.raises(ModelServerError, match="the model server's answer has an unexpected shape"):
        client_class(url, "fake").generate("Hi")


@pytest.mark.parametrize("client_class, body", [
    (OpenAIClient, b'data: ["x"]\n\ndata: [DONE]\n\n'),
    (OpenAIClient, b'data: {"choices": [{"delta": {"content": 7}}]}\n\ndata: [DONE]\n\n'),
    (OllamaClient, b'["x"]\n'),
    (OllamaClient, b'{"message": {"content": {"text": "x"}}}\n'),
])
def test_a_stream_of_another_shape_is_a_bad_gateway(canned_server, client_class, body):
    url, answer = canned_server
    answer["body"] = body
    with pytest.raises(ModelServerError, match="the model server's stream has an unexpected shape"):
        list(client_class(url, "fake").stream("Hi"))


@pytest.mark.parametrize("client_class", [OpenAIClient, OllamaClient])
def test_a_dropped_connection_is_a_bad_gateway_and_is_not_retried(fake_server, client_class):
    fake_server.config.fault = "drop"

    with pytest.raises(ModelServerError, match="failed: Empty reply from server"):
        client_class(fake_server.url, "fake").generate("Hi")
    assert len([r for r in fake_server.requests if r["method"] == "POST"]) == 1


def test_a_model_server_is_never_reached_through_an_environment_proxy(fake_server, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")   # nothing listens there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)

    assert OpenAIClient(fake_server.url, "fake").generate("Hi").text == REPLY


def test_a_restarted_server_is_reached_again_on_a_new_connection():
    with FakeModelServer() as server:
        client = OpenAIClient(server.url, "fake")
        assert client.generate("Hi").text == REPLY       # a connection kept open by this thread
        port = server.port
    time.sleep(1.1)  # libcurl checks a kept-open connection before reuse once it has been idle a second
    with FakeModelServer(port=port):                      # the old connection is dead
        assert client.generate("Hi").text == REPLY


def test_a_forked_process_opens_connections_of_its_own():
    parent = protocols._curl_pool
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writer, b"new" if protocols._curl_pool is not parent else b"same")
        os._exit(0)
    os.waitpid(child, 0)

    assert os.read(reader, 10) == b"new"
    assert protocols._curl_pool is parent


def test_calls_one_after_another_share_one_connection_whatever_their_thread(fake_server):
    client = OpenAIClient(fake_server.url, "fake")
    for _ in range(3):
        thread = threading.Thread(target=client.generate, args=("Hi",))
        thread.start()
        thread.join()

    assert fake_server.connections_opened == 1
    assert len([r for r in fake_server.requests if r["method"] == "POST"]) == 3


def test_a_kept_open_connection_that_dies_mid_call_is_not_sent_the_post_again(fake_server):
    client = OpenAIClient(fake_server.url, "fake")
    client.generate("Hi")                      # the connection stays open
    fake_server.config.fault = "drop"          # the server reads the next request, then hangs up

    with pytest.raises(ModelServerError):
        client.generate("Hi")
    assert len([r for r in fake_server.requests if r["method"] == "POST"]) == 2


@pytest.fixture
def tls_server(tmp_path):
    """An OpenAI-compatible answer over HTTPS, with a self-signed certificate for 127.0.0.1."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    answer = json.dumps({"choices": [{"message": {"content": REPLY}, "finish_reason": "stop"}], "usage": {}}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


@pytest.fixture
def trusted_certificates(monkeypatch):
    """Trust what SSL_CERT_FILE names, as the system's CA store (read again for each test)."""
    def trust(cert_file):
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
        protocols._trusted_certificates.cache_clear()
    yield trust
    protocols._trusted_certificates.cache_clear()


def test_https_endpoints_are_checked_against_the_systems_certificates(tls_server, trusted_certificates):
    url, cert = tls_server
    with pytest.raises(ModelServerError, match="certificate"):   # not in the system's store
        OpenAIClient(url, "fake").generate("Hi")

    trusted_certificates(cert)
    assert OpenAIClient(url, "fake").generate("Hi").text == REPLY



@pytest.mark.parametrize("client_class", [OpenAIClient, OllamaClient])
def test_a_stream_dropped_midway_is_a_bad_gateway(fake_server, client_class):
    fake_server.config.fault = "drop"
    stream = client_class(fake_server.url, "fake").stream("Hi")
    received = []

    with pytest.raises(ModelServerError, match="broke off its stream"):
        for chunk in stream:
            received.append(chunk)

    assert received == ["Hello"]
    assert stream.result is None


@pytest.mark.parametrize("client_class", [OpenAIClient, OllamaClient])
def test_a_slow_answer_times_out(fake_server, client_class):
    fake_server.config.fault, fake_server.config.delay_ms = "slow", 2000

    with pytest.raises(ModelServerTimeout) as raised:
        client_class(fake_server.url, "fake", timeout_s=0.2).generate("Hi")

    assert raised.value.status == 504
    assert "did not answer within 0.2 s" in raised.value.detail


def test_fault_count_fails_only_the_first_requests(fake_server):
    fake_server.config.fault, fake_server.config.fault_count = "error", 1
    client = OpenAIClient(fake_server.url, "fake")

    with pytest.raises(ModelServerError):
        client.generate("Hi")
    assert client.generate("Hi").text == REPLY


def test_an_unreachable_server_is_a_bad_gateway():
    with FakeModelServer() as server:
        url = server.url
    with pytest.raises(ModelServerError, match="failed"):
        OpenAIClient(url, "fake").generate("Hi")


def test_client_for_picks_protocol_and_served_name():
    openai_model = {"protocol": "openai", "name": "smollm2", "version": "1",
                    "runtime_config": {"model_alias": "smol", "request_timeout_s": 12}}
    ollama_model = {"protocol": "ollama", "name": "llama2", "version": "7b", "runtime_config": {}}

    client = client_for(openai_model, "http://127.0.0.1:1/")

    assert (type(client), client.base_url, client.model_name, client.timeout_s) == (
        OpenAIClient, "http://127.0.0.1:1", "smol", 12.0)
    assert served_model_name(ollama_model) == "llama2:7b"
    assert served_model_name({**ollama_model, "runtime_config": {"model_name": "llama2:latest"}}) == "llama2:latest"
    assert isinstance(client_for(ollama_model, "http://x"), OllamaClient)
