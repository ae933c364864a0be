"""extproc/strategies/base.py: scores, signals, the in-flight correction, rankings, the
Scorer contract."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from extproc.snapshot import Snapshot
from extproc.strategies import RequestFacts
from extproc.strategies.base import (
    Context,
    Ranking,
    Scorer,
    Scores,
    Signal,
    higher_is_better,
    inverted,
    lower_is_better,
    one_hot,
    position_of,
    selected,
)

from ..helpers import scrape_ok, vm
from .helpers import ctx_of, loaded


# -- scores ------------------------------------------------------------------------------------
def test_score_forms_normalise_into_0_1_higher_is_better():
    assert lower_is_better([2.0, 4.0, 6.0]).normalised() == [1.0, 0.5, 0.0]
    assert higher_is_better([2.0, 4.0, 6.0]).normalised() == [0.0, 0.5, 1.0]
    assert inverted([0.25, 1.0]).normalised() == [0.75, 0.0]
    assert one_hot(3, 1).normalised() == [0.0, 1.0, 0.0]
    assert lower_is_better([3.0, 3.0]).normalised() == [1.0, 1.0]  # all equal: all best
    assert lower_is_better([3.0, 3.0]).scale == 0.0


def test_min_max_scores_count_nan_and_infinities_as_worst():
    s = lower_is_better([math.nan, 1.0, 3.0, math.inf])
    assert s.normalised() == [0.0, 1.0, 0.0, 0.0]
    assert lower_is_better([math.nan, math.nan]).scale == 0.0


@pytest.mark.parametrize(
    ("sig", "scores"),
    [
        (Signal([2.0, 4.0, 6.0], 1.0), [1.0, 0.5, 0.0]),
        (Signal([5.0, 5.2], 1.0), [1.0, 0.8]),  # the range is at least one request wide
        (Signal([5.0, 5.0], 0.0), [1.0, 1.0]),  # equal and no unit: no information
        (Signal([1000.0, 800.0], 10.0, norm="relative"), [0.0, 0.2]),
        (Signal([0.25, 0.5], 0.01, norm="absolute"), [0.75, 0.5]),
        (Signal([0.25, 0.5], 0.01, lower_is_better=False, norm="absolute"), [0.25, 0.5]),
        (Signal([10.0, 20.0], 1.0, lower_is_better=False), [0.0, 1.0]),
        (Signal([10.0, 20.0], 1.0, lower_is_better=False, norm="relative"), [0.5, 1.0]),
        (Signal([0.0, 0.0], 1.0, norm="relative"), [1.0, 1.0]),
        (Signal([math.nan, 1.0, 2.0], 1.0), [0.0, 1.0, 0.0]),
    ],
)
def test_signal_normalisation(sig, scores):
    values, offset, scale = sig.affine()
    assert [pytest.approx(offset + scale * v) for v in values] == scores


# -- the in-flight correction ------------------------------------------------------------------
def test_in_flight_correction_touches_only_candidates_with_requests_in_flight():
    reg, _ = loaded([1, 2, 3, 4])
    reg.on_pick(1)
    reg.on_pick(1)
    reg.on_pick(3)
    ctx = ctx_of(reg)
    assert sorted(ctx.active) == [1, 3]
    assert ctx.with_inflight([10.0, 10.0, 10.0, 10.0], [1.0, 0.5, 1.0, 2.0]) == [
        10.0,
        11.0,
        10.0,
        12.0,
    ]
    assert ctx.loads == [1.0, 4.0, 3.0, 5.0]


def test_in_flight_correction_for_most_candidates_is_one_pass_with_the_same_result():
    reg, _ = loaded([0, 0, 0, 0])
    for i in range(4):
        reg.on_pick(i)
    ctx = ctx_of(reg)
    assert len(ctx.active) == 4
    assert ctx.with_inflight([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]) == [2.0, 4.0, 6.0, 8.0]
    assert ctx.with_inflight([1.0, 2.0, 3.0, 4.0]) == [2.0, 3.0, 4.0, 5.0]


def test_in_flight_positions_follow_a_narrowed_candidate_list():
    reg, _ = loaded([0, 0, 0])
    reg.on_pick(2)
    pool = reg.snapshot().everyone
    ctx = ctx_of(reg, candidates=pool.eligible[1:])  # e.g. narrowed by LoRA affinity
    assert ctx.pending == [0, 1] and ctx.active == [1]
    bare = Snapshot(backends=reg.snapshot().backends, pending=(0, 0, 3))  # no active list: derived
    c = Context(RequestFacts(), bare, pool, pool.eligible, random.Random(0))
    assert c.active == [2] and c.loads == [0.0, 0.0, 3.0]


def test_columns_are_computed_once_per_snapshot_and_pool():
    reg, _ = loaded([1, 2])
    calls = []

    def col(cands):
        calls.append(1)
        return [b.running for b in cands]

    ctx = ctx_of(reg)
    assert ctx.column(col) == ctx_of(reg).column(col) == [1.0, 2.0]
    assert len(calls) == 1
    ctx_of(reg, candidates=reg.snapshot().everyone.eligible[:1]).column(col)  # narrowed: not cached
    scrape_ok(reg, 0, vm(running=5))  # a new snapshot: computed again
    assert ctx_of(reg).column(col) == [5.0, 2.0] and len(calls) == 3


# -- rankings -----------------------------------------------------------------------------------
def test_ranking_selects_exact_ties_or_a_tolerance_band():
    r = Ranking(Scores([0.9, 1.0, 0.95, 1.0, 0.2]), 1.0)
    assert r.select(0.0) == [False, True, False, True, False]
    assert r.select(0.1) == [True, True, True, True, False]
    assert Ranking(Scores([0.1, 0.5]), 1.0).select(0.0) == 1
    low = Ranking(lower_is_better([5.0, 1.0, 2.0]), 0.5)  # weight 1 of 2: half the spread
    assert low.select(0.2) == [False, True, True]
    assert Ranking(lower_is_better([3.0, 3.0]), 1.0).select(0.5) is None  # no spread: all


def test_ranking_ignores_nan_and_infinite_scores():
    r = Ranking(Scores([math.nan, 0.5, math.inf, 0.7]), 1.0)
    assert r.select(0.0) == [False, False, False, True]
    assert r.best_one(random.Random(0)) == 3
    assert Ranking(Scores([math.nan, math.nan]), 1.0).select(0.0) is None
    assert Ranking(Scores([math.nan, math.nan]), 1.0).best_one(random.Random(0)) in (0, 1)


def test_position_of_breaks_ties_uniformly():
    counts = Counter(position_of([3, 1, 3, 3, 0], 3, random.Random(s)) for s in range(3000))
    assert set(counts) == {0, 2, 3} and min(counts.values()) > 850
    assert (
        selected("abc", None) == "abc"
        and selected("abc", 1) == ("b",)
        and selected("abc", [1, 0, 1]) == ["a", "c"]
    )


# -- scorers ------------------------------------------------------------------------------------
def test_a_scorer_is_a_signal_or_a_request_scorer_not_both():
    with pytest.raises(ValueError, match="exactly one"):
        Scorer("x", "doc")
    with pytest.raises(ValueError, match="exactly one"):
        Scorer("x", "doc", signal=lambda c: Signal([], 1.0), score=lambda ctx, p: None)


def test_least_load_is_min_of_loads_without_a_pass_over_every_candidate():
    """least_load (per-snapshot order of scraped loads + the candidates with requests in
    flight) must equal min(loads) exactly: for the pool, a narrowed candidate list, a NaN."""
    rng = random.Random(4)
    for trial in range(120):
        n = rng.choice([1, 2, 5, 30, 70, 100])  # the plain scan below 64, the order above
        reg, _ = loaded([float(rng.randint(0, 6)) for _ in range(n)])
        if trial % 10 == 0:
            scrape_ok(reg, rng.randrange(n), vm(running=math.nan))
        for _ in range(rng.choice([0, 3, rng.randint(0, 3 * n)])):  # few or many in flight
            reg.on_pick(rng.randrange(n))
        ctx = ctx_of(reg)
        if trial % 4 == 0:  # narrowed for this request: not the pool's own list
            ctx = ctx_of(reg, candidates=ctx.candidates[: max(1, n // 2)])
        loads = ctx.loads
        least = ctx.least_load
        if any(math.isnan(x) for x in loads):
            assert least is min(loads) or (math.isnan(least) and math.isnan(min(loads)))
        else:
            assert least == min(loads) and least in loads, trial


def test_sparse_scores_rank_as_their_dense_copy():
    """Scores that name their non-zero positions (prefix holders, a session's home) are ranked
    from those alone; select and best_one must answer as for the same values without them."""
    rng = random.Random(8)
    for _ in range(300):
        n = rng.randint(1, 12)
        values = [0.0] * n
        for i in rng.sample(range(n), rng.randint(0, n)):
            values[i] = rng.choice([0.0, 0.25, 0.5, 1.0])
        nz = tuple(i for i, x in enumerate(values) if x)
        factor = rng.choice([1.0, 0.3])
        sparse, dense = Ranking(Scores(values, nonzero=nz), factor), Ranking(Scores(values), factor)
        for tolerance in (0.0, 0.05, 0.2):
            kept = [list(selected(range(n), r.select(tolerance))) for r in (sparse, dense)]
            assert kept[0] == kept[1], (values, tolerance)
        seed = rng.random()
        assert sparse.best_one(random.Random(seed)) == dense.best_one(random.Random(seed))
