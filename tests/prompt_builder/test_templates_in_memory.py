"""The active templates held in memory, keyed by the templates' version that every write changes."""
from __future__ import annotations

import pytest

from services.common.errors import Unprocessable
from services.prompt_builder import queries, templates
from services.prompt_builder.templates import PromptRequest, build_prompt

FAMILIES = ("smollm2", "llama2", "mistral", "codellama", "gemma3", "phi3", "default")


class CountedConnection:
    """A connection that notes every statement it runs."""

    def __init__(self, conn) -> None:
        self.conn, self.statements = conn, []

    def execute(self, query, params=None):
        self.statements.append(query)
        return self.conn.execute(query, params)


def templates_version(conn) -> str:
    return conn.execute("SELECT version::text FROM prompt_templates_version").fetchone()["version"]


def build(conn, version: str | None, **request):
    return build_prompt(conn, PromptRequest(**{"prompt": "Hello", "task_type": "question-answering",
                                               "model": "phi3:mini", **request}),
                        templates_version=version)


def row_of(conn, task_type: str, family: str) -> dict:
    return conn.execute("SELECT id FROM prompt_templates WHERE active AND task_type = %s "
                        "AND model_family = %s", (task_type, family)).fetchone()


def test_every_write_to_the_templates_gives_them_a_new_version_and_a_read_does_not(conn):
    seen = [templates_version(conn)]

    def changed() -> bool:
        seen.append(templates_version(conn))
        return seen[-1] not in seen[:-1]

    templates.list_templates(conn)
    build(conn, None)
    assert not changed()
    created = templates.create_template(conn, task_type="question-answering", model_family="phi3",
                                        user_template="Q: {prompt}")
    assert changed()
    templates.update_template(conn, created["id"], {"user_template": "Question: {prompt}"})
    assert changed()
    templates.update_template(conn, created["id"], {"active": True})  # version 1 again
    assert changed()
    templates.update_template(conn, created["id"], {"active": False})
    assert changed()
    conn.execute("DELETE FROM prompt_templates WHERE id = %s", (created["id"],))
    assert changed()
    conn.execute("TRUNCATE prompt_templates CASCADE")
    assert changed()


def test_a_build_at_the_version_in_memory_runs_no_statement(conn):
    version = templates_version(conn)
    expected = build(conn, None)
    build(conn, version)  # holds the templates of this version, if the process did not already
    counted = CountedConnection(conn)
    assert build(counted, version) == expected
    assert counted.statements == []


def test_a_build_at_another_version_reads_all_active_templates_in_one_statement(conn):
    counted = CountedConnection(conn)
    expected = build(conn, None)
    assert build(counted, "not the version in memory") == expected
    assert build(counted, templates_version(conn)) == expected
    assert len(counted.statements) == 1


def test_a_template_written_since_the_templates_were_held_is_used(conn):
    build(conn, templates_version(conn))
    family = templates.create_template(conn, task_type="question-answering", model_family="phi3",
                                       user_template="Q: {prompt}")
    assert build(conn, templates_version(conn)).template["id"] == str(family["id"])
    templates.update_template(conn, family["id"], {"active": False})
    assert build(conn, templates_version(conn)).template["id"] == \
        str(row_of(conn, "question-answering", "default")["id"])
    templates.update_template(conn, family["id"], {"active": True})
    built = build(conn, templates_version(conn))
    assert (built.template["id"], built.messages[-1]["content"]) == (
        str(family["id"]), "Q: Hello\n\nAnswer in plain text, without Markdown.")


@pytest.mark.parametrize("deactivated", [
    [],
    [("summarization", "default"), ("code-generation", "codellama")],
    [(task, family) for task in templates.TASK_TYPES for family in FAMILIES],
])
def test_resolution_in_memory_equals_the_sql_resolution(conn, deactivated):
    for task_type, family in deactivated:
        conn.execute("UPDATE prompt_templates SET active = false WHERE task_type = %s "
                     "AND model_family = %s", (task_type, family))
    active = templates.ActiveTemplates(*queries.active_templates(conn))
    assert active.version == templates_version(conn)
    for task_type in templates.TEMPLATE_TASK_TYPES:
        for family in FAMILIES:
            assert active.resolve(task_type, family) == queries.resolve_active(conn, task_type, family)


def test_with_no_active_template_a_build_from_memory_is_the_same_422(conn):
    conn.execute("UPDATE prompt_templates SET active = false")
    assert queries.active_templates(conn) == (templates_version(conn), [])
    for version in (None, templates_version(conn)):
        with pytest.raises(Unprocessable) as caught:
            build(conn, version)
        assert caught.value.detail == "No active template applies to (question-answering, phi3) and " \
                                      "there is no active global default."
