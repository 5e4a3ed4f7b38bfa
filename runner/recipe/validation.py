"""The JSON Schema (schema/recipe.schema.json, the one place recipe keys are defined) as the recipe code uses it:
loaded once, ``$ref`` resolved, which keys accept null, the validator (integers are integers), the defaults it
fills in, and exponent numbers settled by what each key wants.

Nothing here changes the recipe it is given: settle_exponents returns a new one, fill_defaults fills the copy the
caller made for it.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

from runner.recipe.loader import Exponent

SCHEMA_PATH = Path(__file__).parent / "schema" / "recipe.schema.json"


@functools.cache
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def resolve_ref(sch: dict) -> dict:
    """``sch`` with its ``$ref`` (and theirs) replaced by what they point at in the schema."""
    while "$ref" in sch:
        node = schema()
        for part in sch["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        sch = {**node, **{k: v for k, v in sch.items() if k != "$ref"}}
    return sch


def branches(sch: dict) -> list[dict]:
    """``sch`` and each of its oneOf / anyOf alternatives (those resolved)."""
    return [sch, *(resolve_ref(b) for b in [*sch.get("oneOf", []), *sch.get("anyOf", [])])]


def allows_null(path: tuple) -> bool:
    """Whether the schema accepts null at ``path`` (True for a key it does not know: validation names it)."""
    node = schema()
    for key in path:
        node = resolve_ref(node)
        alternatives = [node, *node.get("oneOf", []), *node.get("anyOf", [])]
        found = [b["properties"][key] for b in alternatives if key in b.get("properties", {})]
        if not found:
            return True
        node = found[0]
    return _null_ok(resolve_ref(node))


def _null_ok(node: dict) -> bool:
    kinds = node.get("type", [])
    if "null" in (kinds if isinstance(kinds, list) else [kinds]) or None in node.get("enum", []):
        return True
    if "const" in node and node["const"] is None:
        return True
    return any(_null_ok(resolve_ref(b)) for b in [*node.get("oneOf", []), *node.get("anyOf", [])])


@functools.cache
def validator_class():
    """JSON Schema 2020-12, except that an integer is an integer: the standard accepts 5.0, which Python code
    given it (range, tensor shapes) does not."""
    from jsonschema import Draft202012Validator, validators

    def is_integer(_checker, value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", is_integer)
    return validators.extend(Draft202012Validator, type_checker=checker)


def error_rank(error) -> tuple:
    """Report what the user most likely got wrong first: unknown keys, then the deepest, most specific error."""
    first = 0 if error.validator == "additionalProperties" else 1
    return (first, -len(error.absolute_path), str(list(error.absolute_path)))


def fill_defaults(instance, sch: dict, validator) -> None:
    """Fill the schema's defaults into ``instance`` (the caller's own copy), section by section."""
    sch = resolve_ref(sch)
    for sub in sch.get("allOf", []):
        if "if" in sub and validator.evolve(schema=sub["if"]).is_valid(instance):
            fill_defaults(instance, sub["then"], validator)
    if isinstance(instance, dict):
        for key, prop in sch.get("properties", {}).items():
            prop = resolve_ref(prop)
            if key not in instance and "default" in prop:
                instance[key] = copy.deepcopy(prop["default"])
            if key in instance and instance[key] is not None:
                fill_defaults(instance[key], prop, validator)
    elif isinstance(instance, list) and "items" in sch:
        for item in instance:
            fill_defaults(item, sch["items"], validator)


# ---------------------------------------------------------------- exponent numbers


def settle_exponents(raw: dict, validator) -> dict:
    """``raw`` with every Exponent a plain float, or its text where the schema wants text and no number (what YAML
    1.1 gave such a key before exponents were numbers); ``raw`` itself when it has none."""
    found = list(_exponents(raw, []))
    if not found:
        return raw
    wants_text = {tuple(e.absolute_path) for e in _all_errors(validator.iter_errors(raw))
                  if e.validator == "type" and isinstance(e.instance, Exponent) and _text_only(e.validator_value)}
    out = copy.deepcopy(raw)
    for path, value in found:
        parent = out
        for part in path[:-1]:
            parent = parent[part]
        parent[path[-1]] = value.text if tuple(path) in wants_text else float(value)
    return out


def _exponents(value, path: list):
    """(path, value) of each Exponent under ``value``."""
    if isinstance(value, Exponent):
        yield path, value
    elif isinstance(value, (dict, list)):
        for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
            yield from _exponents(item, [*path, key])


def _all_errors(errors):
    """The errors and, inside oneOf / anyOf ones, each branch's."""
    for error in errors:
        yield error
        yield from _all_errors(error.context or ())


def _text_only(types) -> bool:
    types = types if isinstance(types, list) else [types]
    return "string" in types and not {"number", "integer"} & set(types)
