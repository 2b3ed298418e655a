"""Fixtures of the orchestrator tests: settings in a temporary runtime dir, models, fake servers."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fake_model_server import FakeModelServer
from orchestrator_helpers import fake_server_command
from services.common.config import Settings
from services.common.db import PooledDatabase
from services.orchestrator.runtimes import process


@pytest.fixture(autouse=True)
def fake_process_server(monkeypatch) -> None:
    monkeypatch.setitem(process.SERVER_COMMANDS, "fake", fake_server_command)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(database_url=database_url, runtime_dir=str(tmp_path / "runtimes"),
                    models_dir=str(tmp_path / "models"), runtime_drivers=("process", "docker", "external"),
                    host_cpu_cores=4.0, host_memory_mb=4096, docker_url="tcp://127.0.0.1:2375",
                    default_keep_alive_s=300)


@pytest.fixture
def fresh_settings(settings: Settings, fresh_database_url: str) -> Settings:
    return replace(settings, database_url=fresh_database_url)


@pytest.fixture
def pooled_db(fresh_database_url: str) -> Iterator[PooledDatabase]:
    """A real pool on a database of the test's own, for concurrency and processes."""
    database = PooledDatabase(fresh_database_url, min_size=1, max_size=12, name="orchestrator-test")
    database.pool.open(wait=True)
    yield database
    database.close()


@pytest.fixture
def fake_server() -> Iterator[FakeModelServer]:
    with FakeModelServer(reply="Hello from the fake model.") as server:
        yield server


@pytest.fixture(autouse=True)
def stop_started_processes(settings: Settings) -> Iterator[None]:
    """Whatever a test started, through whichever settings, ends with it."""
    yield
    for pid_file in Path(settings.runtime_dir).glob("*.json"):
        record = json.loads(pid_file.read_text())
        process.ProcessDriver(settings, record["scope"]).stop(process.runtime_ref(record))
    process.reap_children()  # servers a test killed itself
