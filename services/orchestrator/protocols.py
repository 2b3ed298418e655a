"""Clients for model servers: one interface over the Ollama and OpenAI protocols.

`generate` returns a `Generation` (text, token counts, timings); `stream` yields text chunks and
holds the `Generation` once exhausted. Failures raise problems dispatch can act on:
`ModelServerError` (502: refused, dropped, 5xx, garbage) and `ModelServerTimeout` (504).
POSTs are never retried here: a request that reached a model server is not sent twice.

A whole answer (a generation, a model list) comes through libcurl (pycurl), on connections kept
open between calls: a model call is the dispatcher's hot path, and there it costs 0.15 ms of CPU
against urllib3's 0.37 (the call, its JSON and its answer's). Streams and readiness probes go
through a urllib3 pool.
"""
from __future__ import annotations

import io
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import pycurl
import urllib3
from urllib3.exceptions import HTTPError as TransportError
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import TimeoutError as TransportTimeout

from services.common import fast_json
from services.common.errors import BadGateway, GatewayTimeout

CONNECT_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 1.0
DEFAULT_GENERATION_TIMEOUT_S = 300.0
STREAM_READ_BYTES = 512        # a streamed answer is read in small pieces, as the server sends them
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
# "Expect:" unset: libcurl would wait up to a second for a "100 Continue" before sending a large body.
CURL_JSON_HEADERS = [f"{name}: {value}" for name, value in JSON_HEADERS.items()] + ["Expect:"]
USER_AGENT = "ai-model-dispatcher"


class ModelServerError(BadGateway):
    """The model server failed or answered something unusable (worth a retry elsewhere)."""


class ModelServerTimeout(GatewayTimeout):
    """The model server did not answer in time."""


@dataclass(frozen=True)
class Options:
    """Generation options both protocols understand."""

    max_tokens: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    # "json" for any JSON value, or a JSON schema the output must match.
    response_format: str | dict | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Timings:
    load_ms: float | None = None
    prompt_ms: float | None = None
    generation_ms: float | None = None
    total_ms: float = 0.0
    tokens_per_second: float | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    input_tokens: int | None
    output_tokens: int | None
    timings: Timings = field(default_factory=Timings)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        """A server's answer of another shape (content parts, counts as text) is its error, found here."""
        if not isinstance(self.text, str):
            raise TypeError(f"the answer's text is {type(self.text).__name__}, not a string")
        for count in (self.input_tokens, self.output_tokens):
            if count is not None and (type(count) is not int or count < 0):
                raise TypeError(f"a token count is {count!r}, not a whole number")

    def as_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def model_pool() -> urllib3.PoolManager:
    """One connection pool per process for model servers; no retries (probes poll by themselves).

    Model servers are ours (local processes, containers) or named endpoints: never reached through
    an environment proxy.
    """
    return urllib3.PoolManager(num_pools=64, maxsize=64, retries=False)


def _is_timeout(error: TransportError) -> bool:
    # urllib3 counts a refused connection as a connect timeout; here it is a server that is down.
    return isinstance(error, TransportTimeout) and not isinstance(error, NewConnectionError)


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[str]:
    """The body's lines as they arrive."""
    pending = b""
    for piece in response.stream(STREAM_READ_BYTES):
        pending += piece
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if pending:
        yield pending.rstrip(b"\r").decode()


# What reading an answer of an unexpected shape raises (a string where an object belongs, say).
SHAPE_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError)


class GenerationStream:
    """Text chunks as they arrive; `result` is the whole `Generation` once the stream is exhausted."""

    def __init__(self, response: urllib3.BaseHTTPResponse,
                 parse: Callable[[urllib3.BaseHTTPResponse, float], Iterator]) -> None:
        self._response = response
        self._parse = parse
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        started = time.perf_counter()
        try:
            for item in self._parse(self._response, started):
                if isinstance(item, Generation):
                    self.result = item
                else:
                    yield item
        except TransportError as exc:
            if _is_timeout(exc):
                raise ModelServerTimeout("the model server stopped sending before the answer was complete") from exc
            raise ModelServerError(f"the model server broke off its stream: {exc}") from exc
        except SHAPE_ERRORS as exc:
            raise ModelServerError(f"the model server's stream has an unexpected shape: {exc!r}") from exc
        finally:
            self.close()

    def close(self) -> None:
        _discard(self._response)


