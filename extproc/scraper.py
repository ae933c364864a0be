"""Polls every backend's /metrics on its own timer and feeds the registry.

One task per backend, so a slow server (a loaded vLLM answers /metrics late) never delays
the others; one ticker rebuilds the snapshot once per interval for all of them. Every task is
supervised (:mod:`extproc.supervise`): a bug costs one scrape, never the backend's loop.
Each backend has one keep-alive connection (:mod:`extproc.scrape_client`).

How often: ``--scrape-interval``, unless ``--scrape-budget`` (cores) would be exceeded; then idle,
steady backends are scraped less often first, busy ones last (:mod:`extproc.scrape_budget`).
The cost of a scrape is measured as the scraper runs.

How a scrape ends decides what the registry believes (docs/reliability.md):
* ``ok``: fresh numbers;
* ``timeout``: no answer within ``--scrape-timeout`` -> *suspect* (treated as saturated);
* ``refused`` / ``connect_timeout``: nothing listens or the host is unreachable -> unhealthy;
* ``http_error`` / ``parse_error`` / ``too_large`` / ``error``: a hard failure (3 in a row ->
  unhealthy; suspect from the first);
* ``service_stalled``: a timeout while the service's OWN event loop was stalled (starved of
  CPU, a long GC): the backend is not blamed and keeps its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

from extproc.backends import BackendRecord, BackendRegistry
from extproc.metrics_parser import MetricsParseError, VllmMetrics, parse_vllm_metrics
from extproc.observability import Metrics
from extproc.scrape_budget import (
    CostMeter,
    Intervals,
    Yield,
    idle_cap,
    is_busy,
    plan_intervals,
)
from extproc.scrape_client import (
    ConnectFailed,
    ConnectTimeout,
    HttpConnection,
    ProtocolError,
    ResponseTooLarge,
)
from extproc.supervise import spawn

log = logging.getLogger(__name__)

WARN_EVERY_S = 60.0  # the "budget too small" warning, at most this often
# After an event-loop stall the budget is halved (down to this share), then grows back by this
# factor per tick without stalls (x2 in ~3 ticks).
MIN_THROTTLE = 1 / 16
THROTTLE_RECOVERY = 1.25
# While scraping yields to ext_proc, every backend is scraped at this share of the idle cap.
YIELD_SHARE = 0.9
# CPU of a backend's first scrape (connect, cold caches), to spread a batch of new backends.
FIRST_SCRAPE_COST_S = 0.001
FIRST_SCRAPE_SPREAD_S = 1.0  # ... over at most this when the budget allows

# A real vLLM /metrics page is ~50 KB; many LoRA adapters or models make it a few 100 KB.
DEFAULT_MAX_SCRAPE_BYTES = 4 * 1024 * 1024


class LoopWatch:
    """Notices stalls of the service's own event loop, so a timeout they caused is not blamed
    on the backend (on a CPU-starved host every scrape times out at once)."""

    def __init__(self, period: float, threshold: float, observe: Callable[[float], None]) -> None:
        self.period = period
        self.threshold = threshold
        self.observe = observe
        self.last_tick: float | None = None  # None until run() starts
        self.last_stall_end = float("-inf")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.last_tick = loop.time()
        while True:
            await asyncio.sleep(self.period)
            now = loop.time()
            lag = max(0.0, now - self.last_tick - self.period)
            self.observe(lag)
            if lag > self.threshold:
                self.last_stall_end = now
            self.last_tick = now

    def stalled_since(self, t: float) -> bool:
        """True if the loop stalled after ``t`` (loop time), or is overdue right now."""
        if self.last_stall_end >= t:
            return True
        if self.last_tick is None:
            return False
        return asyncio.get_running_loop().time() - self.last_tick > self.period + self.threshold


def parse_models(body: bytes) -> tuple[frozenset[str], frozenset[str]]:
    """``GET /v1/models`` -> (ids, adapter ids). ValueError on anything not OpenAI-shaped."""
    data = orjson.loads(body)
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError("/v1/models: 'data' is not a list")
    good = [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]
    ids = frozenset(e["id"] for e in good)
    adapters = frozenset(e["id"] for e in good if e.get("parent"))
    return ids, adapters


def _in_pool(record: BackendRecord) -> bool:
    return record.slot >= 0  # a removed backend's slot is -1: its scrape loop ends


@dataclass(slots=True, eq=False)
class _Backend:
    """What the scraper keeps per backend besides the registry's record."""

    conn: HttpConnection
    busy: bool = True  # priority for the next interval (scrape_budget.is_busy)
    wake: asyncio.Future[None] | None = None  # set while napping longer than the base interval
    napping_for: float = 0.0  # the interval that nap is for
    timed: bool = False  # this scrape is one the cost meter samples
    cpu: list[float] = field(default_factory=lambda: [0.0])  # its CPU seconds so far


