"""One generation on a ready runtime: resolve the model, lease a runtime, ask it, answer with timings."""
from __future__ import annotations

import time

from services.common.config import Settings
from services.common.db import Database
from services.common.errors import Conflict, NotFound
from services.orchestrator import queries
from services.orchestrator.lifecycle import leased_runtime
from services.orchestrator.protocols import Options, client_for
from services.registry.selection import find_model


def resolve_model(db: Database, *, model_id: str | None = None, model: str | None = None) -> dict:
    """A model by id, or by "name:version" or "name" (its newest active version)."""
    if model_id is None:
        return named_model(db, model or "")[0]
    with db.connection(autocommit=True) as conn:  # one read
        row = queries.get_model(conn, model_id)
    if row is None:
        raise NotFound(f"model {model_id} does not exist")
    if not row["active"]:
        raise Conflict(f"model {row['name']}:{row['version']} is not active", model_id=str(row["id"]))
    return row


def named_model(db: Database, ref: str, state: dict | None = None) -> tuple[dict, str]:
    """The active model "name:version" or "name" (its newest active version) names, and the
    templates version, on the selection `state` (read now if not given; the catalogue is in memory)."""
    with db.connection(autocommit=True) as conn:
        row, templates_version = find_model(conn, ref, state)
    if row is None:
        raise NotFound(f"model {ref} does not exist")
    return row, templates_version


def generate(db: Database, settings: Settings, model: dict, *, prompt: str | None = None,
             messages: list[dict] | None = None, options: Options = Options()) -> dict:
    """Send one request to a ready runtime of `model` (starting one if needed)."""
    started = time.perf_counter()
    with leased_runtime(db, model["id"], settings) as runtime:
        ensure_ms = (time.perf_counter() - started) * 1000
        generation = client_for(model, runtime["endpoint"]).generate(prompt, messages, options)
    return {"model_id": model["id"], "model": f"{model['name']}:{model['version']}",
            "runtime_id": runtime["id"], "ensure_ms": round(ensure_ms, 3), **generation.as_dict()}
