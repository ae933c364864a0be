"""Routing quality: our service's strategies vs Envoy round-robin vs the Rust routers.

Run: ``make bench-routing ARGS="--workloads shared-prefix --contenders extproc:weighted,envoy"``
(every workload x contender x seed at 30 s per point takes hours on a 2-core box, so parts run
separately and merge), ``make bench-routing ARGS=--quick`` (end-to-end smoke, ~30 s).
docs/benchmarks.md ("Routing quality") explains the method; in short:

* Fleet: 4 vLLM simulators (``python -m vllmsim``) started by devstack's ``Stack``, fresh for
  EVERY run so no contender inherits another's prefix cache or queue. Engine cost model = the
  simulator's defaults (Llama-3-8B on an H100, docs/vllmsim.md), servers made smaller
  (``--max-num-seqs 16 --num-gpu-blocks 1024``) so the fleet saturates at request rates this
  box can drive; in the heterogeneous fleet two servers have every cost x3.
* Contenders, one after another against the same saved workload file per seed: Envoy + our
  service once per strategy (``x-routing-strategy`` per request), the same Envoy without
  ext_proc balancing round-robin, and ``vllm-router`` / ``sglang-router`` (PyPI) policies.
* Workloads: see WORKLOADS below (sharegpt, shared-prefix, heterogeneous, multi-turn,
  eviction-pressure, long-context, bursty).
* Capacity per workload: every server of the fleet driven in a closed loop (a permanent
  backlog) at once; the sum of their completion rates. Stored, and reused by later
  invocations so that every contender of a workload runs at the same request rate.
* Each run writes one JSON (with its per-request TTFT/e2e samples) under
  ``<out>/routing-runs/``; the report (``<out>/routing.md``/``.json``/``.png``) is rebuilt
  from ALL runs present, with 95 % bootstrap intervals over seeds (bench/routing_stats.py).
* Time: the simulators run at ``--time-scale S`` (simulated s per wall s); every latency in
  the results is wall x S, every rate / S: all numbers are simulated time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import routers  # noqa: E402
from bench.common import code_fingerprint, git_commit, write_atomic, write_json  # noqa: E402
from bench.loadgen import (  # noqa: E402
    RequestResult,
    run_closed_loop,
    run_load,
    saturated_throughput,
    summarize,
)
from bench.routing_report import fmt_ms, fmt_pct, fmt_shares, report  # noqa: E402
from bench.routing_specs import (  # noqa: E402
    DEFAULT_LOADS,
    FLEET_ARGS,
    MAX_NUM_SEQS,
    N_SIMS,
    RUN_FORMAT,
    RUNS_SUBDIR,
    SLOW_FACTOR,
    WORKLOAD_SIZE,
    WORKLOADS,
    Contender,
    WorkloadSpec,
    all_contenders,
    default_strategy,
    run_path,
    select_contenders,
)
from bench.workloads import Workload, generate  # noqa: E402
from devstack.processes import Proc, free_port, http_get  # noqa: E402
from devstack.stack import Stack  # noqa: E402

RESULTS = HERE / "results"
QUICK_OUT = ROOT / "run" / "bench-routing-quick"
RUN_DIR = ROOT / "run" / "bench-routing"  # workload files, requests.jsonl, logs (gitignored)

# ============================================================================ routers
STRATEGY_HEADER = "x-routing-strategy"


@dataclass
class Front:
    """A started router in front of a started fleet."""

    url: str
    stack: Stack
    headers: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)  # router processes besides the stack's


def service_args(time_scale: float) -> list[str]:
    """The service's timers are wall-clock; scale them so that, in simulated time, it scrapes
    every 100 ms and ages metrics exactly as its defaults do against a real fleet."""
    s = time_scale
    return [
        "--scrape-interval", f"{0.1 / s:g}",
        "--stale-after", f"{1.0 / s:g}",
        "--max-metrics-age", f"{10.0 / s:g}",
        "--scrape-timeout", f"{max(0.5, 0.5 / s):g}",
        "--log-level", "warning",
    ]  # fmt: skip


def kv_events_supported() -> bool:
    """Do this tree's simulator and service speak KV events (issue 9, item 3)?"""
    from extproc.config import Settings
    from vllmsim.config import SimConfig

    return "kv_events_endpoint" in Settings.model_fields and hasattr(
        SimConfig, "kv_events_endpoint"
    )


