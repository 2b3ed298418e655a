"""Fixtures of the registry tests: the app on the test transaction."""
from __future__ import annotations

import pytest

from services.registry import create_app


@pytest.fixture
def app(make_app):
    return make_app(create_app)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def settings(app):
    return app.extensions["settings"]
