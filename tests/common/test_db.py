"""The pool's connections: the round-trip-free liveness check, autocommit blocks, and JSON in jsonb."""
from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest
from psycopg.types.json import Jsonb

from services.common.db import PooledDatabase, SingleConnectionDatabase, check_idle_connection, connect


@pytest.fixture
def pooled(fresh_database_url: str):
    database = PooledDatabase(fresh_database_url, min_size=1, max_size=1, name="db-test")
    database.pool.open(wait=True)
    yield database
    database.close()


def backend_pid(database: PooledDatabase, **kwargs) -> int:
    with database.connection(**kwargs) as conn:
        return conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]


def test_a_connection_the_server_closed_is_replaced_before_it_is_handed_out(pooled, fresh_database_url):
    before = backend_pid(pooled)
    with connect(fresh_database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (before,))
    time.sleep(0.2)  # the server's goodbye reaches the idle connection's socket

    after = backend_pid(pooled)

    assert after != before
    assert pooled.pool.get_stats()["connections_lost"] == 1


def test_the_check_passes_a_live_idle_connection_and_fails_a_closed_one(database_url):
    with connect(database_url, autocommit=True) as conn:
        check_idle_connection(conn)
        conn.close()
        with pytest.raises(psycopg.OperationalError, match="closed"):
            check_idle_connection(conn)


def test_an_autocommit_block_commits_each_statement_and_gives_the_connection_back_transactional(pooled):
    with pooled.connection(autocommit=True) as conn:
        conn.execute("CREATE TABLE autocommit_probe (n int)")
        conn.execute("INSERT INTO autocommit_probe VALUES (1)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with pytest.raises(psycopg.errors.DivisionByZero), pooled.connection(autocommit=True) as conn:
        conn.execute("INSERT INTO autocommit_probe VALUES (1 / 0)")

    with pooled.connection() as conn:
        assert conn.autocommit is False
        conn.execute("INSERT INTO autocommit_probe VALUES (2)")
        conn.rollback()
        assert conn.execute("SELECT array_agg(n) AS ns FROM autocommit_probe").fetchone() == {"ns": [1]}
        conn.execute("DROP TABLE autocommit_probe")


def test_threads_take_turns_on_a_single_connection(conn):
    """A background thread (the lease renewer) must not open a savepoint inside the caller's."""
    db, order = SingleConnectionDatabase(conn), []

    def other() -> None:
        with db.connection() as other_conn:
            other_conn.execute("SELECT 1")
            order.append("other")

    with db.connection() as main_conn:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.2)
        assert thread.is_alive()
        main_conn.execute("SELECT 1")
        order.append("main")
    thread.join(5)
    assert order == ["main", "other"]


def test_a_single_connection_keeps_an_autocommit_blocks_writes_when_it_raises_after_them(conn):
    """As a pooled connection in autocommit does: a statement that ran has committed."""
    db = SingleConnectionDatabase(conn)
    conn.execute("CREATE TEMP TABLE autocommit_kept (n int)")
    for autocommit, n in ((True, 1), (False, 2)):
        with pytest.raises(LookupError), db.connection(autocommit=autocommit) as block:
            block.execute("INSERT INTO autocommit_kept VALUES (%s)", (n,))
            raise LookupError("after the write")
    with pytest.raises(psycopg.errors.DivisionByZero), db.connection(autocommit=True) as block:
        block.execute("SELECT 1 / 0")
    assert conn.execute("SELECT array_agg(n) AS ns FROM autocommit_kept").fetchone() == {"ns": [1]}


@pytest.mark.parametrize("value", [{"big": 2**70, "negative": -(2**65), "exact": 12345678901234567890123},
                                   {"text": "a\u0000b", "unicode": "é ☃", "nested": [[{"x": 1.5}]]}])
def test_jsonb_keeps_integers_beyond_64_bits_exact_and_replaces_nul(conn, value):
    stored = conn.execute("SELECT %s::jsonb AS value", (Jsonb(value),)).fetchone()["value"]

    expected = json.loads(json.dumps(value).replace("\\u0000", "\\ufffd"))
    assert stored == expected
    assert all(type(stored[key]) is type(expected[key]) for key in expected)


@pytest.mark.parametrize("value, expected", [
    ("caf\ud800", "caf\ufffd"),                                   # unpaired high surrogate
    ({"k\udc00": ["x\udfff", 2**70]}, {"k\ufffd": ["x\ufffd", 2**70]}),   # low ones, in a key; json.dumps' path
    ("\U0001F600 \ud83d", "\U0001F600 \ufffd"),                   # a pair stays whole
    ("\\ud800 \\\ud800", "\\ud800 \\\ufffd"),                     # backslashes, then "ud800"; then a surrogate
])
def test_jsonb_replaces_unpaired_surrogates(conn, value, expected):
    assert conn.execute("SELECT %s::jsonb AS value", (Jsonb(value),)).fetchone()["value"] == expected
