"""HTTP views of the registry: load and validate, call the domain, dump."""
from __future__ import annotations

from uuid import UUID

from flask.views import MethodView
from marshmallow import RAISE

from services.common.app import Blueprint, current_settings
from services.common.db import get_db
from services.registry import catalogue, resources, selection
from services.registry.schemas import (DeleteArgsSchema, DeletionSchema, ModelListArgsSchema,
                                       ModelPageSchema, ModelPatchSchema, ModelSchema,
                                       ResourcesRequestSchema, ResourcesSchema,
                                       SelectionRequestSchema, SelectionSchema)

blp = Blueprint("registry", __name__, description="Model catalogue, selection and right-sizing")


@blp.route("/models")
class Models(MethodView):
    @blp.arguments(ModelListArgsSchema, location="query", unknown=RAISE)
    @blp.response(200, ModelPageSchema)
    def get(self, args):
        """List models (filters: task_type, tag, active, name), ordered by name and version."""
        with get_db().connection() as conn:
            return catalogue.list_models(conn, args)

    @blp.arguments(ModelSchema)
    @blp.response(201, ModelSchema)
    @blp.alt_response(409, description="A model with this name and version exists")
    def post(self, fields):
        """Register a model."""
        with get_db().connection() as conn:
            return catalogue.create_model(conn, fields)


@blp.route("/models/<uuid:model_id>")
class Model(MethodView):
    @blp.response(200, ModelSchema)
    @blp.alt_response(404, description="No such model")
    def get(self, model_id: UUID):
        """One model."""
        with get_db().connection() as conn:
            return catalogue.get_model(conn, model_id)

    @blp.arguments(ModelPatchSchema)
    @blp.response(200, ModelSchema)
    @blp.alt_response(404, description="No such model")
    @blp.alt_response(409, description="A model with this name and version exists")
    def patch(self, changes, model_id: UUID):
        """Change any subset of a model's writable fields (performance_metrics is replaced)."""
        with get_db().connection() as conn:
            return catalogue.update_model(conn, model_id, changes)

    @blp.arguments(DeleteArgsSchema, location="query", unknown=RAISE)
    @blp.response(200, DeletionSchema)
    @blp.alt_response(404, description="No such model")
    @blp.alt_response(409, description="A hard delete of a model with live runtimes")
    def delete(self, args, model_id: UUID):
        """Delete a model; one with history is only deactivated unless hard=true."""
        with get_db().connection() as conn:
            return catalogue.delete_model(conn, model_id, hard=args["hard"])


@blp.route("/select")
class Select(MethodView):
    @blp.arguments(SelectionRequestSchema)
    @blp.response(200, SelectionSchema)
    @blp.alt_response(422, description="No model can take the request, or invalid input")
    def post(self, request):
        """Rank the models that can take a request, with the evidence behind each score."""
        with get_db().connection() as conn:
            return selection.select_models(conn, request, current_settings())


@blp.route("/resources")
class Resources(MethodView):
    @blp.arguments(ResourcesRequestSchema)
    @blp.response(200, ResourcesSchema)
    @blp.alt_response(404, description="No such model")
    @blp.alt_response(422, description="The model does not fit on this host")
    def post(self, args):
        """Right-size cpu, memory and gpu of a runtime for a model and an expected load."""
        with get_db().connection() as conn:
            model = catalogue.get_model(conn, args["model_id"])
        sized = resources.right_size(model, args["expected_load"], current_settings())
        return {"model_id": model["id"], "expected_load": args["expected_load"], **sized}
