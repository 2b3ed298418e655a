"""The core every service app shares: config, database, OpenAPI, errors, auth, ids, health, metrics."""
from __future__ import annotations

import hmac
import http
import inspect
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import flask_smorest
from flask import Flask, Response, after_this_request, current_app, g, request
from flask.views import MethodView
from flask_smorest import Api
from flask_smorest.utils import prepare_response
from webargs import missing
from webargs.flaskparser import FlaskParser, is_json_request

from services.common import errors
from services.common.config import Settings
from services.common.db import NUL_ESCAPE_BYTES, PooledDatabase, get_db, unpaired_surrogate_escape
from services.common.json_provider import OrjsonProvider
from services.common.logs import configure_logging
from services.common.metrics import install_request_metrics, metrics_response

logger = logging.getLogger(__name__)

PUBLIC_ENDPOINTS = frozenset({"health.healthz", "health.readyz", "health.metrics"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ServiceFlask(Flask):
    """Flask that remembers which views and hooks are coroutine functions: it asks of each one on
    every request (`inspect.iscoroutinefunction`, a measurable share of a fast request)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._coroutine: dict[Callable, bool] = {}

    def ensure_sync(self, func: Callable) -> Callable:
        function = getattr(func, "__func__", func)   # a bound method is a new object per request
        coroutine = self._coroutine.get(function)
        if coroutine is None:
            coroutine = self._coroutine[function] = inspect.iscoroutinefunction(func)
        return super().ensure_sync(func) if coroutine else func


class ProblemApi(Api):
    """flask-smorest, with every error documented as problem+json and handled by our handlers."""

    ERROR_SCHEMA = errors.ProblemSchema

    def _register_error_handlers(self) -> None:
        errors.register_error_handlers(self._app)

    def _register_responses(self) -> None:
        for status in http.HTTPStatus:
            response = {"description": status.phrase}
            if status >= 400:
                response["schema"] = self.ERROR_SCHEMA
                prepare_response(response, self.spec, errors.PROBLEM_CONTENT_TYPE)
            self.spec.components.response(status.name, response, lazy=True)
        response = {"description": "Error, as problem details", "schema": self.ERROR_SCHEMA}
        prepare_response(response, self.spec, errors.PROBLEM_CONTENT_TYPE)
        self.spec.components.response(self.DEFAULT_ERROR_RESPONSE_NAME, response, lazy=True)


class JsonBodyParser(FlaskParser):
    """webargs' parser (bodies are UTF-8 JSON), but JSON Python cannot read (nested too deeply, an
    integer of more than 4,300 digits) is refused as unreadable (400), not raised (500)."""

    def _raw_load_json(self, req) -> Any:
        if not is_json_request(req):
            return missing
        try:
            return json.loads(req.get_data(cache=True).decode())
        except RecursionError:
            raise json.JSONDecodeError("nested too deeply", "<body>", 0) from None
        except json.JSONDecodeError:
            raise
        except ValueError as error:   # int("9" * 5000): Python's limit on integer conversion
            raise json.JSONDecodeError(str(error), "<body>", 0) from None

    def _handle_invalid_json_error(self, error: ValueError, req, *args, **kwargs):
        raise errors.BadRequest(f"The body is not valid JSON: {error}.", errors={"json": ["Invalid JSON body."]})


class Blueprint(flask_smorest.Blueprint):
    """The services' blueprints: flask-smorest's, with JsonBodyParser."""

    ARGUMENTS_PARSER = JsonBodyParser()


health = Blueprint("health", __name__, description="Liveness, readiness and metrics")


@health.route("/healthz", endpoint="healthz")
class Liveness(MethodView):
    @health.response(200, content_type="application/json")
    def get(self):
        """The process is alive; `service` tells which one answers on this port."""
        return {"status": "ok", "service": current_app.config["SERVICE_NAME"]}


@health.route("/readyz", endpoint="readyz")
class Readiness(MethodView):
    @health.response(200, content_type="application/json")
    def get(self):
        """The process can serve: its database answers."""
        with get_db().connection() as conn:
            conn.execute("SELECT 1")
        return {"status": "ready", "service": current_app.config["SERVICE_NAME"]}


@health.route("/metrics", endpoint="metrics")
class Metrics(MethodView):
    @health.response(200, content_type="text/plain")
    def get(self):
        """Prometheus metrics of this process (or all the web server's worker processes)."""
        return metrics_response()


def create_service_app(service: str, title: str, blueprints: Iterable[Blueprint],
                       test_config: dict | None = None, import_name: str = __name__) -> Flask:
    """Build a service app: defaults, then environment, then `test_config`."""
    app = ServiceFlask(import_name)
    app.json = OrjsonProvider(app)
    app.config.update(Settings.from_env().as_flask_config())
    app.config.update(
        API_TITLE=title,
        API_VERSION="1.0.0",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL="https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
        SERVICE_NAME=service,
    )
    app.config.update(test_config or {})
    settings = Settings.from_flask_config(app.config)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["settings"] = settings

    configure_logging(settings.log_level)
    database = app.config.get("DATABASE") or PooledDatabase(
        settings.database_url,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        timeout_s=settings.db_pool_timeout_s,
        statement_timeout_ms=settings.db_statement_timeout_ms,
        name=f"dispatcher-{service}",
    )
    if isinstance(database, PooledDatabase):
        database.open()
    app.extensions["database"] = database

    app.before_request(_assign_request_id)
    app.before_request(_require_token)
    app.before_request(_require_json_body)
    app.before_request(_refuse_unstorable_text)
    app.after_request(_echo_request_id)
    install_request_metrics(app, service)

    api = ProblemApi(app)
    api.register_blueprint(health)
    for blueprint in blueprints:
        api.register_blueprint(blueprint)
    app.extensions["api"] = api
    return app


def _assign_request_id() -> None:
    supplied = request.headers.get("X-Request-ID", "")
    g.request_id = supplied if _REQUEST_ID.fullmatch(supplied) else str(uuid.uuid4())


def _echo_request_id(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id", "")
    return response


def _require_token() -> Response | None:
    token = current_settings().api_token
    if not token or request.endpoint in PUBLIC_ENDPOINTS:
        return None
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(supplied.encode(), token.encode()):
        return None
    return errors.problem_response(
        401, "A valid bearer token is required (Authorization: Bearer <token>).",
        headers={"WWW-Authenticate": 'Bearer realm="dispatcher"'},
    )


def _require_json_body() -> Response | None:
    if request.routing_exception or request.method not in BODY_METHODS or not request.content_length:
        return None
    if request.is_json:
        return None
    return errors.problem_response(
        415, f"Request bodies must be application/json, not {request.mimetype or 'unspecified'}.")


def _refuse_unstorable_text() -> Response | None:
    """No text or jsonb column can hold U+0000 or an unpaired surrogate (valid JSON escapes, but not
    Unicode text): refused in the path, the query and JSON bodies alike."""
    body = request.get_data() if request.is_json else b""
    in_body = b"\\u0000" in body and NUL_ESCAPE_BYTES.search(body)   # the regex only where it can match
    if in_body or "\x00" in request.path or any("\x00" in value for value in request.args.values()):
        return errors.problem_response(
            422, "Strings cannot contain the character U+0000: the database cannot store it.")
    if unpaired_surrogate_escape(body):   # in raw UTF-8, one is invalid UTF-8: the parser's 400
        return errors.problem_response(
            422, "Strings cannot contain unpaired surrogates (\\ud800 to \\udfff): they are not Unicode text.")
    return None


def after_response(job: Callable[[], None]) -> None:
    """Run `job` in this thread once the current response has been sent (the WSGI server closes
    it then), so the client does not wait for it; an error in it is logged."""
    def run() -> None:
        try:
            job()
        except Exception:
            logger.exception("a job run after the response failed")

    @after_this_request
    def register(response: Response) -> Response:
        response.call_on_close(run)
        return response


def current_settings() -> Settings:
    """The settings of the app serving the current request."""
    return current_app.extensions["settings"]
