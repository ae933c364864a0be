"""bench/routing_stats.py: the routing benchmark's intervals (block bootstrap over seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.routing_stats import bootstrap_quantile, estimate, ratio_estimate, verdict


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """Positive, autocorrelated latencies (like consecutive requests sharing a queue)."""
    x = np.empty(n)
    x[0] = rng.normal()
    for i in range(1, n):
        x[i] = phi * x[i - 1] + math.sqrt(1 - phi**2) * rng.normal()
    return np.exp(x)


def test_point_is_the_pooled_percentile_and_per_seed_values_are_kept():
    seeds = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    e = estimate(seeds, 90, n_boot=200)
    assert e.value == pytest.approx(np.percentile(np.arange(1, 21), 90))
    assert e.per_seed == (pytest.approx(9.1), pytest.approx(19.1))
    assert e.n == 20
    assert e.lo <= e.value <= e.hi


def test_interval_covers_the_true_p90_of_iid_data_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    true = -math.log(0.1)  # p90 of Exp(1)
    trials, covered = 60, 0
    for _ in range(trials):
        seeds = [rng.exponential(1.0, 400) for _ in range(3)]
        e = estimate(seeds, 90, n_boot=300, block=1, rng=rng)
        covered += e.lo <= true <= e.hi
    assert covered / trials >= 0.85


def test_blocks_widen_the_interval_of_autocorrelated_data():
    rng = np.random.default_rng(3)
    seeds = [_ar1(rng, 1000, 0.95) for _ in range(3)]
    narrow = estimate(seeds, 90, block=1, rng=np.random.default_rng(1))
    wide = estimate(seeds, 90, block=50, rng=np.random.default_rng(1))
    assert (wide.hi - wide.lo) > 1.5 * (narrow.hi - narrow.lo)


def test_bootstrap_keeps_each_seed_at_its_size():
    """Stratified: a replicate never has fewer values of a seed than the seed has, so a
    seed with only tiny latencies cannot dominate a replicate."""
    small, big = np.zeros(100), np.full(100, 10.0)
    draws = bootstrap_quantile([small, big], 50, n_boot=200, block=10)
    # exactly half of each replicate is 0 and half 10: the median is always 5
    assert np.allclose(draws, 5.0)


def test_nan_and_empty_inputs_give_nan_not_an_exception():
    e = estimate([[], [math.nan]], 90)
    assert math.isnan(e.value) and e.n == 0
    assert all(math.isnan(x) for x in ratio_estimate([[1.0]], [[]], 90))
    assert all(math.isnan(x) for x in ratio_estimate([[1.0]], [[0.0, 0.0]], 90))


def test_ratio_of_a_scaled_copy_is_that_scale_within_its_interval():
    rng = np.random.default_rng(11)
    base = [rng.exponential(1.0, 800) for _ in range(3)]
    ratio, lo, hi = ratio_estimate([b * 0.5 for b in base], base, 90)
    assert ratio == pytest.approx(0.5)
    assert lo < 0.5 < hi < 0.7


@pytest.mark.parametrize(
    ("ratio", "lo", "hi", "want"),
    [
        (0.6, 0.5, 0.7, "met"),
        (0.75, 0.6, 0.9, "met on the estimate, not beyond noise (CI up to 0.90)"),
        (0.9, 0.7, 1.1, "missed by 12% on the estimate, within noise (CI from 0.70)"),
        (1.2, 1.0, 1.4, "missed by 50%"),
        (math.nan, math.nan, math.nan, "not measured"),
    ],
)
def test_verdict_wording(ratio, lo, hi, want):
    assert verdict(ratio, lo, hi, 0.8) == want
