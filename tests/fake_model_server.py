"""A real HTTP model server for tests, speaking the Ollama and OpenAI protocols, with faults on demand.

In a test:   with FakeModelServer(reply="hi") as fake: ... fake.url ... fake.config.fault = "error"
As a process: python tests/fake_model_server.py --port N [--fault slow|error|drop|garbage]
              [--delay-ms MS] [--fault-count N] [--load-ms MS] [--reply TEXT] [--model NAME]
              [--allocate-mb MB]

Faults hit generation requests (`/v1/chat/completions`, `/api/generate`, `/api/chat`):
  slow     wait `delay_ms` before answering (between chunks when streaming)
  error    answer 500 with a JSON error
  drop     close the connection without an answer (mid-stream when streaming)
  garbage  answer 200 with a body that is not JSON
`fault_count` N > 0 faults only the first N generation requests, then answers normally.
`load_ms` answers 503 "Loading model" (like llama.cpp) for that long after start.
`--allocate-mb` fills that much memory before listening, as a real server loads its weights.
Tokens are words: `max_tokens` cuts the reply to that many words (finish_reason "length").
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("slow", "error", "drop", "garbage")
GENERATION_PATHS = ("/v1/chat/completions", "/api/generate", "/api/chat")


@dataclass
class FakeConfig:
    reply: str = "Hello from the fake model."
    model: str = "fake"
    fault: str | None = None
    delay_ms: int = 0
    fault_count: int = 0
    load_ms: int = 0


@dataclass
class FakeState:
    config: FakeConfig
    started: float = field(default_factory=time.monotonic)
    requests: list[dict] = field(default_factory=list)
    pulled: set[str] = field(default_factory=set)
    generations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def loading(self) -> bool:
        return (time.monotonic() - self.started) * 1000 < self.config.load_ms

    def next_fault(self) -> str | None:
        """The fault for the next generation request, counting it."""
        with self.lock:
            self.generations += 1
            count = self.config.fault_count
            if self.config.fault and (count <= 0 or self.generations <= count):
                return self.config.fault
            return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in separate writes: no 40 ms delayed-ACK stall
    server: _Server

    def log_message(self, format: str, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)
        self.server.connections_opened += 1

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    # Routing.
    def do_GET(self) -> None:
        state = self.server.state
        state.requests.append({"method": "GET", "path": self.path, "body": None})
        name = state.config.model
        if self.path == "/health":
            if state.loading():
                self._json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
            else:
                self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "fake"}]})
        elif self.path == "/api/version":
            self._json(200, {"version": "0.0.0-fake"})
        elif self.path == "/api/tags":
            self._json(200, {"models": [_ollama_model(n) for n in sorted({name, *state.pulled})]})
        elif self.path == "/api/ps":
            self._json(200, {"models": [_ollama_model(name)]})
        else:
            self._json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        state = self.server.state
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        except ValueError:
            self._json(400, {"error": "invalid JSON"})
            return
        state.requests.append({"method": "POST", "path": self.path, "body": body})
        if self.path == "/api/pull":
            self._pull(body)
            return
        if self.path not in GENERATION_PATHS:
            self._json(404, {"error": f"no route {self.path}"})
            return
        if state.loading():
            self._json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
            return
        fault = state.next_fault()
        stream = body.get("stream", self.path.startswith("/api/"))  # Ollama streams unless told not to
        if fault == "error":
            self._json(500, {"error": "fake failure"})
        elif fault == "garbage":
            self._raw(200, b"this is {not json", "application/json")
        elif fault == "drop" and not stream:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            delay_s = state.config.delay_ms / 1000 if fault == "slow" else 0.0
            answer = _Answer.build(body, state.config.reply)
            if stream:
                self._stream(answer, delay_s, drop=fault == "drop")
            else:
                time.sleep(delay_s)
                self._json(200, answer.openai() if self.path.startswith("/v1/") else answer.ollama(self.path))

    # Answers.
    def _pull(self, body: dict) -> None:
        name = str(body.get("model") or body.get("name") or "")
        lines = [{"status": "pulling manifest"},
                 {"status": "downloading", "digest": "sha256:fake", "total": 100, "completed": 50},
                 {"status": "downloading", "digest": "sha256:fake", "total": 100, "completed": 100},
                 {"status": "success"}]
        self.server.state.pulled.add(name)
        self._start_chunked("application/x-ndjson")
        for line in lines:
            self._chunk(json.dumps(line).encode() + b"\n")
        self._chunk(b"")

    def _stream(self, answer: _Answer, delay_s: float, *, drop: bool) -> None:
        openai = self.path.startswith("/v1/")
        self._start_chunked("text/event-stream" if openai else "application/x-ndjson")
        chunks = answer.openai_chunks() if openai else answer.ollama_chunks(self.path)
        for index, chunk in enumerate(chunks):
            time.sleep(delay_s)
            self._chunk(chunk)
            if drop and index == 0:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
        self._chunk(b"")

    def _json(self, status: int, body: dict) -> None:
        self._raw(status, json.dumps(body).encode(), "application/json")

    def _raw(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_chunked(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


@dataclass
class _Answer:
    model: str
    words: list[str]
    input_tokens: int
    finish_reason: str

    @classmethod
    def build(cls, body: dict, reply: str) -> _Answer:
        words = reply.split(" ")
        limit = body.get("max_tokens") or (body.get("options") or {}).get("num_predict")
        finish = "stop"
        if isinstance(limit, int) and 0 < limit < len(words):
            words, finish = words[:limit], "length"
        prompt = body.get("prompt") or " ".join(str(m.get("content", "")) for m in body.get("messages") or [])
        return cls(str(body.get("model", "")), words, len(str(prompt).split()), finish)

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def openai(self) -> dict:
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                             "finish_reason": self.finish_reason}],
                "usage": self._usage(), "timings": self._timings()}

    def openai_chunks(self) -> list[bytes]:
        def event(payload: dict) -> bytes:
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model}
        pieces = [w if i == 0 else " " + w for i, w in enumerate(self.words)]
        chunks = [event({**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]})
                  for p in pieces]
        chunks.append(event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": self.finish_reason}],
                             "usage": self._usage(), "timings": self._timings()}))
        return [*chunks, b"data: [DONE]\n\n"]

    def ollama(self, path: str) -> dict:
        return {**self._ollama_piece(path, self.text), "done": True, "done_reason": self.finish_reason,
                **self._ollama_counts()}

    def ollama_chunks(self, path: str) -> list[bytes]:
        pieces = [w if i == 0 else " " + w for i, w in enumerate(self.words)]
        lines = [{**self._ollama_piece(path, p), "done": False} for p in pieces]
        lines.append({**self._ollama_piece(path, ""), "done": True, "done_reason": self.finish_reason,
                      **self._ollama_counts()})
        return [json.dumps(line).encode() + b"\n" for line in lines]

    def _ollama_piece(self, path: str, text: str) -> dict:
        base = {"model": self.model, "created_at": "2025-01-01T00:00:00Z"}
        if path == "/api/chat":
            return {**base, "message": {"role": "assistant", "content": text}}
        return {**base, "response": text}

    def _ollama_counts(self) -> dict:
        return {"total_duration": 3_000_000, "load_duration": 1_000_000, "prompt_eval_count": self.input_tokens,
                "prompt_eval_duration": 500_000, "eval_count": len(self.words),
                "eval_duration": 1_000_000 * len(self.words)}

    def _usage(self) -> dict:
        return {"prompt_tokens": self.input_tokens, "completion_tokens": len(self.words),
                "total_tokens": self.input_tokens + len(self.words)}

    def _timings(self) -> dict:
        return {"prompt_n": self.input_tokens, "prompt_ms": 0.5, "predicted_n": len(self.words),
                "predicted_ms": 1.0 * len(self.words), "predicted_per_second": 1000.0}


def _ollama_model(name: str) -> dict:
    return {"name": name, "model": name, "size": 1, "digest": "fake", "details": {"family": "fake"}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, state: FakeState) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.state = state
        self.connections: set[socket.socket] = set()
        self.connections_opened = 0

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a client gone is normal
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """End kept-alive connections too, as a server that stops does."""
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FakeModelServer:
    """The fake server in a background thread of this process."""

    def __init__(self, port: int = 0, **config) -> None:
        self.state = FakeState(FakeConfig(**config))
        self._server = _Server(port, self.state)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def config(self) -> FakeConfig:
        return self.state.config

    @property
    def requests(self) -> list[dict]:
        return self.state.requests

    @property
    def connections_opened(self) -> int:
        """The TCP connections clients opened to this server."""
        return self._server.connections_opened

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeModelServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join()

    def __enter__(self) -> FakeModelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fake Ollama/OpenAI model server for tests.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault", choices=FAULTS)
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--fault-count", type=int, default=0)
    parser.add_argument("--load-ms", type=int, default=0)
    parser.add_argument("--reply", default=FakeConfig.reply)
    parser.add_argument("--model", default=FakeConfig.model)
    parser.add_argument("--allocate-mb", type=int, default=0)
    args = parser.parse_args(argv)
    weights = b"\x01" * (args.allocate_mb * 1024 * 1024)  # written, so every page is really used
    server = _Server(args.port, FakeState(FakeConfig(
        reply=args.reply, model=args.model, fault=args.fault, delay_ms=args.delay_ms,
        fault_count=args.fault_count, load_ms=args.load_ms)))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"fake_model_server listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    del weights
    return 0


if __name__ == "__main__":
    sys.exit(main())
