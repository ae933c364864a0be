"""Every cache state of the core issue: cold, partial, unhealthy, recovery, stale, unknown."""

from __future__ import annotations

import random

import pytest

from extproc.decide import NoBackends, decide
from extproc.snapshot import Freshness
from extproc.strategies import FALLBACKS, STRATEGIES, RequestFacts

from .helpers import fail, registry, scrape_ok, vm

LR = STRATEGIES["least-request"]
RANDOM = FALLBACKS["random"]


def pick(reg, strategy=LR, seed=0):
    return decide(strategy, RANDOM, RequestFacts(), reg.snapshot(), random.Random(seed))


def test_empty_pool_raises_no_backends():
    reg, _ = registry(0)
    with pytest.raises(NoBackends):
        pick(reg)


def test_cold_cache_routes_by_fallback_over_every_backend():
    reg, _ = registry(3)
    reg.rebuild()
    assert reg.snapshot().cold
    chosen = {pick(reg, seed=s).backend.endpoint for s in range(60)}
    assert {pick(reg, seed=s).reason for s in range(5)} == {"cold-cache"}
    assert len(chosen) == 3  # random over all, not stuck on the first


def test_cold_cache_even_when_every_scrape_fails():
    # A vLLM still loading its model answers /metrics with 503: unknown AND failing.
    reg, _ = registry(2)
    for i in range(2):
        fail(reg, i, times=5)
    reg.rebuild()
    d = pick(reg)
    assert d.reason == "cold-cache"


@pytest.mark.parametrize("name", ["least-request", "weighted"])
def test_cold_and_failing_is_cold_cache_not_all_unhealthy(name):
    reg, _ = registry(2)
    for i in range(2):
        fail(reg, i, times=5)  # every vLLM still loading: /metrics answers 503
    reg.rebuild()
    assert pick(reg, STRATEGIES[name]).reason == "cold-cache"


def test_first_good_scrape_leaves_cold_immediately():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm(running=1))  # rebuilds by itself: an unknown -> known transition
    assert not reg.snapshot().cold
    assert pick(reg).reason == "metrics"


def test_partial_cache_gives_newcomer_the_median_prior():
    reg, _ = registry(4)
    for i, running in enumerate([2.0, 4.0, 10.0]):
        scrape_ok(reg, i, vm(running=running))
    reg.rebuild()
    newcomer = reg.snapshot().backends[3]
    assert newcomer.freshness is Freshness.UNKNOWN and newcomer.prior
    assert newcomer.running == 4.0  # median of 2, 4, 10 — not 0 (flood), not excluded (starve)
    # With loads 2, 4, 10 and the newcomer at 4, least-request picks the backend at 2.
    assert pick(reg).backend.index == 0


def test_newcomer_is_neither_flooded_nor_starved():
    reg, _ = registry(3)
    scrape_ok(reg, 0, vm(running=3))
    scrape_ok(reg, 1, vm(running=3))
    reg.rebuild()
    counts = [0, 0, 0]
    rng = random.Random(1)
    for _ in range(30):  # no scrape in between: pending accounting spreads the burst
        d = decide(LR, RANDOM, RequestFacts(), reg.snapshot(), rng)
        reg.on_pick(d.backend.index)
        counts[d.backend.index] += 1
    assert all(8 <= c <= 12 for c in counts), counts


def test_unhealthy_after_three_consecutive_failures_then_excluded():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm(running=50))
    scrape_ok(reg, 1, vm(running=0))
    fail(reg, 1, times=2)
    reg.rebuild()
    assert reg.snapshot().backends[1].healthy
    fail(reg, 1, times=1)
    reg.rebuild()
    assert not reg.snapshot().backends[1].healthy
    # The idle-looking backend is broken: the busy but healthy one takes everything.
    assert {pick(reg, seed=s).backend.index for s in range(20)} == {0}


def test_all_unhealthy_uses_every_backend():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm(running=5))
    scrape_ok(reg, 1, vm(running=1))
    fail(reg, 0, times=3)
    fail(reg, 1, times=3)
    reg.rebuild()
    d = pick(reg)
    assert d.reason == "all-unhealthy"
    assert d.backend.index == 1  # still ranks on last-known values


def test_recovery_on_first_good_scrape():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm(running=9))
    fail(reg, 1, times=4)
    reg.rebuild()
    assert not reg.snapshot().backends[1].healthy
    scrape_ok(reg, 1, vm(running=0))
    reg.rebuild()
    assert reg.snapshot().backends[1].healthy
    assert pick(reg).backend.index == 1


def test_timeouts_never_make_a_backend_unhealthy_or_idle():
    reg, clock = registry(2)
    scrape_ok(reg, 0, vm(running=2))
    scrape_ok(reg, 1, vm(running=30))  # loaded: its /metrics then starts timing out
    fail(reg, 1, times=10, timeout=True)
    clock.advance(5.0)
    scrape_ok(reg, 0, vm(running=2))
    reg.rebuild()
    b1 = reg.snapshot().backends[1]
    assert b1.healthy and b1.overloaded
    assert b1.freshness is Freshness.STALE and b1.running == 30  # last-known value kept
    assert pick(reg).backend.index == 0


