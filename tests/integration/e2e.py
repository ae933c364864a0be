"""Helpers for tests that go through the real Envoy: requests, polling, admin reads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from devstack.processes import http_get

MODEL = "tiny-llama"


def service_workers() -> int:
    """``--workers`` of the services the integration tests start: ``EXTPROC_TEST_WORKERS``
    (default 1), so a CI job runs the same tests against decision worker processes."""
    return int(os.environ.get("EXTPROC_TEST_WORKERS", "1"))


@dataclass
class Routed:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def endpoint(self) -> str:
        return self.headers.get("x-routed-endpoint", "")

    @property
    def reason(self) -> str:
        return self.headers.get("x-routing-reason", "")

    @property
    def pod(self) -> str:
        """The simulator that really served the request (its own response header)."""
        return self.headers.get("x-inference-pod", "")

    def json(self) -> Any:
        return orjson.loads(self.body)


def chat_body(
    text: str = "hello", *, model: str = MODEL, max_tokens: int = 4, **extra: Any
) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        **extra,
    }


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any] | bytes | None = None,
    *,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Routed:
    data = (
        body if isinstance(body, bytes) else orjson.dumps(body if body is not None else chat_body())
    )
    hdrs = {"content-type": "application/json", **(headers or {})}
    async with session.post(
        url + path, data=data, headers=hdrs, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as r:
        return Routed(r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read())


@contextlib.asynccontextmanager
async def long_requests(
    session: aiohttp.ClientSession, url: str, n: int, *, max_tokens: int = 3000
) -> AsyncIterator[list[asyncio.Task[Routed]]]:
    """``n`` chat requests to ``url`` that keep running (``ignore_eos``) while the block runs:
    load a server for real; cancelled (and awaited) on exit."""
    tasks = [
        asyncio.create_task(
            post(session, url, chat_body(max_tokens=max_tokens, ignore_eos=True), timeout=120)
        )
        for _ in range(n)
    ]
    try:
        yield tasks
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
        return orjson.loads(await r.read())


async def eventually(
    check: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy (returned), or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


async def backend_view(
    session: aiohttp.ClientSession, admin_url: str, endpoint: str
) -> dict[str, Any]:
    data = await get_json(session, admin_url + "/backends")
    return next(b for b in data["backends"] if b["endpoint"] == endpoint)


async def all_scraped(session: aiohttp.ClientSession, admin_url: str) -> bool:
    """Every backend has been scraped once (fresh or not since)."""
    data = await get_json(session, admin_url + "/backends")
    return all(b["age_seconds"] is not None for b in data["backends"])


async def all_fresh(session: aiohttp.ClientSession, admin_url: str) -> bool:
    data = await get_json(session, admin_url + "/backends")
    return all(b["freshness"] == "fresh" for b in data["backends"])


async def ok_scrapes(session: aiohttp.ClientSession, admin_url: str) -> float:
    """Good scrapes the service has counted, all backends (``extproc_scrapes_total{result="ok"}``).

    The service counts a scrape after the registry took its numbers, so a decision that starts
    after this read already sees them.
    """
    async with session.get(admin_url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
        text = await r.text()
    return sum(
        sample.value
        for fam in text_string_to_metric_families(text)
        for sample in fam.samples
        if sample.name == "extproc_scrapes_total" and sample.labels.get("result") == "ok"
    )


async def envoy_routes_to(
    session: aiohttp.ClientSession, envoy_admin_url: str, endpoint: str
) -> bool:
    """Envoy itself considers the host usable (its active health check / outlier detection).

    A pick Envoy holds unhealthy is skipped for the next host of the list, so a test about where
    picks land must wait for Envoy's view too, not only the service's.
    """
    async with session.get(
        envoy_admin_url + "/clusters", timeout=aiohttp.ClientTimeout(total=10)
    ) as r:
        text = await r.text()
    flags = [
        ln.rsplit("::", 1)[1] for ln in text.splitlines() if f"::{endpoint}::health_flags::" in ln
    ]
    return bool(flags) and all(f == "healthy" for f in flags)


def envoy_stats(admin_url: str, flt: str) -> dict[str, int]:
    """Envoy's counters and gauges whose name matches the regex ``flt`` (admin /stats)."""
    status, text = http_get(f"{admin_url}/stats?filter={flt}", timeout=3.0)
    assert status == 200, text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out
