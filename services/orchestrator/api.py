"""HTTP views of the orchestrator's runtimes: load and validate, call the lifecycle, dump."""
from __future__ import annotations

from uuid import UUID

from flask.views import MethodView

from services.common.app import Blueprint, current_settings
from services.common.db import get_db
from services.orchestrator import generation, lifecycle, queries
from services.orchestrator.protocols import Options
from services.orchestrator.schemas import (ActionsSchema, EnsureSchema, GenerateSchema, GenerationSchema,
                                           HealthReportSchema, RuntimeListArgsSchema, RuntimeListSchema,
                                           RuntimeSchema, ScaleResultSchema, ScaleSchema)

blp = Blueprint("runtimes", __name__, description="Model runtimes: ensure, inspect, stop, scale, heal")


@blp.route("/runtimes")
class Runtimes(MethodView):
    @blp.arguments(RuntimeListArgsSchema, location="query")
    @blp.response(200, RuntimeListSchema)
    def get(self, args):
        """List runtimes, newest first (filters: model_id, status, driver, health_status)."""
        with get_db().connection() as conn:
            items = queries.list_runtimes(conn, **args)
        return {"items": items, "limit": args["limit"], "offset": args["offset"]}


@blp.route("/runtimes/ensure")
class EnsureRuntime(MethodView):
    @blp.arguments(EnsureSchema)
    @blp.response(200, RuntimeSchema)
    @blp.alt_response(404, description="No such model")
    @blp.alt_response(409, description="The model is inactive")
    @blp.alt_response(422, description="The model can never fit on this host")
    @blp.alt_response(503, description="No runtime could be started (see detail and runtime_id)")
    def post(self, body):
        """A ready runtime of the model: the least-loaded warm one, or one started now."""
        return lifecycle.ensure_runtime(get_db(), body["model_id"], current_settings())


@blp.route("/runtimes/<uuid:runtime_id>")
class Runtime(MethodView):
    @blp.response(200, RuntimeSchema)
    @blp.alt_response(404, description="No such runtime")
    def get(self, runtime_id: UUID):
        """One runtime."""
        return lifecycle.get_runtime(get_db(), runtime_id)

    @blp.response(200, RuntimeSchema)
    @blp.alt_response(404, description="No such runtime")
    def delete(self, runtime_id: UUID):
        """Drain the runtime (no new requests, wait for running ones), then stop it."""
        return lifecycle.stop_runtime(get_db(), runtime_id, current_settings())


@blp.route("/runtimes/<uuid:runtime_id>/restart")
class RestartRuntime(MethodView):
    @blp.response(200, RuntimeSchema)
    @blp.alt_response(404, description="No such runtime")
    @blp.alt_response(409, description="Another request is changing the runtime, or its model is inactive")
    @blp.alt_response(503, description="It did not come back")
    def post(self, runtime_id: UUID):
        """Drain, stop and start the runtime again (same id, restart_count + 1)."""
        return lifecycle.restart_runtime(get_db(), runtime_id, current_settings())


@blp.route("/models/<uuid:model_id>/scale")
class ScaleModel(MethodView):
    @blp.arguments(ScaleSchema)
    @blp.response(200, ScaleResultSchema)
    @blp.alt_response(404, description="No such model")
    @blp.alt_response(409, description="The model is inactive")
    @blp.alt_response(422, description="More replicas than the model allows")
    @blp.alt_response(503, description="A replica could not be started")
    def post(self, body, model_id: UUID):
        """Run exactly this many runtimes of the model."""
        return lifecycle.scale_model(get_db(), model_id, body["replicas"], current_settings())


@blp.route("/runtimes/reap")
class ReapIdle(MethodView):
    @blp.response(200, ActionsSchema)
    def post(self):
        """Stop runtimes idle longer than their model's keep-alive; say which."""
        return {"actions": lifecycle.reap_idle(get_db(), current_settings())}


@blp.route("/runtimes/health")
class CheckHealth(MethodView):
    @blp.response(200, HealthReportSchema)
    def post(self):
        """Probe running runtimes; mark, restart or give up on the ones that fail."""
        return lifecycle.check_health(get_db(), current_settings())


@blp.route("/runtimes/autoscale")
class Autoscale(MethodView):
    @blp.response(200, ActionsSchema)
    def post(self):
        """Add replicas for models with a long pending queue, within limits and host capacity."""
        return {"actions": lifecycle.autoscale(get_db(), current_settings())}


@blp.route("/generate")
class Generate(MethodView):
    @blp.arguments(GenerateSchema)
    @blp.response(200, GenerationSchema)
    @blp.alt_response(404, description="No such model")
    @blp.alt_response(409, description="The model is inactive")
    @blp.alt_response(502, description="The model server failed")
    @blp.alt_response(503, description="No runtime could be started")
    @blp.alt_response(504, description="The model server did not answer in time")
    def post(self, body):
        """Send one request to a ready runtime of the model (starting one if needed)."""
        db = get_db()
        model = generation.resolve_model(db, model_id=body.get("model_id"), model=body.get("model"))
        return generation.generate(db, current_settings(), model, prompt=body.get("prompt"),
                                   messages=body.get("messages"), options=_options(body["options"]))


def _options(raw: dict) -> Options:
    response_format = raw.get("json_schema") or (raw.get("format") if raw.get("format") == "json" else None)
    return Options(max_tokens=raw.get("max_tokens"), temperature=raw.get("temperature"),
                   stop=tuple(raw.get("stop", ())), response_format=response_format, seed=raw.get("seed"))
