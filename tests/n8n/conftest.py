"""Fixtures of the n8n tests: the harness, the services on a database of their own, n8n with the workflows."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from n8n_stack import N8N_BIN, ROOT, N8n, Processes, Stack, run_script, start_n8n, start_stack, stop_runtimes

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def n8n_harness() -> Path:
    """The pinned n8n, installed by the same shell function scripts/test uses (a no-op when current)."""
    subprocess.run(["bash", "-c", "source scripts/lib.sh && ensure_n8n_harness"], cwd=ROOT, check=True)
    return N8N_BIN


@pytest.fixture(scope="session")
def stack_database_url(template_database: str) -> Iterator[str]:
    """A committed, seeded database that the service processes share."""
    name = f"{template_database.removesuffix('_tpl')}_n8n"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                      sql.Identifier(template_database)))
    try:
        yield psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def stack(stack_database_url: str, tmp_path_factory) -> Iterator[Stack]:
    """The four services and the queue worker, with a token; the real smollm2 behind them."""
    processes = Processes(logs=tmp_path_factory.mktemp("stack"))
    started = None
    try:
        started = start_stack(processes, stack_database_url, processes.logs)
        yield started
    finally:
        if started:
            processes.stop(started.worker)   # first: a request it still runs could start a runtime meanwhile
            stop_runtimes(started)
        processes.stop_all()


@pytest.fixture(scope="session")
def n8n(n8n_harness: Path, stack: Stack, tmp_path_factory) -> Iterator[N8n]:
    """A real n8n with every workflow imported by scripts/n8n-import and the webhook flows active."""
    processes = Processes(logs=tmp_path_factory.mktemp("n8n"))
    try:
        started = start_n8n(processes, processes.logs / "user", stack.env)
        imported = run_script("n8n-import", env=started.import_env(stack))
        assert imported.returncode == 0, imported.stdout + imported.stderr
        started.import_output = imported.stdout
        yield started
    finally:
        processes.stop_all()


@pytest.fixture
def stack_db(stack: Stack) -> Iterator[psycopg.Connection]:
    """The stack's database, autocommit: what the services committed is visible at once."""
    with psycopg.connect(stack.database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn
