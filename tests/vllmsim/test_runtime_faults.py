"""Faults switched on and off at run time through ``/sim/faults`` (benchmarks flip them mid-run)."""

from __future__ import annotations

import asyncio


async def test_metrics_hang_and_inference_500_switch_on_and_off(sim_factory, http) -> None:
    base, _ = await sim_factory()
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with http.post(f"{base}/sim/faults", json={"metrics_latency": 3600, "fail_rate": 1}) as r:
        assert r.status == 200 and (await r.json())["metrics_latency"] == 3600
    try:
        async with asyncio.timeout(0.5):
            async with http.get(f"{base}/metrics") as r:
                raise AssertionError(f"/metrics answered {r.status} while hanging")
    except TimeoutError:
        pass
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.status == 500 and "error" in await r.json()
    async with http.post(f"{base}/sim/faults", json={"metrics_latency": 0, "fail_rate": 0}) as r:
        assert await r.json() == {
            "metrics_latency": 0.0,
            "metrics_fail_rate": 0.0,
            "fail_rate": 0.0,
        }
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200
    async with http.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.status == 200


async def test_bad_fault_requests_are_400_and_change_nothing(sim_factory, http) -> None:
    base, _ = await sim_factory()
    for bad in ({"fail_rate": 2}, {"nope": 1}, {"fail_rate": True}, [], "x"):
        async with http.post(f"{base}/sim/faults", json=bad) as r:
            assert r.status == 400 and "error" in await r.json()
    async with http.post(f"{base}/sim/faults", data=b"{not json") as r:
        assert r.status == 400
    async with http.get(f"{base}/sim/faults") as r:
        assert await r.json() == {
            "metrics_latency": 0.0,
            "metrics_fail_rate": 0.0,
            "fail_rate": 0.0,
        }
