"""The evaluator interface: the one contract between the runner and every evaluator, built-in or a user's own.

An evaluator is a pure function of records: the runner computes everything that needs the model (generated or
ranked predictions, log-likelihoods of the references) and hands it over in the records. Evaluators import this
module and the runner's leaf helpers only (``runner.common.stats`` for intervals, ``runner.common.labels`` for
label matching, ``runner.common.safeio`` and ``runner.common.markdown`` for files), never the runner's machinery.

Each evaluator declares its metrics (``Metric``: direction and scale), its headline metric and the trivial
baselines that fit its task. Everything that ranks or compares scores (``runner compare``, ``runner sweep``,
``training.early_stopping``, the baselines, report.md) reads these declarations, never a metric's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HIGHER, LOWER = "higher", "lower"
# A metric's scale: what one of its points is (runner.common.stats.point) and how it is printed.
SCALES = {
    "fraction": "a share in [0, 1] (accuracy)",
    "percent": "0 to 100 (ROUGE x100)",
    "count": "a count of things (invalid predictions)",
    "unbounded": "any other number (a loss in nats, a perplexity, a ratio)",
}
# The trivial baselines the runner knows (runner.evaluate.baselines); an evaluator names those that fit its task.
BASELINES = {
    "majority_class": "always the train split's most frequent label (the completion is one label)",
    "label_distribution": "a label drawn from the train split's label frequencies (the completion is one label)",
    "label_set": "always the train split's most frequent set of labels (needs gold_names)",
    "lead_1": "the first sentence of the input field (free text)",
    "first_words": "the first N words of the input field, N the median reference length (free text)",
}


@dataclass(frozen=True)
class Metric:
    """One number an evaluator returns, declared: ``name`` is its key at the top of what ``evaluate`` returns
    (``"accuracy"``; ROUGE's ``{"rougeL": {"f1", "ci95"}}`` is ``"rougeL"``) or a dotted path into it where ``*``
    stands for any one key (``"per_class.*.f1"``); ``better``: ``"higher"`` or ``"lower"``; ``scale``: one of
    SCALES."""

    name: str
    better: str
    scale: str


@dataclass
class Record:
    """One evaluated example: the rendered prompt, the reference completion and the model's prediction.

    ``logprob`` and ``tokens`` are set for an evaluator that ``needs`` "logprobs": the summed log-probability of
    the reference completion + EOS after the prompt, and how many tokens it sums over (as training counts them).
    ``group``: the example's subject or category where its data names one (a multiple-choice benchmark's items).
    """

    index: int
    prompt: str
    reference: str
    prediction: str
    id: str | None = None
    logprob: float | None = None
    tokens: int | None = None
    group: str | None = None


class Evaluator:
    """Subclass and implement ``evaluate``. Recipe keys other than ``name`` arrive as keyword arguments.

    ``params_schema`` (JSON Schema ``properties``/``required``) lets ``runner validate`` check those keys and fill
    their defaults. ``needs`` says what the runner puts into the records: ``"predictions"`` (generated or ranked,
    of the evaluation split) and/or ``"logprobs"`` (of the ``split`` attribute's role, None = the evaluation split);
    generation is skipped when no evaluator of the recipe needs predictions. ``completion`` tells the runner what
    the recipe's completion holds for this evaluator: ``"label"`` (one label name of a ``labels`` parameter: rank
    mode may choose among them), ``"labels"`` (several, joined by a separator) or None (free text).

    ``metrics`` declares the numbers ``evaluate`` returns (a tuple of ``Metric``: direction and scale), ``headline``
    which of the top-level ones sums the evaluator up (None = the first declared), ``baselines`` which trivial
    baselines (keys of BASELINES) fit its task. ``metrics = None`` (the default, for a user's evaluator that
    declares nothing): every number ``evaluate`` returns is shown, its direction unknown, so nothing ranks by it
    (``runner compare`` names no better system, ``runner sweep`` no best setting, ``training.early_stopping``
    refuses it); its headline is the first number it returns. ``metrics = ()``: no numbers (a file to read).
    """

    name = "evaluator"
    params_schema: dict | None = None
    metrics: tuple[Metric, ...] | None = None
    headline: str | None = None
    baselines: tuple[str, ...] = ()
    needs: tuple[str, ...] = ("predictions",)
    completion: str | None = None
    split: str | None = None  # the role whose examples get "logprobs"; None = evaluation.split
    batch_size: int | None = None  # examples per forward pass for "logprobs"; None = as generation sizes them

    def __init__(self, seed: int = 42, **params):
        self.seed = seed
        self.params = params

    def evaluate(self, records: list[Record], out_dir: Path) -> dict:
        raise NotImplementedError


def declaration_problem(evaluator) -> str | None:
    """What is wrong with an evaluator's (or its class's) ``metrics``, ``headline`` and ``baselines``, in one
    sentence; None when they are well formed."""
    metrics, headline, baselines = (getattr(evaluator, key, None) for key in ("metrics", "headline", "baselines"))
    if metrics is not None:
        if not isinstance(metrics, (tuple, list)):
            return f"metrics is a {type(metrics).__name__}, not a tuple of Metric"
        names = set()
        for m in metrics:
            if not isinstance(m, Metric):
                return f"metrics holds {m!r}, not a Metric (e.g. Metric({str(m)!r}, better='higher', scale='fraction'))"
            if not isinstance(m.name, str) or not m.name or m.name.startswith(".") or m.name.endswith("."):
                return f"metric name {m.name!r} is not a key or a dotted path"
            if m.better not in (HIGHER, LOWER):
                return f"metric {m.name!r}: better is {m.better!r}, not 'higher' or 'lower'"
            if m.scale not in SCALES:
                return f"metric {m.name!r}: scale is {m.scale!r}, not one of {', '.join(SCALES)}"
            if m.name in names:
                return f"metric {m.name!r} is declared twice"
            names.add(m.name)
        top = [m.name for m in metrics if "." not in m.name and "*" not in m.name]
        if headline is not None and headline not in top:
            return f"headline {headline!r} is not one of its top-level metrics ({', '.join(top) or 'none'})"
    elif headline is not None and not isinstance(headline, str):
        return f"headline is a {type(headline).__name__}, not a metric name"
    if not isinstance(baselines, (tuple, list)) or any(b not in BASELINES for b in baselines):
        return f"baselines is {baselines!r}, not a tuple of {', '.join(BASELINES)}"
    if "label_set" in baselines and not callable(getattr(evaluator, "gold_names", None)):
        return "the label_set baseline needs a gold_names(references) method that lists each reference's labels"
    return None
