"""Model runtimes, the request queue and the dispatch pipeline."""
from __future__ import annotations

from flask import Flask

from services.common.app import create_service_app


def create_app(test_config: dict | None = None) -> Flask:
    """The Orchestrator service app (gunicorn: 'services.orchestrator:create_app()')."""
    return create_service_app("orchestrator", "Orchestrator", [], test_config, import_name=__name__)
