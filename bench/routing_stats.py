"""Confidence intervals for the routing benchmark: moving-block bootstrap over seeds.

A point (workload x load x contender) is measured once per seed; each run gives a sequence of
per-request latencies in send order. The point estimate of a percentile is taken over all
measured requests of all seeds pooled. Its 95 % interval comes from a bootstrap that keeps the
structure of the data:

* stratified by seed: every replicate has each seed's runs at their own size (seeds are the
  unit that is repeated; no replicate is made of one lucky seed's requests only);
* moving blocks within a run: consecutive requests share a queue, so their latencies are
  correlated; resampling single requests would pretend there are more independent values than
  there are and give intervals that are too narrow. Blocks of ``block`` consecutive requests
  (default 25, i.e. ~1 s of arrivals at the benchmark's rates, longer than a queue's memory at
  85 % load) are drawn with replacement and concatenated to the run's length.

The ratio of two contenders (e.g. ours / the best Rust router) gets its interval from the
ratio of independent replicates of both (the runs are independent processes replaying the same
workload files).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_BOOT = 1000
BLOCK = 25
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    value: float  # pooled percentile
    lo: float  # lower bound of the interval
    hi: float  # upper bound
    per_seed: tuple[float, ...]  # the percentile of each seed's run alone
    n: int  # requests behind it

    def as_dict(self) -> dict[str, object]:
        return {
            "value": self.value,
            "lo": self.lo,
            "hi": self.hi,
            "per_seed": list(self.per_seed),
            "n": self.n,
        }


def _seed_arrays(per_seed: Sequence[Sequence[float]]) -> list[np.ndarray]:
    out = []
    for xs in per_seed:
        a = np.asarray(xs, dtype=float)
        a = a[np.isfinite(a)]
        if a.size:
            out.append(a)
    return out


def bootstrap_quantile(
    per_seed: Sequence[Sequence[float]],
    q: float,
    *,
    n_boot: int = N_BOOT,
    block: int = BLOCK,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``n_boot`` replicates of the pooled ``q``-th percentile (q in [0, 100])."""
    arrays = _seed_arrays(per_seed)
    if not arrays:
        return np.full(n_boot, math.nan)
    rng = rng if rng is not None else np.random.default_rng(0)
    parts = []
    for a in arrays:
        m = a.size
        b = max(1, min(block, m))
        k = math.ceil(m / b)
        starts = rng.integers(0, m - b + 1, size=(n_boot, k))
        idx = (starts[:, :, None] + np.arange(b)).reshape(n_boot, k * b)[:, :m]
        parts.append(a[idx])
    return np.percentile(np.concatenate(parts, axis=1), q, axis=1)


def estimate(
    per_seed: Sequence[Sequence[float]],
    q: float,
    *,
    n_boot: int = N_BOOT,
    block: int = BLOCK,
    level: float = LEVEL,
    rng: np.random.Generator | None = None,
) -> Estimate:
    """Pooled percentile with its percentile-bootstrap interval (see the module docstring)."""
    arrays = _seed_arrays(per_seed)
    if not arrays:
        return Estimate(math.nan, math.nan, math.nan, (), 0)
    value = float(np.percentile(np.concatenate(arrays), q))
    draws = bootstrap_quantile(arrays, q, n_boot=n_boot, block=block, rng=rng)
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return Estimate(
        value=value,
        lo=float(lo),
        hi=float(hi),
        per_seed=tuple(float(np.percentile(a, q)) for a in arrays),
        n=int(sum(a.size for a in arrays)),
    )


def ratio_estimate(
    num: Sequence[Sequence[float]],
    den: Sequence[Sequence[float]],
    q: float,
    *,
    n_boot: int = N_BOOT,
    block: int = BLOCK,
    level: float = LEVEL,
    rng: np.random.Generator | None = None,
) -> tuple[float, float, float]:
    """(ratio, lo, hi) of the pooled ``q``-th percentiles num / den."""
    a, b = _seed_arrays(num), _seed_arrays(den)
    if not a or not b:
        return math.nan, math.nan, math.nan
    rng = rng if rng is not None else np.random.default_rng(1)
    top = float(np.percentile(np.concatenate(a), q))
    bottom = float(np.percentile(np.concatenate(b), q))
    if bottom <= 0:
        return math.nan, math.nan, math.nan
    ra = bootstrap_quantile(a, q, n_boot=n_boot, block=block, rng=rng)
    rb = bootstrap_quantile(b, q, n_boot=n_boot, block=block, rng=rng)
    ratios = ra / np.where(rb > 0, rb, np.nan)
    lo, hi = np.nanpercentile(ratios, [50 * (1 - level), 50 * (1 + level)])
    return top / bottom, float(lo), float(hi)


def verdict(ratio: float, lo: float, hi: float, target: float) -> str:
    """How a measured ratio (with its interval) stands against ``ratio <= target``."""
    if math.isnan(ratio):
        return "not measured"
    if hi <= target:
        return "met"
    if ratio <= target:
        return f"met on the estimate, not beyond noise (CI up to {hi:.2f})"
    if lo <= target:
        return (
            f"missed by {ratio / target - 1:.0%} on the estimate, within noise (CI from {lo:.2f})"
        )
    return f"missed by {ratio / target - 1:.0%}"
