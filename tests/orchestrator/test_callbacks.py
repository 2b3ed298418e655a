"""The async callback: retried while the receiver (an n8n Wait node) is not waiting yet."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.orchestrator.pipeline import _call_back


class Receiver(ThreadingHTTPServer):
    """Answers the queued statuses in turn (then 200) and keeps the bodies it got."""

    def __init__(self, statuses: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.statuses = statuses
        self.bodies: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/webhook-waiting/7"


class ReceiverHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver(request) -> Iterator[Receiver]:
    server = Receiver(list(request.param))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize("receiver", [[409, 409]], indirect=True)
def test_a_callback_is_repeated_until_the_receiver_is_waiting(receiver):
    body = {"request_id": "r1", "status": "completed"}

    _call_back({"id": "r1", "callback_url": receiver.url}, body)

    assert receiver.bodies == [body, body, body]


@pytest.mark.parametrize("receiver", [[404]], indirect=True)
def test_a_callback_the_receiver_does_not_know_is_not_repeated(receiver, caplog):
    _call_back({"id": "r1", "callback_url": receiver.url}, {"status": "completed"})

    assert receiver.bodies == [{"status": "completed"}]
    assert [r.message for r in caplog.records] == ["callback failed"]
