"""vllmsim speed benchmark: can the simulator keep up with its own clock under load?

Scenario A ("one core"): one instance pinned to CPU 0, the load generator pinned to CPU 1,
256 concurrent streaming completions (ignore_eos) kept in flight for --duration seconds.
Scenario B ("2-core box"): four instances and the load generator unpinned on the machine,
64 streams each (256 in total).

Reported per scenario: the engine's step lag (wall time between a step's planned end and the
moment it actually completed; /sim/stats), resyncs (lag > 100 ms), simulator CPU use, the
tokens/s the clients received, and client-side inter-chunk time vs the simulated ITL.
Results: bench/results/vllmsim.json and .md.

    python bench/bench_vllmsim.py [--duration 20] [--streams 256] [--scenario a|b|both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


async def start_sim(cpu: int | None, extra: list[str]) -> tuple[asyncio.subprocess.Process, str]:
    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vllmsim",
        "--port",
        "0",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=pin,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    if not line.startswith("vllmsim ready:"):
        raise RuntimeError(f"simulator did not start: {line!r}")
    return proc, line.split()[2]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def client(
    session: aiohttp.ClientSession,
    base: str,
    stop_at: float,
    rng: random.Random,
    prefixes: list[str],
    out: dict[str, Any],
) -> None:
    """Keep one stream in flight until ``stop_at`` (a bounded load loop)."""
    while time.monotonic() < stop_at:
        prompt = rng.choice(prefixes) + f" user question {rng.random()}" * 8
        payload = {
            "prompt": prompt,
            "max_tokens": rng.randint(128, 384),
            "ignore_eos": True,
            "stream": True,
        }
        last = None
        try:
            async with session.post(f"{base}/v1/completions", json=payload) as r:
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    now = time.monotonic()
                    if last is None:
                        out["ttft"].append(now - out["sent"].get(id(r), now))
                    else:
                        out["gaps"].append(now - last)
                    last = now
                    out["chunks"] += 1
                    if now >= stop_at:
                        break  # stop mid-stream: closing the connection aborts the request
            out["requests"] += 1
        except aiohttp.ClientError:
            out["errors"] += 1


async def scenario(
    name: str, instances: int, streams: int, duration: float, pin: bool, extra: list[str]
) -> dict[str, Any]:
    ncpu = os.cpu_count() or 1
    if pin and ncpu >= 2:
        os.sched_setaffinity(0, {1})
    procs = [await start_sim(0 if pin else None, extra) for _ in range(instances)]
    rng = random.Random(42)
    prefixes = [
        f"System prompt number {i}: " + "you are a helpful assistant. " * 40 for i in range(8)
    ]
    try:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=conn, timeout=aiohttp.ClientTimeout(total=duration + 60)
        ) as s:
            warm_stop = time.monotonic() + 3.0
            per = streams // instances
            # warm-up: fill the batch so the measured window is in steady state
            warm = {"gaps": [], "ttft": [], "sent": {}, "chunks": 0, "requests": 0, "errors": 0}
            tasks = [
                asyncio.create_task(client(s, base, warm_stop + duration, rng, prefixes, warm))
                for _, base in procs
                for _ in range(per)
            ]
            await asyncio.sleep(max(0.0, warm_stop - time.monotonic()))
            cpu0 = [cpu_seconds(p.pid) for p, _ in procs]
            before = []
            for _, base in procs:
                async with s.get(f"{base}/sim/stats?reset=1") as r:
                    before.append(await r.json())
            chunks0, t0 = warm["chunks"], time.monotonic()
            gaps0 = len(warm["gaps"])
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - t0
            after = []
            for _, base in procs:
                async with s.get(f"{base}/sim/stats") as r:
                    after.append(await r.json())
                async with s.get(f"{base}/metrics") as r:
                    page = await r.text()
            cpu1 = [cpu_seconds(p.pid) for p, _ in procs]
            itl_sum = itl_count = 0.0
            for line in page.splitlines():
                if line.startswith("vllm:inter_token_latency_seconds_sum"):
                    itl_sum = float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:inter_token_latency_seconds_count"):
                    itl_count = float(line.rsplit(" ", 1)[1])
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            await p.wait()
        if pin and ncpu >= 2:
            os.sched_setaffinity(0, set(range(ncpu)))
    gaps = warm["gaps"][gaps0:]
    steps = [a["steps"] - b["steps"] for a, b in zip(after, before)]
    tokens = sum(a["generation_tokens"] - b["generation_tokens"] for a, b in zip(after, before))
    cpu_total = sum(c1 - c0 for c0, c1 in zip(cpu0, cpu1))
    return {
        "scenario": name,
        "instances": instances,
        "streams": streams,
        "pinned": pin and ncpu >= 2,
        "duration_s": round(elapsed, 2),
        "lag_p50_ms": round(max(a["lag_wall_s"]["p50"] for a in after) * 1e3, 3),
        "lag_p99_ms": round(max(a["lag_wall_s"]["p99"] for a in after) * 1e3, 3),
        "lag_max_ms": round(max(a["lag_wall_s"]["max"] for a in after) * 1e3, 3),
        "resyncs": sum(a["resyncs"] for a in after),
        "steps_per_s_per_instance": round(statistics.mean(steps) / elapsed, 1),
        "running_at_end": [a["running"] for a in after],
        "sim_cpu_util_per_instance": [round((c1 - c0) / elapsed, 3) for c0, c1 in zip(cpu0, cpu1)],
        # CPU the simulator needs per generated token (incl. HTTP), and per wall second:
        # below 1.0 core-second per second it can keep up on a core of its own.
        "sim_cpu_us_per_token": round(cpu_total / tokens * 1e6, 1) if tokens else None,
        "engine_busy_share": round(max(a["engine_busy_wall_s"] for a in after) / elapsed, 3),
        "client_tokens_per_s": round((warm["chunks"] - chunks0) / elapsed, 1),
        "client_gap_p50_ms": round(pct(gaps, 0.5) * 1e3, 2),
        "client_gap_p99_ms": round(pct(gaps, 0.99) * 1e3, 2),
        "sim_itl_mean_ms": round(itl_sum / itl_count * 1e3, 2) if itl_count else None,
        "client_errors": warm["errors"],
    }


def write_report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    meta = {
        "sim_flags": args.sim_flags,
        # the machine is shared: other processes' load explains lag we did not cause
        "loadavg_before": args.loadavg_before,
        "loadavg_after": list(os.getloadavg()),
    }
    cols = [
        "scenario",
        "instances",
        "streams",
        "pinned",
        "lag_p50_ms",
        "lag_p99_ms",
        "lag_max_ms",
        "resyncs",
        "steps_per_s_per_instance",
        "sim_cpu_util_per_instance",
        "sim_cpu_us_per_token",
        "client_tokens_per_s",
        "client_gap_p50_ms",
        "sim_itl_mean_ms",
        "client_errors",
    ]
    lines = [
        "# vllmsim speed benchmark",
        "",
        f"Simulator flags: `{args.sim_flags}` "
        "(defaults = 8B/H100 calibration, time scale 1). Load average before/after: "
        f"{meta['loadavg_before']} / {meta['loadavg_after']} (shared machine).",
        "",
        "Lag = wall time between an engine step's planned end and its actual completion "
        "(p50/p99/max over the measured window). Resyncs = steps that were more than 100 ms "
        "late (the engine then re-anchors its clock). A simulator that cannot keep up shows "
        "a lag that grows without bound and CPU use pinned at 1.0; one that keeps up but "
        "waits for a CPU now and then (other processes on a shared machine) shows a small "
        "median with a tail. `sim_cpu_util` is the fraction of one core the simulator "
        "process used, `sim_cpu_us_per_token` its CPU time (engine + HTTP + SSE) per "
        "generated token.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in results:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    write_results("vllmsim", {"meta": meta, "results": results}, "\n".join(lines))


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    extra = args.sim_flags.split()
    results = []
    if args.scenario in ("a", "both"):
        results.append(
            await scenario(
                "A: 1 instance pinned to CPU 0, loadgen on CPU 1",
                1,
                args.streams,
                args.duration,
                True,
                extra,
            )
        )
    if args.scenario in ("b", "both"):
        results.append(
            await scenario(
                "B: 4 instances + loadgen, 2 shared cores",
                4,
                args.streams,
                args.duration,
                False,
                extra,
            )
        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--scenario", choices=["a", "b", "both"], default="both")
    ap.add_argument("--sim-flags", default="--seed 0", help="extra vllmsim flags")
    args = ap.parse_args()
    args.loadavg_before = list(os.getloadavg())
    results = asyncio.run(main_async(args))
    write_report(results, args)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