class Scraper:
    def __init__(
        self,
        registry: BackendRegistry,
        metrics: Metrics,
        *,
        interval: float,
        timeout: float,
        connect_timeout: float | None = None,
        models_interval: float = 5.0,
        max_bytes: int = DEFAULT_MAX_SCRAPE_BYTES,
        budget: float = 0.0,
    ) -> None:
        """``budget``: CPU cores scraping may use (0 = no limit): intervals stretch to fit."""
        self.registry = registry
        self.metrics = metrics
        self.interval = interval
        self.models_interval = models_interval
        self.max_bytes = max_bytes
        self.budget = budget
        self.timeout = timeout
        # A connect that has not completed by then is a host that drops packets: down, not slow.
        self.connect_timeout = min(timeout, connect_timeout) if connect_timeout else None
        self.idle_cap = idle_cap(interval, registry.stale_after)
        self.intervals = Intervals(interval, interval)
        self.meter = CostMeter()
        self._backends: dict[str, _Backend] = {}
        self._paths: dict[str, str] = {}  # URL -> path, parsed once
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._warned_at = float("-inf")
        self._planned_at = float("-inf")
        self.throttle = 1.0  # share of the budget in use (< 1 after event-loop stalls)
        self.yielding = Yield()  # the process is out of CPU: scraping gives way to ext_proc
        # A stall of half the timeout can make an answered scrape time out.
        self.watch = LoopWatch(
            period=0.05, threshold=min(0.2, timeout / 2), observe=metrics.loop_lag
        )

    async def start(self) -> None:
        self.sync()
        self._publish()
        self._ticker = spawn("snapshot-ticker", self._tick, self.metrics.task_error)
        self._watch_task = spawn("loop-watch", self.watch.run, self.metrics.task_error)

    def sync(self) -> None:
        """Start tasks for new backends and stop those of removed ones."""
        current = {r.url: r for r in self.registry.records}
        for url in list(self._tasks):
            if url not in current:
                self._tasks.pop(url).cancel()
        for url in list(self._backends):
            if url not in current:
                self._backends.pop(url).conn.close()
        new = [
            rec
            for url, rec in current.items()
            if (task := self._tasks.get(url)) is None or task.done()
        ]
        # Spread the first scrapes of backends that appear together (start-up, discovery): one
        # burst of connects would stall the event loop. Over one interval (at most a second: a
        # long --scrape-interval must not leave a starting service cold that long), or longer
        # when the budget could not pay for them all at once.
        spread = min(self.interval, FIRST_SCRAPE_SPREAD_S)
        if self.budget > 0:
            spread = max(spread, len(new) * FIRST_SCRAPE_COST_S / self.budget)
        for rec in new:
            self._tasks[rec.url] = spawn(
                "scrape",
                functools.partial(self._loop, rec, random.uniform(0.0, spread)),
                self.metrics.task_error,
                keep_going=functools.partial(_in_pool, rec),
            )

    @property
    def task_count(self) -> int:
        return sum(1 for t in self._tasks.values() if not t.done())

    async def stop(self) -> None:
        tasks = [*self._tasks.values(), *(t for t in (self._ticker, self._watch_task) if t)]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for b in self._backends.values():
            b.conn.close()
        self._backends.clear()

    # -- scheduling -------------------------------------------------------------------
    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            t0 = time.thread_time()
            self.registry.rebuild()
            self._plan()
            self.meter.add_tick(time.thread_time() - t0, self.interval)

    def _plan(self) -> None:
        """New intervals from the measured cost; wake the naps they (or traffic) cut short."""
        records = self.registry.records
        backends = [self._backends.get(r.url) for r in records]
        busy = sum(1 for b in backends if b is not None and b.busy)
        now = asyncio.get_running_loop().time()
        # Our event loop stalled since the last plan (starved of CPU, a long GC): scrape less for
        # a while so that the loop, which also answers ext_proc, catches up (else every scrape
        # times out as service_stalled, and reconnects, which costs more).
        if self.watch.last_stall_end > self._planned_at:
            self.throttle = max(MIN_THROTTLE, self.throttle / 2)
        else:
            self.throttle = min(1.0, self.throttle * THROTTLE_RECOVERY)
        self._planned_at = now
        budget = self.budget * self.throttle
        # What the ticker takes (rebuilding the snapshot is O(pool)) is not left for scrapes;
        # they keep a tenth of the budget however large the pool.
        for_scrapes = max(budget - self.meter.fixed_cores, budget / 10)
        planned = plan_intervals(
            busy=busy,
            idle=len(backends) - busy,
            cost=self.meter.per_scrape,
            budget=for_scrapes,
            base=self.interval,
            cap=self.idle_cap,
        )
        # Out of CPU with ext_proc to answer (one process): every backend at (nearly) the idle
        # cap, if that costs less than the plan; decisions get the rest. The margin keeps ages
        # (interval + scrape + rebuild) within --stale-after: still fresh.
        yielding = self.budget > 0 and self.yielding.update(
            now, time.process_time(), self.meter.total, self.budget
        )
        slow = max(self.interval, YIELD_SHARE * self.idle_cap)
        if yielding and planned.busy < slow:
            planned = Intervals(slow, max(slow, planned.idle))
        if planned.busy > self.interval and now - self._warned_at > WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "scrape budget %.2f cores%s: busy backends scraped every %.2f s instead of "
                "%.2f s (%d backends at %.0f us each)%s",
                budget,
                " (reduced: the event loop stalled)" if self.throttle < 1 else "",
                planned.busy,
                self.interval,
                len(backends),
                self.meter.per_scrape * 1e6,
                "" if self.throttle < 1 else "; raise --scrape-budget to keep them fresher",
            )
        self.intervals = planned
        self._publish(busy, len(backends) - busy)
        # A nap planned with longer intervals (e.g. while the first, costlier scrapes were
        # measured) ends now and is re-planned; a request routed to a napping idle backend makes
        # it busy: scrape it now rather than at the end of its idle interval. (Busy backends
        # nearly always have requests pending: for them only the plan counts.)
        for rec, b in zip(records, backends):
            if b is not None and b.wake is not None and not b.wake.done():
                if (rec.pending and not b.busy) or planned.of(b.busy) < b.napping_for:
                    b.wake.set_result(None)

    def _publish(self, busy: int | None = None, idle: int = 0) -> None:
        if busy is None:
            busy = len(self.registry.records)
        self.metrics.scrape_plan(
            self.intervals.busy,
            self.intervals.idle,
            busy,
            idle,
            self.budget * self.throttle,
            self.yielding.active,
        )
        self.metrics.scrape_cost(self.meter.per_scrape, self.meter.total)

    async def _wait_turn(self, rec: BackendRecord, b: _Backend, started: float) -> None:
        """Sleep until the backend's next scrape is due: ``started`` + its current interval.

        Naps longer than the base interval can be cut short by :meth:`_plan`; then the due time
        is computed again from the new plan, or the scrape happens now if traffic came.
        """
        loop = asyncio.get_running_loop()
        while True:
            interval = self.intervals.of(b.busy)
            delay = started + interval - loop.time()
            if delay <= 0:
                return
            if delay <= self.interval:  # nothing can make a base-interval nap shorter
                await asyncio.sleep(delay)
                return
            b.wake = wake = loop.create_future()
            b.napping_for = interval
            timer = loop.call_later(delay, _set_done, wake)
            try:
                await wake
            finally:
                timer.cancel()
                b.wake = None
            if rec.pending and not b.busy:
                return

    def _backend(self, rec: BackendRecord) -> _Backend:
        b = self._backends.get(rec.url)
        if b is None:
            if rec.url.startswith("https:") and self._ssl is None:
                self._ssl = ssl.create_default_context()
            conn = HttpConnection(
                rec.url,
                connect_timeout=self.connect_timeout,
                max_bytes=self.max_bytes,
                ssl_context=self._ssl,
            )
            b = self._backends[rec.url] = _Backend(conn)
        return b

    async def _loop(self, rec: BackendRecord, first_delay: float = 0.0) -> None:
        b = self._backend(rec)
        url = rec.url.rstrip("/") + "/metrics"
        models_url = rec.url.rstrip("/") + "/v1/models"
        loop = asyncio.get_running_loop()
        next_models = 0.0
        await asyncio.sleep(first_delay)
        while rec.slot >= 0:  # -1 once the backend left the pool
            started = loop.time()
            result = await self._measured_scrape(rec, b, url)
            # /v1/models changes rarely (adapters loaded at run time): poll it slowly, and at
            # once when a backend first answers.
            if result == "ok" and started >= next_models:
                if await self.fetch_models(rec, models_url):
                    next_models = started + self.models_interval
            await self._wait_turn(rec, b, started)

    async def _measured_scrape(self, rec: BackendRecord, b: _Backend, url: str) -> str:
        if not self.meter.due():
            self.meter.skip()
            return await self.scrape_once(rec, url)
        b.cpu[0] = 0.0
        b.timed = True
        try:
            result = await self.meter.timed(self.scrape_once(rec, url), b.cpu)
        finally:
            b.timed = False
        self.meter.add(b.cpu[0])
        return result

    def _path(self, url: str) -> str:
        path = self._paths.get(url)
        if path is None:
            if len(self._paths) > 4 * len(self._backends) + 64:
                self._paths.clear()  # backends came and went
            path = self._paths[url] = urlsplit(url).path or "/"
        return path

    # -- one scrape ---------------------------------------------------------------------------
    async def scrape_once(self, rec: BackendRecord, url: str) -> str:
        """GET ``url`` (the backend's /metrics) once and record the outcome."""
        return await self._scrape(rec, self._backend(rec), self._path(url))

    async def fetch_models(self, rec: BackendRecord, url: str) -> bool:
        """GET /v1/models: every id (base models and LoRA adapters, which have a parent).

        A malformed reply is counted (``extproc_scrapes_total{result="models_error"}``) and
        leaves the known models as they were.
        """
        path = self._path(url)
        try:
            async with asyncio.timeout(self.timeout):
                status, body = await self._backend(rec).conn.get(path)
            if status != 200:
                raise ValueError(f"HTTP {status}")
            ids, adapters = parse_models(body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any bad reply is just a failed poll
            log.debug("GET %s%s failed: %s: %s", rec.url, path, type(exc).__name__, exc)
            self.metrics.scraped(rec.endpoint, "models_error")
            return False
        self.registry.record_models(rec, ids, adapters)
        return True

    async def _scrape(self, rec: BackendRecord, b: _Backend, path: str) -> str:
        generation = self.registry.begin_scrape(rec)
        previous: VllmMetrics | None = rec.metrics
        current: VllmMetrics | None = None
        started = asyncio.get_running_loop().time()
        result = "ok"
        try:
            async with asyncio.timeout(self.timeout):
                status, body = await b.conn.get(path, b.cpu if b.timed else None)
            if status != 200:
                result = "http_error"
                self.registry.record_failure(rec, f"HTTP {status}", timeout=False)
            else:
                current = parse_vllm_metrics(body.decode("utf-8", "replace"))
                self.registry.record_success(rec, current, generation)
        except TimeoutError as exc:
            if self.watch.stalled_since(started):
                result = "service_stalled"  # our loop was late, not the backend: blame no one
            elif isinstance(exc, ConnectTimeout):
                result = "connect_timeout"
                self.registry.record_failure(rec, "connect timeout", timeout=False, down=True)
            else:
                result = "timeout"
                self.registry.record_failure(rec, "timeout", timeout=True)
        except ConnectFailed as exc:
            result = "refused"
            self.registry.record_failure(
                rec, f"cannot connect: {exc.os_error}", timeout=False, down=True
            )
        except MetricsParseError as exc:
            result = "parse_error"
            self.registry.record_failure(rec, f"unparsable /metrics: {exc}", timeout=False)
        except ResponseTooLarge as exc:
            result = "too_large"
            self.registry.record_failure(rec, f"/metrics too large: {exc}", timeout=False)
        except (ProtocolError, OSError) as exc:
            result = "error"
            self.registry.record_failure(rec, f"{type(exc).__name__}: {exc}", timeout=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one backend's bug kill its scrape loop
            result = "error"
            log.exception("scrape of %s%s failed unexpectedly", rec.url, path)
            self.registry.record_failure(rec, f"{type(exc).__name__}: {exc}", timeout=False)
        if result != "service_stalled":
            b.busy = is_busy(
                previous,
                current,
                pending=rec.pending,
                suspect=rec.suspect,
                healthy=rec.healthy,
            )
        self.metrics.scraped(rec.endpoint, result)
        return result


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
