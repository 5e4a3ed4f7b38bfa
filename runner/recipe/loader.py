"""YAML in and out, bounded: a recipe file (or an override's value) read safely into plain values, and a resolved
recipe written back as YAML that reads the same.

A recipe is a few hundred values a few levels deep; the bounds here make a hostile file fail in a moment instead of
taking the machine (aliases that repeat themselves inside each other expand exponentially). Numbers written with an
exponent and no dot (``1e-4``) are numbers, as YAML 1.2 and people read them.

The small wording helpers at the bottom (``_show``, ``_kind``, ``_fmt``) are shared by the recipe package's modules.
"""

from __future__ import annotations

import math
import re
import reprlib
from pathlib import Path

import yaml

from runner.common.errors import RecipeError, short

MAX_FILE_BYTES = 1_000_000
MAX_DEPTH = 40
MAX_VALUES = 50_000
MAX_INT = 2**63 - 1

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
# YAML 1.1 as text. The recipe loader reads them as Exponent numbers, the dumper quotes text that looks like one.
_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_EXPONENT_TAG = "tag:qlora-recipes,2024:exponent"
_NUMBER_STARTS = list("-+0123456789.")


class Exponent(float):
    """A number written with an exponent and no dot. It keeps the text it was written as: YAML 1.1 read that as
    text, so a key whose schema wants text (``name: 1e3``) gets it back (see validation.settle_exponents)."""

    text: str


def _construct_exponent(loader, node) -> Exponent:
    value = Exponent(loader.construct_yaml_float(node))
    value.text = node.value
    return value


_Loader.add_implicit_resolver(_EXPONENT_TAG, _EXPONENT, _NUMBER_STARTS)
_Loader.add_constructor(_EXPONENT_TAG, _construct_exponent)


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper, quoting the text that the recipe loader would read as a number (``'1e3'``)."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, _NUMBER_STARTS)


def dump(recipe: dict) -> str:
    """The recipe as YAML that the recipe loader reads back to the same values."""
    return yaml.dump(recipe, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


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


def read_yaml(path: Path) -> dict:
    """A recipe file's top-level mapping, read within MAX_FILE_BYTES and parsed by parse_yaml."""
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


# ---------------------------------------------------------------- values and key paths in words

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel, _repr.maxlist, _repr.maxdict = 60, 60, 2, 4, 4


def _show(value) -> str:
    """``repr(value)`` bounded to a few dozen characters, whatever ``value`` holds."""
    try:
        return _repr.repr(value)
    except (ValueError, RecursionError):
        return f"<{_kind(value)}>"


def _kind(value) -> str:
    """What a value is, in YAML's words: mapping and list, not dict and array."""
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _fmt(path) -> str:
    """A key path as the recipe writes it: ["evaluation", "evaluators", 0, "name"] -> evaluation.evaluators[0].name."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