def fleet_stack(
    spec: WorkloadSpec, seed: int, log_dir: Path, *, sims_only: bool, kv_events: bool = False
) -> Stack:
    """The fleet of ``spec`` (and, unless ``sims_only``, our service + Envoy). With
    ``kv_events`` every simulator publishes its KV-cache events (whoever the contender is, so
    the fleets are identical) and the service subscribes to them: exact prefix-cache state."""
    sim_args = [spec.sim_args(i) for i in range(N_SIMS)]
    svc = service_args(spec.time_scale)
    sim_ports = None
    if kv_events:
        # The service names each publisher by its server's address, so the ports are chosen
        # here rather than by the Stack.
        sim_ports = [free_port() for _ in range(N_SIMS)]
        events = [f"tcp://127.0.0.1:{free_port()}" for _ in range(N_SIMS)]
        for args, ev, port in zip(sim_args, events, sim_ports, strict=True):
            args += ["--kv-events-endpoint", ev]
            svc += ["--kv-events-endpoint", f"127.0.0.1:{port}={ev}"]
        svc += ["--tokenizer", "*=vllmsim"]
    return Stack(
        log_dir=log_dir,
        n_backends=N_SIMS,
        common_sim_args=[*FLEET_ARGS, "--time-scale", f"{spec.time_scale:g}", "--seed", str(seed)],
        sim_args=sim_args,
        service_args=svc,
        envoy_concurrency=1,
        sims_only=sims_only,
        sim_ports=sim_ports,
    )


@contextlib.contextmanager
def serving(
    c: Contender, spec: WorkloadSpec, seed: int, log_dir: Path, kv_events: bool
) -> Iterator[Front]:
    """Fresh fleet + the contender's router; everything stopped on exit."""
    with fleet_stack(
        spec, seed, log_dir, sims_only=c.family != "extproc", kv_events=kv_events
    ) as stack:
        if c.family == "extproc":
            stack.wait_metrics_fresh()  # a long-running service would have them
            yield Front(stack.url, stack, {STRATEGY_HEADER: c.policy})
            return
        port = free_port()
        if c.family == "envoy":
            backends = [(h, int(p)) for h, p in (e.rsplit(":", 1) for e in stack.sim_endpoints)]
            proc = routers.start_envoy_round_robin(
                port=port, admin_port=free_port(), backends=backends, log_dir=log_dir
            )
        else:
            start = (
                routers.start_vllm_router
                if c.family == "vllm-router"
                else routers.start_sglang_router
            )
            proc = start(
                port=port,
                prometheus_port=free_port(),
                worker_urls=stack.sim_urls,
                policy=c.policy,
                log_dir=log_dir,
            )
        try:
            yield Front(f"http://127.0.0.1:{port}", stack, procs=[proc])
        finally:
            proc.stop()


