from __future__ import annotations

from services.common.db import connect
from services.common.migrate import MIGRATIONS_DIR, migrate, sql_files

COUNTS = """
SELECT (SELECT count(*) FROM model_registry) AS models,
       (SELECT count(*) FROM optimization_rules) AS rules,
       (SELECT count(*) FROM optimization_rule_conditions) AS conditions
"""


def test_running_migrations_twice_applies_nothing_the_second_time(fresh_database_url):
    with connect(fresh_database_url) as conn:
        assert migrate(conn) == []
        versions = [row["version"] for row in conn.execute(
            "SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [path.stem for path in sql_files(MIGRATIONS_DIR)]


def test_seeds_are_idempotent(fresh_database_url):
    with connect(fresh_database_url, autocommit=True) as conn:
        before = conn.execute(COUNTS).fetchone()
        migrate(conn, seed=True)
        after = conn.execute(COUNTS).fetchone()
    assert before == after
    assert before["models"] == 10 and before["rules"] == 4 and before["conditions"] == 5
