"""A schema error in the recipe's words: jsonschema's first complaint becomes one RecipeError naming the key path,
what is wrong in YAML's terms (list, mapping, true/false) and a hint (the key's description, a did-you-mean, the
allowed values)."""

from __future__ import annotations

import difflib
import re

from runner.common.errors import RecipeError, clip, short
from runner.recipe.loader import _fmt, _kind, _show
from runner.recipe.validation import branches, schema


def to_recipe_error(error, raw: dict, of_recipe: bool = True) -> RecipeError:
    """The RecipeError for one of jsonschema's errors on ``raw``: a recipe (``of_recipe``), or an evaluator's keys
    checked against its params_schema (whose top is not the recipe's)."""
    if error.context:  # oneOf / anyOf: report the branch that got furthest
        deepest = max(error.context, key=lambda e: len(e.absolute_path))
        if len(deepest.absolute_path) > len(error.absolute_path):
            return to_recipe_error(deepest, raw, of_recipe)
    path = list(error.absolute_path)
    where = _fmt(path) or "recipe"
    kind, value, sch = error.validator, error.instance, error.schema
    if kind == "additionalProperties":
        allowed = sorted(sch.get("properties", {}))
        key = sorted(set(value) - set(allowed))[0]
        return RecipeError(_fmt([*path, key]), "unknown key", _unknown_key_hint(key, allowed, top=of_recipe and not path))
    if kind == "required":
        missing = [k for k in error.validator_value if k not in value][0]
        desc = sch.get("properties", {}).get(missing, {}).get("description", "")
        return RecipeError(_fmt([*path, missing]), "missing required key", _first_sentence(desc) or "add it")
    if kind == "type":
        want = error.validator_value
        # in the words _kind uses for what was given (YAML's): list and mapping, not JSON Schema's array and object
        want = " or ".join(_YAML_KINDS.get(w, w) for w in (want if isinstance(want, list) else [want]))
        return RecipeError(where, f"expected {want}, got {_kind(value)} {_show(value)}",
                           _list_hint(value, sch, _describe(sch)))
    if kind == "enum":
        # As YAML writes them: true/false, not Python's True/False.
        names = [str(v).lower() if isinstance(v, bool) else str(v) for v in error.validator_value]
        close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"one of: {', '.join(names)}"
        return RecipeError(where, f"{_show(value)} is not allowed", hint)
    if kind == "const":
        return RecipeError(where, f"{_show(value)} is not allowed", f"expected {error.validator_value!r}")
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        return RecipeError(where, f"{_show(value)} is out of range", f"must be {op} {error.validator_value}")
    if kind in ("minLength", "minItems", "minProperties"):
        return RecipeError(where, "must not be empty", _describe(sch))
    if kind == "uniqueItems":
        return RecipeError(where, "has duplicate items", "list each item once")
    if kind == "pattern":
        return _pattern_error(where, value, error.validator_value, sch)
    if kind == "oneOf":
        return RecipeError(where, f"{_show(value)} does not fit", _list_hint(value, sch, _describe(sch)))
    return RecipeError(where, short(error.message, 200), _describe(sch))


def _unknown_key_hint(key: str, allowed: list[str], top: bool) -> str:
    """A key written at the top that belongs in a section (``max_steps=5``): the section's key path; else the
    closest allowed name, else the allowed names."""
    sections = sections_with(key) if top else []
    if sections:
        paths = [f"{section}.{key}" for section in sections]
        return f"did you mean {' or '.join([', '.join(paths[:-1]), paths[-1]] if len(paths) > 1 else paths)}?"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"


def sections_with(key: str) -> list[str]:
    """The top-level sections (model, training, ...) that have a key named ``key``, in the schema's order."""
    return [name for name, sch in schema()["properties"].items()
            if any(key in b.get("properties", {}) for b in branches(sch))]


def _list_hint(value, sch: dict, hint: str | None) -> str | None:
    """A list key given text (``lora.target_modules=q_proj,v_proj``): the hint shows it written as a list."""
    kinds = [b.get("type") for b in branches(sch)]
    if not isinstance(value, str) or not any(k == "array" or (isinstance(k, list) and "array" in k) for k in kinds):
        return hint
    items = clip(",".join(v.strip() for v in value.split(",") if v.strip()), 80) or "..."  # a head...tail of it
    return f"{hint}; a list is written in brackets: [{items}]" if hint else f"a list is written in brackets: [{items}]"


# The schema's patterns are names: one character of a class, then any of another, ^[first][rest]*$.
_NAME_PATTERN = re.compile(r"\^\[([^\]]+)\]\[([^\]]+)\]\*\$")


def _pattern_error(where: str, value: str, pattern: str, sch: dict) -> RecipeError:
    """A name the schema's pattern refuses: which character is wrong and what is allowed."""
    m = _NAME_PATTERN.fullmatch(pattern)
    if m is None:
        return RecipeError(where, f"{_show(value)} does not match {pattern}", _describe(sch))
    first, rest = m.groups()
    if not re.fullmatch(f"[{first}]", value[:1]):  # '..', '.hidden': the description says why that matters
        return RecipeError(where, f"{_show(value)} must start with {_characters(first, one=True)}", _describe(sch))
    bad = next(ch for ch in value if not re.fullmatch(f"[{rest}]", ch))
    return RecipeError(where, f"{_show(value)} has a character that is not allowed: {bad!r}",
                       f"use {_characters(rest)}")


def _characters(char_class: str, one: bool = False) -> str:
    """A regex character class in words: ``A-Za-z0-9._-`` -> "letters, digits, '.', '_' and '-'" (``one``: "a
    letter or ...")."""
    words = []
    for span, word in (("A-Za-z", "letter"), ("0-9", "digit")):
        if span in char_class:
            words.append(word if one else f"{word}s")
            char_class = char_class.replace(span, "")
    words += [repr(ch) for ch in char_class]
    if one:
        return "a " + " or ".join(words)
    return f"{', '.join(words[:-1])} and {words[-1]}" if len(words) > 1 else words[0]


_YAML_KINDS = {"array": "list", "object": "mapping"}


def _describe(sch: dict) -> str | None:
    """The first sentence of the key's schema description, as a hint."""
    desc = sch.get("description")
    return _first_sentence(desc) if desc else None


_ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "cf")


def _first_sentence(text: str) -> str:
    """``text`` up to its first full stop that ends a sentence: not one of an abbreviation (e.g.) nor one inside
    brackets, so the hint is never cut mid-example."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "." and depth == 0 and text[i + 1:i + 2] in ("", " ") and not text[:i].endswith(_ABBREVIATIONS):
            return text[:i]
    return text