def smoke(front: Front) -> str | None:
    """One tiny request through the router: None if it answered 200 with x-inference-pod."""
    import urllib.request

    body = json.dumps(
        {
            "model": "tiny-llama",
            "max_tokens": 1,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "ping"}],
        }
    ).encode()
    req = urllib.request.Request(
        front.url + "/v1/chat/completions",
        data=body,
        method="POST",
        headers={"content-type": "application/json", **front.headers},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            if resp.status != 200:
                return f"smoke request answered {resp.status}"
            if not resp.headers.get("x-inference-pod"):
                return "smoke request: no x-inference-pod header in the response"
            asked = front.headers.get(STRATEGY_HEADER)
            got = resp.headers.get("x-routing-strategy")
            if asked and got and got != asked:
                return f"asked for strategy {asked!r}, the service reports {got!r}"
    except Exception as exc:  # noqa: BLE001
        return f"smoke request failed: {type(exc).__name__}: {exc}"
    return None


def sim_report(urls: Sequence[str]) -> dict[str, Any]:
    """Engine-side facts after a run: prefix-cache hit rate, preemptions, pacing lag."""
    hits = queries = preempt = 0.0
    lags, resyncs = [], 0
    for u in urls:
        with contextlib.suppress(Exception):
            _, text = http_get(f"{u}/metrics", timeout=2.0)
            hits += _metric_sum(text, "vllm:prefix_cache_hits_total")
            queries += _metric_sum(text, "vllm:prefix_cache_queries_total")
            preempt += _metric_sum(text, "vllm:num_preemptions_total")
        with contextlib.suppress(Exception):
            st = json.loads(http_get(f"{u}/sim/stats", timeout=2.0)[1])
            lags.append(float(st["lag_wall_s"]["p99"]))
            resyncs += int(st.get("resyncs", 0))
    return {
        "prefix_hit_rate": hits / queries if queries else math.nan,
        "preemptions": int(preempt),
        "sim_lag_p99_wall_s": max(lags) if lags else math.nan,
        "sim_resyncs": resyncs,
    }


def _metric_sum(text: str, name: str) -> float:
    pat = re.compile(r"^" + re.escape(name) + r"(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)
    return sum(float(m) for m in pat.findall(text))


# ============================================================================ workloads, capacity
def workload_file(spec: WorkloadSpec, seed: int) -> Workload:
    """The saved workload of (spec, seed), generated once; every contender replays the file."""
    path = RUN_DIR / "workloads" / f"{spec.name}-seed{seed}-{spec.digest()[:8]}.json"
    if not path.exists():
        generate(spec.kind, WORKLOAD_SIZE, seed, burstiness=spec.burstiness, **spec.params).save(
            path
        )
    return Workload.load(path)


def calibrate(spec: WorkloadSpec, wl: Workload, log_dir: Path, seconds: float) -> dict[str, Any]:
    """Capacity: every server in its own closed loop (1.5 x max-num-seqs outstanding: a full
    batch plus a queue) for ``seconds`` of wall time (x SLOW_FACTOR for slow servers, so they
    complete as many requests), at once; the sum of their completion rates. Server i gets
    requests i, i+4, ... (what round-robin would give it)."""
    conc = int(MAX_NUM_SEQS * 1.5)
    s = spec.time_scale
    with fleet_stack(spec, wl.seed, log_dir, sims_only=True) as stack:

        async def drive() -> list[Any]:
            return await asyncio.gather(
                *(
                    run_closed_loop(
                        url,
                        dataclasses.replace(wl, requests=wl.requests[i::N_SIMS]),
                        concurrency=conc,
                        n=len(wl.requests) // N_SIMS,
                        deadline=seconds * (SLOW_FACTOR if i in spec.slow else 1.0),
                        request_timeout=120.0,
                    )
                    for i, url in enumerate(stack.sim_urls)
                )
            )

        runs = asyncio.run(drive())
        sim = sim_report(stack.sim_urls)
    per = [saturated_throughput(r.results, conc) for r in runs]
    if not all(rps > 0 for rps, _ in per):
        raise RuntimeError(f"calibration of {spec.name} failed: per-server rates {per}")
    rps_wall = sum(rps for rps, _ in per)
    return {
        "workload": spec.name,
        "spec_digest": spec.digest(),
        "capacity_rps_sim": rps_wall / s,
        "capacity_rps_wall": rps_wall,
        "per_server_rps_sim": [rps / s for rps, _ in per],
        "output_tokens_per_s_sim": sum(t for _, t in per) / s,
        "concurrency_per_server": conc,
        "seconds_wall": seconds,
        "requests": sum(len(r.results) for r in runs),
        "sim": sim,
        "time_scale": s,
        "measured": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": git_commit(),
    }


def calibration_for(
    spec: WorkloadSpec,
    out: Path,
    *,
    given: float | None,
    recalibrate: bool,
    seconds: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The stored calibration of ``spec`` if it matches, else a new one (stored)."""
    path = out / RUNS_SUBDIR / spec.name / "calibration.json"
    if given is not None:
        cal = {
            "workload": spec.name,
            "spec_digest": spec.digest(),
            "capacity_rps_sim": given,
            "capacity_rps_wall": given * spec.time_scale,
            "given": True,
            "time_scale": spec.time_scale,
        }
        write_json(path, cal)
        return cal
    if path.exists() and not recalibrate:
        cal = json.loads(path.read_text())
        if cal.get("spec_digest") == spec.digest():
            return dict(cal)
        say(f"[{spec.name}] stored calibration is for another workload/fleet: recalibrating")
    say(f"[{spec.name}] calibrating capacity ({seconds:g} s wall) ...")
    cal = calibrate(spec, workload_file(spec, 1), RUN_DIR / "logs" / spec.name / "calibration",
                    seconds)  # fmt: skip
    write_json(path, cal)
    return cal


# ============================================================================ one run
def run_one(
    c: Contender,
    spec: WorkloadSpec,
    wl: Workload,
    cal: dict[str, Any],
    load: float,
    duration: float,
    warmup: float,
    log_dir: Path,
    kv_events: bool = False,
    drain_limit: float = 60.0,
) -> dict[str, Any]:
    """Fresh fleet + contender, replay the first n requests of ``wl``; the run record."""
    s = spec.time_scale
    rate_wall = load * float(cal["capacity_rps_wall"])
    n = max(20, math.ceil(rate_wall * (duration + warmup)))
    if n > len(wl.requests):
        raise ValueError(
            f"{n} requests needed, the workload has {len(wl.requests)}: shorten --duration"
        )
    shutil.rmtree(log_dir, ignore_errors=True)  # logs of this run only (Proc appends)
    log_dir.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {
        "format": RUN_FORMAT,
        "workload": spec.name,
        "spec_digest": spec.digest(),
        "workload_sha256": wl.digest(),
        "seed": wl.seed,
        "contender": c.name,
        "family": c.family,
        "policy": c.policy,
        "load": load,
        "capacity_rps_sim": cal["capacity_rps_sim"],
        "rate_sim": rate_wall / s,
        "n": n,
        "duration_wall_s": duration,
        "warmup_wall_s": warmup,
        "time_scale": s,
        "kv_events": kv_events,
        "code": code_fingerprint(),
        "git_commit": git_commit(),
        "default_strategy": default_strategy(),
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_before": os.getloadavg()[0],
    }
    t_start = time.monotonic()
    with serving(c, spec, wl.seed, log_dir, kv_events) as front:
        rec["setup_wall_s"] = round(time.monotonic() - t_start, 2)
        problem = smoke(front)
        if problem:
            raise RuntimeError(problem)
        # The smoke request and start-up scrapes are not part of the measurement.
        for u in front.stack.sim_urls:
            with contextlib.suppress(Exception):
                http_get(f"{u}/sim/stats?reset=1", timeout=2.0)
        offsets = wl.offsets(rate_wall, n)
        run = asyncio.run(
            run_load(
                front.url,
                wl,
                rate=rate_wall,
                n=n,
                headers=front.headers,
                request_timeout=60.0,
                deadline=offsets[-1] + drain_limit,
            )
        )
        rec["sim"] = sim_report(front.stack.sim_urls)
        dead = [p.name for p in [*front.stack.procs, *front.procs] if not p.alive()]
        if dead:
            rec["died"] = dead
    rec["setup_and_run_wall_s"] = round(time.monotonic() - t_start, 1)
    rec["loadavg_after"] = os.getloadavg()[0]
    rec["client_send_lag_p99_wall_s"] = run.lag_p99_s
    rec["hit_deadline"] = run.hit_deadline
    measured = [r for r in run.results if r.scheduled >= warmup]
    summary = summarize(
        measured,
        wall_s=_window(measured, warmup),
        time_scale=s,
        pods=[f"sim{i}" for i in range(N_SIMS)],
    )
    summary["errors_total"] = sum(1 for r in run.results if not r.ok)
    summary["warmup_requests"] = len(run.results) - len(measured)
    rec["summary"] = summary
    # A run in which our service failed to apply the strategy (it routed by its fallback)
    # measures the fallback, not the strategy: recorded as failed, with the reason.
    reasons = summary["routing_reasons"]
    fallen = sum(v for k, v in reasons.items() if "error" in k)  # e.g. fallback-error
    if c.family == "extproc" and fallen > 0.05 * max(1, summary["completed"]):
        rec["error"] = f"the service routed {fallen} requests by its fallback: {reasons}"
        del rec["summary"]
    # Per-request samples in send order (simulated ms), what the report's intervals come from.
    ok = [r for r in measured if r.ok and r.ttft is not None and r.e2e is not None]
    rec["samples"] = {
        "ttft_ms": [round(r.ttft * s * 1000, 2) for r in ok if r.ttft is not None],
        "e2e_ms": [round(r.e2e * s * 1000, 1) for r in ok if r.e2e is not None],
    }
    _save_requests(log_dir / "requests.jsonl", run.results)
    return rec


def _window(measured: Sequence[RequestResult], start: float) -> float:
    """Wall seconds from the first measured send to the last measured completion."""
    ends = [r.sent + r.e2e for r in measured if r.ok and r.e2e is not None]
    return (max(ends) - start) if ends else math.nan


def _save_requests(path: Path, results: Sequence[RequestResult]) -> None:
    lines = []
    for r in results:
        d = r.to_dict()
        d.pop("itls", None)
        lines.append(json.dumps(d))
    write_atomic(path, "\n".join(lines) + "\n")


def one_line(rec: dict[str, Any]) -> str:
    head = (
        f"{rec['workload']:>17} {rec['load'] * 100:4.0f}% seed {rec['seed']} {rec['contender']:<27}"
    )
    if "error" in rec:
        return f"{head} FAILED {rec['error'][:300]}"
    s = rec["summary"]
    hit = rec["sim"]["prefix_hit_rate"]
    return (
        f"{head} n {s['requests']:>4} TTFT p50/p90 {fmt_ms(s['ttft_s']['p50'])}/"
        f"{fmt_ms(s['ttft_s']['p90'])} ms  e2e p90 {s['e2e_s']['p90']:.2f}s  "
        f"err {s['errors_total']}  hit {fmt_pct(hit)}  share {fmt_shares(s['backend_share'])}  "
        f"[{rec['setup_and_run_wall_s']:.0f}s]"
    )


# ============================================================================ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench_routing", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="end-to-end smoke (~30 s): shared-prefix, extproc:weighted and envoy:round-robin, "
        f"one seed, 3 s runs, results in {QUICK_OUT.relative_to(ROOT)}/",
    )
    ap.add_argument("--workloads", default=None, help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument(
        "--contenders",
        default=None,
        help="comma list of names or patterns (extproc:weighted, sglang-router:*, envoy, all); "
        "default all",
    )
    ap.add_argument("--seeds", default=None, help="comma list (default 1,2,3; quick 1)")
    ap.add_argument(
        "--loads", default=None, help="fractions of capacity (default 0.85), e.g. 0.5,0.85,1.1"
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help="wall seconds of measured arrivals per run (default 30; quick 3)",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="wall seconds of arrivals before the measurement (default 2; quick 1)",
    )
    ap.add_argument(
        "--capacity",
        default=None,
        help="skip calibration: WORKLOAD=REQ_PER_SIM_S[,...] (stored like a calibration)",
    )
    ap.add_argument("--recalibrate", action="store_true", help="ignore stored calibrations")
    ap.add_argument(
        "--calibration-seconds",
        type=float,
        default=None,
        help="wall seconds of the closed loop that measures capacity (default 15; quick 5)",
    )
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no run after this many minutes (the report covers what ran)",
    )
    ap.add_argument(
        "--kv-events",
        choices=("auto", "on", "off"),
        default="auto",
        help="simulators publish KV events and our service subscribes (exact prefix-cache "
        "state); auto = when this tree supports it",
    )
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where runs and the report go (default bench/results; quick "
        f"{QUICK_OUT.relative_to(ROOT)})",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild routing.md/.json/.png from the runs present, run nothing",
    )
    return ap.parse_args(argv)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    quick = a.quick
    out: Path = a.out_dir or (QUICK_OUT if quick else RESULTS)
    if a.report_only:
        report(out, quick)
        print(f"re-rendered {out / 'routing.md'}")
        return 0
    try:
        wl_names = (
            _csv(a.workloads) if a.workloads else ["shared-prefix"] if quick else list(WORKLOADS)
        )
        unknown = [w for w in wl_names if w not in WORKLOADS]
        if unknown:
            raise ValueError(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
        contenders = select_contenders(
            a.contenders or ("extproc:weighted,envoy:round-robin" if quick else "all"),
            all_contenders(),
        )
        seeds = [int(x) for x in _csv(a.seeds)] if a.seeds else ([1] if quick else [1, 2, 3])
        loads = [float(x) for x in _csv(a.loads)] if a.loads else list(DEFAULT_LOADS)
        given = {k: float(v) for k, v in (kv.split("=", 1) for kv in _csv(a.capacity or ""))}
    except ValueError as exc:
        print(f"bench_routing: {exc}", file=sys.stderr)
        return 2
    kv_events = a.kv_events == "on" or (a.kv_events == "auto" and kv_events_supported())
    duration = a.duration if a.duration is not None else (3.0 if quick else 30.0)
    warmup = a.warmup if a.warmup is not None else (1.0 if quick else 2.0)
    cal_s = a.calibration_seconds or (5.0 if quick else 15.0)
    skipped: dict[str, str] = {}
    for fam, check in (
        ("vllm-router", routers.vllm_router_available),
        ("sglang-router", routers.sglang_router_available),
    ):
        why = check()
        if why and any(c.family == fam for c in contenders):
            skipped[fam] = why
            contenders = [c for c in contenders if c.family != fam]
    for fam, why in skipped.items():
        print(f"skipped {fam}: {why}", flush=True)

    t0 = time.monotonic()
    total = len(wl_names) * len(seeds) * len(loads) * len(contenders)
    print(
        f"bench-routing: {len(wl_names)} workloads x {len(seeds)} seeds x {len(loads)} loads x "
        f"{len(contenders)} contenders = {total} runs of {duration:g}+{warmup:g} s (wall); "
        f"KV events {'on' if kv_events else 'off'}; results in {out}",
        flush=True,
    )
    done = failed = 0
    out_of_time = False
    for wname in wl_names:
        spec = WORKLOADS[wname]
        cal = calibration_for(
            spec,
            out,
            given=given.get(wname),
            recalibrate=a.recalibrate,
            seconds=cal_s,
            say=lambda m: print(m, flush=True),
        )
        print(f"[{wname}] capacity {cal['capacity_rps_sim']:.1f} req/s (simulated)", flush=True)
        # Seeds outside, contenders inside: drifts of the shared box hit every contender alike.
        for seed in seeds:
            wl = workload_file(spec, seed)
            for load in loads:
                for c in contenders:
                    if a.max_minutes is not None and time.monotonic() - t0 > a.max_minutes * 60:
                        out_of_time = True
                        break
                    log_dir = RUN_DIR / "logs" / wname / f"{round(load * 100)}" / \
                        c.name.replace(":", "-") / f"seed{seed}"  # fmt: skip
                    try:
                        rec = run_one(c, spec, wl, cal, load, duration, warmup, log_dir, kv_events)
                    except Exception as exc:  # noqa: BLE001 - record it, go on with the others
                        rec = {
                            "format": RUN_FORMAT,
                            "workload": wname,
                            "spec_digest": spec.digest(),
                            "workload_sha256": wl.digest(),
                            "seed": seed,
                            "contender": c.name,
                            "family": c.family,
                            "policy": c.policy,
                            "load": load,
                            "capacity_rps_sim": cal["capacity_rps_sim"],
                            "rate_sim": load * cal["capacity_rps_sim"],
                            "git_commit": git_commit(),
                            "code": code_fingerprint(),
                            "error": f"{type(exc).__name__}: {exc}"[:800],
                        }
                        failed += 1
                    # one compact line: the per-request samples make up most of it
                    write_json(run_path(out, wname, c.name, load, seed), rec, indent=None)
                    done += 1
                    print(f"[{done}/{total}] " + one_line(rec), flush=True)
    if out_of_time:
        print(f"--max-minutes {a.max_minutes:g} reached: {total - done} runs not started")
    doc = report(out, quick)
    minutes = (time.monotonic() - t0) / 60
    print(f"wrote {out / 'routing.md'} ({doc['runs']} runs) in {minutes:.1f} min")
    for t in doc["targets"]:
        for k in ("vs_rust", "vs_rr"):
            c = t.get(k)
            if c:
                print(f"target {t['workload']}: {c['ratio']:.2f} x {c['against']} "
                      f"(target ≤ {c['target']:.1f}): {c['verdict']}")  # fmt: skip
    return 1 if done and failed == done else 0


if __name__ == "__main__":
    sys.exit(main())
