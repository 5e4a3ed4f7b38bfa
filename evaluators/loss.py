"""Loss and perplexity of the reference completions (+ EOS) on a split, computed as training computes it:
token-level cross-entropy on the completion tokens only, averaged over all of the split's completion tokens."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from evaluators.base import Evaluator, Record


def ratio_bootstrap_ci(numerators: np.ndarray, denominators: np.ndarray, seed: int, resamples: int = 1000,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap over examples of sum(numerators) / sum(denominators) (a token-weighted mean)."""
    if len(numerators) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(numerators), size=(resamples, len(numerators)))
    ratios = numerators[idx].sum(axis=1) / denominators[idx].sum(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))


class Loss(Evaluator):
    name = "loss"
    needs_model = True
    uses_predictions = False

    def __init__(self, split="eval", batch_size=None, **kw):
        super().__init__(**kw)
        self.split = split
        self.batch_size = batch_size
        self.nll = self.tokens = None

    def score_model(self, model, tokenizer, examples, recipe: dict) -> None:
        from runner.rank import completion_logprobs

        scored = completion_logprobs(model, tokenizer, list(examples["prompt"]), list(examples["completion"]),
                                     recipe, batch_size=self.batch_size)
        self.nll = np.array([-lp for lp, _ in scored], dtype=float)
        self.tokens = np.array([n for _, n in scored], dtype=float)

    def evaluate(self, records: list[Record], out_dir: Path) -> dict:
        if self.nll is None:
            raise RuntimeError("the loss evaluator needs score_model() before evaluate()")
        loss = float(self.nll.sum() / self.tokens.sum())
        low, high = ratio_bootstrap_ci(self.nll, self.tokens, self.seed)
        return {"split": self.split, "examples": len(self.nll), "tokens": int(self.tokens.sum()),
                "loss": round(loss, 5), "loss_ci95": [round(low, 5), round(high, 5)],
                "perplexity": round(math.exp(loss), 4),
                "perplexity_ci95": [round(math.exp(low), 4), round(math.exp(high), 4)]}
