"""Fixtures on a real Postgres: a fresh test database per session, a rolled-back transaction per test.

A seeded template database is built once per session; tests that need real commits (locks,
concurrent workers, services run as processes) get their own clone of it (`fresh_database_url`).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg import sql

from services.common.db import SingleConnectionDatabase, connect
from services.common.migrate import migrate

class ServedClient(FlaskClient):
    """A test client that reads each response whole and closes it, as a WSGI server does once it has
    sent it: what the app runs after a response (the record of a dispatch's answer) has then run."""

    def open(self, *args, buffered: bool = True, **kwargs):
        return super().open(*args, buffered=buffered, **kwargs)


Flask.test_client_class = ServedClient

ADMIN_URL = os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _url_for(name: str) -> str:
    return psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)


def _create_database(name: str, template: str | None = None) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        admin.execute(statement)


def _drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    """A migrated and seeded database that per-test databases are cloned from."""
    name = f"dispatcher_test_{uuid.uuid4().hex[:10]}_tpl"
    _create_database(name)
    try:
        with connect(_url_for(name)) as conn:
            migrate(conn, seed=True)
        yield name
    finally:
        _drop_database(name)


@pytest.fixture(scope="session")
def database_url(template_database: str) -> Iterator[str]:
    """The session's test database (a clone of the template)."""
    name = template_database.removesuffix("_tpl")
    _create_database(name, template=template_database)
    try:
        yield _url_for(name)
    finally:
        _drop_database(name)


@pytest.fixture
def fresh_database_url(template_database: str) -> Iterator[str]:
    """A database of this test's own, for code that must really commit."""
    name = f"{template_database.removesuffix('_tpl')}_{uuid.uuid4().hex[:6]}"
    _create_database(name, template=template_database)
    try:
        yield _url_for(name)
    finally:
        _drop_database(name)


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    """A connection inside a transaction that is rolled back after the test."""
    with connect(database_url) as connection:
        with connection.transaction(force_rollback=True):
            yield connection


@pytest.fixture
def db(conn: psycopg.Connection) -> SingleConnectionDatabase:
    """The test transaction, shaped as the `Database` apps use."""
    return SingleConnectionDatabase(conn)


@pytest.fixture
def make_app(db, database_url):
    """Build any service app on the test transaction: make_app(create_app, **config)."""
    def build(create_app, **config):
        return create_app({"TESTING": True, "DATABASE": db, "DATABASE_URL": database_url,
                           "API_TOKEN": "", **config})
    return build
