"""Statistics, all of them: how precise is a test set, how much do seeds move a score, and does a difference
between two settings exceed both. A leaf module (numpy, scipy): evaluators use it as the runner does.

Two sources of uncertainty are kept apart:

- **test examples**: a different draw of test examples would give a different score. Measured by the percentile
  bootstrap over examples (every evaluator's ``ci95``: ``bootstrap_ci``, ``ratio_bootstrap_ci``) and, between two
  systems scored on the same examples, by the paired bootstrap (``paired_bootstrap``).
- **training seed**: the same recipe trained with another seed (LoRA init, data order, dropout, sampling) scores
  differently on the *same* examples. Measured by the spread of a metric across seeds, and between two settings by
  Welch's t-test on their per-seed scores (scipy), which is honest about how little two or three seeds tell.
"""

from __future__ import annotations

import math

import numpy as np

# A metric's "point" by its declared scale (evaluators.base.SCALES): 1 on a 0-100 scale (ROUGE), one percentage
# point of a share in [0, 1]; other scales have no natural point.
POINTS = {"percent": 1.0, "fraction": 0.01}

RESAMPLES = 1000


# ---------------------------------------------------------------- the bootstrap over test examples


def _resampled(n: int, seed: int, resamples: int) -> np.ndarray:
    """[resamples, n] example indices drawn with replacement; the same seed draws the same ones."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def bootstrap_ci(scores: np.ndarray, seed: int, resamples: int = RESAMPLES, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of the mean; the same seed gives the same interval."""
    if len(scores) == 0:
        return float("nan"), float("nan")
    return _percentiles(scores[_resampled(len(scores), seed, resamples)].mean(axis=1), level)


def ratio_bootstrap_ci(numerators: np.ndarray, denominators: np.ndarray, seed: int, resamples: int = RESAMPLES,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap over examples of sum(numerators) / sum(denominators) (a token-weighted mean)."""
    if len(numerators) == 0:
        return float("nan"), float("nan")
    idx = _resampled(len(numerators), seed, resamples)
    return _percentiles(numerators[idx].sum(axis=1) / denominators[idx].sum(axis=1), level)


def paired_bootstrap(base: np.ndarray, adapter: np.ndarray, seed: int, resamples: int = RESAMPLES,
                     level: float = 0.95) -> dict:
    """Bootstrap of mean(adapter - base) over examples resampled together: its CI and a two-sided p-value."""
    diffs = np.asarray(adapter, dtype=float) - np.asarray(base, dtype=float)
    means = diffs[_resampled(len(diffs), seed, resamples)].mean(axis=1)
    low, high = _percentiles(means, level)
    # The share of resampled differences on the far side of zero, doubled: how often chance alone flips the sign.
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return {"difference": round(float(diffs.mean()), 4), "difference_ci95": [round(low, 4), round(high, 4)],
            "p_value": round(p, 4), "resamples": resamples}


def ci_overlap(a: list | None, b: list | None) -> bool | None:
    if not a or not b:
        return None
    return not (a[1] < b[0] or b[1] < a[0])


# ---------------------------------------------------------------- how precise a test set is


def half_width(ci: list | tuple | None) -> float | None:
    if not ci or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return None
    return (ci[1] - ci[0]) / 2


def smallest_difference(ci: list | tuple | None) -> float | None:
    """The smallest difference between two systems with this bootstrap spread that a test set of this size
    separates at 95% without pairing: the half-width of the difference's interval, sqrt(2) x the metric's own
    half-width. Pairing (both systems on the same examples) usually resolves less."""
    h = half_width(ci)
    return None if h is None else math.sqrt(2) * h


def point(scale: str | None) -> float | None:
    """One point of a metric on ``scale`` ("percent" -> 1.0, "fraction" -> 0.01); None when the scale has no
    natural point (a loss, a perplexity, a count) or is not declared."""
    return POINTS.get(scale)


def examples_for(difference: float, ci: list | tuple | None, examples: int) -> int | None:
    """Test examples needed to resolve ``difference`` (as ``smallest_difference``): the interval shrinks with the
    square root of the number of examples."""
    smallest = smallest_difference(ci)
    if smallest is None or difference <= 0 or examples <= 0:
        return None
    return max(1, math.ceil(examples * (smallest / difference) ** 2))


def seed_spread(values: list[float]) -> dict:
    """Mean over seeds, their standard deviation (ddof 1) and the t-based 95% half-width of the mean."""
    arr = np.asarray(values, dtype=float)
    out = {"seeds": len(arr), "mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()),
           "sd": None, "mean_ci95_half": None}
    if len(arr) >= 2:
        from scipy import stats

        sd = float(arr.std(ddof=1))
        out["sd"] = sd
        out["mean_ci95_half"] = float(stats.t.ppf(0.975, len(arr) - 1) * sd / math.sqrt(len(arr)))
    return out


def welch(a: list[float], b: list[float], level: float = 0.95) -> dict | None:
    """Welch's t-test of mean(b) - mean(a) over seeds: its confidence interval and p-value. None with fewer than two
    seeds on a side (one seed says nothing about seed noise). Equal, constant scores give a zero-width interval."""
    if len(a) < 2 or len(b) < 2:
        return None
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(b.mean() - a.mean())
    if a.std() == 0 and b.std() == 0:  # no seed noise at all: t is undefined, the difference is exact
        return {"difference": diff, "ci95": [diff, diff], "p_value": 0.0 if diff else 1.0}
    from scipy import stats

    result = stats.ttest_ind(b, a, equal_var=False)
    ci = result.confidence_interval(level)
    return {"difference": diff, "ci95": [float(ci.low), float(ci.high)], "p_value": float(result.pvalue)}


def excludes_zero(ci: list | None) -> bool | None:
    if not ci:
        return None
    return bool(ci[0] > 0 or ci[1] < 0)
