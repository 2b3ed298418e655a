"""Apply `database/migrations/*.sql` in order, once each; `--seed` also applies `database/seeds`.

Usage: python -m services.common.migrate [--seed] [--database-url URL]
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import psycopg
from psycopg import conninfo as pg_conninfo, sql

from services.common.config import PROJECT_ROOT, Settings
from services.common.db import connect

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = PROJECT_ROOT / "database" / "migrations"
SEEDS_DIR = PROJECT_ROOT / "database" / "seeds"
# Any fixed number: every migrating process takes the same lock, so two never interleave.
MIGRATION_LOCK_KEY = 7_301_994_001
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


def sql_files(directory: Path) -> list[Path]:
    """The numbered `.sql` files of a folder, in order; a misnamed file is an error."""
    files = sorted(directory.glob("*.sql"))
    for path in files:
        if not _FILE_NAME.fullmatch(path.name):
            raise ValueError(f"{path.name}: migration and seed files are named NNNN_snake_case.sql")
    return files


def migrate(conn: psycopg.Connection, *, seed: bool = False,
            migrations_dir: Path = MIGRATIONS_DIR, seeds_dir: Path = SEEDS_DIR) -> list[str]:
    """Apply pending migrations (and seeds), one transaction per file; return what was applied."""
    conn.autocommit = True
    conn.execute("SET lock_timeout = '10s'")
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        conn.execute(CREATE_MIGRATIONS_TABLE)
        applied = {row["version"] for row in conn.execute("SELECT version FROM schema_migrations")}
        done = []
        for path in sql_files(migrations_dir):
            if path.stem in applied:
                continue
            with conn.transaction():
                conn.execute(path.read_text())
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (path.stem,))
            logger.info("migration applied", extra={"migration": path.stem})
            done.append(path.stem)
        if seed:
            # Seeds are written to be idempotent, so they run every time.
            for path in sql_files(seeds_dir):
                with conn.transaction():
                    conn.execute(path.read_text())
                done.append(f"seed:{path.stem}")
        return done
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def ensure_database(database_url: str) -> None:
    """Create the target database when it does not exist yet (connecting through `postgres`)."""
    info = pg_conninfo.conninfo_to_dict(database_url)
    name = info.get("dbname")
    if not name:
        return
    admin_url = pg_conninfo.make_conninfo(database_url, dbname="postgres")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", action="store_true", help="also apply database/seeds")
    parser.add_argument("--database-url", default=None, help="defaults to DATABASE_URL")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    database_url = args.database_url or Settings.from_env().database_url
    ensure_database(database_url)
    with connect(database_url) as conn:
        done = migrate(conn, seed=args.seed)
    print(f"applied: {', '.join(done)}" if done else "nothing to apply")
    return 0


if __name__ == "__main__":
    sys.exit(main())
