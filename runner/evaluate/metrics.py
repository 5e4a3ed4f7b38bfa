"""The shape of a metric, read from ``metrics.json`` one way for everything that shows or compares metrics: the
summary line, report.md, ``runner compare``, the baselines and ``runner sweep``.

Evaluators write their numbers as they like (``{"rougeL": {"f1": 68.1, "ci95": [..]}}``, ``{"accuracy": 0.9,
"accuracy_ci95": [..]}``); ``flatten`` turns them into ``{"rouge.rougeL": {"value", "ci95", "lower_is_better"}}``.
"""

from __future__ import annotations

import math

from runner.common import stats

# Numbers in metrics.json that describe the evaluation rather than measure the model.
NOT_METRICS = {"count", "examples", "tokens", "support", "predicted", "labels_scored"}
# A metric whose last name holds one of these words is better lower.
LOWER_IS_BETTER = ("loss", "perplexity", "invalid")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def finite(v) -> bool:
    return _is_number(v) and not (isinstance(v, float) and math.isnan(v))


def lower_is_better(metric: str) -> bool:
    last = metric.rsplit(".", 1)[-1]
    return any(word in last for word in LOWER_IS_BETTER)


def by_evaluator(metrics: dict) -> dict[str, dict[str, dict]]:
    """{evaluator: {metric key: {"value", "ci95", "lower_is_better"}}}: every number of every evaluator's block.

    A block holding one number and ``ci95`` (ROUGE's ``{"f1", "ci95"}``) is one metric; ``<key>_ci95`` beside
    ``<key>`` is that key's interval; nested blocks give dotted keys (``per_class.Sports.f1``).
    """
    out: dict[str, dict[str, dict]] = {}
    for name, block in metrics.items():
        if isinstance(block, dict):
            found: dict[str, dict] = {}
            _walk(block, "", found)
            out[name] = found
    return out


def _walk(block: dict, prefix: str, out: dict) -> None:
    numbers = {k: v for k, v in block.items() if _is_number(v) and k not in NOT_METRICS}
    if isinstance(block.get("ci95"), list) and len(numbers) == 1:
        (key, value), = numbers.items()
        out[prefix or key] = _metric(prefix or key, value, block["ci95"])
        return
    for key, value in block.items():
        if key in NOT_METRICS or key.endswith("_ci95"):
            continue
        path = f"{prefix}.{key}" if prefix else key
        if _is_number(value):
            ci = block.get(f"{key}_ci95")
            out[path] = _metric(path, value, ci if isinstance(ci, list) else None)
        elif isinstance(value, dict):
            _walk(value, path, out)


def _metric(key: str, value, ci95: list | None) -> dict:
    return {"value": value, "ci95": ci95, "lower_is_better": lower_is_better(key)}


def flatten(metrics: dict) -> dict[str, dict]:
    """``{"rouge.rougeL": {"value": 68.1, "ci95": [..], "lower_is_better": False}, ...}`` from a metrics.json."""
    return {f"{name}.{key}": m for name, block in by_evaluator(metrics).items() for key, m in block.items()}


def headline(metrics: dict) -> dict[str, dict]:
    """The top-level metrics with a value ("rouge.rougeL", "classification.accuracy"; no per-class rows)."""
    return {f"{name}.{key}": m for name, block in by_evaluator(metrics).items() for key, m in block.items()
            if "." not in key and finite(m["value"])}


def summary_line(metrics: dict) -> str:
    """One line: each evaluator's top-level metrics, with their 95% CIs."""
    parts = []
    for name, block in by_evaluator(metrics).items():
        for key, m in block.items():
            if "." in key:
                continue
            if m["ci95"] is None:
                parts.append(f"{name}.{key} {m['value']:.4g}")
                continue
            # Scores on a 0-100 scale (ROUGE) read best with two decimals, shares and losses with 4 digits.
            form = ".2f" if stats.point(f"{name}.{key}") == 1.0 else ".4g"
            low, high = m["ci95"]
            parts.append(f"{key} {m['value']:{form}} [{low:{form}}, {high:{form}}]")
    return f"{metrics['split']} ({metrics['examples']} examples): " + (", ".join(parts) or "no metrics")