class ModelClient:
    """A model server at `base_url` serving `model_name`; subclasses speak one protocol."""

    protocol = ""

    def __init__(self, base_url: str, model_name: str, *, timeout_s: float = DEFAULT_GENERATION_TIMEOUT_S,
                 pool: urllib3.PoolManager | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.pool = pool or model_pool()

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None,
                 options: Options = Options()) -> Generation:
        """One whole answer."""
        started = time.perf_counter()
        body = self._post(*self._request(prompt, messages, options, stream=False)).json_body()
        try:
            return self._generation(body, (time.perf_counter() - started) * 1000)
        except SHAPE_ERRORS as exc:
            raise ModelServerError(f"the model server's answer has an unexpected shape: {exc!r}") from exc

    def stream(self, prompt: str | None = None, messages: list[dict] | None = None,
               options: Options = Options()) -> GenerationStream:
        """The answer as it is generated."""
        path, body = self._request(prompt, messages, options, stream=True)
        return GenerationStream(self._post(path, body, stream=True).response, self._parse_stream)

    def ready(self) -> bool:
        """Whether the server answers and has its model loaded (a cheap probe)."""
        raise NotImplementedError

    def models(self) -> list[str]:
        """The model names the server offers."""
        raise NotImplementedError

    # Protocol specifics.
    def _request(self, prompt, messages, options, *, stream: bool) -> tuple[str, dict]:
        raise NotImplementedError

    def _generation(self, body: dict, total_ms: float) -> Generation:
        raise NotImplementedError

    def _parse_stream(self, response: urllib3.BaseHTTPResponse, started: float) -> Iterator:
        raise NotImplementedError

    # HTTP.
    def _timeout(self) -> urllib3.Timeout:
        return urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=self.timeout_s)

    def _get(self, path: str, timeout_s: float = PROBE_TIMEOUT_S) -> urllib3.BaseHTTPResponse | None:
        try:
            return self.pool.request("GET", self.base_url + path, timeout=timeout_s)
        except TransportError:
            return None

    def _get_json(self, path: str) -> dict:
        return self._call(path).json_body()

    def _post(self, path: str, body: dict, *, stream: bool = False) -> _Answer:
        return self._call(path, body, stream=stream).checked()

    def _call(self, path: str, body: dict | None = None, *, stream: bool = False) -> _Answer:
        """POST `body` (GET without one): the whole answer, or with `stream` the response to read."""
        url = self.base_url + path
        payload = None if body is None else fast_json.dumps(body)
        if not stream:
            status, data = _fetch(url, payload, self.timeout_s)
            return _Answer(url, status=status, data=data)
        try:
            response = self.pool.request("GET" if body is None else "POST", url, body=payload,
                                         headers=JSON_HEADERS, timeout=self._timeout(), preload_content=False)
        except TransportError as exc:
            if _is_timeout(exc):
                raise ModelServerTimeout(f"{url} did not answer within {self.timeout_s:g} s") from exc
            raise ModelServerError(f"{url} failed: {exc}") from exc
        return _Answer(url, status=response.status, response=response)


class _CurlPool:
    """libcurl handles shared by a process's threads, the last one given back taken first: calls one
    after another go over one kept-open connection, calls at the same time over as many (a llama.cpp
    server serves a handful of connections at a time: one per thread would starve it)."""

    def __init__(self) -> None:
        self._idle: list[pycurl.Curl] = []
        self._lock = threading.Lock()

    @contextmanager
    def handle(self) -> Iterator[pycurl.Curl]:
        with self._lock:
            handle = self._idle.pop() if self._idle else pycurl.Curl()
        try:
            yield handle
        finally:
            with self._lock:
                self._idle.append(handle)


