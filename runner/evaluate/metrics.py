"""The shape of a metric, read from ``metrics.json`` one way for everything that shows or compares metrics: the
summary line, report.md, ``runner compare``, the baselines, ``runner sweep`` and early stopping.

Evaluators write their numbers as they like (``{"rougeL": {"f1": 68.1, "ci95": [..]}}``, ``{"accuracy": 0.9,
"accuracy_ci95": [..]}``) and declare them (evaluators.base.Metric: direction and scale). ``flatten`` turns both
into ``{"rouge.rougeL": {"value", "ci95", "better", "scale"}}``: every metric is named ``<evaluator>.<metric>``.

The declarations travel with the numbers: evaluation writes them into metrics.json under DECLARED
(``declared_by``), so a metrics.json read later says itself which way each of its metrics is better (one written
before declarations existed gets the built-in evaluators' own). A reader that holds the recipe may pass its
evaluators' declarations instead (``declared=``). An evaluator that declares no metrics (``metrics = None``) gets
every number it returns shown, ``better`` None: nothing ranks by it.
"""

from __future__ import annotations

import math

from evaluators import BUILTINS, builtin

# metrics.json's key for the evaluators' declarations: {evaluator: {"metrics": [..] | None, "headline": ..}}.
DECLARED = "declared"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def finite(v) -> bool:
    return _is_number(v) and not (isinstance(v, float) and math.isnan(v))


# ---------------------------------------------------------------- the declarations


def declared_by(evaluators) -> dict[str, dict]:
    """The declarations of built evaluators ((name, evaluator) pairs), as metrics.json holds them under DECLARED."""
    out = {}
    for name, evaluator in evaluators:
        metrics = evaluator.metrics
        top = [m.name for m in metrics or () if "." not in m.name and "*" not in m.name]
        out[name] = {"metrics": None if metrics is None else [{"name": m.name, "better": m.better, "scale": m.scale}
                                                              for m in metrics],
                     "headline": evaluator.headline or (top[0] if top else None)}
    return out


def _declarations(metrics: dict, declared: dict | None) -> dict:
    """``declared``, else metrics.json's own; a metrics.json from before evaluators declared their metrics: the
    built-in evaluators' class declarations (a user's evaluator in it declares none)."""
    if declared is None:
        declared = metrics.get(DECLARED)
    if declared is None:
        declared = declared_by([(name, builtin(name)) for name in metrics if name in BUILTINS])
    return declared


def _match(path: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    return len(path) == len(pattern) and all(p == "*" or p == k for k, p in zip(path, pattern, strict=True))


# ---------------------------------------------------------------- reading metrics.json


def by_evaluator(metrics: dict, declared: dict | None = None) -> dict[str, dict[str, dict]]:
    """{evaluator: {metric key: {"value", "ci95", "better", "scale"}}}: every declared number of every evaluator's
    block (every number of one that declares none, ``better`` and ``scale`` None).

    A block holding one number and ``ci95`` (ROUGE's ``{"f1", "ci95"}``) is one metric; ``<key>_ci95`` beside
    ``<key>`` is that key's interval; nested blocks give dotted keys (``per_class.Sports.f1``).
    """
    declarations = _declarations(metrics, declared)
    out: dict[str, dict[str, dict]] = {}
    for name, block in metrics.items():
        if name == DECLARED or not isinstance(block, dict):
            continue
        found: list[tuple[tuple[str, ...], object, list | None]] = []
        _walk(block, (), found)
        spec = (declarations.get(name) or {}).get("metrics")
        rows = {}
        for path, value, ci in found:
            if spec is None:
                rows[".".join(path)] = {"value": value, "ci95": ci, "better": None, "scale": None}
                continue
            m = next((m for m in spec if _match(path, tuple(m["name"].split(".")))), None)
            if m is not None:
                rows[".".join(path)] = {"value": value, "ci95": ci, "better": m["better"], "scale": m["scale"]}
        out[name] = rows
    return out


def _walk(block: dict, prefix: tuple[str, ...], out: list) -> None:
    numbers = {k: v for k, v in block.items() if _is_number(v)}
    if isinstance(block.get("ci95"), list) and len(numbers) == 1:
        (key, value), = numbers.items()
        out.append((prefix or (key,), value, block["ci95"]))
        return
    for key, value in block.items():
        if key.endswith("_ci95"):
            continue
        path = (*prefix, key)
        if _is_number(value):
            ci = block.get(f"{key}_ci95")
            out.append((path, value, ci if isinstance(ci, list) else None))
        elif isinstance(value, dict):
            _walk(value, path, out)


def flatten(metrics: dict, declared: dict | None = None) -> dict[str, dict]:
    """``{"rouge.rougeL": {"value": 68.1, "ci95": [..], "better": "higher", "scale": "percent"}, ...}`` from a
    metrics.json."""
    return {f"{name}.{key}": m for name, block in by_evaluator(metrics, declared).items() for key, m in block.items()}


def headline(metrics: dict, declared: dict | None = None) -> dict[str, dict]:
    """The top-level metrics with a value ("rouge.rougeL", "classification.accuracy"; no per-class rows)."""
    return {f"{name}.{key}": m for name, block in by_evaluator(metrics, declared).items() for key, m in block.items()
            if "." not in key and finite(m["value"])}


def primary_metric(metrics: dict, declared: dict | None = None) -> str | None:
    """The metric a run is summed up by: the headline of the first evaluator (in the recipe's order) that has one
    with a value (an evaluator that declares none: the first number it returns)."""
    declarations = _declarations(metrics, declared)
    for name, block in by_evaluator(metrics, declared).items():
        top = [key for key, m in block.items() if "." not in key and finite(m["value"])]
        chosen = (declarations.get(name) or {}).get("headline")
        if chosen in top:
            return f"{name}.{chosen}"
        if (declarations.get(name) or {}).get("metrics") is None and top:
            return f"{name}.{top[0]}"
    return None


def better_of(a: float, b: float, better: str | None) -> int | None:
    """Which of two values of a metric is better: 1 (``a``), -1 (``b``), 0 (equal), None (direction unknown)."""
    if better is None:
        return None
    if a == b:
        return 0
    return 1 if (a > b) == (better == "higher") else -1


def summary_line(metrics: dict, declared: dict | None = None) -> str:
    """One line: each evaluator's top-level metrics, named as everywhere (``classification.accuracy``), with their
    95% CIs."""
    parts = []
    for name, block in by_evaluator(metrics, declared).items():
        for key, m in block.items():
            if "." in key:
                continue
            # Scores on a 0-100 scale (ROUGE) read best with two decimals, shares and losses with 4 digits.
            form = ".2f" if m["scale"] == "percent" else ".4g"
            text = f"{name}.{key} {m['value']:{form}}"
            if m["ci95"] is not None:
                low, high = m["ci95"]
                text += f" [{low:{form}}, {high:{form}}]"
            parts.append(text)
    return f"{metrics['split']} ({metrics['examples']} examples): " + (", ".join(parts) or "no metrics")
