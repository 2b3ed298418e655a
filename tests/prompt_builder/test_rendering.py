"""Safe template rendering and validation at save time (no database)."""
from __future__ import annotations

import re

import pytest

from services.common.errors import Unprocessable
from services.prompt_builder.templates import (TEMPLATE_PATTERN, USER_TEMPLATE_PATTERN, parse_template,
                                               placeholder_names, render, template_text_problems,
                                               validate_template)

UNKNOWN = "allowed: prompt, format_instructions, task_type, model, model_family, context, language, " \
          "labels, examples, history"


@pytest.mark.parametrize("text, problem", [
    ("{prompt.__class__}", "{prompt.__class__} is not a plain name (no attribute or index access, "
                           "no positional fields)"),
    ("{prompt[0]}", "{prompt[0]} is not a plain name (no attribute or index access, no positional fields)"),
    ("{0}", "{0} is not a plain name (no attribute or index access, no positional fields)"),
    ("{}", "{} is not a plain name (no attribute or index access, no positional fields)"),
    ("{prompt!r}", "{prompt} has a conversion or format spec; only {name} is allowed"),
    ("{prompt:>10}", "{prompt} has a conversion or format spec; only {name} is allowed"),
    ("{prompt:{context}}", "{prompt} has a conversion or format spec; only {name} is allowed"),
    ("{prompt", "unbalanced braces (expected '}' before end of string); write a literal brace as {{ or }}"),
    ("prompt}", "unbalanced braces (Single '}' encountered in format string); write a literal brace as "
                "{{ or }}"),
    ("{prompt}}", "unbalanced braces (Single '}' encountered in format string); write a literal brace as "
                  "{{ or }}"),
    ("{prompt!}", "unbalanced braces (unmatched '{' in format spec); write a literal brace as {{ or }}"),
])
def test_unsafe_or_malformed_placeholders_are_rejected(text, problem):
    with pytest.raises(ValueError) as caught:
        parse_template(text)
    assert str(caught.value) == problem
    assert template_text_problems(text) == [problem]


def test_unknown_placeholders_are_listed_once_each():
    assert template_text_problems("{prompt} {secret} {secret} {contexts}") == [
        f"unknown placeholder {{secret}}; {UNKNOWN}",
        f"unknown placeholder {{contexts}}; {UNKNOWN}",
    ]


def test_the_user_template_must_contain_the_prompt():
    assert template_text_problems("{context}", requires_prompt=True) == [
        "the user template must contain {prompt}"]
    assert template_text_problems("{context}") == []


def test_validate_template_reports_each_part():
    with pytest.raises(Unprocessable) as caught:
        validate_template("{model.name}", "Say {{hi}}")
    assert caught.value.errors == {
        "system_template": ["{model.name} is not a plain name (no attribute or index access, "
                            "no positional fields)"],
        "user_template": ["the user template must contain {prompt}"],
    }


def test_literal_braces_are_written_doubled():
    assert render("{{json}} {prompt} }}", {"prompt": "x"}) == "{json} x }"
    assert render("{{ {prompt} }}", {"prompt": "x"}) == "{ x }"
    assert placeholder_names("{{context}} {prompt} {model} {prompt}") == ["prompt", "model"]


def test_values_are_inserted_verbatim_and_never_interpreted():
    prompt = "Use {context} and {0.__class__} and {{braces}} and {prompt!r}"
    assert render("Q: {prompt}\n{language}", {"prompt": prompt, "language": "{python}"}) == \
        f"Q: {prompt}\n{{python}}"


def test_a_missing_variable_is_a_422_naming_it():
    with pytest.raises(Unprocessable) as caught:
        render("{context}: {prompt} in {language}", {"prompt": "x"})
    assert caught.value.detail == "Missing template variable(s): context, language."
    assert caught.value.extensions == {"missing": ["context", "language"]}


@pytest.mark.parametrize("text", [
    "{prompt}", "{{prompt}}", "{{{prompt}}}", "a {prompt} {context} }}", "{prompt} {", "{prompt} {x}",
    "x", "{prompt}}", "{prompt.x}", "{prompt!r}", "{model} {prompt} {history}{examples}",
])
def test_the_documented_patterns_agree_with_the_validator(text):
    assert bool(re.match(USER_TEMPLATE_PATTERN, text)) == (not template_text_problems(text, requires_prompt=True))
    assert bool(re.match(TEMPLATE_PATTERN, text)) == (not template_text_problems(text))
