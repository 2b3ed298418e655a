"""A Draft 2020-12 validator whose regexes run on RE2, in time linear in the text (and whose
multipleOf stays exact on numbers too large for a float, where jsonschema's raises).

A caller's schema brings its own `pattern` / `patternProperties` regexes and a model writes the
text they run on. Python's `re` backtracks: `^(a+)+$` against a long run of a's and a "!" takes
exponential time, holding a service thread practically for ever. RE2 does not backtrack, so it has
no lookaround or backreferences either: such patterns are refused when the schema comes in
(RE2_FORMAT_CHECKER), with a 422 that names them.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from fractions import Fraction
from functools import lru_cache
from typing import Any

import re2
from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError

# ECMA-262 (the regex dialect JSON Schema names) writes \uXXXX where RE2 writes \x{XXXX};
# an escaped backslash is matched first so that `\\u0041` stays a backslash and "u0041".
_ECMA_UNICODE_ESCAPE = re.compile(r"\\\\|\\u([0-9A-Fa-f]{4})")
# RE2's own memory bound per pattern (program and DFA cache), kept below its 8 MiB default
# because compiled patterns are cached across requests.
RE2_MAX_MEM = 2 << 20
COMPILED_PATTERN_CACHE = 64
SHOWN_PATTERN_CHARS = 200


class UnsupportedPattern(ValueError):
    """A schema regex RE2 cannot compile: lookaround, a backreference, or not a regex at all."""

    def __init__(self, pattern: str, reason: str):
        shown = pattern if len(pattern) <= SHOWN_PATTERN_CHARS else pattern[:SHOWN_PATTERN_CHARS] + "..."
        super().__init__(f"{shown!r} ({reason})")
        self.pattern = pattern
        self.reason = reason


@lru_cache(maxsize=COMPILED_PATTERN_CACHE)
def compile_pattern(pattern: str) -> re2._Regexp:
    """The RE2 form of a JSON Schema regex; raises UnsupportedPattern."""
    try:
        return re2.compile(_ECMA_UNICODE_ESCAPE.sub(_as_re2_escape, pattern), _re2_options())
    except re2.error as error:
        reason = error.args[0].decode(errors="replace") if error.args else "not a regex"
        raise UnsupportedPattern(pattern, reason) from None
    except UnicodeEncodeError:
        raise UnsupportedPattern(pattern, "a lone surrogate is not a character") from None


def pattern_matches(pattern: str, text: str) -> bool:
    """Whether `pattern` matches somewhere in `text` (JSON Schema regexes are not anchored)."""
    compiled = compile_pattern(pattern)
    try:
        return compiled.search(text) is not None
    except UnicodeEncodeError:
        # JSON can carry a lone surrogate ("\ud800"), which RE2's UTF-8 cannot: it matches as U+FFFD.
        return compiled.search(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")) is not None


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False          # a caller's bad pattern is a 422, not a line on stderr
    options.never_capture = True        # only whether it matches is asked
    options.max_mem = RE2_MAX_MEM
    return options


def _as_re2_escape(match: re.Match) -> str:
    return rf"\x{{{match[1]}}}" if match[1] else match[0]


def _is_re2_pattern(instance: Any) -> bool:
    if isinstance(instance, str):
        compile_pattern(instance)
    return True


# The meta-schema marks `pattern` values and `patternProperties` keys as format "regex":
# checked with RE2, they are refused when the schema is checked, before any output is.
RE2_FORMAT_CHECKER = FormatChecker(Draft202012Validator.FORMAT_CHECKER.checkers)
RE2_FORMAT_CHECKER.checks("regex", raises=UnsupportedPattern)(_is_re2_pattern)


# --- keywords that run a schema's regexes (jsonschema's own, with RE2 in place of `re`) -----------

def _pattern(validator, pattern: str, instance: Any, schema: dict) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not pattern_matches(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator, patterns: dict, instance: Any, schema: dict) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if pattern_matches(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator, additional: Any, instance: Any, schema: dict) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    extras = sorted(key for key in instance if not _declared(key, schema))
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        if "patternProperties" in schema:
            verb = "does" if len(extras) == 1 else "do"
            patterns = ", ".join(repr(pattern) for pattern in sorted(schema["patternProperties"]))
            yield ValidationError(f"{_listed(extras)} {verb} not match any of the regexes: {patterns}")
        else:
            yield ValidationError(f"Additional properties are not allowed ({_listed(extras)} "
                                  f"{_was_or_were(extras)} unexpected)")


def _unevaluated_properties(validator, unevaluated: Any, instance: Any, schema: dict) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    evaluated = _evaluated_keys(validator, instance, schema)
    failing = [key for key in instance if key not in evaluated
               and not _valid(validator.descend(instance[key], unevaluated, path=key, schema_path=key))]
    if failing and unevaluated is False:
        failing.sort()
        yield ValidationError(f"Unevaluated properties are not allowed ({_listed(failing)} "
                              f"{_was_or_were(failing)} unexpected)")
    elif failing:
        yield ValidationError(f"Unevaluated properties are not valid under the given schema "
                              f"({_listed(failing)} {_was_or_were(failing)} unevaluated and invalid)")


def _declared(key: str, schema: dict) -> bool:
    return key in schema.get("properties", {}) or any(
        pattern_matches(pattern, key) for pattern in schema.get("patternProperties", {}))


def _evaluated_keys(validator, instance: dict, schema: Any) -> set[str]:
    """The keys of `instance` that `schema` evaluates (jsonschema's find_evaluated_property_keys_by_schema)."""
    if validator.is_type(schema, "boolean"):
        return set()
    keys = _evaluated_by_references(validator, instance, schema)
    if validator.is_type(properties := schema.get("properties"), "object"):
        keys |= properties.keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if (subschema := schema.get(keyword)) is not None:
            keys |= {key for key, value in instance.items() if _valid(validator.descend(value, subschema))}
    patterns = schema.get("patternProperties", {})
    keys |= {key for key in instance if any(pattern_matches(pattern, key) for pattern in patterns)}
    for key, subschema in schema.get("dependentSchemas", {}).items():
        if key in instance:
            keys |= _evaluated_keys(validator, instance, subschema)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, []):
            if _valid(validator.descend(instance, subschema)):
                keys |= _evaluated_keys(validator, instance, subschema)
    return keys | _evaluated_by_conditional(validator, instance, schema)


