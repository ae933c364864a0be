"""Admin HTTP server: /metrics (Prometheus), /healthz, /backends (JSON snapshot)."""

from __future__ import annotations

from collections.abc import Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from extproc.backends import BackendRegistry
from extproc.config import Settings
from extproc.observability import Metrics


def backends_json(registry: BackendRegistry) -> dict[str, object]:
    # The live snapshot, exactly what decisions read right now (rebuilt every scrape interval).
    snap = registry.snapshot()
    records = {r.endpoint: r for r in registry.records}
    out = []
    for v in snap.backends:
        rec = records.get(v.endpoint)
        m = v.metrics
        out.append(
            {
                "endpoint": v.endpoint,
                "url": v.url,
                "freshness": v.freshness.value,
                "healthy": v.healthy,
                "overloaded": v.overloaded,
                "suspect": v.suspect,
                "failing": rec.failing if rec else False,
                "age_seconds": None if v.scraped_at is None else snap.built_at - v.scraped_at,
                "prior": v.prior,
                "running": v.running,
                "waiting": v.waiting,
                "kv_cache_usage": v.kv_cache_usage,
                "token_rate": v.token_rate,
                "ttft_seconds": v.ttft,
                "pending": rec.pending if rec else 0,
                "inflight": rec.inflight if rec else 0,
                "consecutive_failures": rec.failures if rec else 0,
                "consecutive_timeouts": rec.timeouts if rec else 0,
                "last_error": rec.last_error if rec else "",
                "models": list(m.models) if m else [],
                "lora_running": list(m.lora_running) if m else [],
            }
        )
    return {
        "cold": snap.cold,
        "all_unhealthy": snap.all_unhealthy,
        "built_at": snap.built_at,
        "backends": out,
    }


def build_admin_app(
    registry: BackendRegistry,
    metrics: Metrics,
    settings: Settings,
    *,
    workers: Callable[[], list[dict[str, object]]] | None = None,
) -> web.Application:
    """``workers``: with --workers N, describes each worker for /healthz."""

    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.exposition), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        body: dict[str, object] = {"status": "ok", "backends": len(registry.records)}
        if workers is not None:
            body["workers"] = workers()
        return web.json_response(body)

    async def backends(_: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(backends_json(registry)), content_type="application/json"
        )

    async def settings_handler(_: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(settings.model_dump()), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/backends", backends)
    app.router.add_get("/settings", settings_handler)
    return app


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)
