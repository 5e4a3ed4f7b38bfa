"""The evaluator interface."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Record:
    """One evaluated example: the rendered prompt, the reference completion and the model's prediction."""

    index: int
    prompt: str
    reference: str
    prediction: str
    id: str | None = None


class Evaluator:
    """Subclass and implement ``evaluate``. Recipe keys other than ``name`` arrive as keyword arguments.

    ``params_schema`` (JSON Schema ``properties``/``required``) lets ``runner validate`` check those keys.
    An evaluator that needs the model itself (e.g. ``loss``) sets ``needs_model`` and implements ``score_model``;
    one that reads no generated predictions sets ``uses_predictions = False`` (generation is skipped when no
    evaluator of the recipe uses them).
    """

    name = "evaluator"
    params_schema: dict | None = None
    needs_model = False
    uses_predictions = True
    split: str | None = None  # the role whose examples score_model() gets; None = evaluation.split

    def __init__(self, seed: int = 42, **params):
        self.seed = seed
        self.params = params

    def score_model(self, model, tokenizer, examples, recipe: dict) -> None:
        """Called before ``evaluate`` when ``needs_model``: the model (in eval mode, adapter as evaluated), its
        tokenizer and the prepared examples of ``split`` (columns prompt, completion, n_tokens, truncated, id)."""

    def evaluate(self, records: list[Record], out_dir: Path) -> dict:
        raise NotImplementedError
