"""Wires the parts together and runs until told to stop.

Shutdown (docs/reliability.md):
* SIGTERM drains: gRPC health turns NOT_SERVING at once, ext_proc keeps answering for
  ``--drain-seconds`` (Envoy's health check moves new streams to another replica meanwhile),
  then open streams (HTTP requests still running) get ``--stop-grace`` to finish; the rest are
  ended with status OK, which Envoy treats as "done", never as a failure.
* SIGINT (Ctrl-C) or a second SIGTERM stops without the drain.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from aiohttp import web
from grpc_health.v1 import health as grpc_health

from extproc.admin import build_admin_app, split_address
from extproc.backends import BackendRegistry
from extproc.config import ConfigError, Settings
from extproc.discovery import Discovery, normalize_static
from extproc.gie_metrics import PoolCollector, pool_name
from extproc.grpc_server import ExtProcHandler, build_server, set_serving
from extproc.health_port import build_health_server
from extproc.kv_prefix import PrefixSource
from extproc.observability import Metrics
from extproc.prefix_index import PrefixIndex
from extproc.processor import Processor
from extproc.route_settings import RouteSettings
from extproc.scraper import Scraper
from extproc.strategies import FALLBACKS
from extproc.tls import server_credentials

if TYPE_CHECKING:
    from extproc.k8s_discovery import K8sDiscovery
    from extproc.kv_subscriber import KvEventSubscriptions
    from extproc.workers import WorkerPool

log = logging.getLogger("extproc")


class Health:
    """SERVING only while the service is up, not draining, has read its discovery source once
    (``synced``: a Kubernetes replica is not ready before it knows the pool) and knows a backend."""

    def __init__(self, set_status: Callable[[bool], Awaitable[None]], metrics: Metrics) -> None:
        self._set = set_status
        self._metrics = metrics
        self.started = False
        self.synced = False
        self.draining = False
        self.pool_size = 0
        self.deciding = True  # --workers N: at least one worker serves
        self._published: bool | None = None
        self._lock = asyncio.Lock()

    @property
    def serving(self) -> bool:
        return (
            self.started
            and self.synced
            and not self.draining
            and self.pool_size > 0
            and self.deciding
        )

    async def publish(self) -> None:
        async with self._lock:  # keep the order of flips when several are scheduled at once
            serving = self.serving
            if serving != self._published:
                await self._set(serving)
                self._metrics.serving.set(1 if serving else 0)
                if self._published is not None or not serving:
                    log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
                self._published = serving


async def run(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (immediate) or SIGTERM arrives (drain first)."""
    pool: WorkerPool | None = None
    if settings.workers > 1:  # scraping here, decisions in worker processes (docs/scaling.md)
        from extproc.workers import WorkerPool

        pool = WorkerPool.create(settings)
    try:
        await _serve(settings, stop or asyncio.Event(), pool)
    finally:
        if pool is not None:
            await pool.close()  # no worker outlives the main; the run directory goes


