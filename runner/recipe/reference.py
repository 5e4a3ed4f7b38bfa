"""docs/recipe-reference.md, written from the schema: every recipe key with its type, default and description, and
each built-in evaluator's keys (its ``params_schema``). The page is generated so that it cannot drift from the one
definition of the keys; ``make docs`` (``python -m runner.recipe.reference > docs/recipe-reference.md``) rewrites
it, and a test checks that the committed page is what this prints.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import yaml

from evaluators import BUILTINS, builtin

SCHEMA_PATH = Path(__file__).parent / "schema" / "recipe.schema.json"
PAGE = "docs/recipe-reference.md"

INTRO = """\
A recipe is one YAML file. `runner validate RECIPE --print` shows it with every default below filled in; unknown
keys are errors with a "did you mean" hint, and a wrong value is one line naming its key path, its hint often the
first sentence of the key's description below. Overrides on the command line use the same key paths:
`training.max_steps=5`, `lora.target_modules=[q_proj,v_proj]`, `evaluation.evaluators[1].count=4`. A worked
example of a whole recipe is [recipes/xsum_phi2.yaml](../recipes/xsum_phi2.yaml); how the keys are used is in the
other [docs](../README.md#documentation)."""


def _escape(text: str) -> str:
    """Text for a markdown table cell: no cell breaks, no HTML tags, no stray emphasis."""
    text = " ".join(str(text).split())
    for raw, safe in (("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*")):
        text = text.replace(raw, safe)
    return text


def _yaml(value) -> str:
    """A value as a recipe would write it (YAML flow style: null, true, [a, b], {k: v})."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def _code(value) -> str:
    if isinstance(value, str) and "\n" in value:  # a table cell is one line: the text as YAML writes it quoted
        return "`" + json.dumps(value).replace("|", "\\|") + "`"
    return "`" + _yaml(value).replace("|", "\\|") + "`"


def _bounds(node: dict) -> str:
    parts = [f"{op} {node[key]}" for key, op in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
                                                 ("exclusiveMaximum", "<")) if key in node]
    return f" ({', '.join(parts)})" if parts else ""


def _kind(node: dict, defs: dict, nested: bool = False) -> str:
    """What a key holds, in words: 'integer (≥ 1)', 'one of: `a`, `b`', 'list of text', 'mapping', ...
    ``nested``: an alternative of a oneOf, whose keys get no rows of their own, so they are named here."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return f"{name} (below)"
    if "oneOf" in node:
        alternatives = [_kind(alt, defs, nested=True) for alt in node["oneOf"]]
        return ("; or " if any(", " in alt for alt in alternatives) else " or ").join(alternatives)
    if "const" in node:
        return _code(node["const"])
    if "enum" in node:
        return "one of: " + ", ".join(_code(v) for v in node["enum"])
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    words = []
    for t in types:
        if t == "array":
            items = node.get("items", {})
            if "properties" in items:
                words.append("list of mappings (keys below)")
            elif "enum" in items:
                words.append("list of any of: " + ", ".join(_code(v) for v in items["enum"]))
            else:
                words.append(f"list of {_kind(items, defs) if items else 'values'}")
        elif t == "object":
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                words.append(f"mapping of names to {_kind(extra, defs)}")
            elif "properties" in node:
                keys = ", ".join(f"`{k}`" for k in node["properties"])
                words.append(f"mapping of {keys}" if nested else "mapping (keys below)")
            else:
                words.append("mapping")
        else:
            words.append({"string": "text", "boolean": "true or false"}.get(t, t))
    if "null" in types and len(words) > 1:  # 'null' reads best last
        words.remove("null")
        words.append("null")
    return " or ".join(words) + _bounds(node)


def _default(node: dict, required: bool) -> str:
    if "default" in node:
        return _code(node["default"])
    return "required" if required else "—"


def _rows(node: dict, path: str, defs: dict, required: bool = False) -> list[str]:
    """One table row for the key at ``path`` and one for each key below it (mappings and lists of mappings)."""
    rows = [f"| `{path}` | {_escape(_kind(node, defs))} | {_default(node, required)} | "
            f"{_escape(node.get('description', ''))} |"]
    below = node.get("items", {}) if "properties" not in node else node
    if "$ref" in below:  # a closed definition's keys are listed here (a benchmark's); an open one's elsewhere
        target = defs.get(below["$ref"].rsplit("/", 1)[-1], {})
        below = target if target.get("additionalProperties") is False else {}
    prefix = f"{path}[]" if below is not node else path
    for key, child in below.get("properties", {}).items():
        rows += _rows(child, f"{prefix}.{key}", defs, key in below.get("required", ()))
    return rows


TABLE_HEAD = ["| key | value | default | description |", "|---|---|---|---|"]


def _section(title: str, lines: list[str]) -> list[str]:
    return [f"## {title}", "", *lines, ""]


def _evaluators() -> list[str]:
    lines = ["Each item of `evaluation.evaluators` is a mapping with `name` and that evaluator's own keys, checked and "
             "filled with defaults by `runner validate`. Your own evaluator (`name: package.module:ClassName`) "
             "declares its keys the same way, in its `params_schema`: see [Evaluation](evaluation.md).", ""]
    for name in BUILTINS:
        cls = builtin(name)
        doc = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        lines += [f"### `{name}`", "", _escape(doc), "", *TABLE_HEAD, f"| `name` | `{name}` | required | |"]
        params = cls.params_schema or {}
        for key, child in params.get("properties", {}).items():
            lines += _rows(child, key, {}, key in params.get("required", ()))[:1]
        lines.append("")
    return lines


def page(schema: dict | None = None) -> str:
    """The whole reference page, as markdown."""
    schema = schema if schema is not None else json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    defs = schema.get("$defs", {})
    props = schema["properties"]
    required = set(schema.get("required", ()))
    scalars = [k for k, v in props.items() if "properties" not in v]
    sections = [k for k in props if k not in scalars]
    out = ["# Recipe reference", "",
           "<!-- Generated by `python -m runner.recipe.reference` (`make docs`) from runner/recipe/schema/recipe.schema.json "
           "and the built-in evaluators' params_schema. Do not edit: change those and regenerate. -->", "",
           INTRO, "",
           "Sections: [top level](#top-level), " + ", ".join(f"[`{k}`](#{k})" for k in sections)
           + ", [evaluators](#evaluators).", ""]
    top = [*TABLE_HEAD]
    for key in scalars:
        top += _rows(props[key], key, defs, key in required)
    out += _section("Top level", top)
    for key in sections:
        node = props[key]
        note = "Required. " if key in required else ""
        body = [f"{note}{_escape(node.get('description', ''))}", "", *TABLE_HEAD]
        for child_key, child in node["properties"].items():
            body += _rows(child, f"{key}.{child_key}", defs, child_key in node.get("required", ()))
        out += _section(f"`{key}`", body)
    out += _section("Evaluators", _evaluators())
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(page())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
