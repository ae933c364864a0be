"""extproc/decide.py: which servers a request may go to (model pools, LoRA affinity)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from extproc.decide import UnknownModel
from extproc.metrics_parser import VllmMetrics
from extproc.strategies import STRATEGIES, RequestFacts

from .helpers import registry, scrape_ok, vm
from .strategies.helpers import run


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


def test_fallbacks_in_a_large_pool_are_spread_least_loaded_and_never_the_pick():
    """Above FALLBACK_SAMPLE candidates, fallbacks come from a sample spread over the pool (not
    neighbours of one another, which often share a node), least loaded of it first."""
    import random

    from extproc.decide import FALLBACK_SAMPLE, rank_fallbacks

    n = 200
    reg, _ = registry(n)
    for i in range(n):
        scrape_ok(reg, i, vm(running=(i * 7) % 13))
    snap = reg.snapshot()
    candidates = snap.everyone.eligible
    rng = random.Random(1)
    seen = set()
    for _ in range(50):
        chosen = rng.choice(candidates)
        fallbacks = rank_fallbacks(chosen, candidates, snap, 3, rng)
        indices = [b.index for b in fallbacks]
        assert len(set(indices)) == 3 and chosen.index not in indices
        loads = [b.running for b in fallbacks]
        assert loads == sorted(loads)
        # spread: no two fallbacks closer than a sample step apart (minus rounding)
        gaps = [abs(a - b) for a in indices for b in indices if a != b]
        assert min(min(g, n - g) for g in gaps) >= n // (FALLBACK_SAMPLE + 1) - 1
        seen.update(indices)
    assert len(seen) > 30  # different starts: not always the same few servers
