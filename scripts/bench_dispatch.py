"""Benchmark dispatch against an instant fake backend, side by side with the LiteLLM proxy.

One run starts, each in its own process: an instant OpenAI-compatible backend (a canned answer,
no model), the orchestrator under granian (WSGI, threads) with only that backend eligible
(RUNTIME_DRIVERS=external), the LiteLLM proxy in front of the same backend, and for the queue part
the worker process. It prints, for each path: sequential p50/p99 and the latency it adds over a
direct call to the backend, and requests/s at --concurrency clients (both taking the paths in
turn, so that a drift in the machine's speed falls on all of them alike); then the queue's end-to-end
rate for --jobs async requests, checking that none was lost and none ran twice. It creates its
own database and drops it at the end.

Fair play: the orchestrator and LiteLLM (under gunicorn with uvicorn workers, its own way; no database,
no telemetry, local cost map) get the same number of worker processes; the load generator is a lean asyncio client on
kept-alive connections. Every process shares this machine's cores with Postgres and the load
generator, so the figures bound the overhead from above; they are not a production measurement.
LiteLLM lives in a venv of its own (--litellm-venv, created and installed on first use).

Usage: python scripts/bench_dispatch.py [--requests 500] [--concurrency 32] [--rounds 3] [--jobs 5000]
       [--web-workers 2] [--web-threads 8] [--queue-workers 8] [--litellm-venv PATH]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.db import connect  # noqa: E402
from services.common.migrate import migrate  # noqa: E402

ADMIN_URL = os.environ.get("BENCH_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE = "dispatcher_bench_dispatch"
LITELLM_VERSION = "1.106.12"  # newer releases need a package the registry lacks
LITELLM_KEY = "sk-bench-dispatch"
MODEL = "bench-instant:v1"
WARMUP = 50

MESSAGES = [{"role": "user", "content": "Say hello."}]
CHAT = {"model": "fake", "messages": MESSAGES, "max_tokens": 16}
DISPATCH = {"prompt": "Say hello.", "task_type": "conversation", "max_tokens": 16}
COMPLETION = json.dumps({
    "id": "chatcmpl-instant", "object": "chat.completion", "created": 1_700_000_000, "model": "fake",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the instant backend."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
}).encode()


# --- the instant backend -------------------------------------------------------------------------

def _http_response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


BACKEND_ROUTES = {
    (b"POST", b"/v1/chat/completions"): _http_response("200 OK", COMPLETION),
    (b"GET", b"/health"): _http_response("200 OK", b'{"status": "ok"}'),
    (b"GET", b"/v1/models"): _http_response("200 OK", b'{"object": "list", "data": [{"id": "fake"}]}'),
}
NOT_FOUND = _http_response("404 Not Found", b'{"error": "no such route"}')


async def _serve_backend_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request on a kept-alive connection with its canned response."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path, _ = head.split(b" ", 2)
            length = _content_length(head)
            if length:
                await reader.readexactly(length)
            writer.write(BACKEND_ROUTES.get((method, path), NOT_FOUND))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve_backend(port: int) -> None:
    """Run the instant backend until SIGTERM."""
    async def main() -> None:
        server = await asyncio.start_server(_serve_backend_connection, "127.0.0.1", port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())


# --- a lean HTTP/1.1 client (the load generator must not be the bottleneck) ---------------------

def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class Connection:
    """One kept-alive connection; just enough HTTP for JSON requests and Content-Length answers."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.head = f"Host: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{extra}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        reused = self.writer is not None
        try:
            head = await self._send(method, path, body)
        except asyncio.IncompleteReadError as error:
            if not reused or error.partial:
                raise
            # The server closed the kept-alive connection as the request went out (an idle
            # timeout): send it again on a new one, as HTTP clients do.
            self.close()
            head = await self._send(method, path, body)
        if b"transfer-encoding: chunked" in head.lower():
            raise RuntimeError(f"{path} answered chunked; this client reads Content-Length answers only")
        answer = await self.reader.readexactly(_content_length(head))
        if b"connection: close" in head.lower():
            self.close()
        return int(head.split(b" ", 2)[1]), answer

    async def _send(self, method: str, path: str, body: bytes) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n"
                          .encode() + body)
        return await self.reader.readuntil(b"\r\n\r\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


@dataclass(frozen=True)
class Target:
    """One way to get an answer: a port, a path, a body and the headers it needs."""

    label: str
    port: int
    path: str
    body: dict
    headers: dict[str, str] = field(default_factory=dict)
    expect: int = 200
    method: str = "POST"

    @property
    def payload(self) -> bytes:
        return json.dumps(self.body).encode() if self.method == "POST" else b""


async def _call(connection: Connection, target: Target, payload: bytes) -> None:
    try:
        status, answer = await connection.request(target.method, target.path, payload)
    except (OSError, asyncio.IncompleteReadError) as error:
        raise RuntimeError(f"{target.label}: the connection failed ({error!r})") from error
    if status != target.expect:
        raise RuntimeError(f"{target.label} answered {status}: {answer[:300]!r}")


SEQUENTIAL_BLOCK = 25


async def sequential(targets: list[Target], requests: int) -> dict[str, list[float]]:
    """Latencies (s) of `requests` calls per path, one call at a time, after a warm-up; the paths
    take turns in blocks of SEQUENTIAL_BLOCK calls, so a drift in the machine's speed falls on all
    of them alike (call by call, every call would wake a process that had just gone idle)."""
    connections = [Connection(target.port, target.headers) for target in targets]
    samples: dict[str, list[float]] = {target.label: [] for target in targets}
    try:
        for target, connection in zip(targets, connections):
            for _ in range(WARMUP):
                await _call(connection, target, target.payload)
        for start in range(0, requests, SEQUENTIAL_BLOCK):
            for target, connection in zip(targets, connections):
                for _ in range(min(SEQUENTIAL_BLOCK, requests - start)):
                    started = time.perf_counter()
                    await _call(connection, target, target.payload)
                    samples[target.label].append(time.perf_counter() - started)
    finally:
        for connection in connections:
            connection.close()
    return samples


async def throughput(target: Target, concurrency: int, requests: int, warmup: int = 2) -> float:
    """Requests/s of `requests` calls from `concurrency` clients (each on its own connection), after
    `warmup` calls on each."""
    connections = [Connection(target.port, target.headers) for _ in range(concurrency)]
    payload, remaining = target.payload, requests

    async def warm(connection: Connection) -> None:
        for _ in range(warmup):
            await _call(connection, target, payload)

    async def client(connection: Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _call(connection, target, payload)

    try:
        await asyncio.gather(*map(warm, connections))
        started = time.perf_counter()
        await asyncio.gather(*map(client, connections))
        return requests / (time.perf_counter() - started)
    finally:
        for connection in connections:
            connection.close()


# --- processes ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process(name: str, command: list[str], env: dict[str, str], logs: Path) -> Iterator[subprocess.Popen]:
    """A process in its own session, logging to logs/<name>.log; its whole group stops on exit."""
    log = (logs / f"{name}.log").open("wb")
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield child
    finally:
        for signum, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(child.pid, signum)
                child.wait(wait_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def wait_until_answers(port: int, path: str, child: subprocess.Popen, name: str, logs: Path,
                       deadline_s: float = 120.0) -> None:
    async def probe() -> int:
        connection = Connection(port, {})
        try:
            return (await connection.request("GET", path))[0]
        finally:
            connection.close()

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            break
        try:
            if asyncio.run(probe()) == 200:
                return
        except (OSError, asyncio.IncompleteReadError):
            pass
        time.sleep(0.2)
    tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{name} did not become ready on port {port}:\n{tail}")


def litellm_binary(venv: Path) -> Path:
    """The LiteLLM proxy of a venv of its own, created and installed on first use."""
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                        f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    return binary


def litellm_config(backend_port: int) -> str:
    """A model_list with the instant backend as an OpenAI-compatible endpoint; no telemetry, no DB."""
    return json.dumps({  # JSON is YAML
        "model_list": [{"model_name": "fake", "litellm_params": {
            "model": "openai/fake", "api_base": f"http://127.0.0.1:{backend_port}/v1", "api_key": "none"}}],
        "litellm_settings": {"telemetry": False, "drop_params": True, "set_verbose": False},
        "general_settings": {"master_key": LITELLM_KEY},
    })


# --- the database ---------------------------------------------------------------------------------

def admin(statement: sql.Composable) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(statement)


def create_database(url: str, backend_port: int) -> None:
    """Migrate and seed a new database; the instant backend is its only external model."""
    admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
    admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    name, version = MODEL.split(":")
    with connect(url, autocommit=True) as conn:
        migrate(conn, seed=True)
        conn.execute(
            "INSERT INTO model_registry (name, version, task_types, complexity_score, base_memory_requirement,"
            " runtime_driver, protocol, runtime_config, keep_alive_seconds, performance_metrics)"
            " VALUES (%s, %s, ARRAY['text-generation', 'code-generation', 'question-answering',"
            " 'conversation', 'summarization', 'classification'], 10, 64, 'external', 'openai', %s, -1,"
            " '{\"avg_latency_ms\": 1, \"accuracy\": 0.9}')",
            (name, version, json.dumps({"endpoint": f"http://127.0.0.1:{backend_port}", "model_alias": "fake"})))


def queue_statuses(url: str) -> dict[str, int]:
    with connect(url, autocommit=True) as conn:
        return {row["status"]: row["n"] for row in conn.execute(
            "SELECT status, count(*) AS n FROM request_queue WHERE mode = 'async' GROUP BY status")}


def unfinished_jobs(url: str) -> int:
    """Async requests not ended yet, counted through the pending and processing partial indexes:
    polling must not load the machine it measures (a count over the whole table costs ~20 ms)."""
    with connect(url, autocommit=True) as conn:
        return conn.execute("""
            SELECT (SELECT count(*) FROM request_queue WHERE status = 'pending' AND mode = 'async')
                 + (SELECT count(*) FROM request_queue WHERE status = 'processing' AND mode = 'async') AS n
        """).fetchone()["n"]


def queue_checks(url: str) -> dict:
    """Of the async requests: how many ran more than once, how many lack exactly one performance
    row, and the time from the first enqueued to the last completed."""
    with connect(url, autocommit=True) as conn:
        return conn.execute("""
            SELECT count(*) FILTER (WHERE q.attempts <> 1) AS rerun,
                   count(*) FILTER (WHERE coalesce(p.n, 0) <> 1) AS not_one_log,
                   extract(epoch FROM max(q.completed_at) - min(q.created_at))::float8 AS span_s
            FROM request_queue q
            LEFT JOIN (SELECT request_id, count(*) AS n FROM performance_logs GROUP BY request_id) p
                   ON p.request_id = q.id
            WHERE q.mode = 'async'""").fetchone()


# --- the run --------------------------------------------------------------------------------------

def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def measure_queue(url: str, target: Target, jobs: int, concurrency: int, deadline_s: float = 300.0) -> dict:
    """Enqueue `jobs` async requests concurrently; wait until every one has ended; check them."""
    started = time.perf_counter()
    enqueue_rate = asyncio.run(throughput(target, concurrency, jobs, warmup=0))
    while time.perf_counter() - started < deadline_s and unfinished_jobs(url):
        time.sleep(0.2)
    statuses = queue_statuses(url)
    completed = statuses.get("completed", 0)
    return {"statuses": statuses, **queue_checks(url), "enqueue_rate": enqueue_rate, "completed": completed,
            "lost": jobs - completed}


@dataclass
class Row:
    label: str
    p50: float
    p99: float
    rate: float | None = None


def measure_paths(targets: list[Target], direct: Target, loaded: set[str], args: argparse.Namespace) -> dict[str, Row]:
    """Sequential latency of every path, the paths in turn (added: minus `direct`, for paths through
    a server of ours or LiteLLM's), then throughput of those in `loaded`: --rounds rounds taking the paths in turn, so a
    drift in the machine's background load falls on all of them; the median round counts."""
    print(f"\nSequential: {args.requests} requests per path after {WARMUP} warm-up, the paths in turn by "
          f"blocks of {SEQUENTIAL_BLOCK}.")
    print(f"{'path':<46} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8}")
    rows: dict[str, Row] = {}
    latencies = asyncio.run(sequential(targets, args.requests))
    for target in targets:
        samples = latencies[target.label]
        row = rows[target.label] = Row(target.label, percentile(samples, 0.5), percentile(samples, 0.99))
        base = rows.get(direct.label)
        added = f"{row.p50 - base.p50:8.2f} {row.p99 - base.p99:8.2f}" if base and row is not base \
            else f"{'':>8} {'':>8}"
        print(f"{target.label:<46} {row.p50:8.2f} {row.p99:8.2f} {added}", flush=True)

    print(f"\nThroughput: {args.concurrency} concurrent clients, {args.load_requests} requests per run, "
          f"{args.rounds} rounds over the paths in turn.")
    print(f"{'path':<46} {'median':>8} {'runs (req/s)':>30}")
    runs: dict[str, list[float]] = {target.label: [] for target in targets if target.label in loaded}
    for _ in range(args.rounds):
        for target in targets:
            if target.label in runs:
                runs[target.label].append(asyncio.run(throughput(target, args.concurrency, args.load_requests)))
    for label, rates in runs.items():
        rows[label].rate = statistics.median(rates)
        print(f"{label:<46} {rows[label].rate:8.0f} {', '.join(f'{rate:.0f}' for rate in rates):>30}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="sequential requests per path")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--load-requests", type=int, default=3000, help="requests per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per path, taken in turn")
    parser.add_argument("--jobs", type=int, default=5000, help="async requests for the queue run")
    parser.add_argument("--web-workers", type=int, default=2, help="web server workers (and LiteLLM's)")
    parser.add_argument("--web-threads", type=int, default=8)
    parser.add_argument("--queue-workers", type=int, default=8)
    parser.add_argument("--litellm-venv", type=Path, default=ROOT / ".run" / "litellm-venv")
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        serve_backend(args.serve_backend)
        return 0

    url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=DATABASE)
    ports = {name: free_port() for name in ("backend", "fake", "orchestrator", "litellm")}
    base_env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    service_env = {**base_env, "DATABASE_URL": url, "RUNTIME_DRIVERS": "external", "DISPATCHER_API_TOKEN": "",
                   "DB_POOL_MAX_SIZE": str(args.web_threads + 2)}
    # No database (so no Prisma), no cost map download, no telemetry.
    litellm_env = {**base_env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
                   "LITELLM_LOG": "ERROR", "NO_PROXY": "127.0.0.1,localhost"}
    litellm = litellm_binary(args.litellm_venv)
    logs = Path(tempfile.mkdtemp(prefix="bench_dispatch-"))
    (logs / "litellm.yaml").write_text(litellm_config(ports["backend"]))
    print(f"logs in {logs}", flush=True)

    create_database(url, ports["backend"])
    try:
        with ExitStack() as stack:
            def start(name: str, command: list[str], env: dict, port: int | None = None, path: str = "") -> None:
                child = stack.enter_context(process(name, command, env, logs))
                if port:
                    wait_until_answers(port, path, child, name, logs)

            start("backend", [sys.executable, __file__, "--serve-backend", str(ports["backend"])],
                  base_env, ports["backend"], "/health")
            start("fake_model_server", [sys.executable, "tests/fake_model_server.py", "--port", str(ports["fake"])],
                  base_env, ports["fake"], "/health")
            start("orchestrator", [sys.executable, "-m", "granian", "--interface", "wsgi", "--factory",
                                   "services.orchestrator:create_app", "--workers", str(args.web_workers),
                                   "--blocking-threads", str(args.web_threads), "--host", "127.0.0.1",
                                   "--port", str(ports["orchestrator"])],
                  service_env, ports["orchestrator"], "/readyz")
            # Under gunicorn: uvicorn's own supervisor kills workers that import slower than 5 s.
            start("litellm", [str(litellm), "--config", str(logs / "litellm.yaml"), "--host", "127.0.0.1",
                              "--port", str(ports["litellm"]), "--num_workers", str(args.web_workers),
                              "--run_gunicorn"],
                  litellm_env, ports["litellm"], "/health/liveliness")

            orchestrator, bearer = ports["orchestrator"], {"Authorization": f"Bearer {LITELLM_KEY}"}
            fake = Target("direct call to tests/fake_model_server.py", ports["fake"], "/v1/chat/completions", CHAT)
            direct = Target("direct call to the instant backend", ports["backend"], "/v1/chat/completions", CHAT)
            floor = Target("GET /healthz of the orchestrator (Flask floor)", orchestrator, "/healthz", {},
                           method="GET")
            dispatch = Target("POST /dispatch", orchestrator, "/dispatch", DISPATCH)
            auto = Target("POST /v1/chat/completions (auto)", orchestrator, "/v1/chat/completions",
                          {**CHAT, "model": "auto"})
            pinned = Target(f"POST /v1/chat/completions ({MODEL})", orchestrator, "/v1/chat/completions",
                            {**CHAT, "model": MODEL})
            litellm_proxy = Target("LiteLLM proxy /v1/chat/completions", ports["litellm"], "/v1/chat/completions",
                                   CHAT, bearer)
            rows = measure_paths([fake, direct, floor, dispatch, auto, pinned, litellm_proxy], direct,
                                 {direct.label, dispatch.label, auto.label, litellm_proxy.label}, args)

            start("worker", [sys.executable, "-m", "services.orchestrator.worker",
                             "--workers", str(args.queue_workers)], service_env)
            queued = measure_queue(url, Target("POST /dispatch async", orchestrator, "/dispatch",
                                               {**DISPATCH, "async": True}, expect=202),
                                   args.jobs, args.concurrency)
        print_queue(queued, args)
        print_goals(rows, direct, [dispatch, auto, pinned], [dispatch, auto], litellm_proxy, queued, args)
    finally:
        admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
    return 0


def print_queue(queued: dict, args: argparse.Namespace) -> None:
    statuses = queued["statuses"]
    span = float(queued["span_s"] or 0) or float("nan")
    print(f"\nQueue: {args.jobs} async requests (POST /dispatch, async: true) from {args.concurrency} clients, "
          f"accepted at {queued['enqueue_rate']:.0f}/s; one worker process with {args.queue_workers} threads")
    print(f"  end to end, first enqueued -> last completed: {span:.2f} s = {queued['completed'] / span:.0f} jobs/s")
    print(f"  statuses: {json.dumps(statuses)}; lost: {queued['lost']}; run more than once: {queued['rerun']}; "
          f"without exactly one performance row: {queued['not_one_log']}")


def print_goals(rows: dict[str, Row], direct: Target, sequential_paths: list[Target], loaded_paths: list[Target],
                proxy: Target, queued: dict, args: argparse.Namespace) -> None:
    base, proxy_rate = rows[direct.label], rows[proxy.label].rate
    # The machine's speed drifts; the ratio to LiteLLM's added p50, measured in the same run, does not.
    proxy_added = rows[proxy.label].p50 - base.p50
    span = float(queued["span_s"] or 0) or float("nan")
    checks = [(f"{t.label}: added p50 {rows[t.label].p50 - base.p50:.2f} ms <= 2 ms "
               f"({(rows[t.label].p50 - base.p50) / proxy_added:.2f}x LiteLLM's {proxy_added:.2f} ms), "
               f"added p99 {rows[t.label].p99 - base.p99:.2f} ms <= 8 ms",
               rows[t.label].p50 - base.p50 <= 2 and rows[t.label].p99 - base.p99 <= 8) for t in sequential_paths]
    checks += [(f"{t.label}: {rows[t.label].rate:.0f} req/s = {rows[t.label].rate / proxy_rate:.2f}x LiteLLM "
                f"({proxy_rate:.0f} req/s) >= 2x", rows[t.label].rate >= 2 * proxy_rate) for t in loaded_paths]
    checks += [(f"queue: {queued['completed'] / span:.0f} jobs/s >= 500", queued["completed"] / span >= 500),
               (f"queue: lost {queued['lost']}, run twice {queued['rerun']}, "
                f"performance rows not one {queued['not_one_log']}: all 0",
                queued["lost"] == 0 and queued["rerun"] == 0 and queued["not_one_log"] == 0)]
    print(f"\nGoals ({os.cpu_count()} cores shared by the backend, the proxies, Postgres and the load generator):")
    for text, met in checks:
        print(f"  [{'met ' if met else 'MISS'}] {text}")


if __name__ == "__main__":
    sys.exit(main())
