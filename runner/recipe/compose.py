"""A recipe put together before it is validated: the file and the ones it ``extends:`` merged (deep_merge), then the
command line's ``key.path=value`` overrides applied, with every relative local path made absolute against the file
(or, for an override, the directory) that wrote it."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from runner.common.errors import RecipeError, short
from runner.recipe.loader import _fmt, _kind, not_a_file, parse_yaml, read_yaml
from runner.recipe.validation import allows_null

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Keys whose relative paths are resolved against the file (or, for overrides, the directory) that set them.
PATH_KEYS = (("model", "name_or_path"), ("model", "tokenizer"), ("model", "adapter"), ("data", "source"))
# Values that an extending recipe replaces as a whole rather than key by key: the files of one dataset
# ({train, eval, test}) are one choice; keeping a parent's eval file beside a child's train file mixes datasets.
REPLACED_WHOLE = (("data", "source"),)


def compose(path: Path, overrides: list[str] | tuple[str, ...]) -> dict:
    """The recipe at ``path`` with what it extends merged in and ``overrides`` applied, not yet validated
    (``extends`` is then null: it has been followed)."""
    raw = _load_with_extends(path, chain=())
    for text in overrides:
        key_path, value = parse_override(text)
        if key_path[0] == "extends":  # read with the file, before any override applies: it would be ignored
            raise RecipeError("extends", "can only be written in the recipe file, not as an override",
                              "add extends: other_recipe.yaml at the top of the recipe file")
        if value is None and not allows_null(tuple(key_path)):
            _remove_path(raw, key_path)  # as `key: null` in an extending recipe: the key's default applies
            continue
        if tuple(key_path[:2]) in PATH_KEYS:  # a path typed on the command line is relative to the shell's directory
            value = _fix_path(value, Path.cwd()) if len(key_path) == 3 else _fix_paths(value, Path.cwd())
        elif key_path[:2] in (["data", "sources"], ["evaluation", "retention"]):  # a benchmark's source alike
            value = _fix_source_paths(value, key_path[2:], Path.cwd())
        _set_path(raw, key_path, value, text)
    raw.pop("extends", None)
    raw["extends"] = None
    return raw


# ---------------------------------------------------------------- extends


def _load_with_extends(path: Path, chain: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise RecipeError("extends", f"recipes extend each other in a cycle: {cycle}", "remove one extends")
    data = _absolutize(read_yaml(path), path.parent)
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


def deep_merge(base: dict, top: dict, path: tuple = ()) -> dict:
    """Mappings merge key by key (except REPLACED_WHOLE); anything else in ``top`` replaces what ``base`` had.
    ``key: null`` in ``top`` removes the key, where null is not itself a value of the key (``data.splits.eval:
    null`` means "no eval split" and is kept): the key is then as if never written, its default applies."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        here = (*path, key)
        if value is None and not allows_null(here):
            out.pop(key, None)
        elif isinstance(value, dict):  # merged into what it inherits, or (nulls read as above) replacing it
            merge_into = isinstance(out.get(key), dict) and here not in REPLACED_WHOLE
            out[key] = deep_merge(out[key] if merge_into else {}, value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ---------------------------------------------------------------- local paths


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
    if isinstance(data.get("evaluation"), dict) and "retention" in data["evaluation"]:
        data["evaluation"]["retention"] = _fix_source_paths(data["evaluation"]["retention"], [], base_dir)
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
# The longest key path a recipe has is a few dozen characters in under 8 parts (data.sources[0].source.train):
# a longer one is a mistake, refused before it is split, looked up or built into the recipe.
MAX_KEY_CHARS, MAX_KEY_PARTS = 200, 16


def parse_override(text: str) -> tuple[list, Any]:
    """``training.max_steps=5`` -> (["training", "max_steps"], 5); values are parsed as YAML."""
    if "=" not in text:
        raise RecipeError(text, "an override must look like key.path=value", "e.g. training.max_steps=5")
    key, _, value_text = text.partition("=")
    key = key.strip()
    path = key_path(key)
    try:
        value = parse_yaml(value_text, key) if value_text.strip() else ""
    except RecipeError as exc:
        if not exc.problem.startswith(("YAML syntax", "not readable", "a second YAML document")):
            # bounded-value problems (NaN, nesting, repeated keys) are mistakes, not plain strings; named by the
            # override's own key path, with the place inside its value after it
            raise RecipeError(_inside(key, exc.key_path), exc.problem, exc.hint) from None
        value = value_text  # not YAML: take it as a plain string
    return path, value


def key_path(key: str) -> list:
    """``data.sources[0].source`` -> ["data", "sources", 0, "source"], bounded in length and parts."""
    if len(key) > MAX_KEY_CHARS or key.count(".") + key.count("[") >= MAX_KEY_PARTS:
        raise RecipeError(key, f"the key path is {len(key):,} characters in {key.count('.') + 1:,} parts",
                          f"a recipe's key paths are at most {MAX_KEY_CHARS} characters in {MAX_KEY_PARTS} parts, "
                          "e.g. training.max_steps=5")
    path: list = []
    for part in key.split("."):
        m = _SEGMENT.fullmatch(part)
        if not m:
            raise RecipeError(key, f"bad key path segment {short(repr(part), 60)}",
                              "use dotted names and [i] for list items")
        path.append(m.group(1))
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return path


def _inside(key: str, where: str) -> str:
    """The key path of a place inside an override's value: ``training.x`` and ``[0][1]`` -> ``training.x[0][1]``
    (``where`` is the override's key itself when the problem is the value as a whole)."""
    if not where or where == key:
        return key
    return f"{key}{where}" if where.startswith("[") else f"{key}.{where}"


def check_repeated(overrides: list[str] | tuple[str, ...]) -> None:
    """The same key path given twice on one command line is a mistake, as a key repeated in a file is: one of the
    two would be dropped silently."""
    seen: dict[tuple, str] = {}
    for text in overrides:
        here = tuple(key_path(text.partition("=")[0].strip()))
        if here in seen:
            raise RecipeError(_fmt(here), f"is given twice on the command line: {short(seen[here], 60)!r}, then "
                              f"{short(text, 60)!r}", "give each key once; in a file a key is written once too")
        seen[here] = text


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
