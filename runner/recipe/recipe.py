"""Recipes: load YAML safely, follow ``extends:``, apply ``key.path=value`` overrides, validate, fill defaults.

Nothing here imports torch or transformers: ``runner validate`` must answer in well under a second.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import json
import math
import re
import reprlib
import sys
from pathlib import Path
from typing import Any

import yaml

from evaluators import BUILTINS, builtin
from evaluators.base import Evaluator, declaration_problem
from runner.common.errors import RecipeError, short
from runner.data import chat, mixture
from runner.evaluate import backend
from runner.recipe.templates import template_fields

SCHEMA_PATH = Path(__file__).parent / "schema" / "recipe.schema.json"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Keys whose relative paths are resolved against the file (or, for overrides, the directory) that set them.
PATH_KEYS = (("model", "name_or_path"), ("model", "tokenizer"), ("data", "source"))
# Bounds on what a recipe may be, so a hostile file fails in a moment instead of taking the machine: a recipe is a
# few hundred values a few levels deep; aliases that repeat themselves inside each other expand exponentially.
MAX_FILE_BYTES = 1_000_000
MAX_DEPTH = 40
MAX_VALUES = 50_000
MAX_INT = 2**63 - 1


@functools.cache
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


# ---------------------------------------------------------------- loading


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved recipe: inherited, overridden, validated, defaults filled, cross-checked."""
    path = Path(path)
    raw = _load_with_extends(path, chain=())
    for text in overrides:
        key_path, value = parse_override(text)
        if key_path[0] == "extends":  # read with the file, before any override applies: it would be ignored
            raise RecipeError("extends", "can only be written in the recipe file, not as an override",
                              "add extends: other_recipe.yaml at the top of the recipe file")
        if value is None and not _allows_null(tuple(key_path)):
            _remove_path(raw, key_path)  # as `key: null` in an extending recipe: the key's default applies
            continue
        if tuple(key_path[:2]) in PATH_KEYS:  # a path typed on the command line is relative to the shell's directory
            value = _fix_path(value, Path.cwd()) if len(key_path) == 3 else _fix_paths(value, Path.cwd())
        elif key_path[:2] == ["data", "sources"]:
            value = _fix_source_paths(value, key_path[2:], Path.cwd())
        _set_path(raw, key_path, value, text)
    raw.pop("extends", None)
    raw["extends"] = None
    check_values(raw)
    if not raw.get("name"):
        raw["name"] = path.name.split(".")[0]
    return validate(raw)


# libyaml's parser when PyYAML has it (a recipe parses in about a millisecond instead of several); the same
# bounds either way.
_BASE_LOADER = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


