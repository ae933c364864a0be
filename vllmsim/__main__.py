"""``python -m vllmsim`` / ``vllmsim`` console script."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

from .config import SimConfig, parse_args


async def _run(cfg: SimConfig) -> None:
    from .server import SIM_KEY, serve  # imported late so --help stays fast

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(cfg) as (app, port):
        pod = app[SIM_KEY].pod
        # Long-lived startup objects (aiohttp, prometheus_client, tables) never become garbage:
        # moving them out of the collector's view keeps full collections short, and a larger
        # young-generation threshold makes them rarer (each pause would be engine-step lag).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        # One parseable line so launchers using --port 0 learn the port.
        print(f"vllmsim ready: http://{cfg.host}:{port} model={cfg.model} pod={pod}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s vllmsim %(levelname)s %(message)s"
    )
    asyncio.run(_run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