def test_overloaded_backend_past_max_age_gets_the_worst_prior_not_the_median():
    reg, clock = registry(3)
    for i, r in enumerate([1.0, 2.0, 40.0]):
        scrape_ok(reg, i, vm(running=r))
    fail(reg, 2, times=5, timeout=True)
    clock.advance(11.0)  # past max_metrics_age for backend 2
    scrape_ok(reg, 0, vm(running=1))
    scrape_ok(reg, 1, vm(running=2))
    reg.rebuild()
    b2 = reg.snapshot().backends[2]
    assert b2.freshness is Freshness.UNKNOWN and b2.prior
    assert b2.running == 2.0  # max of the known (1, 2): busy, not the median, not 0
    assert pick(reg).backend.index == 0


def test_plain_unknown_after_max_age_gets_median_prior():
    reg, clock = registry(3)
    for i in range(3):
        scrape_ok(reg, i, vm(running=float(i)))
    clock.advance(10.5)
    scrape_ok(reg, 0, vm(running=1))
    scrape_ok(reg, 1, vm(running=3))
    reg.rebuild()
    b2 = reg.snapshot().backends[2]
    assert b2.freshness is Freshness.UNKNOWN
    assert b2.running == 2.0


def test_stale_keeps_last_known_values_plus_pending():
    reg, clock = registry(2)
    scrape_ok(reg, 0, vm(running=3))
    scrape_ok(reg, 1, vm(running=3))
    clock.advance(2.0)  # both stale now
    reg.rebuild()
    snap = reg.snapshot()
    assert [b.freshness for b in snap.backends] == [Freshness.STALE, Freshness.STALE]
    assert not snap.cold
    for _ in range(2):
        reg.on_pick(0)
    assert pick(reg).backend.index == 1  # 3 + 2 pending > 3


def test_token_rate_and_recent_ttft_from_counter_deltas():
    reg, clock = registry(1)
    scrape_ok(reg, 0, vm(prompt=100, gen=100, ttft_sum=1.0, ttft_count=10))
    clock.advance(1.0)
    scrape_ok(reg, 0, vm(prompt=300, gen=400, ttft_sum=3.0, ttft_count=12))
    reg.rebuild()
    b = reg.snapshot().backends[0]
    assert b.token_rate == pytest.approx(500.0)
    assert b.ttft == pytest.approx(1.0)  # (3-1)/(12-10): recent, not lifetime 0.25


def test_counter_reset_clears_the_rate_window():
    reg, clock = registry(1)
    scrape_ok(reg, 0, vm(prompt=1000, gen=1000))
    clock.advance(1.0)
    scrape_ok(reg, 0, vm(prompt=10, gen=10))  # restarted server
    clock.advance(1.0)
    scrape_ok(reg, 0, vm(prompt=110, gen=10))
    reg.rebuild()
    assert reg.snapshot().backends[0].token_rate == pytest.approx(100.0)


def test_removed_backend_is_gone_and_its_late_completion_is_harmless():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm())
    token = reg.on_pick(0)
    reg.set_backends(["http://10.0.0.2:8000"])
    assert [b.endpoint for b in reg.snapshot().backends] == ["10.0.0.2:8000"]
    reg.on_done(token)  # must not touch the new slot 0
    assert reg.snapshot().pending == (0,)


def test_reused_views_are_what_a_full_build_gives_through_every_state():
    """Rebuilds keep the views of backends that did not change (a few times cheaper at 1,000);
    through scrapes, failures, timeouts, models, time passing (fresh -> stale -> unknown) and
    servers joining and leaving, the snapshot must equal a build from scratch."""
    from extproc.backends import build_snapshot

    rng = random.Random(12)
    reg, clock = registry(6, stale_after=1.0, max_age=4.0)
    urls = [r.url for r in reg.records]
    reused = 0
    for step in range(400):
        op = rng.random()
        i = rng.randrange(len(reg.records))
        if op < 0.45:
            kv = rng.choice([None, 0.1, 0.5])
            scrape_ok(reg, i, vm(running=rng.randint(0, 3), waiting=rng.randint(0, 1), kv=kv))
        elif op < 0.55:
            fail(reg, i, timeout=rng.random() < 0.5)
        elif op < 0.6:
            rec = reg.records[i]
            reg.record_models(rec, frozenset({rng.choice("ab")}), frozenset())
        elif op < 0.64:
            reg.set_backends(rng.sample(urls, rng.randint(1, len(urls))))
        else:
            clock.t += rng.choice([0.05, 0.3, 1.5])
        before = {id(v) for v in reg.snapshot().backends}
        kept = reg.rebuild()
        reused += sum(id(v) in before for v in kept.backends)
        full = build_snapshot(reg.records, clock(), reg.stale_after, reg.max_metrics_age)
        assert kept.backends == full.backends, step
        assert kept.pending == full.pending
        for name, pool in [("everyone", kept.everyone), *kept.model_pools.items()]:
            other = full.everyone if name == "everyone" else full.model_pools[name]
            assert [v.index for v in pool.eligible] == [v.index for v in other.eligible]
            assert (pool.all_unhealthy, pool.eligible_known, pool.adapters) == (
                other.all_unhealthy,
                other.eligible_known,
                other.adapters,
            )
    assert reused > 400  # the point: most views are kept from one build to the next
