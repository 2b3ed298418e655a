"""SQL for prompt templates; every function returns dict rows."""
from __future__ import annotations

import psycopg

COLUMNS = """id, task_type, model_family, version, system_template, user_template, description,
             active, created_at"""


def list_templates(conn: psycopg.Connection, *, task_type: str | None, model_family: str | None,
                   active: bool | None, limit: int, offset: int) -> tuple[list[dict], int]:
    """One page of templates matching the filters (None = any), and how many match in all."""
    where = """(%(task_type)s::text IS NULL OR task_type = %(task_type)s)
               AND (%(model_family)s::text IS NULL OR model_family = %(model_family)s)
               AND (%(active)s::boolean IS NULL OR active = %(active)s)"""
    params = {"task_type": task_type, "model_family": model_family, "active": active,
              "limit": limit, "offset": offset}
    rows = conn.execute(
        f"""SELECT {COLUMNS} FROM prompt_templates WHERE {where}
            ORDER BY task_type, model_family, version DESC
            LIMIT %(limit)s OFFSET %(offset)s""", params).fetchall()
    total = conn.execute(f"SELECT count(*) AS total FROM prompt_templates WHERE {where}",
                         params).fetchone()["total"]
    return rows, total


def get_template(conn: psycopg.Connection, template_id: str) -> dict | None:
    return conn.execute(f"SELECT {COLUMNS} FROM prompt_templates WHERE id = %s",
                        (template_id,)).fetchone()


def lock_family(conn: psycopg.Connection, task_type: str, model_family: str) -> None:
    """Serialise version changes of one (task type, family) until the transaction ends."""
    # An advisory lock also covers a pair with no row yet; statements after it see what the
    # previous holder committed.
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                 (f"prompt_templates/{task_type}/{model_family}",))


def latest_version(conn: psycopg.Connection, task_type: str, model_family: str) -> dict | None:
    return conn.execute(
        f"""SELECT {COLUMNS} FROM prompt_templates
            WHERE task_type = %s AND model_family = %s ORDER BY version DESC LIMIT 1""",
        (task_type, model_family)).fetchone()


def deactivate_family(conn: psycopg.Connection, task_type: str, model_family: str) -> None:
    conn.execute("""UPDATE prompt_templates SET active = false
                    WHERE task_type = %s AND model_family = %s AND active""", (task_type, model_family))


def set_active(conn: psycopg.Connection, template_id: str, active: bool) -> dict:
    return conn.execute(f"UPDATE prompt_templates SET active = %s WHERE id = %s RETURNING {COLUMNS}",
                        (active, template_id)).fetchone()


def insert_template(conn: psycopg.Connection, *, task_type: str, model_family: str, version: int,
                    system_template: str, user_template: str, description: str, active: bool) -> dict:
    return conn.execute(
        f"""INSERT INTO prompt_templates (task_type, model_family, version, system_template,
                                          user_template, description, active)
            VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {COLUMNS}""",
        (task_type, model_family, version, system_template, user_template, description, active),
    ).fetchone()


def resolve_active(conn: psycopg.Connection, task_type: str, model_family: str) -> dict | None:
    """The active template that applies: (task, family), else (task, default), else (default, default)."""
    return conn.execute(
        f"""SELECT {COLUMNS} FROM prompt_templates
            WHERE active AND (task_type, model_family) IN ((%(task)s, %(family)s), (%(task)s, 'default'),
                                                           ('default', 'default'))
            ORDER BY task_type = 'default', model_family = 'default'
            LIMIT 1""",
        {"task": task_type, "family": model_family}).fetchone()


def active_templates(conn: psycopg.Connection) -> tuple[str, list[dict]]:
    """The templates' version and every active template, read by one statement so they agree."""
    rows = conn.execute(
        f"""SELECT v.templates_version, t.*
            FROM (SELECT version::text AS templates_version FROM prompt_templates_version) v
            LEFT JOIN (SELECT {COLUMNS} FROM prompt_templates WHERE active) t ON true""").fetchall()
    return rows[0]["templates_version"], [
        {name: value for name, value in row.items() if name != "templates_version"}
        for row in rows if row["id"] is not None]
