"""One generation on a ready runtime: resolve the model, lease a runtime, ask it, answer with timings."""
from __future__ import annotations

import time

from services.common.config import Settings
from services.common.db import Database
from services.common.errors import Conflict, NotFound
from services.orchestrator import queries
from services.orchestrator.lifecycle import leased_runtime
from services.orchestrator.protocols import Options, client_for


def resolve_model(db: Database, *, model_id: str | None = None, model: str | None = None) -> dict:
    """A model by id, or by "name:version" or "name" (its newest active version)."""
    with db.connection(autocommit=True) as conn:  # one read
        if model_id:
            row = queries.get_model(conn, model_id)
        else:
            name, _, version = (model or "").partition(":")
            row = queries.find_model(conn, name, version or None)
    if row is None:
        raise NotFound(f"model {model_id or model} does not exist")
    if not row["active"]:
        raise Conflict(f"model {row['name']}:{row['version']} is not active", model_id=str(row["id"]))
    return row


def generate(db: Database, settings: Settings, model: dict, *, prompt: str | None = None,
             messages: list[dict] | None = None, options: Options = Options()) -> dict:
    """Send one request to a ready runtime of `model` (starting one if needed)."""
    started = time.perf_counter()
    with leased_runtime(db, model["id"], settings) as runtime:
        ensure_ms = (time.perf_counter() - started) * 1000
        generation = client_for(model, runtime["endpoint"]).generate(prompt, messages, options)
    return {"model_id": model["id"], "model": f"{model['name']}:{model['version']}",
            "runtime_id": runtime["id"], "ensure_ms": round(ensure_ms, 3), **generation.as_dict()}
