"""Polls every backend's /metrics on its own timer and feeds the registry.

One task per backend, so a slow server (a loaded vLLM answers /metrics late) never delays
the others; one ticker rebuilds the snapshot once per interval for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
import orjson

from extproc.backends import BackendRecord, BackendRegistry
from extproc.metrics_parser import MetricsParseError, parse_vllm_metrics
from extproc.observability import Metrics

log = logging.getLogger(__name__)


class Scraper:
    def __init__(
        self,
        registry: BackendRegistry,
        metrics: Metrics,
        *,
        interval: float,
        timeout: float,
        models_interval: float = 5.0,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.interval = interval
        self.models_interval = models_interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No connection cap per host: each backend has exactly one scraper task anyway.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))
        self.sync()
        self._ticker = asyncio.create_task(self._tick(), name="snapshot-ticker")

    def sync(self) -> None:
        """Start tasks for new backends and stop those of removed ones."""
        current = {r.url: r for r in self.registry.records}
        for url in list(self._tasks):
            if url not in current:
                self._tasks.pop(url).cancel()
        for url, rec in current.items():
            if url not in self._tasks:
                self._tasks[url] = asyncio.create_task(self._loop(rec), name=f"scrape {rec.endpoint}")

    async def stop(self) -> None:
        tasks = [*self._tasks.values(), *([self._ticker] if self._ticker else [])]
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
        """GET /v1/models: every id (base models and LoRA adapters, which have a parent)."""
        assert self._session is not None
        try:
            async with self._session.get(url, timeout=self.timeout) as resp:
                if resp.status != 200:
                    return False
                data = orjson.loads(await resp.read())
            entries = [e for e in data.get("data", []) if isinstance(e, dict) and isinstance(e.get("id"), str)]
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError, AttributeError):
            return False
        ids = frozenset(e["id"] for e in entries)
        adapters = frozenset(e["id"] for e in entries if e.get("parent"))
        self.registry.record_models(rec, ids, adapters)
        return True

    async def scrape_once(self, rec: BackendRecord, url: str) -> str:
        assert self._session is not None
        generation = self.registry.begin_scrape(rec)
        result = "ok"
        try:
            async with self._session.get(url, timeout=self.timeout) as resp:
                body = await resp.read()
                if resp.status != 200:
                    result = "http_error"
                    self.registry.record_failure(rec, f"HTTP {resp.status}", timeout=False)
                else:
                    metrics = parse_vllm_metrics(body.decode("utf-8", "replace"))
                    self.registry.record_success(rec, metrics, generation)
        except TimeoutError:
            result = "timeout"
            self.registry.record_failure(rec, "timeout", timeout=True)
        except MetricsParseError as exc:
            result = "parse_error"
            self.registry.record_failure(rec, f"unparsable /metrics: {exc}", timeout=False)
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
