"""One decision worker of ``--workers N``: answers ext_proc from the main's published state.

Started by :mod:`extproc.workers` as ``python -m extproc.worker RUN_DIR ROW MAIN_PID``, never by
hand.
It reads the settings and the shared state from the run directory, serves ext_proc and
grpc.health.v1 on the service's ``--grpc-address`` (SO_REUSEPORT, shared with the other
workers), and counts its picks in its own row of the shared counters.

Its health is the main's (SERVING only while the main is) and its own (NOT_SERVING from the
moment it drains). SIGTERM drains exactly as the one-process service drains; SIGINT stops; the
kernel kills a worker when its main dies (a crashed service stops deciding at once, as one
process does). With ``--kv-events-*`` each worker subscribes
to the publishers itself (ZMQ fans out): every worker has the whole exact prefix index. The
approximate prefix index (what this worker routed) is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

from prometheus_client import Gauge

from extproc.app import _exact_prefix, build_processor, finish_streams
from extproc.config import ConfigError, Settings
from extproc.grpc_server import build_server, set_serving
from extproc.kv_index import KvIndex
from extproc.observability import Metrics
from extproc.prefix_index import PrefixIndex
from extproc.shared_state import MirrorRegistry, SharedCounters, StateFile
from extproc.tls import server_credentials
from extproc.workers import COUNTERS_FILE, SETTINGS_FILE, STATE_FILE, worker_address

log = logging.getLogger("extproc.worker")

WATCH_PERIOD_S = 0.02  # health follows the main's within this; the parent is checked as often
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
KV_GAUGES_EVERY = 25  # watch periods between two copies of the KV index size into /metrics


class KvIndexGauges:
    """The exact prefix index's size in the main's /metrics. Its gauges are computed when
    Prometheus scrapes (extproc/kv_metrics.py), which cannot cross processes: a worker copies
    them into multiprocess gauges instead (the max over live workers: each holds every server's
    index, all fed by the same events)."""

    def __init__(self, index: KvIndex) -> None:
        self.index = index
        self.blocks = Gauge(
            "extproc_kv_index_blocks",
            "Blocks the exact prefix index holds for the backend (from its KV events).",
            ["backend"],
            registry=None,
            multiprocess_mode="livemax",
        )
        self.block_size = Gauge(
            "extproc_kv_index_block_size",
            "Tokens per block of the backend, from its KV events (0: none yet).",
            ["backend"],
            registry=None,
            multiprocess_mode="livemax",
        )
        self._shown: set[str] = set()

    def update(self) -> None:
        shown = set()
        for endpoint, server in list(self.index.servers.items()):
            self.blocks.labels(endpoint).set(len(server))
            self.block_size.labels(endpoint).set(server.block_size)
            shown.add(endpoint)
        for endpoint in self._shown - shown:  # left the pool: its series reads 0 from now on
            self.blocks.labels(endpoint).set(0)
            self.block_size.labels(endpoint).set(0)
        self._shown = shown


async def serve(settings: Settings, run_dir: Path, row: int) -> None:
    loop = asyncio.get_running_loop()
    stop, drain = asyncio.Event(), asyncio.Event()
    # SIGTERM may come twice (the main forwards it; a process-group signal reaches us too):
    # only the main's SIGINT means "stop now".
    loop.add_signal_handler(signal.SIGTERM, drain.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    parent = os.getppid()
    counters = SharedCounters.attach(run_dir / COUNTERS_FILE)
    registry = MirrorRegistry(
        counters,
        StateFile(run_dir / STATE_FILE, counters),
        row,
        stale_after=settings.stale_after,
        max_metrics_age=settings.max_metrics_age,
        # The main publishes every scrape interval; missing two, we age our copy ourselves.
        rebuild_after=2 * settings.scrape_interval,
    )
    registry.refresh()
    metrics = Metrics()
    metrics.attach_backends(registry, collect=False)
    prefix_source, kv = _exact_prefix(settings, PrefixIndex(), registry, metrics)
    if kv is not None:
        subscriptions = kv
        registry.on_change = lambda: subscriptions.sync(r.endpoint for r in registry.records)
        registry.on_change()
    processor = build_processor(settings, registry, metrics, prefix_source)
    server, health_servicer, handler = build_server(
        processor,
        registry,
        settings.grpc_address,
        server_credentials(settings),
        reuse_port=True,
        also=(worker_address(settings, row),) if settings.worker_ports else (),
    )
    published: bool | None = None
    closing = False

    async def follow_health() -> None:
        nonlocal published
        serving = counters.serving and not drain.is_set() and not closing
        if serving != published:
            await set_serving(health_servicer, serving)
            published = serving

    kv_gauges = KvIndexGauges(kv.index) if kv is not None else None

    async def watch() -> None:
        ticks = 0
        while True:
            if os.getppid() != parent:  # where the kernel does not kill us with it
                log.warning("the main process is gone: stopping")
                stop.set()
            registry.refresh()  # keeps KV subscriptions following the pool between requests
            counters.set_worker(row, streams=handler.open_streams)
            await follow_health()
            if kv_gauges is not None and ticks % KV_GAUGES_EVERY == 0:
                kv_gauges.update()
            ticks += 1
            await asyncio.sleep(WATCH_PERIOD_S)

    await follow_health()  # NOT_SERVING before listening (grpcio starts "" as SERVING)
    await server.start()
    counters.set_worker(row, pid=os.getpid())
    watcher = asyncio.create_task(watch())
    try:
        waiters = [asyncio.ensure_future(e.wait()) for e in (stop, drain)]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if drain.is_set() and not stop.is_set():
            await follow_health()
            log.info(
                "SIGTERM: draining for %.1f s (%d open streams)",
                settings.drain_seconds,
                handler.open_streams,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=settings.drain_seconds)
    finally:
        closing = True
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await follow_health()
        await finish_streams(handler, server, settings, drain, stop)
        counters.set_worker(row, pid=0, streams=0)
        if kv is not None:
            await kv.stop()


def die_with_the_main(main_pid: int) -> bool:
    """Have the kernel SIGKILL this process when its main dies (Linux ``PR_SET_PDEATHSIG``):
    a killed service stops deciding at once, as one process does. False if the main is
    already gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == main_pid  # checked after: the main may have died just before


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or not (args[1].isdigit() and args[2].isdigit()):
        print(
            "usage: python -m extproc.worker RUN_DIR ROW MAIN_PID (started by extproc)",
            file=sys.stderr,
        )
        return 2
    if not die_with_the_main(int(args[2])):
        return 1
    run_dir, row = Path(args[0]), int(args[1])
    settings = Settings.model_validate_json((run_dir / SETTINGS_FILE).read_bytes())
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[worker {row}]: %(message)s",
    )
    try:
        asyncio.run(serve(settings, run_dir, row))
    except KeyboardInterrupt:
        pass
    except ConfigError as exc:  # e.g. a tokenizer that does not load
        print(f"extproc worker {row}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port taken by something that is not a worker
        print(f"extproc worker {row}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