async def _serve(settings: Settings, stop: asyncio.Event, pool: WorkerPool | None) -> None:
    drain = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:
        if drain.is_set():
            stop.set()  # a second SIGTERM: stop now
        drain.set()

    for sig, on_signal in ((signal.SIGINT, stop.set), (signal.SIGTERM, on_sigterm)):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass

    registry: BackendRegistry
    if pool is not None:
        registry = pool.registry
    else:
        registry = BackendRegistry(
            stale_after=settings.stale_after, max_metrics_age=settings.max_metrics_age
        )
    metrics = Metrics()
    metrics.attach_backends(registry)
    metrics.registry.register(PoolCollector(registry, pool_name(settings)))  # GIE inference_pool_*
    if pool is not None:
        metrics.merge_workers(str(pool.prometheus_dir), pool.collector())
    scraper = Scraper(
        registry,
        metrics,
        interval=settings.scrape_interval,
        timeout=settings.scrape_timeout,
        connect_timeout=settings.scrape_connect_timeout,
        models_interval=settings.models_interval,
        max_bytes=settings.max_scrape_bytes,
        budget=settings.scrape_budget,
    )
    prefix_index = PrefixIndex()
    kv_subscriptions: KvEventSubscriptions | None = None
    server: grpc.aio.Server | None = None
    handler: ExtProcHandler | None = None
    if pool is None:
        # TLS material is checked here, before anything listens: a bad file is a config error
        # (with workers, WorkerPool.create checked it).
        credentials = server_credentials(settings)
        prefix_source, kv_subscriptions = _exact_prefix(settings, prefix_index, registry, metrics)
        processor = build_processor(settings, registry, metrics, prefix_source)
        server, health_servicer, handler = build_server(
            processor, registry, settings.grpc_address, credentials
        )
    else:  # the workers answer ext_proc (and its port's health); this one serves the health port
        health_servicer = grpc_health.aio.HealthServicer()
    # The same servicer on the plaintext health port: both ports always say the same.
    health_server = None
    if settings.grpc_health_address:
        health_server = build_health_server(health_servicer, settings.grpc_health_address)

    async def set_status(serving: bool) -> None:
        if pool is not None:
            pool.set_serving(serving)
        await set_serving(health_servicer, serving)

    health = Health(set_status, metrics)
    background: set[asyncio.Task[None]] = set()

    def schedule_health() -> None:
        task = asyncio.ensure_future(health.publish())
        background.add(task)
        task.add_done_callback(background.discard)

    def on_backends(urls: list[str]) -> None:
        added, removed = registry.set_backends(urls)
        prefix_index.purge(r.endpoint for r in removed)
        for r in removed:
            metrics.forget_backend(r.endpoint)
        if added or removed:
            log.info(
                "backends: +%s -%s (now %d)",
                [r.endpoint for r in added],
                [r.endpoint for r in removed],
                len(urls),
            )
        if not urls:
            log.warning(
                "the backend pool is empty: %s",
                "answering 503"
                if settings.empty_pool == "reject"
                else "letting Envoy's fallback policy choose",
            )
        scraper.sync()
        if kv_subscriptions is not None:
            kv_subscriptions.sync(r.endpoint for r in registry.records)
        health.pool_size = len(urls)
        schedule_health()

    discovery: Discovery | K8sDiscovery
    if settings.k8s_inference_pool or settings.k8s_selector:
        from extproc.k8s_discovery import build_k8s_discovery  # only then import the k8s client

        # Reads credentials now (a problem is a ConfigError); the API itself may be down.
        discovery = build_k8s_discovery(settings, on_backends, on_error=metrics.task_error)
    else:
        static = await normalize_static(settings.backend, settings.address_family)
        discovery = Discovery(
            static,
            settings.backends_dns,
            on_backends,
            refresh=settings.dns_refresh,
            family=settings.address_family,
            on_error=metrics.task_error,
        )

    async def ready_when_synced() -> None:
        await discovery.synced.wait()
        health.synced = True
        await health.publish()

    await scraper.start()
    await discovery.start()
    health.synced = (
        discovery.synced.is_set()
    )  # static/DNS: at once; Kubernetes: after its first list
    if not health.synced:
        synced_waiter = asyncio.ensure_future(ready_when_synced())
        background.add(synced_waiter)
        synced_waiter.add_done_callback(background.discard)
    # Publish NOT_SERVING before listening: grpcio's health servicer starts with "" SERVING
    # and the other names unknown, which a probe could read in the first milliseconds.
    await health.publish()
    if pool is not None:

        def on_workers(up: int) -> None:
            health.deciding = up > 0
            schedule_health()

        await pool.start(on_workers)  # returns once every worker serves
    else:
        assert server is not None
        await server.start()
    if health_server is not None:
        await health_server.start()
        log.info("grpc.health.v1 also on %s (plaintext)", settings.grpc_health_address)
    health.started = True
    await health.publish()

    runner = web.AppRunner(
        build_admin_app(registry, metrics, settings, workers=pool.describe if pool else None),
        access_log=None,
    )
    await runner.setup()
    host, port = split_address(settings.admin_address)
    await web.TCPSite(runner, host, port).start()
    log.info(
        "serving ext_proc on %s, admin on %s, strategy %s, %d backend(s)",
        settings.grpc_address,
        settings.admin_address,
        settings.strategy,
        len(registry.records),
    )

    def open_streams() -> int:
        if pool is not None:
            return pool.open_streams
        return handler.open_streams if handler is not None else 0

    try:
        await _first(stop, drain)
        if drain.is_set() and not stop.is_set():
            health.draining = True
            await health.publish()
            if pool is not None:
                pool.drain()  # each worker drains the same way, at the same time
            log.info(
                "SIGTERM: draining for %.1f s (%d open streams)",
                settings.drain_seconds,
                open_streams(),
            )
            try:
                await asyncio.wait_for(stop.wait(), timeout=settings.drain_seconds)
            except TimeoutError:
                pass
    finally:
        health.draining = True
        await health.publish()
        if pool is not None:
            await pool.stop(now=stop.is_set() or not drain.is_set())
        else:
            assert server is not None and handler is not None
            await finish_streams(handler, server, settings, drain, stop)
        if health_server is not None:
            await health_server.stop(grace=0.5)
        await runner.cleanup()
        await discovery.stop()
        await scraper.stop()
        if kv_subscriptions is not None:
            await kv_subscriptions.stop()
        for task in list(background):
            task.cancel()


