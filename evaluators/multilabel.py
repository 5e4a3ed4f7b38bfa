"""Multi-label classification (GoEmotions): reference and prediction are label names joined by a separator
(", " by default, as ``prompt.list_separator`` writes a list). Micro- and macro-F1, exact match (the same set of
labels, order ignored, with a bootstrap 95% CI), per-label precision/recall/F1, and invalid names reported.

Names match ignoring case and runs of whitespace. A predicted name that is no label is dropped from the
prediction's set and counted; a repeated name counts once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from evaluators.base import Evaluator, Metric, Record
from evaluators.classification import LABELS_PARAM, prf
from runner.common.labels import label_lookup, normalize, with_unlisted
from runner.common.stats import bootstrap_ci


def split_names(text: str, separator: str) -> list[str]:
    return [part for part in (" ".join(p.split()) for p in text.split(separator)) if part]


class Multilabel(Evaluator):
    """Multi-label classification: reference and prediction are label names joined by a separator (order
    ignored). Micro/macro-F1, exact match with a bootstrap 95% CI, per-label scores; names that are no label are
    counted as invalid."""

    name = "multilabel"
    completion = "labels"
    metrics = (*(Metric(k, "higher", "fraction") for k in ("micro_f1", "micro_precision", "micro_recall", "macro_f1",
                                                            "exact_match")),
               Metric("invalid_names", "lower", "count"), Metric("invalid_rate", "lower", "fraction"),
               *(Metric(f"per_label.*.{k}", "higher", "fraction") for k in ("precision", "recall", "f1")))
    headline = "exact_match"
    baselines = ("label_set",)
    params_schema = {"properties": {
        "labels": {**LABELS_PARAM, "description": "The label names; null = the names found in the references."},
        "separator": {"type": "string", "minLength": 1, "default": ",",
                      "description": "What separates names in a prediction (surrounding spaces are ignored); "
                                     "prompt.list_separator writes the references."}}}

    def __init__(self, labels=None, separator=",", **kw):
        super().__init__(**kw)
        self.labels = list(labels) if labels else None
        self.separator = separator

    def gold_names(self, references: list[str]) -> list[str]:
        """The label names the references hold, split on ``separator`` (the runner checks them against ``labels``)."""
        return [name for reference in references for name in split_names(reference, self.separator)]

    def label_set(self, records: list[Record]) -> tuple[list[str], list[str]]:
        """(labels, gold names outside the recipe's list): without a list, the names the references use."""
        return with_unlisted(self.labels, self.gold_names([r.reference for r in records]))

    def encode(self, records: list[Record]):
        """(labels, unlisted gold names, gold and predicted indicator matrices, invalid names, rows with one)."""
        labels, extra = self.label_set(records)
        lookup = label_lookup(labels)
        index = {label: i for i, label in enumerate(labels)}
        gold = np.zeros((len(records), len(labels)), dtype=bool)
        pred = np.zeros_like(gold)
        invalid = Counter()
        invalid_rows = 0
        for row, r in enumerate(records):
            for name in split_names(r.reference, self.separator):
                gold[row, index[lookup[normalize(name)]]] = True
            bad = False
            for name in split_names(r.prediction, self.separator):
                label = lookup.get(normalize(name))
                if label is None:
                    invalid[name] += 1
                    bad = True
                else:
                    pred[row, index[label]] = True
            invalid_rows += bad
        return labels, extra, gold, pred, invalid, invalid_rows

    def per_example(self, records: list[Record]) -> dict[str, np.ndarray]:
        """1/0 exact match per example: what `runner compare` pairs across base and adapter."""
        _, _, gold, pred, _, _ = self.encode(records)
        return {"exact_match": (gold == pred).all(axis=1).astype(float)}

    def evaluate(self, records: list[Record], out_dir: Path) -> dict:
        labels, extra, gold, pred, invalid, invalid_rows = self.encode(records)
        tp = (gold & pred).sum(axis=0)
        support, predicted = gold.sum(axis=0), pred.sum(axis=0)
        precision, recall, f1 = prf(tp, predicted, support)
        micro_p, micro_r, micro_f1 = (float(v[0]) for v in prf(tp.sum(keepdims=True), predicted.sum(keepdims=True),
                                                                support.sum(keepdims=True)))
        scored = (support + predicted) > 0  # a label neither referenced nor predicted has no defined F1
        exact = (gold == pred).all(axis=1).astype(float)
        low, high = bootstrap_ci(exact, self.seed)
        out = {
            "micro_f1": round(micro_f1, 4),
            "micro_precision": round(micro_p, 4),
            "micro_recall": round(micro_r, 4),
            "macro_f1": round(float(f1[scored].mean()), 4) if scored.any() else float("nan"),
            "exact_match": round(float(exact.mean()), 4) if len(records) else float("nan"),
            "exact_match_ci95": [round(low, 4), round(high, 4)],
            "labels_scored": int(scored.sum()),
            "invalid_names": int(sum(invalid.values())),
            "invalid_rate": round(invalid_rows / max(len(records), 1), 4),
            "invalid_examples": [{"name": name, "count": n} for name, n in invalid.most_common(5)],
            "per_label": {label: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
                                  "f1": round(float(f1[i]), 4), "support": int(support[i]),
                                  "predicted": int(predicted[i])}
                          for i, label in enumerate(labels)},
        }
        if extra:
            out["references_not_in_labels"] = extra
        return out
