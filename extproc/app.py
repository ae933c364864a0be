"""Wires the parts together and runs until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import random
import signal

from aiohttp import web

from extproc.admin import build_admin_app, split_address
from extproc.backends import BackendRegistry
from extproc.config import Settings
from extproc.discovery import Discovery, normalize_static
from extproc.grpc_server import build_server, set_serving
from extproc.observability import Metrics
from extproc.prefix_index import PrefixIndex
from extproc.processor import Processor
from extproc.route_settings import RouteSettings, parse_weights
from extproc.scraper import Scraper
from extproc.strategies import FALLBACKS

log = logging.getLogger("extproc")


async def run(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass

    registry = BackendRegistry(stale_after=settings.stale_after, max_metrics_age=settings.max_metrics_age)
    metrics = Metrics()
    metrics.attach_backends(registry)
    scraper = Scraper(
        registry,
        metrics,
        interval=settings.scrape_interval,
        timeout=settings.scrape_timeout,
        models_interval=settings.models_interval,
    )
    prefix_index = PrefixIndex()

    def on_backends(urls: list[str]) -> None:
        added, removed = registry.set_backends(urls)
        prefix_index.purge(r.endpoint for r in removed)
        if added or removed:
            log.info("backends: +%s -%s (now %d)", [r.endpoint for r in added], [r.endpoint for r in removed], len(urls))
        scraper.sync()

    static = await normalize_static(settings.backend)
    discovery = Discovery(static, settings.backends_dns, on_backends, refresh=settings.dns_refresh)
    processor = Processor(
        registry,
        default_strategy=settings.strategy,
        fallback=FALLBACKS[settings.fallback],
        metrics=metrics,
        expose_routing_headers=settings.expose_routing_headers,
        prefix_index=prefix_index,
        max_body_bytes=settings.max_body_bytes,
        default_route=RouteSettings(
            weights=parse_weights(settings.weights),
            prefix_guard_abs=settings.prefix_guard_abs,
            prefix_guard_rel=settings.prefix_guard_rel,
        ),
        rng=random.Random(),
    )
    server, health_servicer = build_server(processor, registry, settings.grpc_address)

    await scraper.start()
    await discovery.start()
    await server.start()
    await set_serving(health_servicer, True)

    runner = web.AppRunner(build_admin_app(registry, metrics, settings), access_log=None)
    await runner.setup()
    host, port = split_address(settings.admin_address)
    await web.TCPSite(runner, host, port).start()
    log.info(
        "serving ext_proc on %s, admin on %s, strategy %s, %d backend(s)",
        settings.grpc_address, settings.admin_address, settings.strategy, len(registry.records),
    )
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await set_serving(health_servicer, False)
        await server.stop(grace=2.0)
        await runner.cleanup()
        await discovery.stop()
        await scraper.stop()
