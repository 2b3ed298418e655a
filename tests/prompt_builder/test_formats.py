"""Output formats: instructions, backend options, parsing real and synthetic model output (no database)."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.common.errors import Unprocessable
from services.prompt_builder.formats import (ParsedOutput, backend_options, check_format,
                                             format_instructions, json_schema_problem, parse_output,
                                             repair_prompt)
from tests.prompt_builder.conftest import real_output

BOOK = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["title", "year"], "additionalProperties": False}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"]}
NO_CODE = [{"code": "no_code_block", "message": "The output has no fenced code block."}]
EMPTY = [{"code": "empty_output", "message": "The model returned no content."}]
RE2_LIMITS = "Patterns run on RE2, in linear time, which has no lookahead, lookbehind or backreferences."
ROOT = Path(__file__).resolve().parents[2]


# --- real SmolLM2 outputs ------------------------------------------------------------------------

@pytest.mark.parametrize("fixture, output_format, schema, expected", [
    ("json_constrained", "json", BOOK, ParsedOutput(True, {"title": "1984", "year": 1940})),
    ("json_fenced", "json", BOOK, ParsedOutput(True, {"title": "1984", "year": 1940})),
    ("json_plain", "json", PERSON, ParsedOutput(True, {"name": "Ada", "age": 36})),
    ("json_answer", "json", None, ParsedOutput(True, {"answer": 4})),
    ("code_python", "code", None,
     ParsedOutput(True, "def add(a, b):\n    return a + b", [], "python")),
    ("markdown_list", "markdown", None, ParsedOutput(True, "1. Banana\n2. Apple\n3. Grapefruit")),
    ("text_capital", "text", None, ParsedOutput(True, "The capital of France is Paris.")),
])
def test_good_real_outputs_parse(fixture, output_format, schema, expected):
    assert parse_output(real_output(fixture), output_format, schema) == expected


def test_a_real_truncated_json_answer_is_a_syntax_error():
    assert parse_output(real_output("json_truncated"), "json") == ParsedOutput(False, None, [{
        "code": "json_syntax",
        "message": "The JSON does not parse: Unterminated string starting at: line 3 column 10 (char 29)",
    }])


def test_a_real_answer_of_the_wrong_shape_violates_the_schema():
    # SmolLM2 was asked for a person; checked against the book schema it fails on every key.
    assert parse_output(real_output("json_plain"), "json", BOOK) == ParsedOutput(
        False, {"name": "Ada", "age": 36}, [
            {"code": "schema_violation", "path": "",
             "message": "'title' is a required property"},
            {"code": "schema_violation", "path": "",
             "message": "'year' is a required property"},
            {"code": "schema_violation", "path": "",
             "message": "Additional properties are not allowed ('age', 'name' were unexpected)"},
        ])


def test_a_real_unfenced_truncated_code_answer_has_no_code_block():
    raw = real_output("code_unfenced")
    assert parse_output(raw, "code") == ParsedOutput(False, raw.strip(), NO_CODE)


def test_a_real_json_answer_checked_as_code_has_no_code_block():
    assert parse_output(real_output("json_answer"), "code") == ParsedOutput(False, '{\n  "answer": 4\n}', NO_CODE)


# --- json ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, value", [
    ('Sure! Here it is: {"a": [1, {"b": "}]"}]} Hope this helps.', {"a": [1, {"b": "}]"}]}),
    ('Here is [the JSON] you asked for: [1, 2] and more', [1, 2]),
    ('```\n{"a": "\\"quoted\\""}\n```', {"a": '"quoted"'}),
    ('~~~json\n{"a": 1}\n~~~\n\nand {"b": 2}', {"a": 1}),
    ("  42  ", 42),
    ('{"emoji": "\\ud83d\\ude00", "nested": {"deep": [[[]]]}}', {"emoji": "\U0001F600", "nested": {"deep": [[[]]]}}),
])
def test_json_is_found_in_fences_and_prose(raw, value):
    assert parse_output(raw, "json") == ParsedOutput(True, value)


@pytest.mark.parametrize("raw, reasons", [
    ("", EMPTY),
    (" \n\t ", EMPTY),
    ("I cannot answer that.", [{"code": "no_json_found",
                               "message": "No JSON object or array was found in the output."}]),
    ("NaN", [{"code": "no_json_found", "message": "No JSON object or array was found in the output."}]),
    ('{"a": NaN}', [{"code": "json_syntax", "message": "The JSON does not parse: NaN is not valid JSON"}]),
    # The inner {"b": 1} must not be taken for the answer when the outer object is broken.
    ('{"a": {"b": 1}, }', [{"code": "json_syntax", "message": "The JSON does not parse: Expecting property "
                                                              "name enclosed in double quotes: line 1 column 17 "
                                                              "(char 16)"}]),
    ("{'a': 1}", [{"code": "json_syntax", "message": "The JSON does not parse: Expecting property name "
                                                     "enclosed in double quotes: line 1 column 2 (char 1)"}]),
    ("[" * 100_000, [{"code": "json_syntax", "message": "The JSON does not parse: it is nested too deeply"}]),
])
def test_bad_json_is_reported_not_raised(raw, reasons):
    assert parse_output(raw, "json") == ParsedOutput(False, None, reasons)


def test_a_number_too_large_for_a_float_is_a_syntax_error_not_infinity():
    """Infinity is no JSON: the answer would reach the caller as null, which the schema may forbid."""
    result = parse_output('{"x": 1e400}', "json", {"properties": {"x": {"type": "number"}}})
    assert result == ParsedOutput(False, None, [
        {"code": "json_syntax", "message": "The JSON does not parse: the number 1e400 is too large"}])
    assert parse_output('{"x": 1.5e300}', "json").value == {"x": 1.5e300}


@pytest.mark.parametrize("raw, schema, valid", [
    ('{"n": 1' + "0" * 400 + "}", {"properties": {"n": {"multipleOf": 0.5}}}, True),
    ('{"n": 1' + "0" * 400 + "1}", {"properties": {"n": {"multipleOf": 0.5}}}, True),
    ('{"n": 1' + "0" * 400 + "1}", {"properties": {"n": {"multipleOf": 2.0}}}, False),
    ('{"n": 1e308}', {"properties": {"n": {"multipleOf": 10 ** 400}}}, False),
])
def test_multiple_of_is_exact_where_floats_overflow(raw, schema, valid):
    assert parse_output(raw, "json", schema).valid is valid


def test_an_answer_nested_too_deeply_for_its_schema_is_invalid_output_not_a_bad_request():
    nested = {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"}
    result = parse_output("[" * 300 + "]" * 300, "json", nested)
    assert (result.valid, result.reasons) == (False, [
        {"code": "schema_violation", "message": "The JSON is nested too deeply to check against the schema."}])


@pytest.mark.parametrize("raw", [
    'Per the rubric [1], here it is: {"score": 0.5}',
    'Instead of an empty {} object: {"score": 0.5}',
])
def test_with_a_schema_the_first_json_that_conforms_is_taken(raw):
    schema = {"type": "object", "required": ["score"]}
    assert parse_output(raw, "json", schema) == ParsedOutput(True, {"score": 0.5})
    # Without one that conforms, the first found is reported with what is wrong with it.
    assert parse_output("See [1] and [2].", "json", schema).value == [1]


def test_schema_violations_carry_json_pointer_paths():
    schema = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {"n/m": {"type": "integer"}}}},
        "name": {"type": "string", "maxLength": 3}}}
    raw = '{"items": [{"n/m": 1}, {"n/m": "two"}], "name": "abcd"}'
    assert parse_output(raw, "json", schema) == ParsedOutput(False, {"items": [{"n/m": 1}, {"n/m": "two"}],
                                                                     "name": "abcd"}, [
        {"code": "schema_violation", "path": "/items/1/n~1m", "message": "'two' is not of type 'integer'"},
        {"code": "schema_violation", "path": "/name", "message": "'abcd' is too long"},
    ])


def test_schema_violations_are_capped():
    result = parse_output("[" + ",".join(["1"] * 50) + "]", "json", {"items": {"type": "string"}})
    assert (result.valid, len(result.reasons)) == (False, 20)


@pytest.mark.parametrize("schema, problem", [
    ({"type": "foo"}, "json_schema is not a valid JSON Schema (Draft 2020-12): 'foo' is not valid under "
                      "any of the given schemas"),
    ({"type": "string", "pattern": "("}, "json_schema has a pattern at /pattern that RE2 cannot compile: '(' "
                                         "(missing ): (). " + RE2_LIMITS),
    ({"required": "name"}, "json_schema is not a valid JSON Schema (Draft 2020-12): 'name' is not of "
                           "type 'array'"),
    ([], "json_schema must be a JSON object."),
    ({"type": "object"}, None),
    ({}, None),
])
def test_json_schemas_are_checked_against_the_meta_schema(schema, problem):
    assert json_schema_problem(schema) == problem


def test_an_invalid_schema_or_format_is_a_request_error_not_an_output_error():
    with pytest.raises(Unprocessable) as caught:
        parse_output("{}", "json", {"type": "foo"})
    assert caught.value.detail.startswith("json_schema is not a valid JSON Schema")
    with pytest.raises(Unprocessable) as caught:
        parse_output("{}", "yaml")
    assert (caught.value.detail, caught.value.extensions) == (
        "Unknown output_format 'yaml'.", {"allowed": ["json", "markdown", "code", "text"]})
    with pytest.raises(Unprocessable) as caught:
        check_format("json", {"type": "foo"})
    assert caught.value.detail.startswith("json_schema is not a valid JSON Schema")


def test_a_schema_only_applies_to_json():
    assert parse_output("Paris", "text", {"type": "object"}) == ParsedOutput(True, "Paris")
    assert parse_output("Paris", "text", {"type": "foo"}) == ParsedOutput(True, "Paris")
    assert backend_options("text", "openai", {"type": "object"}) == {}
    assert format_instructions("markdown", {"type": "object"}) == "Format your answer in Markdown."


def test_an_unresolvable_reference_is_a_request_error():
    with pytest.raises(Unprocessable) as caught:
        parse_output("{}", "json", {"$ref": "#/$defs/missing"})
    assert caught.value.detail == "json_schema has a $ref that leads nowhere: '#/$defs/missing'."
    # Found wherever it is, before any answer is checked; the data of const, enum... holds no references.
    assert json_schema_problem({"properties": {"a": {"anyOf": [{"$ref": "#/x"}]}}}) == (
        "json_schema has a $ref that leads nowhere: '#/x'.")
    assert json_schema_problem({"const": {"$ref": "#/x"}}) is None
    assert json_schema_problem({"$dynamicRef": "#x"}) == "json_schema has a $dynamicRef that leads nowhere: '#x'."
    # Named like data keywords, properties and definitions are schemas all the same.
    assert json_schema_problem({"properties": {"default": {"$ref": "#/nowhere"}}}) == (
        "json_schema has a $ref that leads nowhere: '#/nowhere'.")
    assert json_schema_problem({"$ref": "#/$defs/const", "$defs": {"const": {"$ref": "#/x"}}}) == (
        "json_schema has a $ref that leads nowhere: '#/x'.")
    # References resolve against the base URI of the schema resource they sit in.
    assert json_schema_problem({"$id": "https://example.com/root", "$defs": {
        "sub": {"$id": "sub", "$anchor": "here", "type": "integer", "properties": {"x": {"$ref": "#here"}}}},
        "properties": {"a": {"$ref": "sub"}, "b": {"$ref": "https://example.com/sub#here"}}}) is None


LOOP = "json_schema has references in a loop: a schema applies itself to the same place, without end."


@pytest.mark.parametrize("schema, problem", [
    ({"$ref": "#"}, LOOP),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}, LOOP),
    ({"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"anyOf": [{"not": {"$ref": "#"}}]}}}, LOOP),
    ({"$ref": "#/$defs/enum", "$defs": {"enum": {"$ref": "#"}}}, LOOP),
    ({"dependentSchemas": {"kids": {"$ref": "#"}}}, LOOP),
    # Recursion through the answer's own structure ends with it: a tree.
    ({"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
      "$ref": "#/$defs/node"}, None),
    ({"$dynamicAnchor": "meta", "type": "object", "properties": {"x": {"$dynamicRef": "#meta"}}}, None),
])
def test_references_in_a_loop_are_found_before_any_answer_is_checked(schema, problem):
    assert json_schema_problem(schema) == problem
    if problem is None:
        assert parse_output('{"kids": [{"kids": []}], "x": {}}', "json", schema).valid


def test_a_remote_reference_is_never_fetched():
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            body = b'{"type": "string"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(Unprocessable) as caught:
            parse_output("{}", "json", {"$ref": f"http://127.0.0.1:{server.server_port}/schema.json"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert caught.value.detail == f"json_schema has a $ref that leads nowhere: 'http://127.0.0.1:{server.server_port}/schema.json'."
    assert requests == []
    # Draft references resolve from the bundled meta-schemas.
    assert parse_output("{}", "json", {"$ref": "https://json-schema.org/draft/2020-12/schema"}).valid


# --- regexes (RE2) -------------------------------------------------------------------------------

CATASTROPHIC = "^(a+)+$"
# Against CATASTROPHIC, Python's backtracking `re` tries about 2**5000 ways to split the a's.
ADVERSARIAL = "a" * 5000 + "!"
DRAFT_07 = "http://json-schema.org/draft-07/schema#"


def parse_in_child(cases: list[tuple[str, dict]]) -> list[dict]:
    """parse_output of each (raw, schema) as json, in a child process: on a backtracking engine it never returns."""
    script = ("import dataclasses, json, sys\n"
              "from services.prompt_builder.formats import parse_output\n"
              "cases = json.load(sys.stdin)\n"
              "print(json.dumps([dataclasses.asdict(parse_output(raw, 'json', schema)) for raw, schema in cases]))")
    child = subprocess.run([sys.executable, "-c", script], input=json.dumps(cases), capture_output=True,
                           text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


def violation(message: str, path: str) -> dict:
    return {"code": "schema_violation", "message": message, "path": path}


def test_a_catastrophic_pattern_on_adversarial_output_is_invalid_not_a_hung_thread():
    answer = {"answer": ADVERSARIAL}
    keyed = {ADVERSARIAL: 1}
    cases = [
        (answer, {"properties": {"answer": {"type": "string", "pattern": CATASTROPHIC}}}),
        (keyed, {"patternProperties": {CATASTROPHIC: {}}, "additionalProperties": False}),
        (keyed, {"patternProperties": {CATASTROPHIC: {}}, "unevaluatedProperties": False}),
        # A subschema's own $schema, or a $ref to a root that has one, must not switch to a stock validator.
        (answer, {"properties": {"answer": {"$schema": DRAFT_07, "pattern": CATASTROPHIC}}}),
        ({"next": answer}, {"$schema": "https://json-schema.org/draft/2020-12/schema",
                            "properties": {"next": {"$ref": "#"}, "answer": {"pattern": CATASTROPHIC}}}),
        ({"answer": "a" * 5000}, {"properties": {"answer": {"pattern": CATASTROPHIC}}}),
    ]
    no_match = f"{ADVERSARIAL!r} does not match {CATASTROPHIC!r}"
    assert parse_in_child([(json.dumps(value), schema) for value, schema in cases]) == [
        {"valid": False, "value": answer, "reasons": [violation(no_match, "/answer")], "language": None},
        {"valid": False, "value": keyed, "language": None, "reasons": [
            violation(f"{ADVERSARIAL!r} does not match any of the regexes: {CATASTROPHIC!r}", "")]},
        {"valid": False, "value": keyed, "language": None, "reasons": [
            violation(f"Unevaluated properties are not allowed ({ADVERSARIAL!r} was unexpected)", "")]},
        {"valid": False, "value": answer, "reasons": [violation(no_match, "/answer")], "language": None},
        {"valid": False, "value": {"next": answer}, "reasons": [violation(no_match, "/next/answer")],
         "language": None},
        {"valid": True, "value": {"answer": "a" * 5000}, "reasons": [], "language": None},
    ]


CODE = {"type": "object", "properties": {"code": {"type": "string", "pattern": r"^[A-Z]{3}-\d{4}$"}},
        "patternProperties": {"^x-": {"type": "integer"}}, "additionalProperties": False}


@pytest.mark.parametrize("value, reasons", [
    ({"code": "ABC-1234", "x-rank": 2}, []),
    ({"code": "abc-1234"}, [violation(r"'abc-1234' does not match '^[A-Z]{3}-\\d{4}$'", "/code")]),
    ({"code": "ABC-1234", "x-rank": "2"}, [violation("'2' is not of type 'integer'", "/x-rank")]),
    ({"code": "ABC-1234", "rank": 2}, [violation("'rank' does not match any of the regexes: '^x-'", "")]),
    ({"code": "ABC-١٢٣٤"}, [violation(r"'ABC-١٢٣٤' does not match '^[A-Z]{3}-\\d{4}$'", "/code")]),
])
def test_ordinary_patterns_validate_both_ways(value, reasons):
    assert parse_output(json.dumps(value), "json", CODE) == ParsedOutput(not reasons, value, reasons)


@pytest.mark.parametrize("pattern, text, matches", [
    (r"^[\u0041-\u005A]+$", "ABC", True),       # ECMA-262's \uXXXX escape
    (r"^[\u0041-\u005A]+$", "abc", False),
    (r"^\\u0041$", "\\u0041", True),            # an escaped backslash, then a plain "u0041"
    ("^caf\u00e9$", "café", True),
    (r"^\p{L}+$", "été", True),
    ("^.$", "\ud800", True),                    # a lone surrogate, which JSON can escape
])
def test_patterns_match_as_written(pattern, text, matches):
    schema = {"properties": {"text": {"pattern": pattern}}}
    assert parse_output(json.dumps({"text": text}), "json", schema).valid is matches


@pytest.mark.parametrize("schema, problem", [
    ({"properties": {"code": {"type": "string", "pattern": "^(?!test)"}}},
     "json_schema has a pattern at /properties/code/pattern that RE2 cannot compile: '^(?!test)' "
     "(invalid perl operator: (?!). "),
    ({"items": {"pattern": r"^(a)\1$"}},
     r"json_schema has a pattern at /items/pattern that RE2 cannot compile: '^(a)\\1$' "
     r"(invalid escape sequence: \1). "),
    ({"patternProperties": {"(?<=x)y": {}}},
     "json_schema has a pattern at /patternProperties that RE2 cannot compile: '(?<=x)y' "
     "(invalid perl operator: (?<=). "),
    ({"pattern": r"^\u0041(?=B)"}, "json_schema has a pattern at /pattern that RE2 cannot compile: "
                                  r"'^\\u0041(?=B)' (invalid perl operator: (?=). "),
    ({"pattern": "\ud800"}, "json_schema has a pattern at /pattern that RE2 cannot compile: '\\ud800' "
                             "(a lone surrogate is not a character). "),
    ({"pattern": "x" * 300_000}, "json_schema has a pattern at /pattern that RE2 cannot compile: "
                                 f"'{'x' * 200}...' (pattern too large - compile failed). "),
])
def test_patterns_re2_cannot_run_are_refused_with_the_schema(schema, problem):
    assert json_schema_problem(schema) == problem + RE2_LIMITS
    with pytest.raises(Unprocessable) as caught:
        parse_output("{}", "json", schema)
    assert caught.value.detail == problem + RE2_LIMITS


def test_a_pattern_reached_only_through_a_reference_is_refused_up_front_and_when_used():
    schema = {"$ref": "#/notes", "notes": {"pattern": "(?=a)"}}
    # The meta-schema does not look inside unknown keywords; the walk over the document does.
    assert json_schema_problem(schema) == ("json_schema has a pattern at /notes/pattern that RE2 cannot compile: "
                                           "'(?=a)' (invalid perl operator: (?=). " + RE2_LIMITS)
    assert json_schema_problem({"const": {"pattern": "(?=a)"}}) is None    # data, not a schema
    with pytest.raises(Unprocessable) as caught:
        parse_output('"a"', "json", schema)
    assert caught.value.detail == ("json_schema has a pattern at /notes/pattern that RE2 cannot compile: "
                                   "'(?=a)' (invalid perl operator: (?=). " + RE2_LIMITS)


# --- code ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Here:\n```Python title\nprint('a')\n\n\nprint('b')\n```\nThen:\n```sh\nrun\n```",
     ParsedOutput(True, "print('a')\n\n\nprint('b')", [], "python")),
    ("````\nx = '```'\n````", ParsedOutput(True, "x = '```'", [], None)),
    ("~~~rust\nfn main() {}\n~~~", ParsedOutput(True, "fn main() {}", [], "rust")),
    ("```js\nconst a = 1;\nconst b", ParsedOutput(False, "const a = 1;\nconst b", [
        {"code": "unclosed_code_block", "message": "The code block is not closed (truncated output?)."}], "js")),
    ("```python\n\n```", ParsedOutput(False, "", [
        {"code": "empty_code_block", "message": "The code block is empty."}], "python")),
    ("def f():\n    pass\n", ParsedOutput(False, "def f():\n    pass", NO_CODE)),
    ("   ", ParsedOutput(False, "", EMPTY)),
])
def test_code_is_taken_from_the_first_fenced_block(raw, expected):
    assert parse_output(raw, "code") == expected


def test_code_in_the_language_asked_for_is_preferred():
    raw = "Install it:\n```bash\npip install requests\n```\nThen:\n```python\nimport requests\n```"
    assert parse_output(raw, "code", language="Python") == ParsedOutput(True, "import requests", [], "python")
    assert parse_output(raw, "code", language="rust").value == "pip install requests"


@pytest.mark.parametrize("raw, expected", [
    ("```python\r\nprint(1)\r\n```\r\n", "print(1)"),
    # In a list item, the fence's indent is not the code's (CommonMark).
    ("1. Do this:\n   ```python\n   def f():\n       return 1\n   ```", "def f():\n    return 1"),
])
def test_code_blocks_with_crlf_or_an_indented_fence_come_out_as_written(raw, expected):
    assert parse_output(raw, "code") == ParsedOutput(True, expected, [], "python")


# --- markdown and text ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("# Title   \r\n\r\n\r\n\r\nText  \n", ParsedOutput(True, "# Title\n\nText")),
    ("```markdown\n# Wrapped\n\n- a\n```", ParsedOutput(True, "# Wrapped\n\n- a")),
    ("Intro\n\n\n\n```python\nx = 1   \n\n\n\ny = 2\n```\n\n\n\nEnd",
     ParsedOutput(True, "Intro\n\n```python\nx = 1   \n\n\n\ny = 2\n```\n\nEnd")),
    ("Intro\n```python\nx = 1", ParsedOutput(False, "Intro\n```python\nx = 1", [
        {"code": "unclosed_code_block", "message": "A code block is not closed (truncated output?)."}])),
    ("\n", ParsedOutput(False, "", EMPTY)),
])
def test_markdown_is_normalised_outside_code_blocks(raw, expected):
    assert parse_output(raw, "markdown") == expected


def test_markdown_hard_line_breaks_are_kept():
    assert parse_output("Roses are red   \nViolets are blue  \n\nEnd", "markdown").value == (
        "Roses are red  \nViolets are blue\n\nEnd")


def test_text_is_trimmed_and_must_not_be_empty():
    assert parse_output("\n  Paris. \n", "text") == ParsedOutput(True, "Paris.")
    assert parse_output("", "text") == ParsedOutput(False, "", EMPTY)


# --- instructions, options, repair ---------------------------------------------------------------

def test_format_instructions():
    assert format_instructions("json") == \
        "Respond with only valid JSON: no prose before or after it, no code fences."
    assert format_instructions("json", {"type": "object"}) == (
        "Respond with only valid JSON: no prose before or after it, no code fences. "
        'The JSON must conform to this JSON Schema:\n{"type": "object"}')
    assert format_instructions("code", language="go") == \
        "Respond with only the code, in one fenced code block (```go ... ```), without explanations."
    assert format_instructions("code") == \
        "Respond with only the code, in one fenced code block (``` ... ```), without explanations."
    assert format_instructions("markdown") == "Format your answer in Markdown."
    assert format_instructions("text") == "Answer in plain text, without Markdown."


@pytest.mark.parametrize("output_format, protocol, schema, options", [
    ("json", "openai", BOOK, {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "response", "schema": BOOK}}}),
    ("json", "openai", None, {"response_format": {"type": "json_object"}}),
    ("json", "ollama", BOOK, {"format": BOOK}),
    ("json", "ollama", None, {"format": "json"}),
    ("code", "openai", None, {}),
    ("markdown", "ollama", None, {}),
    ("text", "openai", None, {}),
])
def test_backend_options_constrain_json_where_the_protocol_can(output_format, protocol, schema, options):
    assert backend_options(output_format, protocol, schema) == options


def test_repair_prompt_names_the_problems_and_restates_the_format():
    raw = real_output("json_plain")
    parsed = parse_output(raw, "json", {"required": ["title"]})
    assert repair_prompt(raw, parsed, "json", {"required": ["title"]}) == (
        "Your previous answer could not be used:\n"
        "- at /: 'title' is a required property\n\n"
        f"Previous answer:\n<<<\n{raw}\n>>>\n\n"
        "Answer again. Respond with only valid JSON: no prose before or after it, no code fences. "
        'The JSON must conform to this JSON Schema:\n{"required": ["title"]}')


def test_repair_prompt_quotes_at_most_the_start_of_a_long_answer():
    raw = "x" * 5000
    parsed = parse_output(raw, "code")
    assert repair_prompt(raw, parsed, "code") == (
        "Your previous answer could not be used:\n- The output has no fenced code block.\n\n"
        f"Previous answer:\n<<<\n{'x' * 1000}\n[...]\n>>>\n\n"
        "Answer again. Respond with only the code, in one fenced code block (``` ... ```), "
        "without explanations.")
