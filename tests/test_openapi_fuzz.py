"""Fuzz every endpoint of every service from its own OpenAPI document (schemathesis).

No input may produce a 5xx, and every response must match the document (status, content type,
body schema). Each app runs on the rolled-back test transaction, so fuzzing leaves nothing behind.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi import checks as openapi_checks

from services import optimizer, orchestrator, prompt_builder, registry

CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
]
FUZZ_SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))
SERVICES = {
    "registry": registry.create_app,
    "orchestrator": orchestrator.create_app,
    "prompt_builder": prompt_builder.create_app,
    "optimizer": optimizer.create_app,
}


def fuzz_config(service: str) -> dict:
    """Keep fuzzing away from real side effects (no model servers start)."""
    return {"RUNTIME_DRIVERS": ("external",), "RECONCILE_ON_START": False}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_endpoint_survives_fuzzing(make_app, service):
    app = make_app(SERVICES[service], **fuzz_config(service))
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, f"{service} documents no operation"
    for operation in operations:
        fuzz_operation(operation)


def fuzz_operation(operation) -> None:
    @given(case=operation.as_strategy())
    @FUZZ_SETTINGS
    def run(case):
        case.call_and_validate(checks=CHECKS)

    run()
