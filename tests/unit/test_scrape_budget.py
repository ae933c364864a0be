"""The scrape budget: which interval each backend gets (pure), and the cost meter."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.metrics_parser import VllmMetrics
from extproc.scrape_budget import (
    IDLE_STRETCH_MAX,
    LOOP_OVERHEAD,
    OUTLIER,
    CostMeter,
    Intervals,
    Yield,
    idle_cap,
    is_busy,
    plan_intervals,
)


def demand(iv: Intervals, busy: int, idle: int, cost: float) -> float:
    """Cores the scraper uses at these intervals."""
    return cost * (busy / iv.busy + idle / iv.idle)


def plan(busy: int, idle: int, *, cost: float = 200e-6, budget: float = 0.5) -> Intervals:
    return plan_intervals(busy=busy, idle=idle, cost=cost, budget=budget, base=0.1, cap=1.0)


def test_no_budget_unknown_cost_or_empty_pool_is_the_base_interval():
    assert plan_intervals(busy=900, idle=100, cost=1e-3, budget=0, base=0.1, cap=1) == (
        Intervals(0.1, 0.1)
    )
    assert plan(900, 100, cost=0.0) == Intervals(0.1, 0.1)  # nothing measured yet
    assert plan(0, 0) == Intervals(0.1, 0.1)


def test_within_budget_everyone_keeps_the_base_interval():
    # 200 backends x 200 us / 0.1 s = 0.4 cores <= 0.5
    assert plan(50, 150) == Intervals(0.1, 0.1)


def test_idle_backends_are_stretched_first_and_busy_ones_keep_the_base_interval():
    iv = plan(100, 900)  # 1,000 backends: 2 cores at the base interval
    assert iv.busy == 0.1
    assert 0.1 < iv.idle <= 1.0
    assert demand(iv, 100, 900, 200e-6) == pytest.approx(0.5)  # exactly the budget


def test_when_idle_ones_hit_the_cap_busy_ones_stretch_too_keeping_the_ratio():
    iv = plan(500, 500)  # 500 busy alone need 1 core
    assert iv.busy > 0.1
    assert iv.idle == pytest.approx(iv.busy * 10)  # cap / base
    assert demand(iv, 500, 500, 200e-6) == pytest.approx(0.5)


def test_only_busy_backends_over_budget_are_stretched_evenly():
    iv = plan(1000, 0)
    assert iv.busy == pytest.approx(0.4)  # 1,000 x 200 us / 0.5 cores
    assert demand(iv, 1000, 0, 200e-6) == pytest.approx(0.5)


def test_the_plan_is_continuous_where_idle_reaches_the_cap():
    # busy 100 at 0.1 s = 0.2 cores; 0.3 cores left for idle ones at 1.0 s: 1,500 idle.
    at_cap = plan(100, 1500)
    assert at_cap.busy == pytest.approx(0.1) and at_cap.idle == pytest.approx(1.0)
    just_past = plan(100, 1501)
    assert just_past.busy == pytest.approx(0.1, rel=1e-3)
    assert just_past.idle == pytest.approx(1.0, rel=1e-3)


@given(
    busy=st.integers(0, 5000),
    idle=st.integers(0, 5000),
    cost=st.floats(1e-6, 1e-2),
    budget=st.floats(0.01, 8),
    base=st.floats(0.01, 5),
    stretch=st.floats(1, 50),
)
def test_the_plan_never_exceeds_the_budget_nor_favours_idle_backends(
    busy, idle, cost, budget, base, stretch
):
    cap = base * stretch
    iv = plan_intervals(busy=busy, idle=idle, cost=cost, budget=budget, base=base, cap=cap)
    assert iv.busy >= base and iv.idle >= iv.busy
    if busy + idle:
        used = demand(iv, busy, idle, cost)
        at_base = cost * (busy + idle) / base
        assert used <= max(budget, 0) * (1 + 1e-9) or used == pytest.approx(at_base)
        if at_base > budget:  # over budget: the whole budget is used, not less
            assert used == pytest.approx(budget)
    if iv.busy > base:  # busy ones stretch only once idle ones are at the cap
        assert iv.idle == pytest.approx(iv.busy * cap / base)
    else:
        assert iv.idle <= cap * (1 + 1e-9)


def test_idle_cap_is_ten_intervals_but_never_past_stale_after():
    assert idle_cap(0.1, 1.0) == pytest.approx(IDLE_STRETCH_MAX * 0.1)
    assert idle_cap(0.1, 0.5) == 0.5  # idle backends must not go stale
    assert idle_cap(2.0, 1.0) == 2.0  # never below the base interval


def vm(running=0.0, waiting=0.0, kv=0.0) -> VllmMetrics:
    return VllmMetrics(
        running=running, waiting=waiting, kv_cache_usage=kv, prompt_tokens=None,
        generation_tokens=None, ttft_sum=None, ttft_count=None, prefix_cache_queries=None,
        prefix_cache_hits=None, block_size=None, num_gpu_blocks=None, models=("m",),
        lora_running=(), lora_waiting=(), max_lora=None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("previous", "current", "kw", "busy"),
    [
        (vm(), vm(), {}, False),  # idle and steady: stretchable
        (vm(), vm(running=1), {}, True),  # running
        (vm(), vm(waiting=2), {}, True),  # queued
        (vm(), vm(kv=0.01), {}, True),  # KV cache in use
        (vm(running=3), vm(), {}, True),  # just drained: changed since the previous scrape
        (vm(kv=0.2), vm(), {}, True),
        (None, vm(), {}, True),  # first good scrape: nothing to compare with yet
        (vm(), vm(), {"pending": 1}, True),  # traffic routed to it since
        (vm(), None, {"suspect": True}, True),  # timing out or failing: watch its recovery
        (None, None, {}, True),  # never answered yet
        (vm(running=5), None, {"healthy": False, "suspect": True}, False),  # down: idle pace
    ],
)
def test_which_backends_keep_the_base_interval(previous, current, kw, busy):
    args = {"pending": 0, "suspect": False, "healthy": True, **kw}
    assert is_busy(previous, current, **args) is busy


def test_cost_meter_samples_one_scrape_in_every_and_averages():
    meter = CostMeter(every=4, alpha=0.5)
    assert [meter.due() for _ in range(8)] == [False, False, False, True] * 2
    meter.skip()
    assert meter.total == 0.0  # nothing known yet: unsampled scrapes count 0
    k = LOOP_OVERHEAD  # what the event loop adds to the timed steps
    meter.add(100e-6)
    assert meter.per_scrape == pytest.approx(100e-6 * k)  # the first sample is the average
    meter.add(200e-6)
    assert meter.per_scrape == pytest.approx(150e-6 * k)
    meter.skip()
    assert meter.total == pytest.approx(450e-6 * k)  # 100 + 200 + one unsampled at 150
    meter.add(0.1)  # a sample that ran into a long garbage collection
    assert meter.per_scrape == pytest.approx(0.5 * (150e-6 * k + OUTLIER * 150e-6 * k))
    assert meter.total == pytest.approx(450e-6 * k + 0.1 * k)  # the total keeps all of it
    meter.add_tick(0.01, 0.1)  # the ticker: 0.1 cores whatever the scrape rate
    assert meter.fixed_cores == pytest.approx(0.1)  # the weight of a tick: 4 alpha, at most 1
    meter.add_tick(0.0, 0.1)
    assert meter.fixed_cores == 0.0
    assert meter.total == pytest.approx(450e-6 * k + 0.1 * k + 0.01)
    slow = CostMeter(alpha=0.05)
    slow.add_tick(0.01, 0.1)
    assert slow.fixed_cores == pytest.approx(0.02)  # 4 x 0.05 of the way to 0.1


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_timed_counts_the_coroutines_own_cpu_not_other_tasks():
    meter = CostMeter()
    spent = [0.0]

    async def scrape() -> str:
        burn(0.02)
        await asyncio.sleep(0.05)  # meanwhile another task burns 0.05 s of CPU
        burn(0.02)
        return "ok"

    async def neighbour() -> None:
        await asyncio.sleep(0.001)
        burn(0.05)

    other = asyncio.create_task(neighbour())
    assert await meter.timed(scrape(), spent) == "ok"
    await other
    assert 0.035 <= spent[0] < 0.07  # its 0.04 s; not the neighbour's 0.05 s


async def test_timed_passes_errors_and_cancellation_through():
    meter = CostMeter()
    spent = [0.0]

    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await meter.timed(fails(), spent)

    cleaned = []

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):
            await meter.timed(hangs(), spent)
    assert cleaned == [True]  # the cancellation reached the coroutine


# -- the scraper's side: plan, publish, wake ------------------------------------------------------
def scraper_over(n_busy: int, n_idle: int, *, cost: float, budget: float):
    from devstack.processes import free_port
    from extproc.backends import BackendRegistry
    from extproc.observability import Metrics
    from extproc.scraper import Scraper

    # Loopback ports nobody listens on: a scrape loop that runs is refused at once.
    reg = BackendRegistry(stale_after=1.0, max_metrics_age=10.0)
    reg.set_backends([f"http://127.0.0.1:{free_port()}" for _ in range(n_busy + n_idle)])
    metrics = Metrics()
    scraper = Scraper(reg, metrics, interval=0.1, timeout=0.5, budget=budget)
    for i, rec in enumerate(reg.records):
        scraper._backend(rec).busy = i < n_busy
    scraper.meter.add(cost)
    return scraper, reg, metrics


def sample(metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_the_scraper_plans_from_its_measured_cost_and_publishes_the_plan(caplog):
    scraper, _, metrics = scraper_over(10, 990, cost=200e-6, budget=0.5)
    scraper._plan()
    assert scraper.intervals.busy == 0.1 and scraper.intervals.idle > 0.1
    assert sample(metrics, "extproc_scrape_interval_seconds", priority="busy") == 0.1
    assert sample(metrics, "extproc_scrape_interval_seconds", priority="idle") == pytest.approx(
        scraper.intervals.idle
    )
    assert sample(metrics, "extproc_scrape_backends", priority="busy") == 10
    assert sample(metrics, "extproc_scrape_backends", priority="idle") == 990
    assert sample(metrics, "extproc_scrape_cost_seconds") == pytest.approx(200e-6 * LOOP_OVERHEAD)
    assert sample(metrics, "extproc_scrape_cpu_seconds_total") == pytest.approx(
        200e-6 * LOOP_OVERHEAD
    )
    assert sample(metrics, "extproc_scrape_budget_cores") == 0.5
    assert "busy backends scraped every" not in caplog.text
    # A budget too small for the busy ones alone: they stretch too, and the operator is told.
    tight, _, _ = scraper_over(900, 100, cost=200e-6, budget=0.5)
    tight._plan()
    assert tight.intervals.busy > 0.1
    assert "raise --scrape-budget" in caplog.text
    await scraper.stop()
    await tight.stop()


async def test_a_long_nap_ends_early_for_traffic_or_a_shorter_plan():
    scraper, reg, _ = scraper_over(0, 3, cost=200e-6, budget=0.5)
    scraper.intervals = Intervals(0.1, 30.0)  # as planned from an early, high cost estimate
    loop = asyncio.get_running_loop()

    async def napping(i: int) -> asyncio.Task[None]:
        rec = reg.records[i]
        b = scraper._backends[rec.url]
        b.busy = False
        task = asyncio.create_task(scraper._wait_turn(rec, b, loop.time()))
        async with asyncio.timeout(5):
            while b.wake is None:
                await asyncio.sleep(0)
        return task

    scraper.budget = 1e-6  # the plan stays long: only traffic ends this nap
    routed = await napping(1)
    scraper._plan()
    await asyncio.sleep(0.05)
    assert not routed.done() and scraper.intervals.idle > 1
    reg.on_pick(1)
    scraper._plan()
    async with asyncio.timeout(5):
        await routed  # woken long before its interval
    scraper.budget = 0.5  # 3 backends fit: the new plan is 0.1 s for everyone
    replanned = await napping(2)
    scraper._plan()
    async with asyncio.timeout(5):
        await replanned  # woken, and already due under the new plan
    assert scraper._backends[reg.records[1].url].wake is None
    await scraper.stop()


async def test_removed_backends_lose_their_connection_and_stop_closes_the_rest():
    scraper, reg, _ = scraper_over(0, 3, cost=0.0, budget=0.0)
    gone = reg.records[0].url
    reg.set_backends([r.url for r in reg.records[1:]])
    scraper.sync()
    assert gone not in scraper._backends and len(scraper._backends) == 2
    assert scraper.task_count == 2
    await scraper.stop()
    assert scraper._backends == {} and scraper.task_count == 0


async def test_a_stall_of_the_event_loop_halves_the_budget_until_ticks_run_on_time(caplog):
    # ~200 us a scrape: 100 busy at 0.1 s + 900 idle stretched fit 0.5 cores, not 0.25.
    scraper, _, metrics = scraper_over(100, 900, cost=200e-6 / LOOP_OVERHEAD, budget=0.5)
    scraper._plan()
    calm = scraper.intervals
    assert calm.busy == 0.1 and "busy backends scraped every" not in caplog.text
    scraper.watch.last_stall_end = asyncio.get_running_loop().time()  # the loop just stalled
    scraper._plan()
    assert scraper.throttle == 0.5
    assert sample(metrics, "extproc_scrape_budget_cores") == 0.25
    assert scraper.intervals.idle > calm.idle  # fewer scrapes while the loop catches up
    assert "reduced: the event loop stalled" in caplog.text
    for _ in range(10):  # ticks on time: back to the full budget
        scraper._plan()
    assert scraper.throttle == 1.0 and scraper.intervals == calm
    await scraper.stop()


async def test_traffic_does_not_wake_a_busy_backend_stretched_by_the_budget():
    scraper, reg, _ = scraper_over(3, 0, cost=200e-6, budget=1e-6)
    scraper._plan()  # busy ones stretched far beyond the base interval
    rec = reg.records[0]
    b = scraper._backends[rec.url]
    reg.on_pick(0)  # a busy backend nearly always has requests pending
    nap = asyncio.create_task(scraper._wait_turn(rec, b, asyncio.get_running_loop().time()))
    async with asyncio.timeout(5):
        while b.wake is None:
            await asyncio.sleep(0)
    scraper._plan()
    await asyncio.sleep(0.05)
    assert not nap.done()  # the budget holds: it waits for its (stretched) turn
    nap.cancel()
    with pytest.raises(asyncio.CancelledError):
        await nap
    await scraper.stop()


def feed(y: Yield, cores: float, scraping: float, budget: float, ticks: int) -> list[bool]:
    """``ticks`` ticks of 0.1 s in which the process used ``cores``, ``scraping`` of them."""
    out = []
    for _ in range(ticks):
        t, p, sc = y._last or (0.0, 0.0, 0.0)
        out.append(y.update(t + 0.1, p + cores * 0.1, sc + scraping * 0.1, budget))
    return out


def test_scraping_yields_when_the_process_is_out_of_cpu_with_work_besides_scraping():
    y = Yield()
    assert not any(feed(y, 0.6, 0.45, 0.5, 30))  # room left: no yielding
    assert feed(y, 1.0, 0.48, 0.5, 30)[-1]  # saturated, half of it deciding: yield
    assert y.active and y.others == pytest.approx(0.52, abs=0.02)
    # yielding gave decisions more CPU; the process stays saturated: keep yielding
    assert all(feed(y, 1.0, 0.3, 0.5, 30)[3:])
    # less traffic: others 0.45 + the whole budget 0.5 > 0.85: still yielding (no flapping) ...
    assert all(feed(y, 0.75, 0.3, 0.5, 30))
    # ... until the full budget fits again
    assert not feed(y, 0.55, 0.3, 0.5, 30)[-1]


def test_scraping_alone_never_yields_to_itself():
    """Saturated by scraping (a huge pool, a tiny box): the budget and the stall throttle deal
    with it; yielding would only slow scraping with nothing to give the CPU to."""
    y = Yield()
    assert not any(feed(y, 1.0, 0.9, 1.0, 50))


def test_no_yielding_where_scraping_is_cheap_anyway():
    y = Yield()  # 16 backends: scraping 0.04 cores; yielding would cost freshness for nothing
    assert not any(feed(y, 1.0, 0.04, 0.5, 50))


def test_calls_closer_than_the_window_do_not_move_the_shares():
    y = Yield()
    feed(y, 1.0, 0.2, 0.5, 20)
    assert y.active
    t, p, sc = y._last
    for i in range(1, 50):  # back to back: ignored, whatever they say
        assert y.update(t + i * 1e-4, p, sc, 0.5)
    assert y._last == (t, p, sc)


async def test_a_yielding_scraper_scrapes_everyone_at_nearly_the_idle_cap():
    scraper, _, metrics = scraper_over(100, 900, cost=200e-6 / LOOP_OVERHEAD, budget=0.5)
    scraper._plan()
    assert scraper.intervals.busy == 0.1 and sample(metrics, "extproc_scrape_yielding") == 0
    scraper.yielding.active = True  # as Yield decides when the process is out of CPU
    scraper.yielding.update = lambda *a: True  # type: ignore[method-assign]
    scraper._plan()
    assert scraper.intervals == Intervals(0.9, 0.9)  # 0.9 x the idle cap (1 s): still fresh
    assert sample(metrics, "extproc_scrape_yielding") == 1
    # a budget that cannot even pay for the cap keeps its own (longer) plan
    tight, _, _ = scraper_over(3000, 0, cost=200e-6 / LOOP_OVERHEAD, budget=0.5)
    tight.yielding.update = lambda *a: True  # type: ignore[method-assign]
    tight._plan()
    assert tight.intervals.busy > 0.9
    await scraper.stop()
    await tight.stop()


async def test_a_long_scrape_interval_does_not_delay_the_first_scrapes():
    """The first scrapes of a starting pool are spread over at most a second, whatever
    --scrape-interval (60 s here): the service is not cold for a minute."""
    from devstack.processes import free_port
    from extproc.backends import BackendRegistry
    from extproc.observability import Metrics
    from extproc.scraper import Scraper

    reg = BackendRegistry(stale_after=1.0, max_metrics_age=10.0)
    reg.set_backends([f"http://127.0.0.1:{free_port()}" for _ in range(20)])  # refused at once
    scraper = Scraper(reg, Metrics(), interval=60.0, timeout=0.5, budget=0.5)
    await scraper.start()
    try:
        async with asyncio.timeout(5):
            while any(r.failures == 0 for r in reg.records):  # every one tried once
                await asyncio.sleep(0.02)
    finally:
        await scraper.stop()
