"""Contract tests run for EVERY profile (built-in strategies, and profiles a config file adds)
through extproc/decide.py, and get_strategy (extproc/strategies/__init__.py). Each built-in's own
rule is tested with its scorer or picker in tests/unit/strategies/."""

from __future__ import annotations

import random

import pytest

from extproc.decide import NoBackends, decide
from extproc.strategies import FALLBACKS, RequestFacts, get_strategy, load_profiles

from .helpers import registry, scrape_ok, vm

# The built-ins plus profiles of the shapes a --config file may add.
PROFILES = load_profiles(
    {
        "cfg-near-random": {
            "scorers": {"queue": 1, "latency": 1},
            "picker": {"name": "near-random", "tolerance": 0.3},
        },
        "cfg-near-best": {
            "scorers": {"throughput": 1, "kv": 1},
            "picker": {"name": "near-best", "tolerance": 0.2},
        },
        "cfg-cached": {"scorers": {"prefix": 2, "lora": 1, "queue": 1}},
    }
)
ALL = sorted(PROFILES)
RANDOM = FALLBACKS["random"]

# The reason each strategy reports on a cold cache / a partial one, with no request body.
COLD_REASON = {
    "random": "random",
    "round-robin": "round-robin",
    "prefix-cache": "prefix-miss",
    "session": "no-session",
    "weighted": "cold-cache",
    "cfg-cached": "cold-cache",
}
PARTIAL_REASON = {
    "random": "random",
    "round-robin": "round-robin",
    "prefix-cache": "prefix-miss",
    "session": "no-session",
    "weighted": "metrics",
    "cfg-cached": "metrics",
}


def run(reg, name, seed=0, seq=0):
    return decide(
        PROFILES[name], RANDOM, RequestFacts(seq=seq), reg.snapshot(), random.Random(seed)
    )


@pytest.mark.parametrize("name", ALL)
def test_empty_snapshot_is_no_backends(name):
    reg, _ = registry(0)
    with pytest.raises(NoBackends):
        run(reg, name)


@pytest.mark.parametrize("name", ALL)
def test_cold_snapshot_still_answers(name):
    reg, _ = registry(3)
    d = run(reg, name)
    assert d.backend.endpoint in {"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"}
    assert d.reason == COLD_REASON.get(name, "cold-cache") and d.strategy == name
    assert PROFILES[name].needs_metrics == (name not in COLD_REASON)


@pytest.mark.parametrize("name", ALL)
def test_partial_snapshot_answers_with_metrics_reason(name):
    reg, _ = registry(3)
    scrape_ok(reg, 0, vm(running=1))
    d = run(reg, name)
    assert d.reason == PARTIAL_REASON.get(name, "metrics")


@pytest.mark.parametrize("name", ALL)
def test_ties_are_broken_at_random(name):
    reg, _ = registry(3)
    for i in range(3):
        scrape_ok(reg, i, vm(running=2, kv=0.5))
    chosen = {run(reg, name, seed=s, seq=s).backend.index for s in range(60)}
    assert chosen == {0, 1, 2}


@pytest.mark.parametrize("name", ALL)
def test_strategy_exception_falls_back(name, monkeypatch):
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm())
    strategy = PROFILES[name]

    class Boom:
        needs_metrics = strategy.needs_metrics

        def __init__(self):
            self.name = name

        def choose(self, *a):
            raise RuntimeError("bug")

    d = decide(Boom(), RANDOM, RequestFacts(), reg.snapshot(), random.Random(0))
    assert d.reason == "fallback-error" and d.strategy == name


def test_unknown_strategy_name_lists_valid_values():
    with pytest.raises(KeyError, match="least-request"):
        get_strategy("nope")
