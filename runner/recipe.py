"""Recipes: load YAML safely, follow ``extends:``, apply ``key.path=value`` overrides, validate, fill defaults.

Nothing here imports torch or transformers: ``runner validate`` must answer in well under a second.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import json
import re
import string
from pathlib import Path
from typing import Any

import yaml

from runner.errors import RecipeError

SCHEMA_PATH = Path(__file__).parent / "schema" / "recipe.schema.json"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Keys whose relative paths are resolved against the file (or, for overrides, the directory) that set them.
PATH_KEYS = (("model", "name_or_path"), ("model", "tokenizer"), ("data", "source"))


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
        if tuple(key_path[:2]) in PATH_KEYS:  # a path typed on the command line is relative to the shell's directory
            value = _fix_path(value, Path.cwd()) if len(key_path) == 3 else _fix_paths(value, Path.cwd())
        _set_path(raw, key_path, value, text)
    raw.pop("extends", None)
    raw["extends"] = None
    if not raw.get("name"):
        raw["name"] = path.name.split(".")[0]
    return validate(raw)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(str(path), "recipe file not found", "check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise RecipeError(str(path), f"YAML syntax error at {where}: {exc.problem}",
                          "fix the indentation or quoting there") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(str(path), f"not readable as YAML: {exc}", "save it as UTF-8 YAML") from None
    if data is None:
        raise RecipeError(str(path), "recipe file is empty", "add at least model, data and prompt")
    if not isinstance(data, dict):
        raise RecipeError(str(path), f"a recipe is a mapping of keys, got {type(data).__name__}",
                          "write key: value lines at the top level")
    return data


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
    if not parent_path.is_file():
        raise RecipeError("extends", f"file not found: {parent_path}", "paths are relative to the extending recipe")
    base = _load_with_extends(parent_path, (*chain, path))
    base.pop("name", None)  # a name belongs to the file that sets it, not to recipes extending it
    return deep_merge(base, data)


def deep_merge(base: dict, top: dict) -> dict:
    """Mappings merge key by key; anything else in ``top`` replaces what ``base`` had."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


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
    return data


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
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text  # not YAML: take it as a plain string
    return path, value


