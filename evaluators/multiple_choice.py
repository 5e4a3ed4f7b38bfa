"""Multiple-choice benchmarks (MMLU, ARC, HellaSwag style): each record's prediction is the choice the model ranked
first (runner.evaluate.benchmark scores every choice with rank mode's packed pass) and its reference the gold
choice. Accuracy with a bootstrap 95% CI, and per subject (or category) where the items carry one
(``Record.group``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from evaluators.base import Evaluator, Metric, Record
from runner.common.stats import bootstrap_ci


class MultipleChoice(Evaluator):
    """Accuracy of the chosen answers (exact match of the choice text, as the scorer hands it over), with a
    bootstrap 95% CI; ``per_subject.<subject>.accuracy`` where the items name a subject."""

    name = "multiple_choice"
    completion = None
    metrics = (Metric("accuracy", "higher", "fraction"), Metric("per_subject.*.accuracy", "higher", "fraction"))
    headline = "accuracy"
    params_schema = {"properties": {}}

    def per_example(self, records: list[Record]) -> dict[str, np.ndarray]:
        """1 where the chosen answer is the gold one, else 0 (paired comparisons: base vs adapter)."""
        return {"accuracy": np.array([float(r.prediction == r.reference) for r in records])}

    def evaluate(self, records: list[Record], out_dir: Path) -> dict:
        correct = self.per_example(records)["accuracy"]
        out = {"accuracy": _share(correct), "ci95": _ci(correct, self.seed), "n": len(records)}
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            if r.group is not None:
                groups[str(r.group)].append(i)
        if groups:
            out["per_subject"] = {g: {"accuracy": _share(correct[idx]), "ci95": _ci(correct[idx], self.seed),
                                      "n": len(idx)} for g, idx in sorted(groups.items())}
        return out


def _share(values: np.ndarray) -> float:
    return round(float(values.mean()), 4) if len(values) else float("nan")


def _ci(values: np.ndarray, seed: int) -> list[float]:
    low, high = bootstrap_ci(values, seed)
    return [round(low, 4), round(high, 4)]
