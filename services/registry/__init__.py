"""The model catalogue and model selection."""
from __future__ import annotations

from flask import Flask

from services.common.app import create_service_app
from services.registry.api import blp


def create_app(test_config: dict | None = None) -> Flask:
    """The Model registry service app (granian --factory 'services.registry:create_app')."""
    return create_service_app("registry", "Model registry", [blp], test_config,
                              import_name=__name__)
