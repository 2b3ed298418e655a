"""Performance analysis, optimization rules and re-ranking."""
from __future__ import annotations

from flask import Flask

from services.common.app import create_service_app


def create_app(test_config: dict | None = None) -> Flask:
    """The Optimizer service app (gunicorn: 'services.optimizer:create_app()')."""
    return create_service_app("optimizer", "Optimizer", [], test_config, import_name=__name__)
