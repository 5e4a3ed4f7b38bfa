"""Single-label classification: the prediction is a label name. Accuracy (with a bootstrap 95% CI), macro-F1,
per-class precision/recall/F1, a confusion matrix (PNG), and predictions that name no label counted as invalid.

Label matching ignores case and runs of whitespace (" sci/tech " matches "Sci/Tech"). An invalid prediction is
wrong for accuracy and a miss for its gold class's recall; it is no class's false positive.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from evaluators.base import Evaluator, Metric, Record
from runner.common.labels import label_lookup, normalize, with_unlisted
from runner.common.stats import bootstrap_ci

INVALID = "(invalid)"


LABELS_PARAM = {"type": ["array", "null"], "items": {"type": "string", "minLength": 1}, "minItems": 2,
                "uniqueItems": True, "default": None}


def prf(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class; 0 where a denominator is 0 (as scikit-learn's zero_division=0)."""
    precision = np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(len(tp)), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(len(tp)), where=total > 0)
    return precision, recall, f1


def plot_confusion(matrix: np.ndarray, rows: list[str], columns: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.45 * len(columns) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), labels=columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    if len(columns) <= 12:
        for i in range(len(rows)):
            for j in range(len(columns)):
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                        color="white" if shares[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the reference row")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# The most classes the confusion matrix (metrics.json and the PNG) shows one by one; past it, the most frequent
# ones (references and predictions) and one OTHER row and column for the rest, so its size stays bounded.
MATRIX_CLASSES = 40
OTHER = "(other classes)"


def confusion(gold: np.ndarray, pred: np.ndarray, frequency: np.ndarray, limit: int) -> tuple[list[int], np.ndarray]:
    """(the class ids shown, in class order; the matrix: rows the reference class, columns the predicted class,
    then invalid predictions). With more than ``limit`` classes, the ``limit`` most frequent and OTHER."""
    k = len(frequency)
    shown = sorted(np.argsort(-frequency, kind="stable")[:limit].tolist()) if k > limit else list(range(k))
    n = len(shown) + (len(shown) < k)  # OTHER's row and column, when some classes are folded into it
    position = np.full(k, n - 1, dtype=int)
    position[shown] = np.arange(len(shown))
    matrix = np.zeros((n, n + 1), dtype=int)
    np.add.at(matrix, (position[gold], np.where(pred < 0, n, position[np.maximum(pred, 0)])), 1)
    return shown, matrix


class Classification(Evaluator):
    """Single-label classification: the prediction is a label name (case and spaces ignored). Accuracy with a
    bootstrap 95% CI, macro-F1, per-class precision/recall/F1, confusion_matrix.png; predictions naming no label
    are counted as invalid."""

    name = "classification"
    completion = "label"
    metrics = (Metric("accuracy", "higher", "fraction"), Metric("macro_f1", "higher", "fraction"),
               Metric("invalid", "lower", "count"), Metric("invalid_rate", "lower", "fraction"),
               *(Metric(f"per_class.*.{k}", "higher", "fraction") for k in ("precision", "recall", "f1")))
    headline = "accuracy"
    baselines = ("majority_class", "label_distribution")
    params_schema = {"properties": {
        "labels": {**LABELS_PARAM, "description": "The label names, in the order the confusion matrix shows them; "
                                                  "null = the labels found in the references."},
        "confusion_matrix": {"type": "boolean", "default": True, "description": "Write confusion_matrix.png."}}}

    def __init__(self, labels=None, confusion_matrix=True, **kw):
        super().__init__(**kw)
        self.labels = list(labels) if labels else None
        self.confusion_matrix = confusion_matrix

    def gold_names(self, references: list[str]) -> list[str]:
        """The label names the references hold: each is one (the runner checks them against ``labels``)."""
        return list(references)

    def classes(self, records: list[Record]) -> tuple[list[str], list[str]]:
        """(classes, gold labels outside the recipe's list): without a list, the labels the references use."""
        return with_unlisted(self.labels, self.gold_names([r.reference for r in records]))

    def encode(self, records: list[Record]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        """(classes, unlisted gold labels, gold class ids, predicted class ids with -1 for invalid)."""
        classes, extra = self.classes(records)
        lookup = label_lookup(classes)
        index = {label: i for i, label in enumerate(classes)}
        gold = np.array([index[lookup[normalize(r.reference)]] for r in records], dtype=int)
        pred = np.array([index.get(lookup.get(normalize(r.prediction)), -1) for r in records], dtype=int)
        return classes, extra, gold, pred

    def per_example(self, records: list[Record]) -> dict[str, np.ndarray]:
        """1/0 correctness per example: what `runner compare` pairs across base and adapter."""
        _, _, gold, pred = self.encode(records)
        return {"accuracy": (gold == pred).astype(float)}

    def evaluate(self, records: list[Record], out_dir: Path) -> dict:
        classes, extra, gold, pred = self.encode(records)
        k = len(classes)
        # Counted per class, not from a k x k matrix: thousands of labels (a text column taken for the label) would
        # need gigabytes for it.
        support, predicted = np.bincount(gold, minlength=k), np.bincount(pred[pred >= 0], minlength=k)
        tp = np.bincount(gold[gold == pred], minlength=k)
        shown, matrix = confusion(gold, pred, support + predicted, MATRIX_CLASSES)
        precision, recall, f1 = prf(tp, predicted, support)
        # A class that is neither a reference nor a prediction here has no defined F1: left out of the average.
        scored = (support + predicted) > 0
        correct = (gold == pred).astype(float)
        invalid = Counter(" ".join(r.prediction.split()) for r, p in zip(records, pred) if p < 0)
        low, high = bootstrap_ci(correct, self.seed)
        out = {
            "accuracy": round(float(correct.mean()), 4) if len(records) else float("nan"),
            "accuracy_ci95": [round(low, 4), round(high, 4)],
            "macro_f1": round(float(f1[scored].mean()), 4) if scored.any() else float("nan"),
            "invalid": int(sum(invalid.values())),
            "invalid_rate": round(sum(invalid.values()) / max(len(records), 1), 4),
            "invalid_examples": [{"prediction": text, "count": n} for text, n in invalid.most_common(5)],
            "per_class": {c: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
                              "f1": round(float(f1[i]), 4), "support": int(support[i])}
                          for i, c in enumerate(classes)},
            "confusion_matrix": {"rows": (rows := [classes[i] for i in shown] + ([OTHER] if len(shown) < k else [])),
                                 "columns": [*rows, INVALID], "counts": matrix.tolist()},
        }
        if len(shown) < k:
            out["confusion_matrix"]["note"] = (f"the {len(shown)} most frequent of {k} classes; the rest are "
                                               f"{OTHER}")
        if extra:
            out["references_not_in_labels"] = extra
        if self.confusion_matrix and len(records):
            rows = out["confusion_matrix"]["rows"]
            top = f", the top {len(shown)} of {k} classes" if len(shown) < k else ""
            plot_confusion(matrix, rows, [*rows, INVALID], out_dir / "confusion_matrix.png",
                           f"{len(records)} examples, accuracy {out['accuracy']:.3f}{top}")
            out["file"] = "confusion_matrix.png"
        return out