_curl_pool = _CurlPool()


def _forget_curl_pool() -> None:
    global _curl_pool
    _curl_pool = _CurlPool()  # a forked child does not use its parent's connections


os.register_at_fork(after_in_child=_forget_curl_pool)


@lru_cache(maxsize=1)
def _trusted_certificates() -> ssl.DefaultVerifyPaths:
    """The system's CA certificates, as urllib3 trusts them (the wheel's libcurl looks for Red Hat's)."""
    return ssl.get_default_verify_paths()


def _fetch(url: str, body: bytes | None, timeout_s: float) -> tuple[int, bytes]:
    """POST `body` (GET without one): the answer's status and its whole body, within `timeout_s` in all."""
    answer = io.BytesIO()
    with _curl_pool.handle() as handle:
        _prepare(handle, url, body, timeout_s, answer)
        try:
            handle.perform()
        except pycurl.error as exc:
            code, message = exc.args
            if code == pycurl.E_OPERATION_TIMEDOUT:
                if handle.getinfo(pycurl.PRETRANSFER_TIME) > 0:
                    raise ModelServerTimeout(f"{url} did not answer within {timeout_s:g} s") from exc
                raise ModelServerTimeout(f"{url} could not be reached within {CONNECT_TIMEOUT_S:g} s") from exc
            raise ModelServerError(f"{url} failed: {message}") from exc
        return handle.getinfo(pycurl.RESPONSE_CODE), answer.getvalue()


