"""One connection pool per process; a `Database` hands out connections that commit or roll back."""
from __future__ import annotations

import re
import select
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Protocol

import psycopg
from flask import current_app
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import ConnectionPool

from services.common import fast_json

# An escaped U+0000 in JSON text: preceded by an even number of backslashes (escaped ones).
NUL_ESCAPE_BYTES = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")
# An escaped surrogate in JSON text, or a pair of them whole (the one character they make): group 2
# is 6 bytes long for an unpaired one.
SURROGATE_ESCAPE_BYTES = re.compile(
    rb"(?<!\\)((?:\\\\)*)(\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2})")


def unpaired_surrogate_escape(text: bytes) -> bool:
    """Whether JSON text escapes a surrogate outside a pair (valid JSON; not Unicode text)."""
    return (b"\\ud" in text or b"\\uD" in text) and any(
        len(match[2]) == 6 for match in SURROGATE_ESCAPE_BYTES.finditer(text))


def jsonb_dumps(value) -> bytes:
    """JSON for jsonb: Postgres refuses U+0000 and unpaired surrogates there, so a model's output
    holding one (valid JSON escapes both) is stored with U+FFFD in its place rather than failing
    the statement that records the answer."""
    text = fast_json.dumps(value)
    if b"\\u0000" in text:
        text = NUL_ESCAPE_BYTES.sub(rb"\1\\ufffd", text)
    if b"\\ud" in text:   # only json.dumps writes these: orjson refused the value
        text = SURROGATE_ESCAPE_BYTES.sub(_unpaired_replaced, text)
    return text


def _unpaired_replaced(match: re.Match) -> bytes:
    return match[0] if len(match[2]) == 12 else match[1] + b"\\ufffd"


set_json_dumps(jsonb_dumps)
set_json_loads(fast_json.loads)

# A CTE for statements that write transient state (a lease, a runtime's busy count): their commit
# does not wait for the WAL to reach the disk (`synchronous_commit` off for that transaction only).
# Only a crash of Postgres or of its machine can lose such a commit (the WAL writer flushes it
# within a few hundred ms, the next durable commit at once), and lease expiry repairs what it held. The statement must read from `unflushed` for it to run.
UNFLUSHED = "unflushed AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))"


class Database(Protocol):
    """What services need from the database: a connection in a transaction.

    `autocommit=True` is for a block of one statement (which is a transaction by itself): it
    saves the BEGIN and COMMIT round trips. The hot path of a dispatch is made of such blocks.
    """

    def connection(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection]: ...

    def close(self) -> None: ...


class PooledDatabase:
    """A `psycopg_pool.ConnectionPool`; `connection()` commits on success, rolls back on error."""

    def __init__(self, conninfo: str, *, min_size: int = 1, max_size: int = 10,
                 timeout_s: float = 5.0, statement_timeout_ms: int = 30_000,
                 name: str = "dispatcher") -> None:
        self.pool = ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            open=False,
            name=name,
            check=check_idle_connection,
            kwargs={
                "row_factory": dict_row,
                "options": f"-c statement_timeout={statement_timeout_ms}",
                "application_name": name,
            },
        )

    def open(self) -> None:
        # wait=False: a service starts even while Postgres is down; /readyz says so.
        self.pool.open(wait=False)

    @contextmanager
    def connection(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
        with self.pool.connection() as conn:
            if not autocommit:
                yield conn
                return
            conn.autocommit = True
            try:
                yield conn
            finally:
                with suppress(psycopg.Error):  # a broken connection is discarded by the pool anyway
                    conn.autocommit = False

    def close(self) -> None:
        self.pool.close()


class SingleConnectionDatabase:
    """One caller-owned connection; each `connection()` is a savepoint (used by tests, scripts).

    Threads take turns (a lease renewer's savepoint must not interleave with the caller's).
    """

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self._turn = threading.RLock()

    @contextmanager
    def connection(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
        raised = None
        with self._turn, self.conn.transaction():
            try:
                yield self.conn
            except Exception as error:
                # As in autocommit, what the block wrote stays when it raises afterwards; only a
                # failed statement undoes the block.
                if not autocommit or self.conn.info.transaction_status == TransactionStatus.INERROR:
                    raise
                raised = error
        if raised is not None:
            raise raised

    def close(self) -> None:
        pass


def check_idle_connection(conn: psycopg.Connection) -> None:
    """The pool's check before handing out a connection: raise if the server has closed it.

    Without a round trip: an idle connection has nothing to read, so a readable socket means the
    server sent its goodbye (shutdown, restart, idle timeout, terminated backend) or hung up.
    """
    if conn.closed:
        raise psycopg.OperationalError("the connection is closed")
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        conn.close()  # so the pool discards it and opens another
        raise psycopg.OperationalError("the server closed this idle connection")


def connect(conninfo: str, *, statement_timeout_ms: int | None = None, **kwargs) -> psycopg.Connection:
    """A plain connection returning dict rows (scripts, migrations, tests, jobs needing their own)."""
    if statement_timeout_ms is not None:
        kwargs["options"] = f"-c statement_timeout={statement_timeout_ms}"
    return psycopg.connect(conninfo, row_factory=dict_row, **kwargs)


def get_db() -> Database:
    """The database of the current app."""
    return current_app.extensions["database"]
