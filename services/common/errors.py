"""Problem details (RFC 9457) for every error, one exception class per status."""
from __future__ import annotations

import logging
from http import HTTPStatus

import psycopg
from flask import Flask, Response, g, json
from marshmallow import INCLUDE, Schema, fields
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout
from werkzeug.exceptions import HTTPException

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"


class ProblemSchema(Schema):
    """The body of every error response; problem types add members of their own."""

    class Meta:
        unknown = INCLUDE

    type = fields.String(required=True, metadata={"description": "A URI naming the problem type"})
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    request_id = fields.String(required=True)
    errors = fields.Dict(metadata={"description": "Field messages, keyed by location then field"})


class Problem(Exception):
    """An error answered as `application/problem+json`; subclasses fix the status."""

    status = 500

    def __init__(self, detail: str, *, errors: dict | None = None, headers: dict | None = None,
                 **extensions) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.extensions = extensions


class BadRequest(Problem):
    status = 400


class Unauthorized(Problem):
    status = 401


class NotFound(Problem):
    status = 404


class Conflict(Problem):
    status = 409


class PayloadTooLarge(Problem):
    status = 413


class UnsupportedMediaType(Problem):
    status = 415


class Unprocessable(Problem):
    status = 422


class BadGateway(Problem):
    status = 502


class ServiceUnavailable(Problem):
    status = 503


class GatewayTimeout(Problem):
    status = 504


def problem_response(status: int, detail: str, *, errors: dict | None = None,
                     headers: dict | None = None, type: str = "about:blank",
                     **extensions) -> Response:
    """Build the problem+json response; the single place its shape is defined."""
    body = {
        "type": type,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "request_id": getattr(g, "request_id", ""),
        **extensions,
    }
    if errors:
        body["errors"] = errors
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_CONTENT_TYPE)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _handle_problem(error: Problem) -> Response:
    return problem_response(error.status, error.detail, errors=error.errors,
                            headers=error.headers, **error.extensions)


def _handle_http_exception(error: HTTPException) -> Response:
    data = getattr(error, "data", None) or {}
    # webargs (through flask-smorest) puts validation messages under "messages".
    errors = data.get("errors") or data.get("messages")
    detail = data.get("message") or error.description or error.name
    if errors and error.code == 422:
        detail = "The request is invalid: see errors for each field."
    headers = dict(data.get("headers") or {})
    if error.code == 405 and error.valid_methods:
        headers["Allow"] = ", ".join(error.valid_methods)
    return problem_response(error.code or 500, detail, errors=errors, headers=headers)


def _handle_database_error(error: psycopg.Error) -> Response:
    """Translate database errors once, here, at the boundary."""
    diag = getattr(error, "diag", None)
    constraint = getattr(diag, "constraint_name", None)
    if isinstance(error, pg_errors.UniqueViolation):
        return problem_response(409, "A resource with these unique fields already exists.",
                                constraint=constraint)
    if isinstance(error, pg_errors.ForeignKeyViolation):
        return problem_response(422, "A referenced resource does not exist.", constraint=constraint)
    if isinstance(error, (pg_errors.CheckViolation, pg_errors.NotNullViolation,
                          pg_errors.InvalidTextRepresentation, pg_errors.NumericValueOutOfRange,
                          pg_errors.StringDataRightTruncation)):
        return problem_response(422, "A value is out of the range the database accepts.",
                                constraint=constraint)
    if isinstance(error, (pg_errors.LockNotAvailable, pg_errors.QueryCanceled)):
        return problem_response(503, "The database is busy; try again.", headers={"Retry-After": "1"})
    if isinstance(error, psycopg.OperationalError):
        return problem_response(503, "The database is unavailable.", headers={"Retry-After": "5"})
    return _handle_unexpected(error)


def _handle_pool_timeout(error: PoolTimeout) -> Response:
    return problem_response(503, "No database connection is available.", headers={"Retry-After": "2"})


def _handle_unexpected(error: Exception) -> Response:
    logger.exception("unhandled error", exc_info=error)
    return problem_response(500, "An unexpected error occurred; it has been logged.")


def register_error_handlers(app: Flask) -> None:
    """Every error the app can raise becomes problem+json."""
    app.register_error_handler(Problem, _handle_problem)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(PoolTimeout, _handle_pool_timeout)
    app.register_error_handler(psycopg.Error, _handle_database_error)
    app.register_error_handler(Exception, _handle_unexpected)
