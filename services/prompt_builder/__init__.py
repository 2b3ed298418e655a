"""Prompt templates, output formats and validation of model output."""
from __future__ import annotations

from flask import Flask

from services.common.app import create_service_app


def create_app(test_config: dict | None = None) -> Flask:
    """The Prompt builder service app (granian --factory 'services.prompt_builder:create_app')."""
    from services.prompt_builder.api import blp

    return create_service_app("prompt_builder", "Prompt builder", [blp], test_config, import_name=__name__)
