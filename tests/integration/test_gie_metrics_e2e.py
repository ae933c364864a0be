"""The Gateway API Inference Extension pool series on the real service's admin /metrics, with
real simulators: the values follow what the simulators report and which of them are up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack import Stack

from .e2e import MODEL, eventually

pytestmark = pytest.mark.integration

POOL = "e2e-pool"


async def pool_series(
    session: aiohttp.ClientSession, admin_url: str
) -> dict[tuple[str, str], float]:
    """(sample name, model_server_pod or "") -> value, for the inference_pool_* samples of POOL."""
    async with session.get(admin_url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
        text = await r.text()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("inference_pool_") and s.labels.get("name") == POOL:
                out[(s.name, s.labels.get("model_server_pod", ""))] = s.value
    return out


async def test_pool_series_follow_the_simulators(stack: Callable[..., Stack]) -> None:
    # Simulator 0 runs one sequence at a time, so concurrent requests sent straight to it queue.
    s = stack(n_backends=3, sim_args=[["--max-num-seqs", "1"]], service_args=["--pool-name", POOL])
    endpoints = s.sim_endpoints
    async with aiohttp.ClientSession() as session:

        async def idle_pool() -> dict[tuple[str, str], float] | None:
            got = await pool_series(session, s.admin_url)
            per_pod = {
                pod: v
                for (name, pod), v in got.items()
                if name == "inference_pool_per_pod_queue_size"
            }
            ok = got.get(("inference_pool_ready_pods", "")) == 3 and set(per_pod) == set(endpoints)
            return got if ok else None

        got = await eventually(idle_pool, timeout=15)
        assert got[("inference_pool_average_queue_size", "")] == 0
        assert got[("inference_pool_average_running_requests", "")] == 0
        assert got[("inference_pool_average_kv_cache_utilization", "")] == 0

        # Three long requests straight to simulator 0 (not through Envoy: no routing involved):
        # one runs, two wait there.
        body = orjson.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 4000, "stream": True})

        async def hold() -> None:
            async with session.post(
                s.sim_urls[0] + "/v1/completions",
                data=body,
                headers={"content-type": "application/json"},
            ) as r:
                assert r.status == 200
                async for _ in r.content.iter_any():
                    pass

        held = [asyncio.create_task(hold()) for _ in range(3)]
        try:

            async def queued() -> dict[tuple[str, str], float] | None:
                got = await pool_series(session, s.admin_url)
                return (
                    got
                    if got.get(("inference_pool_per_pod_queue_size", endpoints[0])) == 2
                    else None
                )

            got = await eventually(queued, timeout=15)
            assert got[("inference_pool_per_pod_queue_size", endpoints[1])] == 0
            assert got[("inference_pool_average_queue_size", "")] == pytest.approx(2 / 3)
            assert got[("inference_pool_average_running_requests", "")] == pytest.approx(1 / 3)
            assert got[("inference_pool_average_kv_cache_utilization", "")] > 0
        finally:
            for t in held:
                t.cancel()
            await asyncio.gather(*held, return_exceptions=True)

        # A simulator goes away: refused scrapes make it unhealthy at once, so not ready.
        s.sims[2].stop()

        async def two_ready() -> bool:
            got = await pool_series(session, s.admin_url)
            return got.get(("inference_pool_ready_pods", "")) == 2

        await eventually(two_ready, timeout=15)
