"""Dispatch endpoints: one request end to end (sync or queued), its status, cancel, feedback."""
from __future__ import annotations

import uuid
from uuid import UUID

from flask import g, jsonify, request, url_for
from flask.views import MethodView

from services.common.app import Blueprint, after_response, current_settings
from services.common.db import get_db
from services.common.errors import Conflict, NotFound
from services.orchestrator import request_queue
from services.orchestrator.pipeline import check_admissible, run_sync_request
from services.orchestrator.dispatch_schemas import (AcceptedSchema, DispatchResultSchema, DispatchSchema,
                                                    FeedbackOutSchema, FeedbackSchema, RequestStatusSchema)

blp = Blueprint("dispatch", __name__, description="Dispatch a request to the best model, end to end")
ACCEPTED = AcceptedSchema()  # once: building a schema is a measurable share of an async enqueue


@blp.route("/dispatch")
class Dispatch(MethodView):
    @blp.arguments(DispatchSchema())  # an instance: webargs would build one per request from a class
    @blp.response(200, DispatchResultSchema)
    @blp.alt_response(202, schema=AcceptedSchema, description="Queued (async or Prefer: respond-async)")
    def post(self, body):
        """Answer a prompt with the best model, or queue it (`async: true` / `Prefer: respond-async`)."""
        run_async = body.pop("run_async") or "respond-async" in request.headers.get("Prefer", "")
        # Secrets: kept in a column of their own, out of the payload that is stored and read back.
        callback_headers = body.pop("callback_headers") or None
        check_admissible(body, current_settings())
        request_id = dispatch_request_id()
        db = get_db()
        if run_async:
            with db.connection(autocommit=True) as conn:
                request_queue.enqueue(conn, request_id=request_id, payload=body, task_type=body["task_type"],
                                      priority=body["priority"], mode="async", callback_url=body["callback_url"],
                                      callback_headers=callback_headers)
            status_url = url_for("dispatch.RequestStatus", request_id=request_id)
            # A Response, so the 200 schema does not apply to it.
            accepted = jsonify(ACCEPTED.dump(
                {"request_id": request_id, "status": "pending", "status_url": status_url}))
            return accepted, 202, {"Location": status_url}
        # A Response: the answer is plain JSON already (it is stored as jsonb too), and a schema dump
        # of it would cost a tenth of the dispatch's own time.
        return jsonify(run_sync_request(db, current_settings(), request_id, body, callback_headers=callback_headers,
                                        after_answer=after_response))


@blp.route("/requests/<uuid:request_id>", endpoint="RequestStatus")
class RequestStatus(MethodView):
    @blp.response(200, RequestStatusSchema)
    def get(self, request_id: UUID):
        """A request's status and, once done, its result or error details."""
        with get_db().connection() as conn:
            row = request_queue.get(conn, request_id)
        if row is None:
            raise NotFound(f"Request {request_id} does not exist.")
        return row

    @blp.response(200, RequestStatusSchema)
    def delete(self, request_id: UUID):
        """Cancel a request that is still pending."""
        with get_db().connection() as conn:
            cancelled = request_queue.cancel(conn, request_id)
            row = cancelled or request_queue.get(conn, request_id)
        if row is None:
            raise NotFound(f"Request {request_id} does not exist.")
        if cancelled is None:
            raise Conflict(f"Request {request_id} is {row['status']}; only a pending request can be cancelled.",
                           request_status=row["status"])
        return cancelled


@blp.route("/requests/<uuid:request_id>/feedback")
class Feedback(MethodView):
    @blp.arguments(FeedbackSchema)
    @blp.response(201, FeedbackOutSchema)
    def post(self, body, request_id: UUID):
        """Rate the answer to a request (0..1); selection learns from it."""
        with get_db().connection() as conn:
            row = request_queue.add_feedback(conn, request_id, **body)
            request = request_queue.get(conn, request_id) if row is None else None
        if row is None and request is None:
            raise NotFound(f"Request {request_id} does not exist.")
        if row is None:
            raise Conflict(f"Request {request_id} is {request['status']}: it has no answer to rate.",
                           request_status=request["status"])
        return row


def dispatch_request_id() -> str:
    """The dispatch's id; a caller's X-Request-ID is kept when it is a UUID, so logs line up."""
    try:
        request_id = str(UUID(g.request_id))
    except ValueError:
        request_id = str(uuid.uuid4())
    g.request_id = request_id
    return request_id


def enqueue_sync(request_id: str, payload: dict) -> dict:
    """Record a request this thread runs now (a stream): already processing, leased to it."""
    with get_db().connection(autocommit=True) as conn:
        return request_queue.enqueue(conn, request_id=request_id, payload=payload, task_type=payload["task_type"],
                                     priority=payload["priority"], mode="sync", callback_url=payload["callback_url"],
                                     lease_owner=request_queue.lease_owner(),
                                     lease_seconds=current_settings().queue_lease_s)
