"""runner.common.stats: the bootstrap intervals every evaluator reports, the ratio bootstrap of the loss, and the paired
bootstrap of `runner compare` (moved here from test_evaluators.py and test_compare.py with the code)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runner.common import stats

SCORES = np.array([12.0, 55.5, 0.0, 31.25, 80.0, 47.0, 9.5, 66.0, 23.0, 71.5])

# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_is_reproducible_from_the_seed():
    assert stats.bootstrap_ci(SCORES, seed=7) == stats.bootstrap_ci(SCORES, seed=7)
    assert stats.bootstrap_ci(SCORES, seed=7) != stats.bootstrap_ci(SCORES, seed=8)


def test_bootstrap_ci_matches_a_direct_computation():
    """Resample one example list at a time from the same generator, sort the means, read the 2.5% / 97.5% points."""
    resamples, n = 1000, len(SCORES)
    rng = np.random.default_rng(42)
    means = sorted(sum(SCORES[rng.integers(0, n, size=n)]) / n for _ in range(resamples))

    def percentile(q):  # linear interpolation between closest ranks, numpy's default
        pos = q / 100 * (resamples - 1)
        lo = math.floor(pos)
        return means[lo] + (means[min(lo + 1, resamples - 1)] - means[lo]) * (pos - lo)

    low, high = stats.bootstrap_ci(SCORES, seed=42)
    assert low == pytest.approx(percentile(2.5), abs=1e-9)
    assert high == pytest.approx(percentile(97.5), abs=1e-9)
    assert low < SCORES.mean() < high
    assert (low, high) == pytest.approx((23.14875, 56.480625), abs=1e-6)  # this fixed set's interval, pinned


def test_ratio_bootstrap_is_reproducible_and_brackets_the_token_weighted_mean():
    nll, tokens = SCORES / 10, np.array([3.0, 5, 2, 8, 4, 6, 2, 7, 3, 5])
    assert stats.ratio_bootstrap_ci(nll, tokens, 3) == stats.ratio_bootstrap_ci(nll, tokens, 3)
    low, high = stats.ratio_bootstrap_ci(nll, tokens, 3)
    assert low < nll.sum() / tokens.sum() < high


# ---------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_matches_a_direct_computation_and_the_seed():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 60, size=40)
    adapter = base + rng.normal(3, 2, size=40)
    out = stats.paired_bootstrap(base, adapter, seed=5)
    assert out == stats.paired_bootstrap(base, adapter, seed=5)
    draw = np.random.default_rng(5)
    diffs = adapter - base
    means = np.array([diffs[draw.integers(0, 40, size=40)].mean() for _ in range(1000)])
    assert out["difference"] == pytest.approx(diffs.mean(), abs=1e-4)
    assert out["difference_ci95"] == pytest.approx([np.percentile(means, 2.5), np.percentile(means, 97.5)], abs=1e-4)
    assert out["p_value"] == pytest.approx(min(1, 2 * min((means <= 0).mean(), (means >= 0).mean())))


def test_pairing_sees_a_small_consistent_gain_that_separate_intervals_miss():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 80, size=50)  # examples differ a lot in difficulty ...
    adapter = base + 2.0  # ... and the adapter gains 2 points on every one
    assert stats.ci_overlap(list(stats.bootstrap_ci(base, 0)), list(stats.bootstrap_ci(adapter, 0)))
    paired = stats.paired_bootstrap(base, adapter, seed=0)
    assert paired["difference_ci95"] == pytest.approx([2.0, 2.0]) and paired["p_value"] == 0


def test_identical_systems_show_no_difference():
    scores = np.arange(10.0)
    out = stats.paired_bootstrap(scores, scores.copy(), seed=0)
    assert out["difference"] == 0 and out["difference_ci95"] == [0, 0] and out["p_value"] == 1
