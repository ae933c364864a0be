"""How often to scrape each backend so that scraping stays within ``--scrape-budget`` cores.

Pure decisions (tests/unit/test_scrape_budget.py) plus the meter that measures what a scrape
costs. The scraper (extproc/scraper.py) asks :func:`plan_intervals` once per tick and sleeps each
backend for the interval of its priority:

* **busy** backends (requests running or waiting, KV cache in use, numbers that moved since the
  previous scrape, requests routed to them since, a failing or never answered scrape) keep
  ``--scrape-interval`` as long as the budget allows: routing decides on their numbers;
* **idle** steady backends (0 running, 0 waiting, nothing changed, healthy, or down and refusing
  connections) are stretched first, up to ``idle_cap``;
* only when the busy ones alone exceed the budget are they stretched too, and the idle ones stay
  ``idle_cap / base`` times slower than them.

When one process both scrapes and answers ext_proc and it runs out of CPU (:class:`Yield`),
scraping yields: every backend is scraped at 0.9 x ``idle_cap`` (still fresh: within
``--stale-after``), whatever its priority and the budget, until the budget would fit again.
"""

from __future__ import annotations

import time
import types
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from extproc.metrics_parser import VllmMetrics

T = TypeVar("T")

# What a scrape costs the event loop beyond the steps the meter can time (select, socket reads,
# timers), as a factor on what it timed: bench/bench_scrape.py measures the process CPU against
# the estimate (1.4-1.7 on CPython 3.11 from 64 to 1,000 backends; bench/results/scrape.md).
LOOP_OVERHEAD = 1.5

OUTLIER = 4.0  # a sampled scrape counts at most this many times the average in it

# Idle backends are stretched to at most this many base intervals (and never past stale_after:
# an idle backend stays fresh). With the defaults (0.1 s, stale_after 1 s) that is 1 s, which
# keeps metrics age p90 under ~1 s even when every backend is idle and stretched.
IDLE_STRETCH_MAX = 10.0


@dataclass(frozen=True, slots=True)
class Intervals:
    busy: float  # seconds between two scrapes of a busy backend
    idle: float  # ... of an idle, steady one

    def of(self, busy: bool) -> float:
        return self.busy if busy else self.idle


def idle_cap(base: float, stale_after: float) -> float:
    """Longest interval an idle backend is stretched to before busy ones are stretched."""
    return max(base, min(IDLE_STRETCH_MAX * base, stale_after))


def plan_intervals(
    *, busy: int, idle: int, cost: float, budget: float, base: float, cap: float
) -> Intervals:
    """Scrape intervals so that ``cost`` CPU seconds per scrape stay within ``budget`` cores.

    ``busy``/``idle``: how many backends of each priority; ``base``: --scrape-interval; ``cap``:
    the longest idle interval before busy backends are stretched too (:func:`idle_cap`).
    ``budget <= 0`` (no budget) or an unknown cost: everything at ``base``.
    """
    if budget <= 0 or cost <= 0 or busy + idle == 0:
        return Intervals(base, base)
    cap = max(cap, base)
    if cost * (busy + idle) / base <= budget:
        return Intervals(base, base)
    # Idle first: the busy ones keep the base interval, the idle ones share what is left.
    spare = budget - cost * busy / base
    if idle and spare > 0:
        stretched = cost * idle / spare
        if stretched <= cap:
            return Intervals(base, max(base, stretched))
    # Even idle at the cap is too much: stretch everyone, idle ones cap/base times slower.
    ratio = cap / base
    busy_interval = cost * (busy + idle / ratio) / budget
    return Intervals(busy_interval, busy_interval * ratio)


# A process this busy (cores, moving average) is saturated: one Python thread uses ~1 core.
SATURATED_CORES = 0.9
# Yield only to real work (what is not scraping takes at least this much), and only when it
# buys something (scraping takes at least this much: not with a few backends).
MIN_OTHER_CORES = 0.25
MIN_SCRAPE_CORES = 0.1
# Stop yielding when the other work plus the whole budget fit under this.
RESUME_CORES = 0.85
YIELD_WINDOW_S = 0.05  # CPU shares are measured over at least this (a tick is 0.1 s)