async def finish_streams(
    handler: ExtProcHandler,
    server: grpc.aio.Server,
    settings: Settings,
    drain: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """Let open streams (= HTTP requests still running) finish by themselves, still accepting
    (Envoy no longer sends new ones once health is NOT_SERVING), then end the rest with OK."""
    loop = asyncio.get_running_loop()
    grace = settings.stop_grace if drain.is_set() else min(settings.stop_grace, 2.0)
    log.info("shutting down (%d open streams, up to %.1f s grace)", handler.open_streams, grace)
    deadline = loop.time() + grace
    while (
        handler.open_streams and loop.time() < deadline and not (drain.is_set() and stop.is_set())
    ):
        await asyncio.sleep(0.05)
    ended = handler.close_open_streams()
    if ended:
        log.info("ended %d open streams with status OK", ended)
    await server.stop(grace=1.0)


def build_processor(
    settings: Settings, registry: BackendRegistry, metrics: Metrics, prefix_source: PrefixSource
) -> Processor:
    return Processor(
        registry,
        default_strategy=settings.strategy,
        fallback=FALLBACKS[settings.fallback],
        metrics=metrics,
        expose_routing_headers=settings.expose_routing_headers,
        prefix_source=prefix_source,
        max_body_bytes=settings.max_body_bytes,
        default_route=RouteSettings(
            profiles=settings.profile_table(),
            shed_queue_depth=settings.shed_queue_depth or None,
        ),
        fallback_endpoints=settings.fallback_endpoints,
        reject_when_empty=settings.empty_pool == "reject",
        rng=random.Random(),
    )


def _exact_prefix(
    settings: Settings, prefix_index: PrefixIndex, registry: BackendRegistry, metrics: Metrics
) -> tuple[PrefixSource, KvEventSubscriptions | None]:
    """The prefix source: exact from KV events (+ tokenizers) when configured, else approximate."""
    if not (settings.kv_events_port or settings.kv_events_endpoint or settings.tokenizer):
        return PrefixSource(prefix_index), None
    from extproc.kv_index import KvIndex
    from extproc.kv_metrics import KvMetrics
    from extproc.kv_subscriber import KvEventSubscriptions, parse_endpoint_map
    from extproc.tokenizer import TokenizerError, load_tokenizers

    tokenizers = None
    if settings.tokenizer:
        try:
            tokenizers = load_tokenizers(settings.tokenizer, max_chars=settings.tokenize_max_chars)
        except TokenizerError as exc:
            raise ConfigError(str(exc)) from None
    kv_metrics = KvMetrics(metrics.registry)
    subscriptions = None
    kv = None
    if settings.kv_events_port or settings.kv_events_endpoint:
        kv = KvIndex(max_blocks=settings.kv_events_max_blocks)
        kv_metrics.attach_index(kv)
        subscriptions = KvEventSubscriptions(
            kv,
            kv_metrics,
            port=settings.kv_events_port,
            endpoints=parse_endpoint_map(settings.kv_events_endpoint),
            on_error=metrics.task_error,
        )
        if tokenizers is None:
            log.warning(
                "KV events without --tokenizer: prompts cannot be matched against them; "
                "routing stays on the approximate prefix index"
            )
    else:
        log.warning(
            "--tokenizer without --kv-events-port/--kv-events-endpoint: nothing to match prompts "
            "against; routing stays on the approximate prefix index"
        )

    def adapter_endpoints(model: str) -> frozenset[str]:
        pool = registry.snapshot().model_pools.get(model)
        return (
            frozenset(b.endpoint for b in pool.members if model in b.adapters)
            if pool
            else frozenset()
        )

    source = PrefixSource(
        prefix_index,
        kv=kv,
        tokenizers=tokenizers,
        metrics=kv_metrics,
        adapter_endpoints=adapter_endpoints,
    )
    return source, subscriptions


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
