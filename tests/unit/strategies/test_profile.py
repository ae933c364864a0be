"""extproc/strategies/profile.py: a profile combines its scorers' weighted scores;
with_weights / with_params."""

from __future__ import annotations

import math
import random

import pytest

from extproc.decide import decide
from extproc.prefix_index import PrefixIndex
from extproc.strategies import STRATEGIES, RequestFacts

from ..helpers import registry, scrape_ok, vm
from .helpers import RANDOM, loaded, profile


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


def test_with_weights_and_with_params_validate():
    w = STRATEGIES["weighted"]
    assert w.with_weights({"queue": 0, "latency": 1}).weights == {
        "kv": 1,
        "prefix": 4,
        "lora": 1,
        "latency": 1,
    }
    for bad in ({"nope": 1}, {"queue": math.inf}, {"queue": -1}):
        with pytest.raises(ValueError):
            w.with_weights(bad)
    p = STRATEGIES["prefix-cache"]
    for bad in ({"nope": 1}, {"guard_abs": -1.0}):
        with pytest.raises(ValueError):
            p.with_params("prefix", bad)
