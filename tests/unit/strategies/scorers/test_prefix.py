"""extproc/strategies/scorers/prefix.py: the prefix-cache profile, its load guard and reasons."""

from __future__ import annotations

import random
from random import Random

import pytest

from extproc.prefix_index import PrefixIndex
from extproc.strategies import STRATEGIES
from extproc.strategies.base import Context, Scores
from extproc.strategies.scorers import prefix as prefix_scorer

from ...helpers import registry, scrape_ok, vm
from ..helpers import prefix_facts, run

GUARD4 = STRATEGIES["prefix-cache"].with_params("prefix", {"guard_abs": 4.0})


def test_prefix_cache_sticks_until_the_load_guard():
    reg, _ = registry(3)
    for i in range(3):
        scrape_ok(reg, i, vm(running=1))
    index = PrefixIndex()
    prompt = "system prompt shared by the group " * 20 + "question"
    index.record("10.0.0.2:8000", index.hashes("m", prompt))
    d = run(reg, "prefix-cache", prefix_facts(index, prompt), profile=GUARD4)
    assert (d.backend.index, d.reason) == (1, "prefix-hit")
    scrape_ok(reg, 1, vm(running=6))  # 6 - 1 = 5 > 4 and 6 > 1.5 x 1
    d = run(reg, "prefix-cache", prefix_facts(index, prompt), profile=GUARD4)
    assert d.reason == "load-guard" and d.backend.index in (0, 2)
    scrape_ok(reg, 1, vm(running=5))  # 5 - 1 = 4: not more than 4 -> still sticks
    assert (
        run(reg, "prefix-cache", prefix_facts(index, prompt), profile=GUARD4).reason == "prefix-hit"
    )


def test_prefix_miss_goes_to_least_loaded():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm(running=3))
    scrape_ok(reg, 1, vm(running=1))
    d = run(reg, "prefix-cache", prefix_facts(PrefixIndex(), "x" * 500))
    assert (d.backend.index, d.reason) == (1, "prefix-miss")


def test_prefix_cache_works_on_a_cold_cache():
    reg, _ = registry(3)
    index = PrefixIndex()
    prompt = "p" * 1000
    index.record("10.0.0.3:8000", index.hashes("m", prompt))
    assert run(reg, "prefix-cache", prefix_facts(index, prompt)).backend.index == 2


def test_asking_only_the_holders_decides_as_asking_every_candidate(monkeypatch):
    """The processor's facts name the few servers holding the prompt (prefix_matches); the
    scorer must then score, guard and pick exactly as when it asks every candidate and the
    profile adds its scores to every candidate (not only to the holders)."""
    rng = random.Random(3)
    prompts = [f"group {g} shared system prompt " * 8 + "question" for g in range(4)]
    for trial in range(60):
        n = rng.choice([3, 8, 40])
        reg, _ = registry(n)
        for i in range(n):
            scrape_ok(reg, i, vm(running=rng.randint(0, 12), waiting=rng.randint(0, 3)))
        index = PrefixIndex()
        for _ in range(rng.randint(0, n // 2)):  # up to ~n/4 holders: the sparse path too
            text = rng.choice(prompts)[: rng.randint(64, 300)]
            index.record(f"10.0.0.{rng.randrange(n) + 1}:8000", index.hashes("m", text))
        prompt = rng.choice(prompts)
        snap = reg.snapshot()
        everyone = snap.everyone
        # every third trial: candidates narrowed for this request (not the pool's own list)
        candidates = everyone.eligible[: n // 2 + 1] if trial % 3 == 0 else everyone.eligible
        for profile in (GUARD4, STRATEGIES["weighted"]):
            outcomes = []
            for dense in (False, True):
                facts = prefix_facts(index, prompt, per_candidate=dense)
                with monkeypatch.context() as mp:
                    if dense:
                        mp.setattr(prefix_scorer, "direct", lambda m, nonzero=None: Scores(m))
                    ranking = profile.rank(Context(facts, snap, everyone, candidates, Random(0)))
                    chosen, reason = profile.choose(
                        Context(facts, snap, everyone, candidates, Random(trial))
                    )
                values = None if ranking is None else list(ranking.scores.values)
                outcomes.append((chosen.index, reason, values))
            (a, ra, va), (b, rb, vb) = outcomes
            assert (a, ra) == (b, rb), (trial, profile.name)
            assert va == (None if vb is None else pytest.approx(vb)), (trial, profile.name)