def _evaluated_by_references(validator, instance: dict, schema: dict) -> set[str]:
    keys = set()
    for keyword in ("$ref", "$dynamicRef"):
        if (reference := schema.get(keyword)) is not None:
            resolved = validator._resolver.lookup(reference)
            target = validator.evolve(schema=resolved.contents, _resolver=resolved.resolver)
            keys |= _evaluated_keys(target, instance, resolved.contents)
    return keys


def _evaluated_by_conditional(validator, instance: dict, schema: dict) -> set[str]:
    if "if" not in schema:
        return set()
    if validator.evolve(schema=schema["if"]).is_valid(instance):
        keys = _evaluated_keys(validator, instance, schema["if"])
        return keys | (_evaluated_keys(validator, instance, schema["then"]) if "then" in schema else set())
    return _evaluated_keys(validator, instance, schema["else"]) if "else" in schema else set()


def _valid(errors: Iterator[ValidationError]) -> bool:
    return next(errors, None) is None


def _listed(keys: list[str]) -> str:
    return ", ".join(repr(key) for key in keys)


def _was_or_were(keys: list[str]) -> str:
    return "was" if len(keys) == 1 else "were"


_stock_multiple_of = Draft202012Validator.VALIDATORS["multipleOf"]


def _multiple_of(validator, multiple: Any, instance: Any, schema: dict) -> Iterator[ValidationError]:
    """jsonschema's multipleOf, exact where a float meets an integer too large for one (a model can
    write a 400-digit number): jsonschema raises OverflowError there."""
    try:
        yield from _stock_multiple_of(validator, multiple, instance, schema)
    except OverflowError:
        if (Fraction(instance) / Fraction(multiple)).denominator != 1:
            yield ValidationError(f"{instance!r} is not a multiple of {multiple}")


Re2Validator = validators.extend(Draft202012Validator, {
    "multipleOf": _multiple_of,
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "unevaluatedProperties": _unevaluated_properties,
})

_evolve_by_dialect = Re2Validator.evolve


def _evolve_on_re2(self, **changes):
    # jsonschema picks the validator class of a subschema (or $ref target) from its $schema, and
    # every stock class runs regexes on `re`: ignoring $schema keeps the whole schema on RE2.
    schema = changes.get("schema", self.schema)
    if isinstance(schema, dict) and "$schema" in schema:
        changes["schema"] = {keyword: value for keyword, value in schema.items() if keyword != "$schema"}
    return _evolve_by_dialect(self, **changes)


Re2Validator.evolve = _evolve_on_re2