def _set_path(data: dict, path: list, value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(_fmt(path[: i + 1]), "no such list item", f"override {text!r} indexes past the list")
            node = node[part]
            continue
        if node.get(part) is None:
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise RecipeError(_fmt(path[: i + 1]), "is a value, not a section", f"cannot set {text!r} inside it")
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(_fmt(path), "no such list item", f"override {text!r} indexes past the list")
    node[last] = value


def _fmt(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------- validation


def validate(raw: dict) -> dict:
    """Check ``raw`` against the schema, fill defaults, run cross-checks; return the resolved recipe."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(raw), key=_error_rank)
    if errors:
        raise _to_recipe_error(errors[0], raw)
    resolved = copy.deepcopy(raw)
    _fill_defaults(resolved, schema(), validator)
    _check_evaluator_params(resolved)
    cross_check(resolved)
    return resolved


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
        return RecipeError(_fmt([*path, missing]), "missing required key", desc.split(".")[0] or "add it")
    if kind == "type":
        want = error.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return RecipeError(where, f"expected {want}, got {_kind(value)} {value!r}", _describe(sch))
    if kind == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value)
        close = difflib.get_close_matches(str(value), [str(v) for v in error.validator_value], n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"one of: {allowed}"
        if path and path[-1] == "name" and "evaluators" in path:
            hint += " Or give your own as package.module:ClassName"
        return RecipeError(where, f"{value!r} is not allowed", hint)
    if kind == "const":
        return RecipeError(where, f"{value!r} is not allowed", f"expected {error.validator_value!r}")
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        return RecipeError(where, f"{value!r} is out of range", f"must be {op} {error.validator_value}")
    if kind in ("minLength", "minItems", "minProperties"):
        return RecipeError(where, "must not be empty", _describe(sch))
    if kind == "uniqueItems":
        return RecipeError(where, "has duplicate items", "list each item once")
    if kind == "pattern":
        return RecipeError(where, f"{value!r} has characters that are not allowed",
                           "use letters, digits, '.', '_' and '-'")
    if kind == "oneOf":
        return RecipeError(where, f"{value!r} does not fit", _describe(sch))
    return RecipeError(where, error.message, _describe(sch))


def _kind(value) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _describe(sch: dict) -> str | None:
    desc = sch.get("description")
    return desc.split(". ")[0].rstrip(".") if desc else None


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
    """A user's evaluator class may declare ``params_schema``; check it here, like the built-ins."""
    from jsonschema import Draft202012Validator

    for i, spec in enumerate(recipe["evaluation"]["evaluators"]):
        if ":" not in spec["name"]:
            continue
        cls = import_evaluator(spec["name"], f"evaluation.evaluators[{i}].name")
        params_schema = getattr(cls, "params_schema", None)
        if params_schema is None:
            continue
        full = {"type": "object", "additionalProperties": False, **params_schema}
        full.setdefault("properties", {})["name"] = {"type": "string"}
        validator = Draft202012Validator(full)
        errors = sorted(validator.iter_errors(spec), key=_error_rank)
        if errors:
            err = _to_recipe_error(errors[0], spec)
            raise RecipeError(f"evaluation.evaluators[{i}].{err.key_path}".rstrip("."), err.problem, err.hint)
        _fill_defaults(spec, full, validator)


def import_evaluator(spec_name: str, key_path: str):
    import sys

    module_name, _, class_name = spec_name.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a user's evaluator lives beside their recipes
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(key_path, f"cannot import {module_name!r}: {exc}",
                          "the module must be importable from the working directory") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise RecipeError(key_path, f"{module_name!r} has no {class_name!r}", "check the class name after ':'")
    return cls


# ---------------------------------------------------------------- cross-checks


def template_fields(template: str, key_path: str) -> list[str]:
    """Field names used by a ``{field}`` template, in order of first use."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RecipeError(key_path, f"bad template: {exc}", "write {field} for a column and {{ }} for braces") from None
    fields = []
    for _, field, spec, conv in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise RecipeError(key_path, f"bad template field {{{field}}}",
                              "use a plain column name like {document}; {{ }} for literal braces")
        if spec or conv:
            raise RecipeError(key_path, f"template field {{{field}}} has a format spec or conversion",
                              "write plain {field}")
        if field not in fields:
            fields.append(field)
    return fields


def cross_check(recipe: dict) -> None:
    """Checks across keys that a schema cannot express."""
    prompt, data, training = recipe["prompt"], recipe["data"], recipe["training"]
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
    if recipe["quantization"]["method"] != "none" and recipe["lora"] is None:
        raise RecipeError("lora", "a quantized model cannot be fully fine-tuned",
                          "add a lora section or set quantization.method: none")
    splits = data["splits"]
    if isinstance(data["source"], dict):
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
    if data["max_tokens"] is not None and data["max_tokens"] > prompt["max_length"]:
        raise RecipeError("data.max_tokens", f"{data['max_tokens']} is larger than prompt.max_length "
                          f"{prompt['max_length']}", "examples are truncated to prompt.max_length first")
    for i, spec in enumerate(recipe["evaluation"]["evaluators"]):
        scored = spec.get("split") if spec["name"] == "loss" else None
        if scored and splits.get(scored) is None and not data["holdout"].get(scored):
            raise RecipeError(f"evaluation.evaluators[{i}].split", f"scores the {scored!r} split, but "
                              f"data.splits.{scored} is null", f"set data.splits.{scored} or another split")
    from runner.rank import check_recipe  # rank mode's needs (labels, a one-field completion)

    check_recipe(recipe)
    from runner import backend  # what generation.backend needs (weights it can merge, no beams to compile)

    backend.check_recipe(recipe)


def get(recipe: dict, key_path: str) -> Any:
    node = recipe
    for part in key_path.split("."):
        node = node[part]
    return node


def dump(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=100)
