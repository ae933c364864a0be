"""Model pools, LoRA affinity, prefix-cache, session and weighted profiles (pure)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from extproc.decide import UnknownModel, decide
from extproc.metrics_parser import VllmMetrics
from extproc.prefix_index import PrefixIndex
from extproc.strategies import FALLBACKS, STRATEGIES, RequestFacts

from .helpers import registry, scrape_ok, vm

RANDOM = FALLBACKS["random"]


def run(reg, name, facts=None, seed=0, profile=None):
    profile = profile or STRATEGIES[name]
    return decide(profile, RANDOM, facts or RequestFacts(), reg.snapshot(), random.Random(seed))


def two_models():
    reg, clock = registry(4)
    for i in range(4):
        scrape_ok(reg, i, vm(running=i, models=("A",) if i < 2 else ("B",)))
    return reg


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_model_pools_never_cross(name):
    reg = two_models()
    for seed in range(30):
        d = run(reg, name, RequestFacts(model="B", seq=seed), seed)
        assert d.backend.index in (2, 3)


def test_unknown_model_raises_with_available_models():
    reg = two_models()
    with pytest.raises(UnknownModel) as exc:
        run(reg, "least-request", RequestFacts(model="C"))
    assert exc.value.available == ("A", "B")


def test_unknown_model_may_go_to_a_backend_not_yet_scraped():
    reg, _ = registry(3)
    scrape_ok(reg, 0, vm(models=("A",)))
    scrape_ok(reg, 1, vm(models=("A",)))
    d = run(reg, "least-request", RequestFacts(model="C"))
    assert d.backend.index == 2 and d.reason == "cold-cache"


def test_no_model_reported_means_no_filtering():
    reg, _ = registry(2)
    for i in range(2):
        scrape_ok(reg, i, vm(models=()))
    assert run(reg, "least-request", RequestFacts(model="anything")).reason == "metrics"


def lora_metrics(running: tuple[str, ...], max_lora: int = 1) -> VllmMetrics:
    return replace(vm(models=("base",)), lora_running=running, max_lora=max_lora)


def test_lora_prefers_running_or_free_slot_over_a_full_server():
    reg, _ = registry(3)
    for i in range(3):
        reg.records[i].served_models = frozenset({"base", "ad1", "ad2"})
        reg.records[i].adapters = frozenset({"ad1", "ad2"})
    scrape_ok(reg, 0, lora_metrics(("ad1",)))  # full, running ad1
    scrape_ok(reg, 1, lora_metrics(("ad2",)))  # full, running ad2
    scrape_ok(reg, 2, replace(lora_metrics(()), running=50))  # free slot but busy
    picks = {
        run(reg, "least-request", RequestFacts(model="ad1"), s).backend.index for s in range(20)
    }
    assert picks == {0}  # 1 would have to evict ad2; 2 is far busier
    base = {run(reg, "random", RequestFacts(model="base"), s).backend.index for s in range(40)}
    assert base == {0, 1, 2}  # base-model requests are not restricted


def prefix_facts(index: PrefixIndex, text: str, **kw) -> RequestFacts:
    hashes = index.hashes("m", text)
    return RequestFacts(
        has_prompt=True, prefix_match=lambda ep: index.match_fraction(ep, hashes), **kw
    )


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


def test_session_is_sticky_and_moves_only_when_its_server_goes():
    reg, _ = registry(4)
    for i in range(4):
        scrape_ok(reg, i, vm())
    keys = [f"user-{i}" for i in range(200)]
    before = {k: run(reg, "session", RequestFacts(session_key=k)).backend.endpoint for k in keys}
    again = {
        k: run(reg, "session", RequestFacts(session_key=k), seed=9).backend.endpoint for k in keys
    }
    assert before == again
    assert len(Counter(before.values())) == 4  # spread over all servers
    gone = "10.0.0.2:8000"
    reg.set_backends([r.url for r in reg.records if r.endpoint != gone])
    after = {k: run(reg, "session", RequestFacts(session_key=k)).backend.endpoint for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == gone}


def test_session_avoids_unhealthy_server():
    reg, _ = registry(3)
    for i in range(3):
        scrape_ok(reg, i, vm())
    key = "abc"
    home = run(reg, "session", RequestFacts(session_key=key)).backend.index
    rec = reg.records[home]
    for _ in range(3):
        reg.record_failure(rec, "refused", timeout=False)
    moved = run(reg, "session", RequestFacts(session_key=key)).backend.index
    assert moved != home
    scrape_ok(reg, home, vm())
    assert run(reg, "session", RequestFacts(session_key=key)).backend.index == home


def test_weighted_blends_and_weights_change_the_choice():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm(running=10, kv=0.9))
    scrape_ok(reg, 1, vm(running=0, kv=0.1))
    index = PrefixIndex()
    prompt = "shared " * 100
    index.record("10.0.0.1:8000", index.hashes("m", prompt))
    facts = prefix_facts(index, prompt)
    assert run(reg, "weighted", facts).backend.index == 1  # load + kv (4) beat prefix (3)
    prefix_heavy = STRATEGIES["weighted"].with_weights(
        {"queue": 1, "kv": 1, "prefix": 10, "lora": 0}
    )
    assert run(reg, "weighted", facts, profile=prefix_heavy).backend.index == 0
