"""extproc/strategies/pickers.py: max, near-best, near-random, random and round-robin."""

from __future__ import annotations

import math
import random
from collections import Counter

from extproc.decide import decide
from extproc.strategies import PICKERS, STRATEGIES, RequestFacts
from extproc.strategies.base import Reason

from ..helpers import registry, scrape_ok, vm
from .helpers import RANDOM, ctx_of, loaded, profile, run


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


def test_near_best_with_broken_load_metrics_still_answers():
    reg, _ = loaded([1, 1])
    ctx = ctx_of(reg)
    ctx._loads = [math.nan, math.nan]  # what a NaN scrape would give
    assert PICKERS["near-best"].pick(ctx, None, {"tolerance": 0.0}) in ctx.candidates


def test_round_robin_cycles_in_order():
    reg, _ = registry(3)
    assert [run(reg, "round-robin", seq=i).backend.index for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_random_is_roughly_uniform():
    reg, _ = registry(4)
    counts = Counter(run(reg, "random", seed=s).backend.index for s in range(2000))
    assert all(400 <= c <= 600 for c in counts.values()), counts
