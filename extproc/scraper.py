"""Polls every backend's /metrics on its own timer and feeds the registry.

One task per backend, so a slow server (a loaded vLLM answers /metrics late) never delays
the others; one ticker rebuilds the snapshot once per interval for all of them. Every task is
supervised (:mod:`extproc.supervise`): a bug costs one scrape, never the backend's loop.

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
import time
from collections.abc import Callable

import aiohttp
import orjson

from extproc.backends import BackendRecord, BackendRegistry
from extproc.metrics_parser import MetricsParseError, parse_vllm_metrics
from extproc.observability import Metrics
from extproc.supervise import spawn

log = logging.getLogger(__name__)

# A real vLLM /metrics page is ~50 KB; many LoRA adapters or models make it a few 100 KB.
DEFAULT_MAX_SCRAPE_BYTES = 4 * 1024 * 1024


class ResponseTooLarge(Exception):
    pass


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


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or :class:`ResponseTooLarge` as soon as it exceeds ``limit`` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ResponseTooLarge(f"{resp.content_length} bytes (limit {limit})")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.interval = interval
        self.models_interval = models_interval
        self.max_bytes = max_bytes
        # A connect that has not completed by then is a host that drops packets: down, not slow.
        connect = min(timeout, connect_timeout) if connect_timeout else None
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        # A stall of half the timeout can make an answered scrape time out.
        self.watch = LoopWatch(
            period=0.05, threshold=min(0.2, timeout / 2), observe=metrics.loop_lag
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No connection cap per host: each backend has exactly one scraper task anyway.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False)
        )
        self.sync()
        self._ticker = spawn("snapshot-ticker", self._tick, self.metrics.task_error)
        self._watch_task = spawn("loop-watch", self.watch.run, self.metrics.task_error)

    def sync(self) -> None:
        """Start tasks for new backends and stop those of removed ones."""
        current = {r.url: r for r in self.registry.records}
        for url in list(self._tasks):
            if url not in current:
                self._tasks.pop(url).cancel()
        for url, rec in current.items():
            task = self._tasks.get(url)
            if task is None or task.done():
                self._tasks[url] = spawn(
                    "scrape",
                    functools.partial(self._loop, rec),
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
        if self._session is not None:
            await self._session.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.registry.rebuild()

    async def _loop(self, rec: BackendRecord) -> None:
        url = rec.url.rstrip("/") + "/metrics"
        models_url = rec.url.rstrip("/") + "/v1/models"
        next_models = 0.0
        while rec.slot >= 0:  # -1 once the backend left the pool
            started = time.monotonic()
            result = await self.scrape_once(rec, url)
            # /v1/models changes rarely (adapters loaded at run time): poll it slowly, and at
            # once when a backend first answers.
            if result == "ok" and started >= next_models:
                if await self.fetch_models(rec, models_url):
                    next_models = started + self.models_interval
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def fetch_models(self, rec: BackendRecord, url: str) -> bool:
        """GET /v1/models: every id (base models and LoRA adapters, which have a parent).

        A malformed reply is counted (``extproc_scrapes_total{result="models_error"}``) and
        leaves the known models as they were.
        """
        assert self._session is not None
        try:
            async with self._session.get(url, timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                ids, adapters = parse_models(await read_bounded(resp, self.max_bytes))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any bad reply is just a failed poll
            log.debug("GET %s failed: %s: %s", url, type(exc).__name__, exc)
            self.metrics.scraped(rec.endpoint, "models_error")
            return False
        self.registry.record_models(rec, ids, adapters)
        return True

    async def scrape_once(self, rec: BackendRecord, url: str) -> str:
        assert self._session is not None
        generation = self.registry.begin_scrape(rec)
        started = asyncio.get_running_loop().time()
        result = "ok"
        try:
            async with self._session.get(url, timeout=self.timeout) as resp:
                if resp.status != 200:
                    result = "http_error"
                    self.registry.record_failure(rec, f"HTTP {resp.status}", timeout=False)
                else:
                    body = await read_bounded(resp, self.max_bytes)
                    metrics = parse_vllm_metrics(body.decode("utf-8", "replace"))
                    self.registry.record_success(rec, metrics, generation)
        except TimeoutError as exc:
            if self.watch.stalled_since(started):
                result = "service_stalled"  # our loop was late, not the backend: blame no one
            elif isinstance(exc, aiohttp.ConnectionTimeoutError):
                result = "connect_timeout"
                self.registry.record_failure(rec, "connect timeout", timeout=False, down=True)
            else:
                result = "timeout"
                self.registry.record_failure(rec, "timeout", timeout=True)
        except aiohttp.ClientConnectorError as exc:
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
        except (aiohttp.ClientError, OSError) as exc:
            result = "error"
            self.registry.record_failure(rec, f"{type(exc).__name__}: {exc}", timeout=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one backend's bug kill its scrape loop
            result = "error"
            log.exception("scrape of %s failed unexpectedly", url)
            self.registry.record_failure(rec, f"{type(exc).__name__}: {exc}", timeout=False)
        self.metrics.scraped(rec.endpoint, result)
        return result