def _prepare(handle: pycurl.Curl, url: str, body: bytes | None, timeout_s: float, answer: io.BytesIO) -> None:
    handle.reset()  # the options of the last call go; its open connections stay
    handle.setopt(pycurl.URL, url)
    handle.setopt(pycurl.PROXY, "")  # model servers are never reached through an environment proxy
    handle.setopt(pycurl.NOSIGNAL, 1)
    handle.setopt(pycurl.MAXCONNECTS, 64)
    handle.setopt(pycurl.CONNECTTIMEOUT_MS, int(CONNECT_TIMEOUT_S * 1000))
    handle.setopt(pycurl.TIMEOUT_MS, max(1, int(timeout_s * 1000)))
    handle.setopt(pycurl.HTTPHEADER, CURL_JSON_HEADERS)
    handle.setopt(pycurl.USERAGENT, USER_AGENT)
    certificates = _trusted_certificates()
    if certificates.cafile:
        handle.setopt(pycurl.CAINFO, certificates.cafile)
    if certificates.capath:
        handle.setopt(pycurl.CAPATH, certificates.capath)
    if body is not None:
        # Read from a stream that cannot rewind: libcurl would otherwise send the POST again when a
        # kept-open connection dies before the answer (a server crashing mid-generation, say). libcurl
        # checks a connection idle for a second or more before it reuses it; one that closed sooner
        # fails this call, which dispatch retries as any failed attempt.
        handle.setopt(pycurl.POST, 1)
        handle.setopt(pycurl.POSTFIELDSIZE_LARGE, len(body))
        handle.setopt(pycurl.READFUNCTION, io.BytesIO(body).read)
        handle.setopt(pycurl.SEEKFUNCTION, lambda offset, origin: pycurl.SEEKFUNC_CANTSEEK)
    handle.setopt(pycurl.WRITEDATA, answer)


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close a response that may not have been read to its end, and give its pool slot back."""
    response.close()
    response.release_conn()


@dataclass
class _Answer:
    """A whole answer (`data`), or a stream's `response` still to be read."""

    url: str
    status: int
    data: bytes = b""
    response: urllib3.BaseHTTPResponse | None = None

    def checked(self) -> _Answer:
        if self.status >= 400:
            raw = self.data[:500]
            if self.response is not None:
                try:
                    raw = self.response.read(500)
                except TransportError:
                    raw = b""
                _discard(self.response)
            excerpt = raw.decode(errors="replace")
            raise ModelServerError(f"{self.url} answered {self.status}: {excerpt}", upstream_status=self.status)
        return self

    def json_body(self) -> dict:
        self.checked()
        try:
            body = fast_json.loads(self.data)
        except ValueError as exc:
            raise ModelServerError(f"{self.url} answered something that is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ModelServerError(f"{self.url} answered JSON that is not an object")
        return body


def _messages(prompt: str | None, messages: list[dict] | None) -> list[dict]:
    return list(messages) if messages else [{"role": "user", "content": prompt or ""}]


def _piece(text) -> str:
    """A streamed piece of the answer: text, or nothing."""
    if text is not None and not isinstance(text, str):
        raise TypeError(f"a piece of the answer is {type(text).__name__}, not a string")
    return text or ""


def _per_second(tokens: int | None, ms: float | None) -> float | None:
    return tokens / (ms / 1000) if tokens and ms else None


class OpenAIClient(ModelClient):
    """`/v1/chat/completions` and `/v1/models` (llama.cpp's server, vLLM, ...)."""

    protocol = "openai"

    def ready(self) -> bool:
        response = self._get("/health")
        if response is not None and response.status == 404:  # servers without /health
            response = self._get("/v1/models")
        return response is not None and response.status == 200

    def models(self) -> list[str]:
        return [item["id"] for item in self._get_json("/v1/models").get("data", [])]

    def _request(self, prompt, messages, options, *, stream):
        body = {"model": self.model_name, "messages": _messages(prompt, messages), "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if options.max_tokens is not None:
            body["max_tokens"] = options.max_tokens
        if options.temperature is not None:
            body["temperature"] = options.temperature
        if options.stop:
            body["stop"] = list(options.stop)
        if options.seed is not None:
            body["seed"] = options.seed
        if options.response_format == "json":
            body["response_format"] = {"type": "json_object"}
        elif isinstance(options.response_format, dict):
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": options.response_format}}
        return "/v1/chat/completions", body

    def _generation(self, body, total_ms):
        choice = body["choices"][0]
        return self._finish(choice["message"].get("content") or "", choice.get("finish_reason"),
                            body.get("usage") or {}, body.get("timings") or {}, total_ms)

    def _parse_stream(self, response, started):
        text, finish, usage, timings = [], None, {}, {}
        for line in _lines(response):
            if not line or not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                yield self._finish("".join(text), finish, usage, timings, (time.perf_counter() - started) * 1000)
                return
            chunk = fast_json.loads(data)
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
            for choice in chunk.get("choices") or []:
                piece = _piece((choice.get("delta") or {}).get("content"))
                if piece:
                    text.append(piece)
                    yield piece
                finish = choice.get("finish_reason") or finish
        raise ModelServerError("the model server ended its stream without [DONE]")

    @staticmethod
    def _finish(text, finish_reason, usage, timings, total_ms) -> Generation:
        output_tokens = usage.get("completion_tokens")
        generation_ms = timings.get("predicted_ms")
        return Generation(
            text=text,
            input_tokens=usage.get("prompt_tokens"),
            output_tokens=output_tokens,
            timings=Timings(load_ms=None, prompt_ms=timings.get("prompt_ms"), generation_ms=generation_ms,
                            total_ms=total_ms,
                            tokens_per_second=timings.get("predicted_per_second") or _per_second(
                                output_tokens, generation_ms or total_ms)),
            finish_reason=finish_reason,
        )


class OllamaClient(ModelClient):
    """`/api/generate`, `/api/chat`, `/api/pull`, `/api/tags`, `/api/ps`."""

    protocol = "ollama"

    def ready(self) -> bool:
        response = self._get("/api/version")
        return response is not None and response.status == 200

    def models(self) -> list[str]:
        return [item["name"] for item in self._get_json("/api/tags").get("models", [])]

    def running(self) -> list[dict]:
        """The models the server holds in memory (`/api/ps`)."""
        return list(self._get_json("/api/ps").get("models", []))

    def pull(self, on_progress: Callable[[dict], None] = lambda _: None) -> dict:
        """Pull the model into the server, reporting each progress line; the last line is returned."""
        answer = self._post("/api/pull", {"model": self.model_name, "stream": True}, stream=True)
        last: dict = {}
        try:
            for line in _lines(answer.response):
                if line:
                    last = fast_json.loads(line)
                    if "error" in last:
                        raise ModelServerError(f"pulling {self.model_name} failed: {last['error']}")
                    on_progress(last)
        except TransportError as exc:
            raise ModelServerError(f"pulling {self.model_name} broke off: {exc}") from exc
        except ValueError as exc:
            raise ModelServerError(f"pulling {self.model_name}: progress that is not JSON: {exc}") from exc
        finally:
            _discard(answer.response)
        if last.get("status") != "success":
            raise ModelServerError(f"pulling {self.model_name} ended without success: {last}")
        return last

    def _request(self, prompt, messages, options, *, stream):
        body: dict = {"model": self.model_name, "stream": stream}
        if messages:
            path, body["messages"] = "/api/chat", list(messages)
        else:
            path, body["prompt"] = "/api/generate", prompt or ""
        model_options = {"num_predict": options.max_tokens, "temperature": options.temperature,
                         "seed": options.seed, "stop": list(options.stop) or None}
        body["options"] = {key: value for key, value in model_options.items() if value is not None}
        if options.response_format is not None:
            body["format"] = options.response_format
        return path, body

    def _generation(self, body, total_ms):
        text = body["message"]["content"] if "message" in body else body["response"]
        return self._finish(text, body, total_ms)

    def _parse_stream(self, response, started):
        text = []
        for line in _lines(response):
            if not line:
                continue
            chunk = fast_json.loads(line)
            if "error" in chunk:
                raise ModelServerError(f"the model server reported: {chunk['error']}")
            piece = _piece(chunk["message"]["content"] if "message" in chunk else chunk.get("response"))
            if piece:
                text.append(piece)
                yield piece
            if chunk.get("done"):
                yield self._finish("".join(text), chunk, (time.perf_counter() - started) * 1000)
                return
        raise ModelServerError("the model server ended its stream without a final chunk")

    @staticmethod
    def _finish(text: str, body: dict, total_ms: float) -> Generation:
        def ms(key: str) -> float | None:
            return body[key] / 1e6 if body.get(key) is not None else None  # Ollama counts nanoseconds

        output_tokens, generation_ms = body.get("eval_count"), ms("eval_duration")
        return Generation(
            text=text,
            input_tokens=body.get("prompt_eval_count"),
            output_tokens=output_tokens,
            timings=Timings(load_ms=ms("load_duration"), prompt_ms=ms("prompt_eval_duration"),
                            generation_ms=generation_ms, total_ms=total_ms,
                            tokens_per_second=_per_second(output_tokens, generation_ms)),
            finish_reason=body.get("done_reason") or ("stop" if body.get("done") else None),
        )


CLIENTS: dict[str, type[ModelClient]] = {"openai": OpenAIClient, "ollama": OllamaClient}


def server_ready(protocol: str, endpoint: str) -> bool:
    """The readiness probe of a server speaking `protocol` at `endpoint`."""
    return CLIENTS[protocol](endpoint, "").ready()


def served_model_name(model: dict) -> str:
    """The name the server knows the model by: its alias or Ollama name, else name:version."""
    config = model.get("runtime_config") or {}
    if model["protocol"] == "openai":
        return str(config.get("model_alias") or model["name"])
    return str(config.get("model_name") or f"{model['name']}:{model['version']}")


def client_for(model: dict, endpoint: str, *, timeout_s: float | None = None) -> ModelClient:
    """The client for a model's protocol, talking to the runtime at `endpoint`."""
    timeout = timeout_s or float((model.get("runtime_config") or {}).get("request_timeout_s",
                                                                          DEFAULT_GENERATION_TIMEOUT_S))
    return CLIENTS[model["protocol"]](endpoint, served_model_name(model), timeout_s=timeout)
