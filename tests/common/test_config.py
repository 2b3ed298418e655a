"""Settings from the environment: a value no service could run with is refused at start, by name."""
from __future__ import annotations

import pytest

from services.common.config import Settings


def test_the_defaults_pass():
    Settings.from_env()


@pytest.mark.parametrize("name, value, message", [
    ("RUNTIME_DRIVERS", "process,bogus", "must be a comma-separated list of process, docker, external"),
    ("LOG_LEVEL", "loud", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("HTTP_TIMEOUT_S", "-1", "must be above 0"),
    ("DB_POOL_MIN_SIZE", "20", "must be from 0 to DB_POOL_MAX_SIZE"),
    ("QUEUE_LEASE_RENEW_S", "60", "must be above 0 and below QUEUE_LEASE_S"),
    ("HTTP_RETRIES", "two", "must be an integer, got 'two'"),
])
def test_a_value_no_service_could_run_with_is_refused_by_name(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"environment variable {name} {message}"):
        Settings.from_env()
