"""The async callback: retried while the receiver (an n8n Wait node) is not waiting yet, with the
caller's `callback_headers`, which are secrets: never stored in the payload, returned or logged."""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fake_model_server import FakeModelServer
from orchestrator_helpers import insert_model
from services.common.http import CappedRetry
from services.orchestrator import create_app, request_queue
from services.orchestrator.pipeline import call_back
from services.orchestrator.worker import WorkerPool

SECRET = "Bearer s3cret-resume-token"
HEADERS = {"Authorization": SECRET, "X-Resume-Key": "second s3cret"}


class Receiver(ThreadingHTTPServer):
    """Answers the queued statuses in turn (then 200) and keeps the bodies and headers it got."""

    def __init__(self, statuses: list[int], redirect_to: str | None = None, retry_after: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.statuses = statuses
        self.redirect_to = redirect_to
        self.retry_after = retry_after
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/webhook-waiting/7"


class ReceiverHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.server.headers.append(dict(self.headers))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
        if self.server.redirect_to:
            self.send_header("Location", self.server.redirect_to)
        if self.server.retry_after:
            self.send_header("Retry-After", self.server.retry_after)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@contextmanager
def serving(statuses: list[int], redirect_to: str | None = None, retry_after: str | None = None) -> Iterator[Receiver]:
    server = Receiver(statuses, redirect_to, retry_after)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def receiver(request) -> Iterator[Receiver]:
    with serving(list(getattr(request, "param", []))) as server:
        yield server


def secrets_in_logs(records: list[logging.LogRecord]) -> list[str]:
    """The log records (message and every extra field) that show a header value."""
    shown = [json.dumps(vars(record), default=str) + record.getMessage() for record in records]
    return [text for text in shown if any(value in text or value.split()[-1] in text for value in HEADERS.values())]


@pytest.mark.parametrize("receiver", [[409, 409]], indirect=True)
def test_a_callback_is_repeated_until_the_receiver_is_waiting(receiver):
    body = {"request_id": "r1", "status": "completed"}

    call_back({"id": "r1", "callback_url": receiver.url}, body)

    assert receiver.bodies == [body, body, body]


def test_a_receiver_asking_for_a_long_wait_holds_the_caller_no_longer_than_the_cap(monkeypatch):
    waits = []
    monkeypatch.setattr("urllib3.util.retry.time.sleep", waits.append)
    with serving([503], retry_after="86400") as receiver:
        call_back({"id": "r1", "callback_url": receiver.url}, {"status": "completed"})

    assert len(receiver.bodies) == 2
    assert waits == [CappedRetry.MAX_RETRY_AFTER_S]


@pytest.mark.parametrize("receiver", [[404]], indirect=True)
def test_a_callback_the_receiver_does_not_know_is_not_repeated(receiver, caplog):
    call_back({"id": "r1", "callback_url": receiver.url}, {"status": "completed"})

    assert receiver.bodies == [{"status": "completed"}]
    assert [r.message for r in caplog.records] == ["callback failed"]


@pytest.mark.parametrize("receiver", [[409, 503]], indirect=True)
def test_the_callback_headers_go_with_the_callback_and_each_retry(receiver):
    call_back({"id": "r1", "callback_url": receiver.url, "callback_headers": HEADERS}, {"status": "completed"})

    assert len(receiver.headers) == 3
    for sent in receiver.headers:
        assert (sent["Authorization"], sent["X-Resume-Key"]) == (SECRET, "second s3cret")


@pytest.mark.parametrize("receiver", [[404]], indirect=True)
def test_a_failed_callback_logs_no_header_value(receiver, caplog):
    caplog.set_level(logging.DEBUG)

    call_back({"id": "r1", "callback_url": receiver.url, "callback_headers": HEADERS}, {"status": "completed"})

    assert [r.message for r in caplog.records if r.name == "services.orchestrator.pipeline"] == ["callback failed"]
    assert secrets_in_logs(caplog.records) == []


def test_an_error_that_quotes_a_header_value_is_logged_redacted(caplog):
    """Values the schema would refuse: the HTTP client's error names the value; the log line does not."""
    row = {"id": "r1", "callback_url": "http://127.0.0.1:9/", "callback_headers": {"Authorization": " " + SECRET}}

    call_back(row, {"status": "completed"})

    failed, = [r for r in caplog.records if r.message == "callback failed"]
    assert failed.error.startswith("Invalid leading whitespace") and failed.error.endswith("'[redacted]'")
    assert secrets_in_logs(caplog.records) == []


def test_a_redirect_is_not_followed_so_the_headers_stay_with_the_receiver_asked(caplog):
    with serving([]) as elsewhere, serving([307], redirect_to=None) as receiver:
        receiver.redirect_to = elsewhere.url

        call_back({"id": "r1", "callback_url": receiver.url, "callback_headers": HEADERS}, {"status": "completed"})

    assert len(receiver.headers) == 1 and elsewhere.headers == []
    failed, = [r for r in caplog.records if r.message == "callback failed"]
    assert failed.error == f"307 redirect, not followed, for url: {receiver.url}"


# --- through the API: POST /dispatch {callback_url, callback_headers} ------------------------------

@pytest.fixture
def client(make_app, settings):
    app = make_app(create_app, RUNTIME_DIR=settings.runtime_dir, RUNTIME_DRIVERS=("external",),
                   RECONCILE_ON_START=False)
    return app.test_client()


@pytest.fixture
def served(conn, fake_server: FakeModelServer) -> dict:
    return insert_model(conn, runtime_config={"endpoint": fake_server.url, "model_alias": "fake"},
                        task_types=["question-answering"])


def dispatch_body(callback_url: str, **fields) -> dict:
    return {"prompt": "What is 6 times 7?", "task_type": "question-answering", "max_tokens": 32,
            "callback_url": callback_url, "callback_headers": HEADERS, **fields}


def stored(conn, request_id: str) -> dict:
    return conn.execute("SELECT request_payload, callback_headers, status FROM request_queue WHERE id = %s",
                        (request_id,)).fetchone()


@pytest.mark.parametrize("receiver", [[409]], indirect=True)
def test_a_queued_request_calls_back_with_its_headers_which_nothing_shows(client, conn, db, served, receiver,
                                                                        caplog):
    caplog.set_level(logging.DEBUG)
    accepted = client.post("/dispatch", json=dispatch_body(receiver.url, **{"async": True}))
    assert accepted.status_code == 202
    request_id = accepted.get_json()["request_id"]
    pending = client.get(f"/requests/{request_id}")
    assert pending.get_json()["status"] == "pending"
    row = stored(conn, request_id)
    assert row["callback_headers"] == HEADERS
    assert "callback_headers" not in row["request_payload"] and row["request_payload"]["callback_url"] == receiver.url

    assert WorkerPool(db, client.application.extensions["settings"], workers=1).run_once() is True

    assert receiver.bodies[-1]["status"] == "completed" and len(receiver.bodies) == 2   # the 409, then again
    assert all((sent["Authorization"], sent["X-Resume-Key"]) == (SECRET, "second s3cret") for sent in receiver.headers)
    done = client.get(f"/requests/{request_id}")
    assert done.get_json()["status"] == "completed"
    shown = [accepted, pending, done, client.get("/openapi.json")]
    assert not [r.get_data(as_text=True) for r in shown if "s3cret" in r.get_data(as_text=True)]
    assert stored(conn, request_id)["callback_headers"] is None   # dropped once the request has ended
    assert secrets_in_logs(caplog.records) == []


def test_a_request_its_lost_worker_leaves_failed_is_called_back_by_the_reclaim(client, conn, db, served, receiver):
    request_id = client.post("/dispatch", json=dispatch_body(receiver.url, **{"async": True})).get_json()["request_id"]
    request_queue.claim_next(conn, owner="dead-worker", lease_seconds=30)
    conn.execute("UPDATE request_queue SET attempts = 3, lease_expires_at = now() - interval '1 second'"
                 " WHERE id = %s", (request_id,))

    reclaimed = WorkerPool(db, client.application.extensions["settings"], workers=1).reclaim_once()

    assert [(str(row["id"]), row["status"]) for row in reclaimed] == [(request_id, "failed")]
    assert receiver.bodies == [{"request_id": request_id, "status": "failed", "error": {
        "error": "worker_lost", "detail": "The worker running this request stopped before finishing it.",
        "attempts": 3}}]
    assert (receiver.headers[0]["Authorization"], receiver.headers[0]["X-Resume-Key"]) == (SECRET, "second s3cret")
    assert stored(conn, request_id)["callback_headers"] is None


def test_a_sync_request_calls_back_with_its_headers_too(client, conn, served, receiver):
    answered = client.post("/dispatch", json=dispatch_body(receiver.url))

    assert answered.status_code == 200 and "s3cret" not in answered.get_data(as_text=True), answered.get_data(as_text=True)
    assert receiver.bodies == [answered.get_json()]
    assert (receiver.headers[0]["Authorization"], receiver.headers[0]["X-Resume-Key"]) == (SECRET, "second s3cret")
    assert stored(conn, answered.get_json()["request_id"])["callback_headers"] is None


def test_a_cancelled_request_drops_its_headers_and_does_not_show_them(client, conn):
    request_id = client.post("/dispatch", json=dispatch_body("http://127.0.0.1:9/", **{"async": True})
                             ).get_json()["request_id"]

    cancelled = client.delete(f"/requests/{request_id}")

    assert cancelled.get_json()["status"] == "cancelled" and "s3cret" not in cancelled.get_data(as_text=True)
    assert stored(conn, request_id)["callback_headers"] is None


def test_a_reclaimed_request_keeps_its_headers_until_it_has_run_out_of_attempts(conn):
    request_id = "5f0c7b7e-0000-4000-8000-0000000000cb"
    request_queue.enqueue(conn, request_id=request_id, payload={"task_type": "question-answering"},
                          task_type="question-answering", priority=100, mode="async",
                          callback_url="http://127.0.0.1:9/", callback_headers=HEADERS)
    kept = []
    for _ in range(3):
        claimed = request_queue.claim_next(conn, owner="dead-worker", lease_seconds=0.001)
        assert claimed["callback_headers"] == HEADERS     # what the worker calls back with
        conn.execute("UPDATE request_queue SET lease_expires_at = clock_timestamp() - interval '1 second'"
                     " WHERE id = %s", (request_id,))   # now() stands still in the test's transaction
        request_queue.reclaim_expired(conn, max_attempts=3)
        kept.append((stored(conn, request_id)["status"], stored(conn, request_id)["callback_headers"]))

    assert kept == [("pending", HEADERS), ("pending", HEADERS), ("failed", None)]


TOO_MANY = {f"X-Header-{n}": "v" for n in range(9)}
NO_URL = object()   # the field left out
VALUE_ERROR = ["A header value is 1 to 4096 visible ASCII characters (spaces and tabs only inside)."]


@pytest.mark.parametrize("fields, errors", [
    ({"callback_url": None}, {"callback_headers": ["callback_headers needs a callback_url."]}),
    ({"callback_url": NO_URL}, {"callback_headers": ["callback_headers needs a callback_url."]}),
    ({"callback_headers": TOO_MANY}, {"callback_headers": ["At most 8 headers."]}),
    ({"callback_headers": ["Authorization", SECRET]}, {"callback_headers": ["Not a valid mapping type."]}),
    ({"callback_headers": {"Bad Name": "v"}}, {"callback_headers": {"Bad Name": {"key": ["Not a valid header name."]}}}),
    ({"callback_headers": {"X-Ok\n": "v"}}, {"callback_headers": {"X-Ok\n": {"key": ["Not a valid header name."]}}}),
    ({"callback_headers": {"": "v"}}, {"callback_headers": {"": {"key": ["Not a valid header name."]}}}),
    ({"callback_headers": {"X" * 65: "v"}}, {"callback_headers": {"X" * 65: {"key": ["Not a valid header name."]}}}),
    *[({"callback_headers": {name: "v"}},
       {"callback_headers": {name: {"key": ["A header the HTTP client sets itself cannot be given."]}}})
      for name in ("Host", "content-length", "Content-Type", "Transfer-Encoding", "CONNECTION", "Upgrade",
                   "Proxy-Authorization", "TE")],
    *[({"callback_headers": {"Authorization": value}}, {"callback_headers": {"Authorization": {"value": VALUE_ERROR}}})
      for value in ("Bearer x\r\nX-Injected: 1", "Bearer x\n", " Bearer x", "Bearer x ", "", "geheim-\u00e4",
                    "x" * 4097)],   # a NUL never gets this far: the app core refuses it
    ({"callback_headers": {"Authorization": 5}}, {"callback_headers": {"Authorization": {"value": ["Not a valid string."]}}}),
    ({"callback_headers": {"Authorization": "a", "authorization": "b"}},
     {"callback_headers": ["Each header may be given once (names are case-insensitive)."]}),
])
def test_bad_callback_headers_are_a_422_that_records_nothing(client, conn, fields, errors):
    before = conn.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"]

    body = {**dispatch_body("http://127.0.0.1:9/", **{"async": True}), **fields}
    response = client.post("/dispatch", json={name: value for name, value in body.items() if value is not NO_URL})

    assert response.status_code == 422
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.get_json()["errors"] == {"json": errors}
    assert conn.execute("SELECT count(*) AS n FROM request_queue").fetchone()["n"] == before


@pytest.mark.parametrize("headers", [
    {f"X-Header-{n}": "v" for n in range(8)},
    {"!#$%&'*+-.^_`|~09azAZ": "a\tb c", "Authorization": "x" * 4096},
])
def test_callback_headers_within_the_bounds_are_taken(client, conn, headers):
    accepted = client.post("/dispatch", json=dispatch_body("http://127.0.0.1:9/", **{"async": True},
                                                           callback_headers=headers))

    assert accepted.status_code == 202, accepted.get_json()
    assert stored(conn, accepted.get_json()["request_id"])["callback_headers"] == headers


def test_a_request_with_a_callback_claims_no_successor(client, conn, db, served, receiver):
    """The next request would wait for the call, its lease not renewed: it is claimed on its own."""
    first, second = (client.post("/dispatch", json=dispatch_body(receiver.url, **{"async": True})).get_json()
                     ["request_id"] for _ in range(2))

    assert WorkerPool(db, client.application.extensions["settings"], workers=1).run_once() is True

    assert [stored(conn, request_id)["status"] for request_id in (first, second)] == ["completed", "pending"]
    assert len(receiver.bodies) == 1
