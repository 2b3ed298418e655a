from __future__ import annotations

from pathlib import Path

import pytest

from services.prompt_builder import create_app

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def app(make_app):
    return make_app(create_app)


@pytest.fixture
def client(app):
    return app.test_client()


def real_output(name: str) -> str:
    """A raw answer of the real SmolLM2 model, saved verbatim (see fixtures/README.md)."""
    return (FIXTURES / f"smollm2_{name}.txt").read_text()
