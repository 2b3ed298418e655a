"""Fixtures of the optimizer tests: the app on the test transaction, seed models, HTTP mocks."""
from __future__ import annotations

import pytest
import responses

from services.optimizer import create_app
from services.optimizer.performance import log_performance_batch

ORCHESTRATOR = "http://orchestrator.test"
REGISTRY = "http://registry.test"


@pytest.fixture
def app(make_app):
    return make_app(create_app, ORCHESTRATOR_URL=ORCHESTRATOR, REGISTRY_URL=REGISTRY,
                    HOST_CPU_CORES=8.0, HOST_MEMORY_MB=32768)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def models(conn) -> dict[str, dict]:
    """The seed models by "name:version"."""
    found = conn.execute("SELECT * FROM model_registry").fetchall()
    return {f"{m['name']}:{m['version']}": m for m in found}


@pytest.fixture
def log(conn):
    """Insert `n` performance rows for a model: log(model_id, n=1, **columns)."""
    def insert(model_id, n: int = 1, **columns) -> list[dict]:
        row = {"model_id": model_id, "task_type": "text-generation", "processing_time_ms": 100,
               "success": True, **columns}
        return log_performance_batch(conn, [row] * n)
    return insert


@pytest.fixture
def http():
    """Outbound HTTP mocked; every registered call must happen."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def no_seed_rules(conn):
    conn.execute("UPDATE optimization_rules SET active = false")

