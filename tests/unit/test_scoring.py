"""The scorer framework: scores, signals, the in-flight correction, rankings, pickers, profiles."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from extproc.decide import decide
from extproc.prefix_index import PrefixIndex
from extproc.snapshot import Snapshot
from extproc.strategies import FALLBACKS, PICKERS, SCORERS, STRATEGIES, RequestFacts
from extproc.strategies.base import (
    Context,
    Ranking,
    Reason,
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
from extproc.strategies.profile import Profile, Use

from .helpers import registry, scrape_ok, vm

RANDOM = FALLBACKS["random"]


def ctx_of(reg, facts=None, seed=0, candidates=None):
    snap = reg.snapshot()
    pool = snap.everyone
    return Context(
        facts or RequestFacts(),
        snap,
        pool,
        pool.eligible if candidates is None else candidates,
        random.Random(seed),
    )


def loaded(loads, **kw):
    reg, clock = registry(len(loads))
    for i, x in enumerate(loads):
        scrape_ok(reg, i, vm(running=x, **kw))
    return reg, clock


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


# -- rankings and pickers ----------------------------------------------------------------------
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


def profile(scorers, picker="max", **picker_params):
    uses = tuple(Use(SCORERS[n], w, dict(SCORERS[n].params)) for n, w in scorers.items())
    p = PICKERS[picker]
    return Profile("test", uses, p, {**p.params, **picker_params})


def test_near_best_takes_the_least_loaded_of_the_nearly_best():
    reg, _ = loaded([1, 9, 5], kv=0.0)
    for i, kv in enumerate([0.50, 0.45, 0.44]):
        scrape_ok(reg, i, vm(running=[1, 9, 5][i], kv=kv))
    facts = RequestFacts()
    run = lambda p: decide(p, RANDOM, facts, reg.snapshot(), random.Random(0)).backend.index
    assert run(profile({"kv": 1})) == 2  # the lowest usage
    assert (
        run(profile({"kv": 1}, "near-best", tolerance=0.02)) == 2
    )  # 0.44 and 0.45: 2 is less loaded
    assert (
        run(profile({"kv": 1}, "near-best", tolerance=0.1)) == 0
    )  # all three near: the least loaded
    picks = {
        decide(
            profile({"kv": 1}, "near-random", tolerance=0.02),
            RANDOM,
            facts,
            reg.snapshot(),
            random.Random(s),
        ).backend.index
        for s in range(40)
    }
    assert picks == {1, 2}


def test_round_robin_and_random_pickers_ignore_scores():
    reg, _ = loaded([0, 50, 50])
    rr = [
        decide(
            STRATEGIES["round-robin"], RANDOM, RequestFacts(seq=i), reg.snapshot(), random.Random(0)
        )
        for i in range(3)
    ]
    assert [d.backend.index for d in rr] == [0, 1, 2] and {d.reason for d in rr} == {
        Reason.ROUND_ROBIN
    }


def test_weights_shift_the_combined_score():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm(running=2, kv=0.9))
    scrape_ok(reg, 1, vm(running=6, kv=0.1))
    run = lambda p: (
        decide(p, RANDOM, RequestFacts(), reg.snapshot(), random.Random(0)).backend.index
    )
    assert run(profile({"queue": 3, "kv": 1})) == 0
    assert run(profile({"queue": 1, "kv": 3})) == 1
    assert run(profile({"queue": 1, "kv": 3, "session": 5})) == 1  # no key: session has no opinion


def test_request_scorers_combine_with_signals_and_each_other():
    reg, _ = loaded([1, 1, 1])
    index = PrefixIndex()
    prompt = "shared system prompt " * 50
    hashes = index.hashes("m", prompt)
    index.record("10.0.0.3:8000", hashes)
    facts = RequestFacts(
        has_prompt=True, prefix_match=lambda ep: index.match_fraction(ep, hashes), session_key="k"
    )
    run = lambda p: decide(p, RANDOM, facts, reg.snapshot(), random.Random(0))
    assert run(profile({"prefix": 1, "queue": 1})).backend.index == 2
    home = run(profile({"session": 1})).backend.index
    assert run(profile({"session": 3, "prefix": 1})).backend.index == home
    assert run(profile({"session": 1, "prefix": 3})).backend.index == 2


def test_every_candidate_scored_the_same_is_a_tie_broken_at_random():
    reg, _ = loaded([1, 1, 1])
    p = profile({"prefix": 1, "session": 1})  # no prompt, no key: no opinion at all
    assert {
        decide(p, RANDOM, RequestFacts(), reg.snapshot(), random.Random(s)).backend.index
        for s in range(40)
    } == {0, 1, 2}


def test_a_scorer_is_a_signal_or_a_request_scorer_not_both():
    with pytest.raises(ValueError, match="exactly one"):
        Scorer("x", "doc")
    with pytest.raises(ValueError, match="exactly one"):
        Scorer("x", "doc", signal=lambda c: Signal([], 1.0), score=lambda ctx, p: None)


def test_scorers_are_discovered_one_per_module():
    assert {"queue", "kv", "throughput", "latency", "prefix", "lora", "session"} <= set(SCORERS)
    assert all(s.doc for s in SCORERS.values())
    assert not SCORERS["prefix"].needs_metrics and SCORERS["queue"].needs_metrics


def test_the_profile_table_declares_every_strategy_of_the_api():
    assert list(STRATEGIES) == [
        "random",
        "round-robin",
        "least-request",
        "throughput",
        "least-kv-cache",
        "least-latency",
        "prefix-cache",
        "session",
        "weighted",
    ]
    assert STRATEGIES["weighted"].weights == {"queue": 2, "kv": 2, "prefix": 3, "lora": 1}
    for name in (
        "throughput",
        "least-kv-cache",
        "least-latency",
    ):  # lagging signals: with the queue
        assert "queue" in STRATEGIES[name].weights


def test_lora_scorer_prefers_the_server_running_the_adapter():
    from dataclasses import replace as dc_replace

    reg, _ = registry(3)
    for i in range(3):
        reg.records[i].served_models = frozenset({"base", "ad1"})
        reg.records[i].adapters = frozenset({"ad1"})
    base = vm(models=("base",))
    scrape_ok(reg, 0, dc_replace(base, lora_running=(), max_lora=2))  # a free slot
    scrape_ok(reg, 1, dc_replace(base, lora_running=("ad1",), max_lora=2))  # running it
    scrape_ok(reg, 2, dc_replace(base, lora_running=("x", "y"), max_lora=2))  # full
    lora_only = profile({"lora": 1})
    ctx = ctx_of(reg, RequestFacts(model="ad1"))
    assert SCORERS["lora"].score(ctx, {}).normalised() == [0.5, 1.0, 0.0]
    assert (
        SCORERS["lora"].score(ctx_of(reg, RequestFacts(model="base")), {}) is None
    )  # a base model
    assert (
        decide(
            lora_only, RANDOM, RequestFacts(model="ad1"), reg.snapshot(), random.Random(0)
        ).backend.index
        == 1
    )


def test_near_best_with_broken_load_metrics_still_answers():
    reg, _ = loaded([1, 1])
    ctx = ctx_of(reg)
    ctx._loads = [math.nan, math.nan]  # what a NaN scrape would give
    assert PICKERS["near-best"].pick(ctx, None, {"tolerance": 0.0}) in ctx.candidates


def test_a_module_without_scorer_is_skipped_and_a_duplicate_name_refused(monkeypatch):
    import pkgutil
    import types

    from extproc.strategies import scorers

    fake = {
        "helper": types.SimpleNamespace(),
        "a": types.SimpleNamespace(SCORER=SCORERS["queue"]),
        "b": types.SimpleNamespace(SCORER=SCORERS["queue"]),
    }
    monkeypatch.setattr(
        pkgutil, "iter_modules", lambda path: [types.SimpleNamespace(name=n) for n in fake]
    )
    monkeypatch.setattr(
        scorers.importlib, "import_module", lambda name: fake[name.rsplit(".", 1)[1]]
    )
    with pytest.raises(RuntimeError, match="two scorers are named 'queue'"):
        scorers._discover()
    del fake["b"]
    assert list(scorers._discover()) == ["queue"]
