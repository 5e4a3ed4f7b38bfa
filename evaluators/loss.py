"""Loss and perplexity of the reference completions (+ EOS) on a split, computed as training computes it:
token-level cross-entropy on the completion tokens only, averaged over all of the split's completion tokens.

The runner scores the references with the model and hands each record's log-probability and token count over
(``needs = ("logprobs",)``); this evaluator only averages them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from evaluators.base import Evaluator, Metric, Record
from runner.common.stats import ratio_bootstrap_ci


class Loss(Evaluator):
    """Loss (completion tokens + EOS, as in training) and perplexity of the model on a split, with bootstrap 95%
    CIs."""

    name = "loss"
    needs = ("logprobs",)
    metrics = (Metric("loss", "lower", "unbounded"), Metric("perplexity", "lower", "unbounded"))
    headline = "loss"
    params_schema = {"properties": {
        "split": {"enum": ["eval", "test", "train"], "default": "eval", "description": "Which role's examples are scored."},
        "batch_size": {"type": ["integer", "null"], "minimum": 1, "default": None,
                       "description": "Examples per forward pass; null = generation.batch_size (auto: sized from GPU "
                                      "memory)."}}}

    def __init__(self, split="eval", batch_size=None, **kw):
        super().__init__(**kw)
        self.split = split
        self.batch_size = batch_size

    def evaluate(self, records: list[Record], out_dir: Path) -> dict:
        nll = np.array([-r.logprob for r in records], dtype=float)
        tokens = np.array([r.tokens for r in records], dtype=float)
        loss = float(nll.sum() / tokens.sum())
        low, high = ratio_bootstrap_ci(nll, tokens, self.seed)
        return {"split": self.split, "examples": len(nll), "tokens": int(tokens.sum()),
                "loss": round(loss, 5), "loss_ci95": [round(low, 5), round(high, 5)],
                "perplexity": round(math.exp(loss), 4),
                "perplexity_ci95": [round(math.exp(low), 4), round(math.exp(high), 4)]}
