"""The model catalogue: create, read, change and retire models."""
from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
from marshmallow import ValidationError

from services.common.errors import Conflict, NotFound, Unprocessable
from services.registry import queries
from services.registry.schemas import load_runtime_config

INVALID = "The request is invalid: see errors for each field."


def create_model(conn: psycopg.Connection, fields: dict[str, Any]) -> dict:
    """Register a model; a duplicate (name, version) is a 409."""
    return queries.insert_model(conn, fields)


def get_model(conn: psycopg.Connection, model_id: UUID) -> dict:
    """The model, or 404."""
    model = queries.get_model(conn, model_id)
    if model is None:
        raise NotFound(f"Model {model_id} does not exist.")
    return model


def list_models(conn: psycopg.Connection, args: dict[str, Any]) -> dict:
    """A page of models in a stable order (name, version, id), with the total count."""
    filters = {key: args.get(key) for key in ("task_type", "tag", "active", "name")}
    return {"items": queries.list_models(conn, filters, args["limit"], args["offset"]),
            "total": queries.count_models(conn, filters),
            "limit": args["limit"], "offset": args["offset"]}


def update_model(conn: psycopg.Connection, model_id: UUID, changes: dict[str, Any]) -> dict:
    """Change some fields; the runtime config must still suit the (possibly new) driver."""
    model = queries.get_model(conn, model_id, for_update=True)
    if model is None:
        raise NotFound(f"Model {model_id} does not exist.")
    if {"runtime_driver", "runtime_config"} & changes.keys():
        merged = {**model, **changes}
        try:
            changes = {**changes, "runtime_config": load_runtime_config(merged["runtime_driver"],
                                                                       merged["runtime_config"])}
        except ValidationError as error:
            raise Unprocessable(INVALID, errors={"json": {"runtime_config": error.messages}}) from None
    return queries.update_model(conn, model_id, changes)


def delete_model(conn: psycopg.Connection, model_id: UUID, *, hard: bool = False) -> dict:
    """Delete a model, or only deactivate it when it has history and `hard` is not set."""
    get_model(conn, model_id)
    history = queries.model_history(conn, model_id)
    if history["has_history"] and not hard:
        queries.update_model(conn, model_id, {"active": False})
        return {"id": model_id, "outcome": "deactivated"}
    if history["live_runtimes"]:
        # Deleting would orphan processes the orchestrator could no longer find.
        raise Conflict(f"Model {model_id} has live runtimes; stop them before a hard delete.",
                       live_runtimes=history["live_runtimes"])
    queries.delete_model(conn, model_id)
    return {"id": model_id, "outcome": "deleted"}
