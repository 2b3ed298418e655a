"""The dispatch pipeline: select -> ensure runtime -> build prompt -> generate -> validate -> log.

It calls the other services' domain modules in-process (they share the database): an HTTP hop
per step would only add latency and failure modes to the hot path.

Failure handling, per request, within `max_retries` extra attempts:
- the runtime fails, times out or cannot start -> the next candidate (wrapping around to the
  first when the list is exhausted, so a restarted runtime gets its turn);
- the output does not validate -> one repair on the same model (the model sees its answer and
  what was wrong), then escalation to the next candidate that is at least as capable;
- the request does not fit the model's prompt template (too long once rendered, say) -> the next
  candidate, whose template may differ.
Every attempt that reached a model is logged in performance_logs. When all fail, `DispatchFailed`
carries them all; when none could build its prompt, the request is at fault: its problem is raised.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache, partial
from typing import Any

from services.common.config import Settings
from services.common.db import Database
from services.common.errors import BadGateway, Conflict, GatewayTimeout, NotFound, Problem, Unprocessable
from services.common.http import http_session
from services.optimizer.performance import log_performance
from services.orchestrator import request_queue
from services.orchestrator.request_queue import Holder
from services.orchestrator.generation import named_model
from services.orchestrator.lifecycle import lease_runtime, leased_runtime, release_runtime, take_inherited_runtime
from services.orchestrator.protocols import (Generation, ModelServerTimeout, Options,
                                             client_for)
from services.prompt_builder.formats import ParsedOutput, parse_output, repair_prompt
from services.prompt_builder.templates import BuiltPrompt, PromptRequest, build_prompt, check_prompt_size
from services.registry.selection import (Candidate, Selection, SelectionRequest, StaleSelection, last_state,
                                         select_models)

logger = logging.getLogger(__name__)

# Outcomes where the model server did its part (performance_logs.success): the model is not to
# blame for an answer that failed validation, or that a client stopped reading.
SERVED = ("ok", "invalid_output", "client_disconnected")


@dataclass(frozen=True)
class DispatchRequest:
    """What a caller asks for; `model` pins one model ("name:version") instead of selecting."""

    task_type: str
    prompt: str | None = None
    messages: tuple[dict, ...] = ()
    complexity: int = 1
    output_format: str = "text"
    json_schema: dict | None = None
    variables: dict = field(default_factory=dict)
    max_tokens: int | None = 256   # None: as long as the model makes it
    temperature: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_retries: int = 2
    timeout_s: float = 120.0
    model: str | None = None
    max_memory_mb: int | None = None
    max_latency_ms: int | None = None
    weights: dict | None = None
    required_tags: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    prefer_warm: bool = True

    @classmethod
    def from_payload(cls, body: dict) -> DispatchRequest:
        """The request from a validated body (as DispatchSchema loads it and the queue stores it)."""
        requirements = body.get("requirements") or {}
        return cls(
            task_type=body["task_type"], prompt=body.get("prompt"),
            messages=tuple(body.get("messages") or ()), complexity=body["complexity"],
            output_format=body["output_format"], json_schema=body.get("json_schema"),
            variables=body.get("variables") or {}, max_tokens=body["max_tokens"],
            temperature=body.get("temperature"), seed=body.get("seed"), stop=tuple(body.get("stop") or ()),
            max_retries=body["max_retries"], timeout_s=body["timeout_s"], model=body.get("model"),
            max_memory_mb=requirements.get("max_memory_mb"), max_latency_ms=requirements.get("max_latency_ms"),
            weights=requirements.get("weights"), required_tags=tuple(requirements.get("required_tags", ())),
            exclude=tuple(requirements.get("exclude", ())), prefer_warm=requirements.get("prefer_warm", True),
        )

    @property
    def user_text(self) -> str:
        """The text the template wraps: the prompt, or the last user message of a chat."""
        return self.prompt if self.prompt is not None else self.messages[-1]["content"]

    @property
    def history_chars(self) -> int:
        """The characters of the chat turns sent before the templated one."""
        return sum(len(message["content"]) for message in self.messages[:-1])


@dataclass
class Attempt:
    number: int
    model: str
    model_id: str
    runtime_id: str | None = None
    # ok | invalid_output | timeout | server_error | start_failed | prompt_failed | client_disconnected
    outcome: str = "pending"
    error: str | None = None
    reasons: list[dict] = field(default_factory=list)
    repair: bool = False
    duration_ms: float = 0.0


@dataclass
class Outcome:
    """The end of one attempt: what came back, and the timings of its steps."""

    attempt: Attempt
    built: BuiltPrompt | None = None
    generation: Generation | None = None
    parsed: ParsedOutput | None = None
    ensure_ms: float = 0.0
    cold_start: bool = False
    load_time_ms: int | None = None      # the server's own load time, on the attempt that started it
    result: dict | None = None           # the answer, on the attempt that gave it
    problem: Problem | None = None       # why the prompt could not be built (prompt_failed)
    recorded: bool = False               # whether the statement releasing its runtime completed the request
    failure: dict | None = None          # or failed it, because the answer could not be recorded
    record: Callable[[], dict | None] | None = None   # that statement, when it is left to the caller

    def released(self, row: dict | None) -> None:
        """Note what the statement releasing the runtime did with the request."""
        self.recorded = bool(row and row["completed"])
        self.failure = row.get("failure") if row else None


class DispatchFailed(Problem):
    """Every attempt failed: 504 when the last one timed out, else 502."""

    def __init__(self, request_id: str, attempts: list[Attempt]) -> None:
        timed_out = bool(attempts) and attempts[-1].outcome == "timeout"
        self.status = GatewayTimeout.status if timed_out else BadGateway.status
        summary = ", ".join(f"{a.model}: {a.outcome}" for a in attempts)
        super().__init__(f"No model produced a usable answer ({summary}).",
                         dispatch_id=request_id, attempts=_as_dicts(attempts))


def run_queued_request(db: Database, settings: Settings, row: dict, *, owner: str, raise_problem: bool = False,
                       successor: request_queue.Claim | None = None,
                       inheritance: request_queue.Inheritance | None = None) -> dict | None:
    """Run a request this owner holds the lease of; record its end (and call back, if asked).

    A worker keeps going after a failed request; `raise_problem` raises its problem instead. With a
    `successor`, the statement completing the request claims the next one into it, for this owner;
    `inheritance` is what a request claimed that way got from its predecessor.
    """
    queue_wait_ms = max(0.0, (row["started_at"] - row["created_at"]).total_seconds() * 1000)
    holder = Holder(str(row["id"]), owner, successor=successor, inheritance=inheritance)
    return _run_request(db, settings, row, holder, queue_wait_ms=queue_wait_ms, raise_problem=raise_problem)


def run_sync_request(db: Database, settings: Settings, request_id: str, payload: dict, *,
                     callback_headers: dict | None = None,
                     after_answer: Callable[[Callable[[], None]], None] | None = None) -> dict:
    """Run a request now, in this thread, and record it; raise its problem if it fails.

    The statement leasing its first runtime records it (processing, leased to this thread), so the
    hot path saves a round trip; a request that fails before any lease is recorded as failed.
    With `after_answer` (say, the web app's after_response), the statement recording the answer
    (and the callback) is handed to it, to run once the caller has the answer: a caller does not
    wait for the record of its own answer. A failure is recorded before it is raised.
    """
    admission = request_queue.Admission(payload, callback_headers, settings.queue_lease_s)
    row = {"id": request_id, "request_payload": payload, "callback_url": payload["callback_url"],
           "callback_headers": callback_headers}
    holder = Holder(request_id, request_queue.lease_owner(), admission)
    return _run_request(db, settings, row, holder, queue_wait_ms=0.0, raise_problem=True, after_answer=after_answer)


def _run_request(db: Database, settings: Settings, row: dict, holder: Holder, *, queue_wait_ms: float,
                 raise_problem: bool, after_answer: Callable[[Callable[[], None]], None] | None = None) -> dict | None:
    request_id, owner = holder.request_id, holder.owner
    try:
        with lease_kept_alive(db, settings, request_id, owner):
            answered = dispatch(db, settings, request_id, DispatchRequest.from_payload(row["request_payload"]),
                                queue_wait_ms=queue_wait_ms, holder=holder, record_later=after_answer is not None)
    except Exception as error:
        take_inherited_runtime(db, settings, holder)   # gives back a runtime no attempt ran on
        details = _error_details(error)
        with db.connection(autocommit=True) as conn:
            recorded = request_queue.fail(conn, request_id, owner=owner, error_details=details,
                                          admission=holder.admission)
        if recorded:
            call_back_failed(row, details)
        if raise_problem or not isinstance(error, Problem):
            raise
        return None
    if answered.record is not None:   # left to run once the caller has the answer
        after_answer(lambda: _recorded_answer(row, answered))
    else:
        _recorded_answer(row, answered)
    return answered.result


def _recorded_answer(row: dict, outcome: Outcome) -> None:
    """Record the answer if that is left to do, then call back; one whose lease was lost is dropped."""
    if outcome.record is not None:
        record, outcome.record = outcome.record, None
        outcome.released(record())
    if outcome.recorded:
        call_back(row, outcome.result)
    elif outcome.failure is not None:
        call_back_failed(row, outcome.failure)
    else:
        logger.warning("lease lost before completion; result dropped", extra={"dispatch_id": str(row["id"])})


class LeaseRenewer:
    """Renews the leases of the requests this process runs, so only a dead owner's lease lapses.

    One thread per process, one UPDATE per database every `queue_lease_renew_s` for all of them:
    a thread per request would cost more than an instant model's whole answer. It sleeps that long
    when it has no lease to renew too, so a lease taken during a sleep is renewed in time; only an
    interval shorter than any before wakes it (never a request as such: that would cost each one a
    thread switch).
    """

    def __init__(self) -> None:
        self._leases: dict[tuple[str, str], tuple[Database, Settings]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._interval_s = Settings.queue_lease_renew_s
        self._shorter = threading.Event()

    @contextmanager
    def kept(self, db: Database, settings: Settings, request_id: str, owner: str) -> Iterator[None]:
        """Keep the lease alive while the block runs."""
        key = (request_id, owner)
        with self._lock:
            self._leases[key] = (db, settings)
            if settings.queue_lease_renew_s < self._interval_s:
                self._interval_s = settings.queue_lease_renew_s
                self._shorter.set()
            if self._thread is None or not self._thread.is_alive():  # first use, or after a fork
                self._thread = threading.Thread(target=self._run, name="lease-renewer", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                del self._leases[key]

    def _run(self) -> None:
        while True:
            self._shorter.wait(self._interval_s)
            self._shorter.clear()
            with self._lock:
                groups: dict[tuple[int, float], tuple[Database, list[tuple[str, str]]]] = {}
                for key, (db, settings) in self._leases.items():
                    groups.setdefault((id(db), settings.queue_lease_s), (db, []))[1].append(key)
            for (_, lease_s), (db, leases) in groups.items():
                try:
                    with db.connection(autocommit=True) as conn:
                        request_queue.renew_leases(conn, leases, lease_seconds=lease_s)
                except Exception:
                    logger.warning("could not renew leases", extra={"leases": len(leases)}, exc_info=True)


_lease_renewer = LeaseRenewer()


def lease_kept_alive(db: Database, settings: Settings, request_id: str, owner: str):
    """Renew the request's lease while the block runs (a context manager)."""
    return _lease_renewer.kept(db, settings, request_id, owner)


def _error_details(error: Exception) -> dict:
    if isinstance(error, Problem):
        return {"status": error.status, "detail": error.detail, **error.extensions}
    return {"status": 500, "detail": "An unexpected error occurred; it has been logged."}


def call_back(row: dict, body: dict) -> None:
    """POST the outcome to the request's callback URL (e.g. an n8n Wait node's resume URL).

    With the request's `callback_headers` (secrets: they never reach a log line). Redirects are
    not followed: the headers would go to wherever the receiver points.
    """
    if not row.get("callback_url"):
        return
    headers = row.get("callback_headers") or {}
    try:
        response = _callback_session().post(row["callback_url"], json=body, headers=headers, allow_redirects=False)
        response.raise_for_status()
        if response.status_code >= 300:
            raise CallbackRedirected(f"{response.status_code} redirect, not followed, for url: {row['callback_url']}")
    except Exception as error:  # the result stays available at GET /requests/{id}
        logger.warning("callback failed", extra={"dispatch_id": str(row["id"]),
                                                 "error": _redacted(str(error), headers.values())})


def call_back_failed(row: dict, error_details: dict) -> None:
    """Call back a request that ended failed, with why."""
    call_back(row, {"request_id": str(row["id"]), "status": "failed", "error": error_details})


class CallbackRedirected(Exception):
    """The callback's receiver answered with a redirect, which is not followed."""


def _redacted(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return text


@lru_cache(maxsize=1)
def _callback_session():
    # A fast answer can arrive before an n8n Wait node is waiting: n8n then answers 409 ("is running
    # already"). Retried with backoff (about 8 s in all), as are 502/503/504; a receiver that was
    # already resumed answers 409 to a repeat, so a repeat does no harm.
    return http_session(timeout_s=10.0, retries=5, backoff_s=0.25, retry_methods=frozenset({"POST"}),
                        retry_statuses=(409, 502, 503, 504))


def dispatch(db: Database, settings: Settings, request_id: str, request: DispatchRequest, *,
             queue_wait_ms: float = 0.0, holder: Holder | None = None, record_later: bool = False) -> Outcome:
    """Run one request to a validated answer (`result` of the outcome); raise DispatchFailed when
    every attempt fails.

    With a `holder`, each attempt notes its model and runtime on the queued request (feedback needs
    them), and the statement releasing the answering attempt's runtime completes the request (left
    to the caller as the outcome's `record` when `record_later`). A holder's inheritance (a runtime
    handed over with the request) is selected on the state it came with.
    """
    started = time.perf_counter()
    inheritance = holder.inheritance if holder is not None else None
    selection, state = _select_unread(db, settings, request, inheritance.state if inheritance else last_state())
    selection_ms = _ms_since(started)

    def answer(outcome: Outcome) -> dict:
        return _answer(request_id, request, selection, outcome, attempts, selection_ms=selection_ms,
                       total_ms=_ms_since(started), queue_wait_ms=queue_wait_ms)

    attempts: list[Attempt] = []
    index, repair_of, prompt_problem = 0, None, None
    while len(attempts) <= request.max_retries:
        candidate = selection.candidates[index % len(selection.candidates)]
        attempt = Attempt(number=len(attempts) + 1, model=_label(candidate.model),
                          model_id=str(candidate.model["id"]), repair=repair_of is not None)
        attempts.append(attempt)
        try:
            outcome = run_attempt(db, settings, request_id, request, candidate, attempt, repair_of=repair_of,
                                  queue_wait_ms=queue_wait_ms, holder=holder, answer=answer,
                                  templates_version=selection.templates_version, selection_state=state,
                                  record_later=record_later)
        except StaleSelection as stale:  # this attempt never ran: go on, selecting on the current state
            selection, state = _select(db, settings, request, stale.state), None
            attempts.pop()
            continue
        if attempt.runtime_id is not None:
            state = None  # checked
        if attempt.outcome == "ok":
            return outcome
        if attempt.outcome == "invalid_output" and repair_of is None:
            repair_of = outcome       # same model, once, with what was wrong
            continue
        prompt_problem = prompt_problem or outcome.problem
        repair_of = None
        index = _next_candidate(selection.candidates, index, escalate=attempt.outcome == "invalid_output")
    raise _failure(request_id, attempts, prompt_problem)


def _failure(request_id: str, attempts: list[Attempt], prompt_problem: Problem | None) -> Problem:
    """DispatchFailed; or, when no attempt could build its prompt, the request's own problem."""
    if prompt_problem is not None and all(a.outcome == "prompt_failed" for a in attempts):
        return prompt_problem
    return DispatchFailed(request_id, attempts)


def stream_dispatch(db: Database, settings: Settings, row: dict, *, owner: str) -> Iterator[dict]:
    """A streamed answer: a start event, text events, then an end event saying whether it is `valid`.

    Models are tried in rank order (wrapping around, up to max_retries + 1 attempts) until one
    starts answering; after the first token there is no retry: a failure ends the stream with an
    error event. Problems before the start event are raised from the first `next()`. Closing the
    stream early (the client went away) releases the runtime and ends the request as failed.
    The whole text is parsed and validated once the stream ends, as `dispatch` does, but an invalid
    answer is neither repaired nor escalated (the client already has it): the end event, the
    stored result and the attempt's performance row say it is invalid, and why.
    """
    request_id = str(row["id"])
    request = DispatchRequest.from_payload(row["request_payload"])
    try:
        selection = _select(db, settings, request)
    except Exception as error:
        _record_failure(db, row, owner, _error_details(error))
        raise
    attempts: list[Attempt] = []
    prompt_problem = None
    with lease_kept_alive(db, settings, request_id, owner):
        for number in range(request.max_retries + 1):
            candidate = selection.candidates[number % len(selection.candidates)]   # wraps, as dispatch does
            attempt = Attempt(number=number + 1, model=_label(candidate.model),
                              model_id=str(candidate.model["id"]))
            attempts.append(attempt)
            outcome, started, text = Outcome(attempt=attempt), time.perf_counter(), []
            if not _prompt_built(db, settings, request, candidate.model, outcome, selection.templates_version):
                prompt_problem = prompt_problem or outcome.problem
                continue
            try:
                yield from _stream_attempt(db, settings, request, candidate, outcome, text,
                                           holder=Holder(request_id, owner))
            except request_queue.LeaseLost:   # the request is no longer ours to end
                raise
            except Problem as error:
                failed = "timeout" if isinstance(error, ModelServerTimeout) else (
                    "server_error" if attempt.runtime_id else "start_failed")
                _end_attempt(db, request_id, request, outcome, started, failed, error.detail)
                if text:   # no retry after the first token: end the stream with the error
                    _record_failure(db, row, owner, _error_details(DispatchFailed(request_id, attempts)))
                    yield {"error": {"status": error.status, "detail": error.detail}}
                    return
                continue
            except GeneratorExit:
                _end_attempt(db, request_id, request, outcome, started, "client_disconnected", DISCONNECTED)
                _record_failure(db, row, owner, {"error": "client_disconnected", "detail": DISCONNECTED,
                                                 "attempts": _as_dicts(attempts)})
                raise
            except Exception as error:   # unforeseen: the request ends now rather than when its lease expires
                _record_failure(db, row, owner, {**_error_details(error), "attempts": _as_dicts(attempts)})
                raise
            parsed, generation = outcome.parsed, outcome.generation
            _end_attempt(db, request_id, request, outcome, started,
                         "ok" if parsed.valid else "invalid_output", None)
            result = {"request_id": request_id, "status": "completed", "streamed": True,
                      "response": parsed.value, "raw": "".join(text), "valid": parsed.valid,
                      "reasons": parsed.reasons, "output_format": request.output_format,
                      "model": {"id": attempt.model_id, "name": candidate.model["name"],
                                "version": candidate.model["version"]},
                      "runtime_id": attempt.runtime_id, "attempts": _as_dicts(attempts)}
            with db.connection(autocommit=True) as conn:
                request_queue.complete(conn, request_id, owner=owner, result=result)
            yield {"finish_reason": generation.finish_reason or "stop",
                   "tokens": {"input": generation.input_tokens, "output": generation.output_tokens},
                   "timings": {"total_ms": attempt.duration_ms, "cold_start_ms": 0.0,
                               "generation_ms": generation.timings.total_ms},
                   "valid": parsed.valid, **({} if parsed.valid else {"reasons": parsed.reasons})}
            return
    failure = _failure(request_id, attempts, prompt_problem)
    _record_failure(db, row, owner, _error_details(failure))
    raise failure


DISCONNECTED = "The client disconnected before the answer was complete."


def _stream_attempt(db: Database, settings: Settings, request: DispatchRequest,
                    candidate: Candidate, outcome: Outcome, text: list[str], *, holder: Holder) -> Iterator[dict]:
    """One model's streamed answer, on the prompt built in `outcome`: the start event once it answers,
    then its text.

    The start event waits for the first chunk, so a model that fails before answering is retried
    on the next candidate without the client seeing anything. `outcome` ends with the generation
    and its whole text parsed (`parsed`, which `_end_attempt` logs; `attempt.reasons`).
    """
    attempt, started = outcome.attempt, time.perf_counter()
    with leased_runtime(db, candidate.model["id"], settings, holder=holder) as runtime:
        outcome.ensure_ms = _ms_since(started)
        attempt.runtime_id = str(runtime["id"])
        client = client_for(candidate.model, runtime["endpoint"], timeout_s=request.timeout_s)
        stream = client.stream(messages=conversation(request, outcome.built, None),
                               options=generation_options(request))
        chunks = iter(stream)
        try:
            first = next(chunks, None)
            yield {"request_id": holder.request_id, "model": attempt.model, "runtime_id": attempt.runtime_id}
            for chunk in itertools.chain([first] if first is not None else [], chunks):
                text.append(chunk)
                yield {"text": chunk}
        finally:
            chunks.close()
        outcome.generation = stream.result
    outcome.parsed = parse_output("".join(text), request.output_format, request.json_schema,
                                  request.variables.get("language"))
    attempt.reasons = outcome.parsed.reasons


def _end_attempt(db: Database, request_id: str, request: DispatchRequest, outcome: Outcome, started: float,
                 result: str, error: str | None) -> None:
    outcome.attempt.outcome, outcome.attempt.error = result, error
    outcome.attempt.duration_ms = _ms_since(started)
    _log_attempt(db, request_id, request, outcome, 0.0)


def _record_failure(db: Database, row: dict, owner: str, error_details: dict) -> None:
    with db.connection(autocommit=True) as conn:
        request_queue.fail(conn, str(row["id"]), owner=owner, error_details=error_details)


def _select_unread(db: Database, settings: Settings, request: DispatchRequest,
                   state: dict | None) -> tuple[Selection, dict | None]:
    """The selection on a state known without reading it (the one this process saw last, say), and
    that state, which the first lease is to check; on a state read now (and None) if there is none,
    or none passes."""
    if state is not None:
        try:
            selection = _select(db, settings, request, state)
        except Problem:  # no model, none that fits, or none left: perhaps only in an old catalogue
            selection = None
        if selection is not None:
            return selection, state
    return _select(db, settings, request), None


def _select(db: Database, settings: Settings, request: DispatchRequest, state: dict | None = None) -> Selection:
    """The selection on `state`, or on the state read now."""
    if request.model:
        return pinned_selection(db, settings, request, state)
    with db.connection(autocommit=True) as conn:  # reads only
        selection = select_models(conn, selection_request(request), settings, state)
    if not selection.candidates:  # the ranked models were deleted between two reads
        raise Conflict("The models selected for this request were deleted meanwhile; send it again.")
    return selection


def selection_request(request: DispatchRequest) -> SelectionRequest:
    return SelectionRequest(
        task_type=request.task_type, complexity=request.complexity,
        max_memory_mb=request.max_memory_mb, max_latency_ms=request.max_latency_ms,
        weights=request.weights, required_tags=request.required_tags, exclude=request.exclude,
        prefer_warm=request.prefer_warm, limit=5,
    )


def pinned_selection(db: Database, settings: Settings, request: DispatchRequest,
                     state: dict | None = None) -> Selection:
    """The one model the caller named, as a selection of one (no scoring); NotFound when it is not
    served here (its runtime driver is not enabled: no attempt could start it)."""
    model, templates_version = named_model(db, request.model, state)
    if model["runtime_driver"] not in settings.runtime_drivers:
        raise NotFound(f"model {request.model} is not served here: its runtime driver "
                       f"{model['runtime_driver']} is not enabled.", model_id=str(model["id"]))
    return Selection(task_type=request.task_type, complexity=request.complexity, weights={},
                     eligible_count=1, candidates=[Candidate(model=model, score=1.0, breakdown={},
                                                             data={"pinned": True})],
                     templates_version=templates_version)


def run_attempt(db: Database, settings: Settings, request_id: str, request: DispatchRequest,
                candidate: Candidate, attempt: Attempt, *, repair_of: Outcome | None,
                queue_wait_ms: float, holder: Holder | None = None,
                answer: Callable[[Outcome], dict] | None = None,
                templates_version: str | None = None, selection_state: dict | None = None,
                record_later: bool = False) -> Outcome:
    """One model, one runtime, one generation, checked; logged by the statement that releases the runtime.

    When it succeeds, `answer` makes the result, which that statement records as the request's end
    (then, with `record_later`, that statement is not run but left to the caller as `record`).
    With the `selection_state` the model was selected on, StaleSelection before anything ran if
    that state is no longer current.
    """
    model = candidate.model
    outcome = Outcome(attempt=attempt)
    started, started_at = time.perf_counter(), datetime.now(timezone.utc)
    if not _prompt_built(db, settings, request, model, outcome, templates_version):
        return outcome
    try:
        runtime = lease_runtime(db, model["id"], settings, holder=holder, selection_state=selection_state)
    except request_queue.LeaseLost:   # the request is no longer this worker's: no model is to blame
        raise
    except Problem as error:  # no runtime to run it on
        attempt.outcome, attempt.error = "start_failed", error.detail
        attempt.duration_ms = _ms_since(started)
        _log_attempt(db, request_id, request, outcome, queue_wait_ms)
        return outcome
    performance = None
    try:
        outcome.ensure_ms = _ms_since(started)
        # Cold when the runtime became ready during this attempt: its load time counts here.
        outcome.cold_start = bool(runtime["ready_at"] and runtime["ready_at"] >= started_at)
        outcome.load_time_ms = runtime["load_time_ms"] if outcome.cold_start else None
        attempt.runtime_id = str(runtime["id"])
        _generate(outcome, model, runtime, request, repair_of)
        attempt.duration_ms = _ms_since(started)
        performance = _performance_row(request_id, request, outcome, queue_wait_ms)
        if attempt.outcome == "ok" and answer is not None:
            outcome.result = answer(outcome)
    finally:
        release = partial(release_runtime, db, runtime["id"], settings, holder, performance=performance,
                          result=outcome.result)
        if record_later and outcome.result is not None:
            outcome.record = release
        else:
            outcome.released(release())
    return outcome


def _prompt_built(db: Database, settings: Settings, request: DispatchRequest, model: dict, outcome: Outcome,
                  templates_version: str | None) -> bool:
    """Build the attempt's prompt (`outcome.built`); False, with the attempt prompt_failed, when the
    request does not fit the model's template. No model ran: nothing is logged against it."""
    try:
        with db.connection(autocommit=True) as conn:  # reads only when the templates are not in memory
            outcome.built = build_prompt(conn, prompt_request(request, model, settings),
                                         templates_version=templates_version)
    except Problem as error:
        outcome.attempt.outcome, outcome.attempt.error, outcome.problem = "prompt_failed", error.detail, error
        return False
    return True


def _generate(outcome: Outcome, model: dict, runtime: dict, request: DispatchRequest,
              repair_of: Outcome | None) -> None:
    """Generate on the runtime and check the output; the attempt's outcome says how it went."""
    attempt = outcome.attempt
    try:
        client = client_for(model, runtime["endpoint"], timeout_s=request.timeout_s)
        outcome.generation = client.generate(
            messages=conversation(request, outcome.built, repair_of), options=generation_options(request))
        outcome.parsed = parse_output(outcome.generation.text, request.output_format, request.json_schema,
                                      request.variables.get("language"))
        attempt.outcome = "ok" if outcome.parsed.valid else "invalid_output"
        attempt.reasons = outcome.parsed.reasons
    except ModelServerTimeout as error:
        attempt.outcome, attempt.error = "timeout", error.detail
    except Unprocessable:
        raise  # the request cannot be checked (say, its schema's $ref leads nowhere): no model can do better
    except Problem as error:
        attempt.outcome, attempt.error = "server_error", error.detail


def prompt_request(request: DispatchRequest, model: dict, settings: Settings) -> PromptRequest:
    return PromptRequest(prompt=request.user_text, task_type=request.task_type,
                         model=_label(model), protocol=model["protocol"],
                         output_format=request.output_format, json_schema=request.json_schema,
                         variables=request.variables, max_prompt_chars=settings.max_prompt_chars,
                         history_chars=request.history_chars)


def check_admissible(payload: dict, settings: Settings) -> None:
    """Refuse now, before recording it, a request every attempt would refuse: a prompt over the size
    limit (PayloadTooLarge; its template adds to it, so one just under may still fail then)."""
    request = DispatchRequest.from_payload(payload)
    check_prompt_size(request.user_text, request.variables, settings.max_prompt_chars, request.history_chars)


def conversation(request: DispatchRequest, built: BuiltPrompt, repair_of: Outcome | None) -> list[dict]:
    """The messages sent: earlier chat turns, the templated request, and a repair turn if any."""
    history = list(request.messages[:-1])
    messages = built.messages
    if any(m["role"] == "system" for m in history):
        # The caller's own system message wins over the template's.
        messages = [m for m in messages if m["role"] != "system"]
    messages = [m for m in messages if m["role"] == "system"] + history + \
               [m for m in messages if m["role"] != "system"]
    if repair_of and repair_of.generation and repair_of.parsed:
        raw = repair_of.generation.text
        messages += [{"role": "assistant", "content": raw},
                     {"role": "user", "content": repair_prompt(raw, repair_of.parsed, request.output_format,
                                                               request.json_schema)}]
    return messages


def generation_options(request: DispatchRequest) -> Options:
    response_format = None
    if request.output_format == "json":
        response_format = request.json_schema if request.json_schema is not None else "json"
    return Options(max_tokens=request.max_tokens, temperature=request.temperature, stop=request.stop,
                   response_format=response_format, seed=request.seed)


def _next_candidate(candidates: list[Candidate], index: int, *, escalate: bool) -> int:
    """The next candidate to try; when escalating, the next one at least as capable if any."""
    if escalate:
        current = candidates[index % len(candidates)].model["complexity_score"]
        for step in range(1, len(candidates)):
            if candidates[(index + step) % len(candidates)].model["complexity_score"] >= current:
                return index + step
    return index + 1


def _log_attempt(db: Database, request_id: str, request: DispatchRequest, outcome: Outcome,
                 queue_wait_ms: float) -> None:
    """Log an attempt in a statement of its own (an attempt that held a runtime is logged with its release)."""
    try:
        with db.connection(autocommit=True) as conn:
            log_performance(conn, _performance_row(request_id, request, outcome, queue_wait_ms))
    except Exception:  # a lost log row must not lose the answer
        logger.exception("could not log a performance row", extra={"dispatch_id": request_id})


def _performance_row(request_id: str, request: DispatchRequest, outcome: Outcome, queue_wait_ms: float) -> dict:
    """The attempt's performance_logs row."""
    attempt, generation = outcome.attempt, outcome.generation
    timings = generation.timings if generation else None
    return {
        "model_id": attempt.model_id,
        "runtime_id": attempt.runtime_id,
        "request_id": request_id,
        "task_type": request.task_type,
        "output_format": request.output_format,
        "attempt": attempt.number,
        "template_id": outcome.built.template["id"] if outcome.built else None,
        "template_version": outcome.built.template["version"] if outcome.built else None,
        "input_tokens": generation.input_tokens if generation else None,
        "output_tokens": generation.output_tokens if generation else None,
        "tokens_per_second": timings.tokens_per_second if timings else None,
        # Without a cold start: that is load_time_ms, which selection adds for a model not running.
        "processing_time_ms": round(attempt.duration_ms - (outcome.ensure_ms if outcome.cold_start else 0.0)),
        "load_time_ms": outcome.load_time_ms,
        "queue_wait_ms": round(queue_wait_ms),
        "success": attempt.outcome in SERVED,
        "validation_passed": outcome.parsed.valid if outcome.parsed else None,
        "error_class": None if attempt.outcome == "ok" else attempt.outcome,
        "error_message": (attempt.error or "")[:5000] or None,
    }


def _answer(request_id: str, request: DispatchRequest, selection: Selection, outcome: Outcome,
            attempts: list[Attempt], *, selection_ms: float, total_ms: float, queue_wait_ms: float) -> dict:
    generation, attempt = outcome.generation, outcome.attempt
    chosen = next(c for c in selection.candidates if str(c.model["id"]) == attempt.model_id)
    return {
        "request_id": request_id,
        "status": "completed",
        "response": outcome.parsed.value,
        "raw": generation.text,
        "valid": outcome.parsed.valid,
        "output_format": request.output_format,
        "finish_reason": generation.finish_reason,
        "model": {"id": attempt.model_id, "name": chosen.model["name"], "version": chosen.model["version"]},
        "runtime_id": attempt.runtime_id,
        "template": outcome.built.template,
        "timings": {
            "queue_wait_ms": round(queue_wait_ms, 3),
            "selection_ms": round(selection_ms, 3),
            "cold_start_ms": round(outcome.ensure_ms, 3) if outcome.cold_start else 0.0,
            "ensure_ms": round(outcome.ensure_ms, 3),
            "generation_ms": round(generation.timings.total_ms, 3),
            "total_ms": round(total_ms, 3),
        },
        "tokens": {"input": generation.input_tokens, "output": generation.output_tokens,
                   "per_second": generation.timings.tokens_per_second},
        "attempts": _as_dicts(attempts),
        "decision": decision(selection, chosen),
    }


def decision(selection: Selection, chosen: Candidate) -> dict[str, Any]:
    """Why this model: the ranked candidates with their score breakdown, and what was filtered."""
    return {
        "task_type": selection.task_type,
        "complexity": selection.complexity,
        "weights": selection.weights,
        "chosen": _label(chosen.model),
        "why": f"{_label(chosen.model)} ranked {selection.candidates.index(chosen) + 1} of "
               f"{selection.eligible_count} eligible models with score {chosen.score:.3f}",
        "candidates": [{"model": _label(c.model), "model_id": str(c.model["id"]), "score": round(c.score, 4),
                        "breakdown": {k: round(v, 4) for k, v in c.breakdown.items()}, "data": c.data}
                       for c in selection.candidates],
        "filtered": _as_dicts(selection.filtered),
    }


def _as_dicts(items: Iterable) -> list[dict]:
    """Dataclass instances as dicts, without `asdict`'s deep copies (a measurable share of an answer)."""
    return [dict(vars(item)) for item in items]


def _label(model: dict) -> str:
    return f"{model['name']}:{model['version']}"


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
