"""Template storage, versions, family resolution and building prompts, on the seeded database."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from services.common.db import connect
from services.common.errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from services.common.migrate import migrate
from services.prompt_builder import templates
from services.prompt_builder.templates import BuiltPrompt, PromptRequest, build_prompt

SMOL_SYSTEM = "You are a small, helpful assistant. Follow the requested output format exactly."
JSON_ONLY = "Respond with only valid JSON: no prose before or after it, no code fences."
PLAIN_TEXT = "Answer in plain text, without Markdown."
SEEDED_PAIRS = {
    ("default", "default"),
    *((task, "default") for task in templates.TASK_TYPES),
    *((task, "smollm2") for task in templates.TASK_TYPES),
    ("text-generation", "llama2"), ("question-answering", "llama2"),
    ("text-generation", "mistral"), ("question-answering", "mistral"),
    ("code-generation", "codellama"), ("code-generation", "wizard-coder"),
    ("question-answering", "orca-mini"), ("conversation", "neural-chat"),
    ("text-generation", "gemma3"), ("summarization", "gemma3"),
}


def seeded(conn, task_type: str, family: str) -> dict:
    return conn.execute("SELECT * FROM prompt_templates WHERE task_type = %s AND model_family = %s "
                        "AND version = 1", (task_type, family)).fetchone()


def ref(row: dict) -> dict:
    return {"id": str(row["id"]), "task_type": row["task_type"], "model_family": row["model_family"],
            "version": row["version"]}


def build(conn, **request) -> BuiltPrompt:
    return build_prompt(conn, PromptRequest(**{"prompt": "Hello", "task_type": "text-generation",
                                               "model": "smollm2", **request}))


# --- seeds ---------------------------------------------------------------------------------------

def test_seeds_hold_one_valid_active_version_1_per_pair(conn):
    rows = conn.execute("SELECT * FROM prompt_templates").fetchall()
    assert {(row["task_type"], row["model_family"]) for row in rows} == SEEDED_PAIRS
    assert len(rows) == len(SEEDED_PAIRS) == 23
    assert {(row["version"], row["active"]) for row in rows} == {(1, True)}
    for row in rows:
        templates.validate_template(row["system_template"], row["user_template"])
        assert set(templates.placeholder_names(row["system_template"] + row["user_template"])) == \
            {"prompt", "format_instructions"}


# --- resolution ----------------------------------------------------------------------------------

@pytest.mark.parametrize("task_type, model, used", [
    ("code-generation", "codellama:13b", ("code-generation", "codellama")),
    ("code-generation", "CodeLlama:7B", ("code-generation", "codellama")),
    ("code-generation", "wizard-coder:15b", ("code-generation", "wizard-coder")),
    ("code-generation", "llama2:13b", ("code-generation", "default")),
    ("question-answering", "llama2", ("question-answering", "llama2")),
    ("conversation", "mistral:7b", ("conversation", "default")),
    ("summarization", "phi3:mini", ("summarization", "default")),
    ("classification", "smollm2:135m-instruct-q4_1", ("classification", "smollm2")),
])
def test_the_family_template_wins_then_the_task_default(conn, task_type, model, used):
    assert build(conn, task_type=task_type, model=model).template == ref(seeded(conn, *used))


def test_without_a_task_default_the_global_default_applies(conn):
    templates.update_template(conn, seeded(conn, "summarization", "default")["id"], {"active": False})
    assert build(conn, task_type="summarization", model="phi3").template == \
        ref(seeded(conn, "default", "default"))
    assert build(conn, task_type="summarization", model="gemma3:270m").template == \
        ref(seeded(conn, "summarization", "gemma3"))


def test_with_no_template_at_all_the_build_is_a_422(conn):
    conn.execute("UPDATE prompt_templates SET active = false")
    with pytest.raises(Unprocessable) as caught:
        build(conn, model="phi3")
    assert caught.value.detail == "No active template applies to (text-generation, phi3) and there is " \
                                  "no active global default."


# --- building ------------------------------------------------------------------------------------

def test_json_with_a_schema_for_the_openai_protocol(conn):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    built = build(conn, prompt="What is {2 + 2}?", task_type="question-answering", model="smollm2:135m",
                  output_format="json", json_schema=schema)
    user = ("Answer briefly: What is {2 + 2}?\n\n" + JSON_ONLY + " The JSON must conform to this JSON "
            'Schema:\n{"properties": {"answer": {"type": "integer"}}, "required": ["answer"], "type": "object"}')
    assert built == BuiltPrompt(
        messages=[{"role": "system", "content": SMOL_SYSTEM}, {"role": "user", "content": user}],
        prompt=f"{SMOL_SYSTEM}\n\n{user}",
        options={"response_format": {"type": "json_schema",
                                     "json_schema": {"name": "response", "schema": schema}}},
        template=ref(seeded(conn, "question-answering", "smollm2")),
        output_format="json",
    )


def test_json_without_a_schema_for_the_ollama_protocol_and_a_template_without_system(conn):
    built = build(conn, prompt="Name a colour.", model="mistral:7b", protocol="ollama", output_format="json")
    user = f"Task: Name a colour.\n\nProvide a comprehensive answer. {JSON_ONLY}"
    assert built == BuiltPrompt(messages=[{"role": "user", "content": user}], prompt=user,
                                options={"format": "json"},
                                template=ref(seeded(conn, "text-generation", "mistral")),
                                output_format="json")


def test_code_instructions_name_the_language_variable(conn):
    built = build(conn, prompt="Sort a list.", task_type="code-generation", model="codellama:7b",
                  output_format="code", variables={"language": "python"})
    assert built.messages[1] == {"role": "user", "content": (
        "Code Generation Task:\nSort a list.\n\nGenerate clean, well-commented code. Respond with only "
        "the code, in one fenced code block (```python ... ```), without explanations.")}
    assert built.options == {}


def test_a_mapping_request_is_accepted(conn):
    built = build_prompt(conn, {"prompt": "Hi", "task_type": "conversation", "model": "neural-chat:7b"})
    assert built.messages == [
        {"role": "system", "content": "You are a friendly and helpful chat assistant."},
        {"role": "user", "content": f"Hi\n\n{PLAIN_TEXT}"}]


def test_extra_variables_fill_the_template_and_missing_ones_are_named(conn):
    row = templates.create_template(
        conn, task_type="question-answering", model_family="phi3",
        system_template="Context ({model_family}): {context}", user_template="{prompt} ({language}, {labels})")
    with pytest.raises(Unprocessable) as caught:
        build(conn, task_type="question-answering", model="phi3:mini", variables={"labels": "a, b"})
    assert (caught.value.detail, caught.value.extensions) == (
        "Missing template variable(s): context, language.", {"missing": ["context", "language"]})
    built = build(conn, task_type="question-answering", model="phi3:mini",
                  variables={"context": "{secret}", "language": "en", "labels": "a, b"})
    # The template has no {format_instructions}: the instruction is appended to the user part.
    assert built.messages == [{"role": "system", "content": "Context (phi3): {secret}"},
                              {"role": "user", "content": f"Hello (en, a, b)\n\n{PLAIN_TEXT}"}]
    assert built.template == ref(row)


@pytest.mark.parametrize("request_fields, detail, extensions", [
    ({"task_type": "translation"}, "Unknown task_type 'translation'.", {"allowed": list(templates.TASK_TYPES)}),
    ({"protocol": "grpc"}, "Unknown protocol 'grpc'.", {"allowed": ["ollama", "openai"]}),
    ({"output_format": "yaml"}, "Unknown output_format 'yaml'.",
     {"allowed": ["json", "markdown", "code", "text"]}),
    ({"output_format": "json", "json_schema": {"type": 1}},
     "json_schema is not a valid JSON Schema (Draft 2020-12): 1 is not valid under any of the given schemas", {}),
    ({"variables": {"prompt": "x", "secret": "y"}}, "Unknown variable(s): prompt, secret.",
     {"allowed": list(templates.EXTRA_VARIABLES)}),
    ({"variables": {"context": 3}}, "Variable values must be strings.", {}),
    ({"model": "../etc/passwd"}, "'../etc/passwd' is not a model name like 'llama2:13b'.", {}),
    ({"model": "llama2\n"}, "'llama2\\n' is not a model name like 'llama2:13b'.", {}),
])
def test_bad_requests_are_422_listing_allowed_values(conn, request_fields, detail, extensions):
    with pytest.raises(Unprocessable) as caught:
        build(conn, **request_fields)
    assert (caught.value.detail, caught.value.extensions) == (detail, extensions)


def test_prompt_size_is_bounded_before_and_after_rendering(conn):
    with pytest.raises(PayloadTooLarge) as caught:
        build(conn, prompt="x" * 60, variables={"context": "y" * 41}, max_prompt_chars=100)
    assert (caught.value.detail, caught.value.extensions) == (
        "The prompt is 101 characters; the limit is 100.", {"limit": 100, "size": 101})
    # 100 characters fit as input, but the template around them does not.
    with pytest.raises(PayloadTooLarge) as caught:
        build(conn, prompt="x" * 100, max_prompt_chars=100)
    assert caught.value.extensions == {"limit": 100, "size": len(SMOL_SYSTEM) + 2 + 100 + 2 + len(PLAIN_TEXT)}
    assert "\n\n" + "x" * 100 + "\n\n" in build(conn, prompt="x" * 100, max_prompt_chars=300).prompt


# --- storage and versions ------------------------------------------------------------------------

def test_a_content_change_makes_a_new_active_version_and_keeps_the_old_one(conn):
    v1 = seeded(conn, "text-generation", "llama2")
    v2, created = templates.update_template(conn, v1["id"], {"user_template": "Now: {prompt}"})
    assert created is True
    assert {key: v2[key] for key in ("task_type", "model_family", "version", "system_template",
                                     "user_template", "description", "active")} == {
        "task_type": "text-generation", "model_family": "llama2", "version": 2,
        "system_template": v1["system_template"], "user_template": "Now: {prompt}",
        "description": v1["description"], "active": True}
    # The old version is unchanged but for its active flag, and still readable.
    assert templates.get_template(conn, v1["id"]) == {**{k: v1[k] for k in v2}, "active": False}
    assert build(conn, model="llama2:7b").template == ref(v2)
    assert build(conn, model="llama2:7b").messages[1]["content"] == f"Now: Hello\n\n{PLAIN_TEXT}"


def test_toggling_active_switches_the_version_in_use(conn):
    v1 = seeded(conn, "text-generation", "llama2")
    v2, _ = templates.update_template(conn, v1["id"], {"description": "v2"})
    row, created = templates.update_template(conn, v1["id"], {"active": True})
    assert (created, row["version"], row["active"]) == (False, 1, True)
    assert templates.get_template(conn, v2["id"])["active"] is False
    assert build(conn, model="llama2").template == ref(v1)
    # Patching an old version's content builds on that version, with the next number.
    v3, _ = templates.update_template(conn, v1["id"], {"system_template": "Be brief."})
    assert (v3["version"], v3["system_template"], v3["description"]) == (3, "Be brief.", v1["description"])
    # Setting the flag it already has changes nothing.
    assert templates.update_template(conn, v3["id"], {"active": True}) == (v3, False)


def test_a_new_version_can_be_saved_inactive(conn):
    v1 = seeded(conn, "code-generation", "codellama")
    v2, _ = templates.update_template(conn, v1["id"], {"user_template": "{prompt}!", "active": False})
    assert (v2["version"], v2["active"], templates.get_template(conn, v1["id"])["active"]) == (2, False, True)
    assert build(conn, task_type="code-generation", model="codellama").template == ref(v1)


def test_deactivating_a_family_falls_back_but_the_global_default_stays(conn):
    row, _ = templates.update_template(conn, seeded(conn, "code-generation", "codellama")["id"], {"active": False})
    assert row["active"] is False
    assert build(conn, task_type="code-generation", model="codellama").template == \
        ref(seeded(conn, "code-generation", "default"))
    with pytest.raises(Conflict) as caught:
        templates.update_template(conn, seeded(conn, "default", "default")["id"], {"active": False})
    assert caught.value.detail == "The global default template cannot be deactivated; activate another " \
                                  "version of it instead."


def test_an_invalid_change_or_no_change_is_rejected(conn):
    v1 = seeded(conn, "text-generation", "llama2")
    with pytest.raises(Unprocessable) as caught:
        templates.update_template(conn, v1["id"], {"system_template": "{model!r}"})
    assert caught.value.errors == {"system_template": ["{model} has a conversion or format spec; only "
                                                       "{name} is allowed"]}
    with pytest.raises(Unprocessable) as caught:
        templates.update_template(conn, v1["id"], {})
    assert caught.value.detail == "Nothing to change: give template text, a description or active."
    assert conn.execute("SELECT count(*) AS n FROM prompt_templates").fetchone()["n"] == 23


def test_create_makes_version_1_once_per_pair(conn):
    row = templates.create_template(conn, task_type="summarization", model_family="phi3",
                                    user_template="TL;DR {prompt}")
    assert (row["version"], row["active"], row["system_template"], row["description"]) == (1, True, "", "")
    with pytest.raises(Conflict) as caught:
        templates.create_template(conn, task_type="summarization", model_family="phi3", user_template="{prompt}")
    assert caught.value.extensions == {"template_id": str(row["id"])}


def test_an_unknown_id_is_not_found(conn):
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as caught:
        templates.get_template(conn, missing)
    assert caught.value.detail == f"No prompt template has id {missing}."


def test_concurrent_patches_make_consecutive_versions(fresh_database_url):
    with connect(fresh_database_url, autocommit=True) as setup:
        v1 = seeded(setup, "text-generation", "llama2")
    results = {}
    with connect(fresh_database_url) as first, connect(fresh_database_url) as second:
        second_pid = second.info.backend_pid

        def patch_second():
            with second.transaction():
                results["second"] = templates.update_template(second, v1["id"], {"description": "second"})[0]

        with first.transaction():
            results["first"] = templates.update_template(first, v1["id"], {"description": "first"})[0]
            thread = threading.Thread(target=patch_second)
            thread.start()
            _wait_until_waiting_for_a_lock(first, second_pid)
        thread.join()
        rows = first.execute("SELECT version, description, active FROM prompt_templates WHERE "
                             "task_type = 'text-generation' AND model_family = 'llama2' ORDER BY version").fetchall()
    assert rows == [{"version": 1, "description": v1["description"], "active": False},
                    {"version": 2, "description": "first", "active": False},
                    {"version": 3, "description": "second", "active": True}]


def _wait_until_waiting_for_a_lock(conn, pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if row and row["wait_event_type"] == "Lock":
            return
        time.sleep(0.01)
    raise AssertionError("the second transaction never waited for the family lock")


def test_seeding_again_leaves_templates_and_their_new_versions_alone(fresh_database_url):
    with connect(fresh_database_url, autocommit=True) as conn:
        v1 = seeded(conn, "code-generation", "codellama")
        with conn.transaction():
            v2, _ = templates.update_template(conn, v1["id"], {"description": "edited"})
        migrate(conn, seed=True)
        rows = conn.execute("SELECT id, version, active FROM prompt_templates "
                            "WHERE task_type = 'code-generation' AND model_family = 'codellama' "
                            "ORDER BY version").fetchall()
        total = conn.execute("SELECT count(*) AS n FROM prompt_templates").fetchone()["n"]
    assert rows == [{"id": v1["id"], "version": 1, "active": False}, {"id": v2["id"], "version": 2, "active": True}]
    assert total == 24
