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
    """

    name = "evaluator"
    params_schema: dict | None = None

    def __init__(self, seed: int = 42, **params):
        self.seed = seed
        self.params = params

    def evaluate(self, records: list[Record], out_dir: Path) -> dict:
        raise NotImplementedError
