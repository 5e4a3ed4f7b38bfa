"""A user's own evaluators for the tests (recipes name them ``tests.userevals:ErrorRate``): metrics whose names a
guess would read the wrong way round, declared: ``error_rate`` is better lower though its name holds no "loss",
``loss_free`` better higher though it does. And two that declare nothing, or declare it malformed."""

from __future__ import annotations

import numpy as np

from evaluators.base import Evaluator, Metric
from runner.common.labels import normalize


class ErrorRate(Evaluator):
    """The share of predictions that are not the reference (case and spaces ignored), and its complement."""

    name = "error_rate"
    params_schema = {"properties": {}}
    metrics = (Metric("error_rate", "lower", "fraction"), Metric("loss_free", "higher", "fraction"))
    headline = "error_rate"

    def per_example(self, records) -> dict[str, np.ndarray]:
        wrong = np.array([normalize(r.prediction) != normalize(r.reference) for r in records], dtype=float)
        return {"error_rate": wrong, "loss_free": 1 - wrong}

    def evaluate(self, records, out_dir) -> dict:
        scores = self.per_example(records)
        return {key: round(float(values.mean()), 4) for key, values in scores.items()}


class Undeclared(Evaluator):
    """Declares nothing: its number is shown, never ranked."""

    name = "undeclared"
    params_schema = {"properties": {}}

    def evaluate(self, records, out_dir) -> dict:
        return {"score": float(np.mean([len(r.prediction) for r in records]))}


class Malformed(Evaluator):
    """Declares its metrics as bare names (the contract wants Metric)."""

    name = "malformed"
    params_schema = {"properties": {}}
    metrics = ("score",)

    def evaluate(self, records, out_dir) -> dict:
        return {"score": 1.0}