class _Loader(_BASE_LOADER):
    """A safe loader that refuses what a recipe never needs and a hostile file uses: keys that are not strings
    (``1: x``, ``on: x``) and repeated keys (YAML would silently keep the last one). Nesting depth is checked
    on the events before composing (see _check_depth)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges: its keys may be overridden by the ones written here
                line = key_node.start_mark.line + 1
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise _LoadProblem(f"line {line}: key {_show(key)} is not text",
                                       "recipe keys are names; quote it if it is meant as one")
                if key in seen:
                    raise _LoadProblem(f"line {line}: key {key!r} is repeated (first at line {seen[key]})",
                                       "keep one; YAML would silently use the last")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# Numbers written with an exponent and no dot (1e-4, 5E-3, 1e4): YAML 1.2 and people read them as numbers, PyYAML's
# YAML 1.1 as text. The recipe loader reads them as _Exponent numbers, the dumper quotes text that looks like one.
_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_EXPONENT_TAG = "tag:qlora-recipes,2024:exponent"
_NUMBER_STARTS = list("-+0123456789.")


class _Exponent(float):
    """A number written with an exponent and no dot. It keeps the text it was written as: YAML 1.1 read that as
    text, so a key whose schema wants text (``name: 1e3``) gets it back (see _settle_exponents)."""

    text: str


def _construct_exponent(loader, node) -> _Exponent:
    value = _Exponent(loader.construct_yaml_float(node))
    value.text = node.value
    return value


_Loader.add_implicit_resolver(_EXPONENT_TAG, _EXPONENT, _NUMBER_STARTS)
_Loader.add_constructor(_EXPONENT_TAG, _construct_exponent)


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper, quoting the text that the recipe loader would read as a number (``'1e3'``)."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, _NUMBER_STARTS)


class _LoadProblem(Exception):
    def __init__(self, problem: str, hint: str):
        super().__init__(problem)
        self.problem, self.hint = problem, hint


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before composing: the composer and everything after it recurse."""
    depth = 0
    for event in yaml.parse(text, Loader=_BASE_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _LoadProblem(f"nested deeper than {MAX_DEPTH} levels at line {event.start_mark.line + 1}",
                                   "a recipe is a few levels of sections; check the brackets and indentation")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml(text: str, where: str):
    """YAML text -> Python values, bounded (see _Loader, check_values); mistakes become a RecipeError at ``where``."""
    try:
        _check_depth(text)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a yaml safe loader
    except _LoadProblem as exc:
        raise RecipeError(where, exc.problem, exc.hint) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        if exc.context == "expected a single document in the stream" and mark:
            raise RecipeError(where, f"a second YAML document starts at line {mark.line + 1}",
                              "a recipe is one YAML document: remove that '---' line and merge or drop what "
                              "follows; to build on another recipe, use extends") from None
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise RecipeError(where, f"YAML syntax error at {at}: {short(exc.problem, 150)}",
                          "fix the indentation or quoting there") from None
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as exc:
        raise RecipeError(where, f"not readable as YAML: {short(exc, 150)}", "save it as UTF-8 YAML") from None
    check_values(data, where)
    return data


def not_a_file(path: Path) -> str | None:
    """What ``path`` is when it is not a file to read (None when it is one)."""
    if path.is_file():
        return None
    if path.is_dir():
        return "is a directory, not a file"
    return "is not a regular file (a device, pipe or socket)" if path.exists() else "not found"


def _read_yaml(path: Path) -> dict:
    problem = not_a_file(path)
    if problem == "not found":
        raise RecipeError(str(path), "recipe file not found", "check the path")
    if problem:
        raise RecipeError(str(path), f"the recipe path {problem}", "give the recipe's YAML file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(str(path), f"cannot read the recipe: {exc.strerror}", "check the path and permissions") from None
    if len(raw) > MAX_FILE_BYTES:
        raise RecipeError(str(path), f"recipe file is larger than {MAX_FILE_BYTES // 1000} kB",
                          "a recipe is a page of YAML; data goes in data.source files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(str(path), f"not UTF-8 text (byte {exc.start})", "save it as UTF-8 YAML") from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise RecipeError(str(path), "recipe file is empty", "add at least model, data and prompt")
    if not isinstance(data, dict):
        raise RecipeError(str(path), f"a recipe is a mapping of keys, got {_kind(data)}",
                          "write key: value lines at the top level")
    return data


def check_values(data, where: str = "") -> None:
    """Refuse what YAML can express but a recipe must not hold: values that refer to themselves, aliases that
    expand past MAX_VALUES values, numbers that are NaN or infinite or too large. Shared (aliased) values are
    counted as often as they are used, without expanding them."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (values, height) of a container already walked
    active: set[int] = set()

    def walk(value, path: list) -> tuple[int, int]:
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(_fmt(path) or where, f"{value} is not a finite number",
                              "write a number, e.g. 2.0e-4")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise RecipeError(_fmt(path) or where, "the number is too large", f"at most {MAX_INT}")
        if not isinstance(value, (dict, list, tuple, set, frozenset)):
            return 1, 0
        key = id(value)
        if key not in sizes:
            if key in active:
                raise RecipeError(_fmt(path) or where, "refers to itself (a YAML alias inside its own anchor)",
                                  "write the value out")
            if len(path) > 2 * MAX_DEPTH:  # aliases nest anchors inside each other past what the text shows
                raise RecipeError(_fmt(path[:3]) or where, f"nested deeper than {2 * MAX_DEPTH} levels",
                                  "YAML aliases inside each other? write the values out")
            active.add(key)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            total, height = 1, 0
            for k, item in items:
                size, below = walk(item, [*path, k if isinstance(value, dict) else int(k)])
                total, height = total + size, max(height, below + 1)
                if total > MAX_VALUES:
                    raise RecipeError(_fmt(path) or where, f"expands to more than {MAX_VALUES:,} values",
                                      "YAML aliases repeated inside each other? write the values out")
            active.discard(key)
            sizes[key] = (total, height)
        total, height = sizes[key]
        if len(path) + height > 2 * MAX_DEPTH:
            raise RecipeError(_fmt(path[:3]) or where, f"nested deeper than {2 * MAX_DEPTH} levels",
                              "YAML aliases inside each other? write the values out")
        return total, height

    walk(data, [])


_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel, _repr.maxlist, _repr.maxdict = 60, 60, 2, 4, 4


def _show(value) -> str:
    """``repr(value)`` bounded to a few dozen characters, whatever ``value`` holds."""
    try:
        return _repr.repr(value)
    except (ValueError, RecursionError):
        return f"<{_kind(value)}>"


def _load_with_extends(path: Path, chain: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise RecipeError("extends", f"recipes extend each other in a cycle: {cycle}", "remove one extends")
    data = _absolutize(_read_yaml(path), path.parent)
    parent = data.get("extends")
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError("extends", f"expected a file path, got {parent!r}", "write extends: other_recipe.yaml")
    parent_path = Path(parent).expanduser()
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    problem = not_a_file(parent_path)
    if problem:
        what = f"file not found: {parent_path}" if problem == "not found" else f"{parent_path} {problem}"
        raise RecipeError("extends", what, "paths are relative to the extending recipe")
    base = _load_with_extends(parent_path, (*chain, path))
    base.pop("name", None)  # a name belongs to the file that sets it, not to recipes extending it
    return deep_merge(base, data)


# Values that an extending recipe replaces as a whole rather than key by key: the files of one dataset
# ({train, eval, test}) are one choice; keeping a parent's eval file beside a child's train file mixes datasets.
REPLACED_WHOLE = (("data", "source"),)


def deep_merge(base: dict, top: dict, path: tuple = ()) -> dict:
    """Mappings merge key by key (except REPLACED_WHOLE); anything else in ``top`` replaces what ``base`` had.
    ``key: null`` in ``top`` removes the key, where null is not itself a value of the key (``data.splits.eval:
    null`` means "no eval split" and is kept): the key is then as if never written, its default applies."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        here = (*path, key)
        if value is None and not _allows_null(here):
            out.pop(key, None)
        elif isinstance(value, dict):  # merged into what it inherits, or (nulls read as above) replacing it
            merge_into = isinstance(out.get(key), dict) and here not in REPLACED_WHOLE
            out[key] = deep_merge(out[key] if merge_into else {}, value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _allows_null(path: tuple) -> bool:
    """Whether the schema accepts null at ``path`` (True for a key it does not know: validation names it)."""
    node = schema()
    for key in path:
        node = _resolve_ref(node)
        branches = [node, *node.get("oneOf", []), *node.get("anyOf", [])]
        found = [b["properties"][key] for b in branches if key in b.get("properties", {})]
        if not found:
            return True
        node = found[0]
    return _null_ok(_resolve_ref(node))


def _null_ok(node: dict) -> bool:
    kinds = node.get("type", [])
    if "null" in (kinds if isinstance(kinds, list) else [kinds]) or None in node.get("enum", []):
        return True
    if "const" in node and node["const"] is None:
        return True
    return any(_null_ok(_resolve_ref(b)) for b in [*node.get("oneOf", []), *node.get("anyOf", [])])


def is_local_path(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~")) or value.lower().endswith(DATA_SUFFIXES)


def _fix_path(value, base_dir: Path):
    if isinstance(value, str) and is_local_path(value):
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base_dir / p).resolve())
    return value


def _fix_paths(value, base_dir: Path):
    if isinstance(value, dict):
        return {k: _fix_path(v, base_dir) for k, v in value.items()}
    return _fix_path(value, base_dir)


def _absolutize(data: dict, base_dir: Path) -> dict:
    """Make relative local paths absolute, so the resolved recipe loads from anywhere."""
    for section, key in PATH_KEYS:
        block = data.get(section)
        if isinstance(block, dict) and key in block:
            block[key] = _fix_paths(block[key], base_dir)
    if isinstance(data.get("data"), dict) and "sources" in data["data"]:
        data["data"]["sources"] = _fix_source_paths(data["data"]["sources"], [], base_dir)
    return data


def _fix_source_paths(value, below: list, base_dir: Path):
    """data.sources (or the part of it at ``below``: [i], [i, "source"], [i, "source", role]) with relative local
    paths made absolute."""
    if not below:
        return [_fix_source_paths(v, [0], base_dir) for v in value] if isinstance(value, list) else value
    if len(below) == 1:
        if isinstance(value, dict) and "source" in value:
            return {**value, "source": _fix_paths(value["source"], base_dir)}
        return value
    if below[1] != "source":
        return value
    return _fix_paths(value, base_dir) if len(below) == 2 else _fix_path(value, base_dir)


# ---------------------------------------------------------------- overrides

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")


def parse_override(text: str) -> tuple[list, Any]:
    """``training.max_steps=5`` -> (["training", "max_steps"], 5); values are parsed as YAML."""
    if "=" not in text:
        raise RecipeError(text, "an override must look like key.path=value", "e.g. training.max_steps=5")
    key, _, value_text = text.partition("=")
    path: list = []
    for part in key.strip().split("."):
        m = _SEGMENT.fullmatch(part)
        if not m:
            raise RecipeError(key, f"bad key path segment {part!r}", "use dotted names and [i] for list items")
        path.append(m.group(1))
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    try:
        value = parse_yaml(value_text, key) if value_text.strip() else ""
    except RecipeError as exc:
        if not exc.problem.startswith(("YAML syntax", "not readable", "a second YAML document")):
            raise  # bounded-value problems (NaN, nesting, repeated keys) are mistakes, not plain strings
        value = value_text  # not YAML: take it as a plain string
    return path, value


def _set_path(data: dict, path: list, value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(path):
        here = _fmt(path[: i + 1])
        if isinstance(part, int) and not isinstance(node, list):
            raise RecipeError(here, f"{_fmt(path[:i]) or 'the recipe'} is {_article(node)}, not a list",
                              f"override {short(text, 80)!r} indexes into it with [{part}]")
        if isinstance(part, str) and not isinstance(node, dict):
            raise RecipeError(here, f"{_fmt(path[:i])} is {_article(node)}, not a section",
                              f"use [i] for list items, e.g. {_fmt(path[:i])}[0].{part}" if isinstance(node, list)
                              else f"cannot set {short(text, 80)!r} inside it")
        if isinstance(part, int) and part >= len(node):
            raise RecipeError(here, "no such list item",
                              f"the list has {len(node)} item(s); override {short(text, 80)!r} indexes past it")
        if i == len(path) - 1:
            node[part] = value
            return
        if isinstance(node, dict) and node.get(part) is None:
            node[part] = [] if isinstance(path[i + 1], int) else {}
        node = node[part]


def _remove_path(data: dict, path: list) -> None:
    """The key at ``path`` removed; a section that is not there has nothing to remove (and is not made)."""
    node = data
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _article(value) -> str:
    kind = _kind(value)
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _fmt(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------- validation


@functools.cache
def _validator_class():
    """JSON Schema 2020-12, except that an integer is an integer: the standard accepts 5.0, which Python code
    given it (range, tensor shapes) does not."""
    from jsonschema import Draft202012Validator, validators

    def is_integer(_checker, value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", is_integer)
    return validators.extend(Draft202012Validator, type_checker=checker)


def validate(raw: dict) -> dict:
    """Check ``raw`` against the schema, fill defaults, run cross-checks; return the resolved recipe."""
    validator = _validator_class()(schema())
    _settle_exponents(raw, validator)
    errors = sorted(validator.iter_errors(raw), key=_error_rank)
    if errors:
        raise _to_recipe_error(errors[0], raw)
    resolved = copy.deepcopy(raw)
    _fill_defaults(resolved, schema(), validator)
    _check_evaluator_params(resolved)
    cross_check(resolved)
    return resolved


def _settle_exponents(raw: dict, validator) -> None:
    """Every _Exponent in ``raw`` becomes a plain float, or its text where the schema wants text and no number
    (what YAML 1.1 gave such a key before exponents were numbers)."""
    found = list(_exponents(raw, []))
    if not found:
        return
    wants_text = {tuple(e.absolute_path) for e in _all_errors(validator.iter_errors(raw))
                  if e.validator == "type" and isinstance(e.instance, _Exponent) and _text_only(e.validator_value)}
    for path, value in found:
        parent = raw
        for part in path[:-1]:
            parent = parent[part]
        parent[path[-1]] = value.text if tuple(path) in wants_text else float(value)


def _exponents(value, path: list):
    """(path, value) of each _Exponent under ``value``."""
    if isinstance(value, _Exponent):
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


def _error_rank(error) -> tuple:
    # Report what the user most likely got wrong first: unknown keys, then the deepest, most specific error.
    first = 0 if error.validator == "additionalProperties" else 1
    return (first, -len(error.absolute_path), str(list(error.absolute_path)))


def _to_recipe_error(error, raw: dict) -> RecipeError:
    if error.context:  # oneOf / anyOf: report the branch that got furthest
        deepest = max(error.context, key=lambda e: len(e.absolute_path))
        if len(deepest.absolute_path) > len(error.absolute_path):
            return _to_recipe_error(deepest, raw)
    path = list(error.absolute_path)
    where = _fmt(path) or "recipe"
    kind, value, sch = error.validator, error.instance, error.schema
    if kind == "additionalProperties":
        allowed = sorted(sch.get("properties", {}))
        extra = sorted(set(value) - set(allowed))
        key = extra[0]
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
        return RecipeError(_fmt([*path, key]), "unknown key", hint)
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
        allowed = ", ".join(names)
        close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"one of: {allowed}"
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


def _kind(value) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


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


def _list_hint(value, sch: dict, hint: str | None) -> str | None:
    """A list key given text (``lora.target_modules=q_proj,v_proj``): the hint shows it written as a list."""
    branches = [sch, *(_resolve_ref(b) for b in [*sch.get("oneOf", []), *sch.get("anyOf", [])])]
    kinds = [b.get("type") for b in branches]
    if not isinstance(value, str) or not any(k == "array" or (isinstance(k, list) and "array" in k) for k in kinds):
        return hint
    items = ",".join(v.strip() for v in value.split(",") if v.strip()) or "..."
    return f"{hint}; a list is written in brackets: [{items}]" if hint else f"a list is written in brackets: [{items}]"


def _resolve_ref(sch: dict) -> dict:
    while "$ref" in sch:
        node = schema()
        for part in sch["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        sch = {**node, **{k: v for k, v in sch.items() if k != "$ref"}}
    return sch


def _fill_defaults(instance, sch: dict, validator) -> None:
    sch = _resolve_ref(sch)
    for sub in sch.get("allOf", []):
        if "if" in sub and validator.evolve(schema=sub["if"]).is_valid(instance):
            _fill_defaults(instance, sub["then"], validator)
    if isinstance(instance, dict):
        for key, prop in sch.get("properties", {}).items():
            prop = _resolve_ref(prop)
            if key not in instance and "default" in prop:
                instance[key] = copy.deepcopy(prop["default"])
            if key in instance and instance[key] is not None:
                _fill_defaults(instance[key], prop, validator)
    elif isinstance(instance, list) and "items" in sch:
        for item in instance:
            _fill_defaults(item, sch["items"], validator)


def _check_evaluator_params(recipe: dict) -> None:
    """Each evaluator's keys against its class's ``params_schema`` (built-ins and a user's own alike), with the
    defaults filled in."""
    for i, (spec, cls) in enumerate(evaluator_classes(recipe)):
        check_declaration(cls, i, spec["name"])
        params_schema = getattr(cls, "params_schema", None)
        if params_schema is None:
            continue
        where = f"evaluation.evaluators[{i}].name"
        if not isinstance(params_schema, dict) or not isinstance(params_schema.get("properties", {}), dict):
            raise RecipeError(where, f"{spec['name']}.params_schema is not a JSON Schema mapping",
                              "give {'properties': {...}} or None")
        full = {"type": "object", "additionalProperties": False, **params_schema}
        full["properties"] = {**full.get("properties", {}), "name": {"type": "string"}}
        validator = _validator_class()(full)
        try:
            validator.check_schema(full)
            errors = sorted(validator.iter_errors(spec), key=_error_rank)
        except Exception as exc:  # jsonschema's SchemaError, or worse, from the user's schema
            raise RecipeError(where, f"{spec['name']}.params_schema is not a valid JSON Schema: {short(exc, 120)}",
                              "fix the class's params_schema") from None
        if errors:
            err = _to_recipe_error(errors[0], spec)
            raise RecipeError(f"evaluation.evaluators[{i}].{err.key_path}".rstrip("."), err.problem, err.hint)
        _fill_defaults(spec, full, validator)


def check_declaration(evaluator, i: int, name: str) -> None:
    """A one-line error at ``evaluation.evaluators[i]`` when the evaluator (or its class) declares its metrics,
    headline or baselines malformed (evaluators.base: the class at load, the built evaluator again)."""
    problem = declaration_problem(evaluator)
    if problem:
        raise RecipeError(f"evaluation.evaluators[{i}]", f"{name}'s metric declaration is malformed: {problem}",
                          "declare metrics = (Metric(name, better='higher' or 'lower', scale=...), ...) as "
                          "evaluators.base.Evaluator describes")


def evaluator_class(name: str, key_path: str) -> type[Evaluator]:
    """The class a recipe's evaluator name stands for: a built-in's (evaluators.BUILTINS), or a user's
    ``package.module:ClassName``."""
    if ":" in name:
        return import_evaluator(name, key_path)
    if name not in BUILTINS:
        close = difflib.get_close_matches(name, list(BUILTINS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? Or" if close else f"one of: {', '.join(BUILTINS)}; or"
        raise RecipeError(key_path, f"{_show(name)} is not allowed", f"{hint} give your own as package.module:ClassName")
    return builtin(name)


def evaluator_classes(recipe: dict) -> list[tuple[dict, type[Evaluator]]]:
    """(spec, class) of each of the recipe's evaluators, in order."""
    return [(spec, evaluator_class(spec["name"], f"evaluation.evaluators[{i}].name"))
            for i, spec in enumerate(recipe["evaluation"]["evaluators"])]


_EVALUATOR_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def import_evaluator(spec_name: str, key_path: str):
    """The class a recipe names as ``package.module:ClassName``. Importing it runs that module: a recipe naming
    one is trusted like a script. The working directory is searched after the installed packages, so a stray
    file there (a ``trl.py``) cannot take a library's place."""
    if not _EVALUATOR_REF.fullmatch(spec_name):
        raise RecipeError(key_path, f"{_show(spec_name)} is not a package.module:ClassName reference",
                          "e.g. myevals.length:LengthRatio, or a built-in name")
    module_name, _, class_name = spec_name.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # a user's evaluator lives beside their recipes
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RecipeError(key_path, f"cannot import {module_name!r}: {short(exc, 150)}",
                          "the module must be importable from the working directory") from None
    except (Exception, SystemExit) as exc:  # the user's module failed while it ran
        raise RecipeError(key_path, f"importing {module_name!r} failed: {type(exc).__name__}: {short(exc, 150)}",
                          "fix that module; it runs when the recipe is loaded") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise RecipeError(key_path, f"{module_name!r} has no {class_name!r}", "check the class name after ':'")
    if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
        what = "a class but not an Evaluator" if isinstance(cls, type) else f"a {type(cls).__name__}, not a class"
        raise RecipeError(key_path, f"{spec_name} is {what}",
                          "name a class that subclasses evaluators.base.Evaluator")
    return cls


# ---------------------------------------------------------------- cross-checks


def cross_check(recipe: dict) -> None:
    """Checks across keys that a schema cannot express."""
    prompt, data, training = recipe["prompt"], recipe["data"], recipe["training"]
    chat.check_recipe(recipe)  # prompt.messages (chat data) or template + completion, and the chat template
    completion_fields = None  # chat data: each label is the last assistant turn's content, no completion template
    if not chat.is_chat(recipe):
        fields = template_fields(prompt["template"], "prompt.template")
        completion_fields = template_fields(prompt["completion"], "prompt.completion")
        if not prompt["completion"].strip():
            raise RecipeError("prompt.completion", "is empty", "the completion is what the model learns to write")
        if not completion_fields:
            raise RecipeError("prompt.completion", "uses no dataset field",
                              "reference the target column, e.g. ' {summary}'")
        if prompt["truncate"] is not None and prompt["truncate"] not in fields:
            raise RecipeError("prompt.truncate", f"{prompt['truncate']!r} is not a field of prompt.template",
                              f"template fields: {', '.join(fields) or 'none'}")
    mixture.check_recipe(recipe)  # data.source or data.sources, and each source's field mapping
    if recipe["quantization"]["method"] != "none" and recipe["lora"] is None:
        raise RecipeError("lora", "a quantized model cannot be fully fine-tuned",
                          "add a lora section or set quantization.method: none")
    splits = data["splits"]
    if isinstance(data.get("source"), dict):
        for role, name in splits.items():
            if name is not None and role not in data["source"] and not data["holdout"].get(role):
                splits[role] = None  # a {train, eval, test} source without this file: the role is unused
    role = recipe["evaluation"]["split"]
    if splits.get(role) is None and not data["holdout"].get(role):
        raise RecipeError("evaluation.split", f"evaluates the {role!r} split, but data.splits.{role} is null",
                          f"set data.splits.{role} or choose another evaluation.split")
    if training["eval_every"] is not None and splits["eval"] is None and not data["holdout"]["eval"]:
        raise RecipeError("training.eval_every", "needs an eval split, but data.splits.eval is null",
                          "set data.splits.eval, or training.eval_every: null")
    _check_early_stopping(training, splits["eval"] is not None or bool(data["holdout"]["eval"]))
    _check_lora_init(recipe)
    if data["max_tokens"] is not None and data["max_tokens"] > prompt["max_length"]:
        raise RecipeError("data.max_tokens", f"{data['max_tokens']} is larger than prompt.max_length "
                          f"{prompt['max_length']}", "examples are truncated to prompt.max_length first")
    for i, (spec, cls) in enumerate(evaluator_classes(recipe)):
        scored = spec.get("split") if "logprobs" in cls.needs else None
        if scored and splits.get(scored) is None and not data["holdout"].get(scored):
            raise RecipeError(f"evaluation.evaluators[{i}].split", f"scores the {scored!r} split, but "
                              f"data.splits.{scored} is null", f"set data.splits.{scored} or another split")
    _check_rank_mode(recipe, completion_fields)
    backend.check_recipe(recipe)  # what generation.backend needs (weights it can merge, no beams to compile)


def rank_labels(recipe: dict) -> list[str] | None:
    """The labels rank mode (``generation.mode: rank``) chooses from: ``generation.labels``, else the ``labels`` of
    the first evaluator whose completion is one label (``classification``)."""
    if recipe["generation"].get("labels"):
        return list(recipe["generation"]["labels"])
    for spec, cls in evaluator_classes(recipe):
        if cls.completion == "label" and spec.get("labels"):
            return list(spec["labels"])
    return None


def _check_rank_mode(recipe: dict, completion_fields: list[str] | None) -> None:
    """Rank mode puts each allowed label into the completion: it needs the labels and a one-field completion
    (``completion_fields`` None: chat data, whose completion is the label itself)."""
    if recipe["generation"].get("mode") != "rank":
        return
    if not rank_labels(recipe):
        raise RecipeError("generation.mode", "rank needs the allowed labels",
                          "set generation.labels: [...] or give the classification evaluator its labels")
    if completion_fields is not None and len(completion_fields) != 1:
        raise RecipeError("prompt.completion", f"rank mode puts each label into the completion, which must use "
                          f"exactly one field, found {len(completion_fields)}", "e.g. completion: \" {label}\"")


def _check_early_stopping(training: dict, has_eval: bool) -> None:
    """Early stopping decides at evaluations and restores a checkpoint: it needs both, at the same steps."""
    if training["early_stopping"] is None:
        return
    if not has_eval:
        raise RecipeError("training.early_stopping", "needs an eval split to evaluate on, but data.splits.eval is null",
                          "set data.splits.eval (or data.holdout.eval), or training.early_stopping: null")
    if training["save_every"] is not None and training["save_every"] != training["eval_every"]:
        raise RecipeError("training.save_every", f"is {training['save_every']}, but with training.early_stopping a "
                          f"checkpoint is saved at every evaluation (eval_every {training['eval_every']})",
                          "leave save_every null, or set it to eval_every")


def _check_lora_init(recipe: dict) -> None:
    """The LoRA inits that need particular weights (peft refuses the others, or computes nothing useful)."""
    lora, method = recipe["lora"], recipe["quantization"]["method"]
    if lora is None:
        return
    if lora["init"] == "pissa" and method != "none":
        raise RecipeError("lora.init", f"pissa decomposes the full-precision weights; peft refuses {method} ones",
                          "use quantization.method: none with pissa, or init: loftq for a 4-bit base")
    if lora["init"] == "pissa" and lora["dora"]:
        raise RecipeError("lora.init", "pissa with dora: peft cannot convert the trained adapter back to a plain "
                          "LoRA of the original weights", "use one of them")
    if lora["init"] == "loftq" and method != "bnb_4bit":
        raise RecipeError("lora.init", f"loftq fits the LoRA weights to the 4-bit quantization error; with {method} "
                          "there is none", "use quantization.method: bnb_4bit, or init: default / pissa")


def get(recipe: dict, key_path: str) -> Any:
    node = recipe
    for part in key_path.split("."):
        node = node[part]
    return node


def dump(recipe: dict) -> str:
    return yaml.dump(recipe, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
