"""Performance analysis, optimization rules and re-ranking."""
from __future__ import annotations

from flask import Flask

from services.common.app import create_service_app
from services.common.http import http_session
from services.optimizer.api import blp


def create_app(test_config: dict | None = None) -> Flask:
    """The Optimizer service app (granian --factory 'services.optimizer:create_app')."""
    app = create_service_app("optimizer", "Optimizer", [blp], test_config, import_name=__name__)
    settings = app.extensions["settings"]
    # The actions' calls to the orchestrator and registry (POST/PATCH are never retried).
    app.extensions["optimizer_http"] = http_session(
        timeout_s=settings.http_timeout_s, retries=settings.http_retries, token=settings.api_token)
    return app
