"""ROUGE F1 (rouge-score, Porter stemmer) x100, with bootstrap 95% confidence intervals over examples."""

from __future__ import annotations

import functools
import re
import types
from pathlib import Path

import numpy as np

from evaluators.base import Evaluator, Metric, Record
from runner.common.stats import bootstrap_ci

TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences_on_lines(text: str) -> str:
    """rougeLsum treats newlines as sentence boundaries, so put each sentence on its own line."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


class _Tokenizer:
    """rouge-score's default tokenizer (lower case, alphanumeric tokens, words over 3 letters Porter-stemmed), each
    word's stem remembered: stemming is most of ROUGE's time, and a split's summaries keep using the same words."""

    def __init__(self, use_stemmer: bool):
        from nltk.stem import porter
        from rouge_score import tokenize

        self._tokenize = tokenize.tokenize
        stem = functools.lru_cache(maxsize=2**17)(porter.PorterStemmer().stem)
        self._stemmer = types.SimpleNamespace(stem=stem) if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        return self._tokenize(text, self._stemmer)


class Rouge(Evaluator):
    """ROUGE F1 (rouge-score) between prediction and the rendered completion."""

    name = "rouge"
    # The types the recipe asks for (as built: __init__); the class declares every type it can score.
    metrics = tuple(Metric(t, "higher", "percent") for t in TYPES)
    headline = "rougeL"
    baselines = ("lead_1", "first_words")
    params_schema = {"properties": {
        "types": {"type": "array", "items": {"enum": ["rouge1", "rouge2", "rougeL", "rougeLsum"]}, "minItems": 1,
                  "uniqueItems": True, "default": ["rouge1", "rouge2", "rougeL", "rougeLsum"],
                  "description": "Which ROUGE scores to report (rougeLsum splits sentences at newlines)."},
        "use_stemmer": {"type": "boolean", "default": True,
                        "description": "Porter-stem words before matching them (rouge-score's use_stemmer)."}}}

    def __init__(self, types=("rouge1", "rouge2", "rougeL", "rougeLsum"), use_stemmer=True, **kw):
        super().__init__(**kw)
        self.types = list(types)
        self.metrics = tuple(Metric(t, "higher", "percent") for t in self.types)
        self.headline = "rougeL" if "rougeL" in self.types else self.types[0]
        self.use_stemmer = use_stemmer

    def per_example(self, records: list[Record]) -> dict[str, np.ndarray]:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(self.types, tokenizer=_Tokenizer(self.use_stemmer))
        scores = {t: [] for t in self.types}
        for r in records:
            result = scorer.score(sentences_on_lines(r.reference), sentences_on_lines(r.prediction))
            for t in self.types:
                scores[t].append(result[t].fmeasure * 100)
        return {t: np.asarray(v, dtype=float) for t, v in scores.items()}

    def evaluate(self, records: list[Record], out_dir: Path) -> dict:
        out = {}
        for t, s in self.per_example(records).items():
            low, high = bootstrap_ci(s, self.seed)
            out[t] = {"f1": round(float(s.mean()), 4) if len(s) else float("nan"),
                      "ci95": [round(low, 4), round(high, 4)]}
        return out
