"""Model runtimes, the request queue and the dispatch pipeline."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

logger = logging.getLogger(__name__)


def create_app(test_config: dict | None = None) -> Flask:
    """The Orchestrator service app (granian --factory 'services.orchestrator:create_app')."""
    # Imported here, not at the top: every model server starts as `python -m
    # services.orchestrator.runtimes.llama_server`, which imports this package first, and should not
    # spend ~0.4 s of its cold start importing Flask, psycopg and the API.
    from services.common.app import create_service_app
    from services.orchestrator.api import blp as runtimes_blp
    from services.orchestrator.dispatch_api import blp as dispatch_blp
    from services.orchestrator.front_doors import blp as front_doors_blp, ollama_bodies_as_json

    app = create_service_app("orchestrator", "Orchestrator", [runtimes_blp, dispatch_blp, front_doors_blp],
                             test_config, import_name=__name__)
    app.wsgi_app = ollama_bodies_as_json(app.wsgi_app)
    if app.config.get("RECONCILE_ON_START", True):
        _reconcile_at_start(app)
    return app


def _reconcile_at_start(app: Flask) -> None:
    """Fix the runtime table against what really runs; a database still down must not stop the start."""
    import psycopg
    from psycopg_pool import PoolTimeout

    from services.orchestrator import lifecycle

    try:
        report = lifecycle.reconcile(app.extensions["database"], app.extensions["settings"])
    except (psycopg.Error, PoolTimeout):
        logger.warning("reconcile at start skipped: the database is unavailable", exc_info=True)
        return
    logger.info("reconciled runtimes", extra={"actions": report["actions"], "skipped": report["skipped"]})
