"""extproc/strategies/scorers/prefix.py: the prefix-cache profile, its load guard and reasons."""

from __future__ import annotations

from extproc.prefix_index import PrefixIndex
from extproc.strategies import STRATEGIES

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