class Yield:
    """Does scraping yield to the process's other work (deciding, with one process)?

    Fed once per tick with the process's CPU clock and the scraper's own CPU total; on while the
    process is saturated and something else than scraping takes a real share, off once that
    share plus the whole budget would fit again (hysteresis: no flapping at the edge).
    """

    def __init__(self, *, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.process = 0.0  # cores the process used (moving average)
        self.others = 0.0  # of which not scraping
        self.scraping = 0.0
        self.active = False
        self._last: tuple[float, float, float] | None = None

    def update(self, now: float, process_cpu: float, scrape_cpu: float, budget: float) -> bool:
        last = self._last
        if last is not None and now - last[0] < YIELD_WINDOW_S:
            return self.active  # too short to measure a share of a core: wait for more
        self._last = (now, process_cpu, scrape_cpu)
        if last is None:
            return self.active
        dt = now - last[0]
        used = (process_cpu - last[1]) / dt
        others = max(0.0, used - (scrape_cpu - last[2]) / dt)
        self.process += self.alpha * (used - self.process)
        self.others += self.alpha * (others - self.others)
        self.scraping += self.alpha * (used - others - self.scraping)
        if not self.active:
            self.active = (
                self.process >= SATURATED_CORES
                and self.others >= MIN_OTHER_CORES
                and self.scraping >= MIN_SCRAPE_CORES
            )
        elif self.others + budget <= RESUME_CORES:
            self.active = False
        return self.active


def is_busy(
    previous: VllmMetrics | None,
    current: VllmMetrics | None,
    *,
    pending: int,
    suspect: bool,
    healthy: bool,
) -> bool:
    """Does this backend deserve the base interval after its latest scrape?

    ``previous``/``current``: the metrics before and after the scrape (``current`` None when it
    failed); ``pending``: requests routed to it that no scrape has counted yet.
    """
    if not healthy:
        return False  # down (refused, unreachable, broken): re-checked at the idle interval
    if suspect or pending or current is None:
        return True  # timing out, failing, never answered, or just sent traffic: watch closely
    if current.running or current.waiting or current.kv_cache_usage:
        return True
    return previous is None or (previous.running, previous.waiting, previous.kv_cache_usage) != (
        current.running,
        current.waiting,
        current.kv_cache_usage,
    )


class CostMeter:
    """Moving average of the CPU seconds one scrape costs, measured on a sample of scrapes.

    :meth:`timed` runs a scrape coroutine and adds the thread CPU time of every step it takes on
    the event loop (building the request, parsing, updating the registry); the scraper adds what
    its connection's callbacks spent (``cpu`` of :meth:`extproc.scrape_client.HttpConnection.get`)
    and, apart, what its ticker spends (:meth:`add_tick`). What runs in none of them (the event
    loop's select, socket reads, timers) is not seen: :data:`LOOP_OVERHEAD` accounts for it, and
    bench/bench_scrape.py compares the estimate with the process CPU.
    """

    def __init__(self, *, every: int = 4, alpha: float = 0.05) -> None:
        self.every = every
        self.alpha = alpha
        self.per_scrape = 0.0  # seconds; 0 until the first sample
        self.fixed_cores = 0.0  # the ticker (snapshot rebuild, planning): cores, moving average
        self.total = 0.0  # CPU seconds spent scraping (estimated for unsampled scrapes)
        self._n = 0

    def due(self) -> bool:
        """True for one scrape in ``every``: measure it and :meth:`add` its cost."""
        self._n += 1
        return self._n % self.every == 0

    def skip(self) -> None:
        """A scrape not measured: counted at the current average."""
        self.total += self.per_scrape

    def add(self, seconds: float) -> None:
        """A measured scrape's CPU seconds (what :meth:`timed` saw; counted x LOOP_OVERHEAD)."""
        seconds *= LOOP_OVERHEAD
        self.total += seconds
        if self.per_scrape == 0.0:
            self.per_scrape = seconds
        else:
            # One sample that ran into a full garbage collection must not move the plan for
            # long: at most OUTLIER x the average enters it (a real rise still gets through).
            seconds = min(seconds, OUTLIER * self.per_scrape)
            self.per_scrape += self.alpha * (seconds - self.per_scrape)

    def add_tick(self, seconds: float, period: float) -> None:
        """CPU seconds of one tick of the ticker, which runs every ``period`` seconds whatever
        the scrape intervals (its cost grows with the pool, not with the scrape rate)."""
        self.total += seconds
        weight = min(1.0, 4 * self.alpha)  # ticks are rarer than scrapes: a faster average
        self.fixed_cores += weight * (seconds / period - self.fixed_cores)

    async def timed(self, coro: Coroutine[Any, Any, T], spent: list[float]) -> T:
        """Await ``coro``; ``spent[0]`` += the thread CPU of its steps."""
        return await _steps(coro, spent)


@types.coroutine
def _steps(coro: Coroutine[Any, Any, T], spent: list[float]) -> Generator[Any, Any, T]:
    # Drives ``coro`` like ``yield from`` would, timing each step (send/throw) with the thread
    # CPU clock: the time between steps belongs to other tasks and is not counted.
    clock = time.thread_time
    value: Any = None
    error: BaseException | None = None
    while True:
        t0 = clock()
        try:
            step = coro.send(value) if error is None else coro.throw(error)
        except StopIteration as done:
            spent[0] += clock() - t0
            return done.value  # type: ignore[no-any-return]
        except BaseException:
            spent[0] += clock() - t0
            raise
        spent[0] += clock() - t0
        try:
            value, error = (yield step), None
        except BaseException as exc:  # cancellation (timeouts) goes into the coroutine
            value, error = None, exc
