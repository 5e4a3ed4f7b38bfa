"""The evaluator interface: the one contract between the runner and every evaluator, built-in or a user's own.

An evaluator is a pure function of records: the runner computes everything that needs the model (generated or
ranked predictions, log-likelihoods of the references) and hands it over in the records. Evaluators import this
module and the runner's leaf helpers only (``runner.common.stats`` for intervals, ``runner.common.safeio`` and
``runner.common.markdown`` for files), never the runner's machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Record:
    """One evaluated example: the rendered prompt, the reference completion and the model's prediction.

    ``logprob`` and ``tokens`` are set for an evaluator that ``needs`` "logprobs": the summed log-probability of
    the reference completion + EOS after the prompt, and how many tokens it sums over (as training counts them).
    """

    index: int
    prompt: str
    reference: str
    prediction: str
    id: str | None = None
    logprob: float | None = None
    tokens: int | None = None


class Evaluator:
    """Subclass and implement ``evaluate``. Recipe keys other than ``name`` arrive as keyword arguments.

    ``params_schema`` (JSON Schema ``properties``/``required``) lets ``runner validate`` check those keys and fill
    their defaults. ``needs`` says what the runner puts into the records: ``"predictions"`` (generated or ranked,
    of the evaluation split) and/or ``"logprobs"`` (of the ``split`` attribute's role, None = the evaluation split);
    generation is skipped when no evaluator of the recipe needs predictions. ``completion`` tells the runner what
    the recipe's completion holds for this evaluator: ``"label"`` (one label name of a ``labels`` parameter: rank
    mode may choose among them), ``"labels"`` (several, joined by a separator) or None (free text). ``metrics``
    names the numbers ``evaluate`` returns at its top level (``("accuracy", "macro_f1")``), if known beforehand.
    """

    name = "evaluator"
    params_schema: dict | None = None
    # The top-level metric keys ``evaluate`` returns (numbers, as runner.evaluate.metrics.headline reads them), so that
    # ``runner sweep --metric`` is checked before anything trains; None = not declared (checked on the results).
    metrics: tuple[str, ...] | None = None
    needs: tuple[str, ...] = ("predictions",)
    completion: str | None = None
    split: str | None = None  # the role whose examples get "logprobs"; None = evaluation.split
    batch_size: int | None = None  # examples per forward pass for "logprobs"; None = as generation sizes them

    def __init__(self, seed: int = 42, **params):
        self.seed = seed
        self.params = params

    def evaluate(self, records: list[Record], out_dir: Path) -> dict:
        raise NotImplementedError
