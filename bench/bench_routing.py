"""Routing quality: our service's strategies vs Envoy round-robin vs the Rust routers.

Run: ``make bench-routing`` (full, ~20 min) or ``make bench-routing ARGS=--quick`` (< 5 min).
Writes ``bench/results/routing.{json,md}`` and ``routing-<workload>.png`` (``routing-quick.*``
with ``--quick``). docs/benchmarks.md ("Routing quality") explains the method; in short:

* Fleet: 4 vLLM simulators (``python -m vllmsim``), identical, restarted for EVERY run so no
  contender inherits another's prefix cache or queue. Engine cost model = the simulator's
  defaults (Llama-3-8B on an H100, see docs/vllmsim.md); only the size is reduced
  (``--max-num-seqs 16 --num-gpu-blocks 1024``) so the fleet saturates at request rates this
  2-core box can drive (see FLEET_ARGS).
* Contenders, one after another against the same workload file and seed:
  (1) Envoy + our service, once per strategy in ``extproc.strategies.STRATEGIES`` (chosen per
  request with ``x-routing-strategy``), (2) the same Envoy config without ext_proc, balancing
  round-robin, (3) ``vllm-router`` and (4) ``sglang-router`` (PyPI), each with the policies
  round_robin, power_of_two and cache_aware.
* Workloads (bench/workloads.py), generated once per seed, saved as JSON and replayed from the
  file: ``sharegpt`` (ShareGPT-like lengths) and ``shared-prefix`` (32 groups x 1,024-token
  system prompt + short questions). Poisson arrivals.
* Load points: 50 %, 85 % and 110 % of the fleet capacity, measured per workload by a closed-
  loop calibration run through Envoy round-robin (permanent backlog -> completion rate).
* Time: the simulators run at ``--time-scale S`` (simulated s per wall s, per workload). The
  client measures wall time; every latency in the results is multiplied by S and every rate
  divided by S, i.e. all numbers are in simulated seconds (what a real fleet would show).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
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
from bench.loadgen import (  # noqa: E402
    RequestResult,
    percentile,
    run_closed_loop,
    run_load,
    saturated_throughput,
    summarize,
)
from bench.workloads import Workload, generate  # noqa: E402
from devstack.envoy_config import render_local_config  # noqa: E402
from devstack.processes import (  # noqa: E402
    ProcessStartError,
    Proc,
    free_port,
    http_get,
    start_envoy,
    start_extproc,
    start_vllmsim,
)

RESULTS = HERE / "results"
RUN_DIR = ROOT / "run" / "bench-routing"  # workloads, per-request data, process logs (gitignored)

# ----------------------------------------------------------------------------- fleet
N_SIMS = 4
MAX_NUM_SEQS = 16
# Per simulator. The cost model stays at the simulator's defaults (Llama-3-8B on an H100, see
# docs/vllmsim.md "Calibration"); only the server is smaller:
# * --max-num-seqs 16: at capacity a server emits ~max_num_seqs/step_time tokens/s whatever
#   the request mix (16 / 7.5 ms ~ 2,100/s); the 4 servers together must stay within what this
#   box can stream through Envoy and a Python client (~3-4k SSE chunks/s wall, measured).
# * --num-gpu-blocks 1024: 16,384 tokens = 2 GiB of Llama-3-8B KV (128 KiB/token), the order of
#   what a 24 GB GPU keeps after 16 GB of weights. The 32 shared prefixes (32 x 1,024 tokens =
#   2,048 blocks) then do not fit in one server's cache but do fit in the fleet's (4,096): the
#   regime prefix-aware routing is for. The ShareGPT-like batch (16 x ~300 tokens) fits easily.
FLEET_ARGS = ["--max-num-seqs", str(MAX_NUM_SEQS), "--num-gpu-blocks", "1024"]

# ----------------------------------------------------------------------------- workloads
# time_scale: simulated seconds per wall second. It does not change the simulated results, only
# how fast they are produced; it is chosen so that 110 % load stays within the box's streaming
# budget (see FLEET_ARGS) while the runs stay short. Below 1 = slower than real time.
WORKLOADS: dict[str, dict[str, Any]] = {
    "sharegpt": {
        "kind": "sharegpt",
        # outputs halved (median 60, mean ~90, max 256 tokens) so that a run's slowest request
        # finishes within seconds; the log-normal shape and the input lengths are unchanged.
        "params": {"output_scale": 0.5, "output_max": 512},
        "time_scale": 0.5,
    },
    "shared-prefix": {
        "kind": "shared-prefix",
        "params": {
            "num_groups": 32,
            "system_prompt_len": 1024,
            "question_len": 48,
            "output_len": 48,
        },
        "time_scale": 0.5,
    },
}
WORKLOAD_SIZE = 8000  # requests generated per workload (runs use a prefix of the list)
LOADS = (0.5, 0.85, 1.1)
QUICK_LOADS = (0.85,)
STRATEGY_HEADER = "x-routing-strategy"
# Strategies that rank servers by load only (no prefix, session or weights); the later issue's
# ShareGPT target compares the default strategy with the best of these.
LOAD_ONLY = ("least-request", "throughput", "least-kv-cache", "least-latency")
# Strategies that use the prompt's prefix; the later issue's shared-prefix targets apply to them.
PREFIX_AWARE = ("prefix-cache", "weighted")


# ============================================================================ contenders
@dataclass
class Front:
    """A started router: where to send requests, extra headers, processes to stop."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    admin_url: str | None = None

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop()


@dataclass
class Contender:
    family: str  # extproc | envoy | vllm-router | sglang-router
    policy: str

    @property
    def name(self) -> str:
        return {"extproc": f"extproc:{self.policy}", "envoy": "envoy:round-robin"}.get(
            self.family, f"{self.family}:{self.policy}"
        )

    def start(self, sim_ports: Sequence[int], log_dir: Path, time_scale: float) -> Front:
        urls = [f"http://127.0.0.1:{p}" for p in sim_ports]
        if self.family == "extproc":
            return _start_extproc_front(sim_ports, log_dir, self.policy, time_scale)
        if self.family == "envoy":
            port, admin = free_port(), free_port()
            p = routers.start_envoy_round_robin(
                port=port,
                admin_port=admin,
                backends=[("127.0.0.1", x) for x in sim_ports],
                log_dir=log_dir,
            )
            return Front(url=f"http://127.0.0.1:{port}", procs=[p])
        port, prom = free_port(), free_port()
        start = (
            routers.start_vllm_router
            if self.family == "vllm-router"
            else routers.start_sglang_router
        )
        p = start(
            port=port, prometheus_port=prom, worker_urls=urls, policy=self.policy, log_dir=log_dir
        )
        return Front(url=f"http://127.0.0.1:{port}", procs=[p])


def _start_extproc_front(
    sim_ports: Sequence[int], log_dir: Path, strategy: str, time_scale: float
) -> Front:
    grpc_port, admin_port, envoy_port, envoy_admin = (free_port() for _ in range(4))
    # The service's timers are wall-clock; scale them so that, in simulated time, it scrapes
    # every 100 ms and ages metrics exactly as its defaults do against a real fleet.
    s = time_scale
    args = [
        "--scrape-interval",
        f"{0.1 / s:g}",
        "--stale-after",
        f"{1.0 / s:g}",
        "--max-metrics-age",
        f"{10.0 / s:g}",
        "--scrape-timeout",
        f"{max(0.5, 0.5 / s):g}",
        "--log-level",
        "warning",
    ]
    front = Front(
        url=f"http://127.0.0.1:{envoy_port}",
        headers={STRATEGY_HEADER: strategy},
        admin_url=f"http://127.0.0.1:{admin_port}",
    )
    try:
        front.procs.append(
            start_extproc(
                grpc_port=grpc_port,
                admin_port=admin_port,
                log_dir=log_dir,
                args=args,
                backends=[f"http://127.0.0.1:{p}" for p in sim_ports],
            )
        )
        cfg = render_local_config(
            listener_port=envoy_port,
            admin_port=envoy_admin,
            extproc_address=("127.0.0.1", grpc_port),
            backends=[("127.0.0.1", p) for p in sim_ports],
        )
        front.procs.append(start_envoy(cfg, log_dir=log_dir, admin_port=envoy_admin, concurrency=1))
        _wait_service_warm(front.admin_url or "", len(sim_ports))
    except BaseException:
        front.stop()
        raise
    return front


def _wait_service_warm(admin_url: str, n: int, timeout: float = 15.0) -> None:
    """Poll /backends until every backend has fresh metrics (a long-running service would)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            status, body = http_get(f"{admin_url}/backends", timeout=1.0)
            if status == 200:
                bs = json.loads(body).get("backends", [])
                if len(bs) == n and all(b.get("freshness") == "fresh" for b in bs):
                    return
        time.sleep(0.05)
    raise ProcessStartError(f"service at {admin_url} never had fresh metrics for {n} backends")


def build_contenders(
    strategies: Sequence[str], families: Sequence[str], rust_policies: Sequence[str]
) -> list[Contender]:
    out = [Contender("extproc", s) for s in strategies] if "extproc" in families else []
    if "envoy" in families:
        out.append(Contender("envoy", "round-robin"))
    for fam in ("vllm-router", "sglang-router"):
        if fam in families:
            out += [Contender(fam, p) for p in rust_policies]
    return out


# ============================================================================ fleet
@contextlib.contextmanager
def fleet(log_dir: Path, time_scale: float, seed: int) -> Iterator[list[int]]:
    """Start N_SIMS fresh simulators (in parallel); yield their ports; stop them."""
    for attempt in range(3):
        ports = _distinct_ports(N_SIMS)
        sims = [
            start_vllmsim(
                p,
                log_dir=log_dir,
                wait=False,
                name=f"vllmsim-{i}",
                args=[
                    *FLEET_ARGS,
                    "--time-scale",
                    f"{time_scale:g}",
                    "--seed",
                    str(seed),
                    "--instance-name",
                    f"sim{i}",
                ],
            )
            for i, p in enumerate(ports)
        ]
        try:
            for s in sims:
                s.wait_ready(30)
        except ProcessStartError:
            for s in sims:
                s.stop()
            if attempt == 2:
                raise
            continue
        try:
            yield ports
        finally:
            for s in sims:
                s.stop()
        return


def code_fingerprint() -> dict[str, str]:
    """sha256 (16 hex) of what decides routing: envoy/envoy.yaml, extproc/ and vllmsim/ sources.
    Recorded per run: a repository edited while the benchmark runs shows up as differing values."""
    import hashlib

    out = {}
    for name, paths in (
        ("envoy.yaml", [ROOT / "envoy" / "envoy.yaml"]),
        ("extproc", sorted((ROOT / "extproc").rglob("*.py"))),
        ("vllmsim", sorted((ROOT / "vllmsim").rglob("*.py"))),
    ):
        h = hashlib.sha256()
        for p in paths:
            with contextlib.suppress(OSError):
                h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes())
        out[name] = h.hexdigest()[:16]
    return out


def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def sim_report(ports: Sequence[int]) -> dict[str, Any]:
    """Engine-side facts after a run: prefix-cache hit rate, preemptions, pacing lag."""
    hits = queries = preempt = 0.0
    lags, resyncs = [], 0
    for p in ports:
        with contextlib.suppress(Exception):
            _, text = http_get(f"http://127.0.0.1:{p}/metrics", timeout=2.0)
            hits += _metric_sum(text, "vllm:prefix_cache_hits_total")
            queries += _metric_sum(text, "vllm:prefix_cache_queries_total")
            preempt += _metric_sum(text, "vllm:num_preemptions_total")
        with contextlib.suppress(Exception):
            st = json.loads(http_get(f"http://127.0.0.1:{p}/sim/stats", timeout=2.0)[1])
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


# ============================================================================ one run
@dataclass
class Plan:
    workload: str
    load: float  # fraction of capacity
    rate_wall: float  # requests per wall second
    n: int  # requests sent (warm-up included)
    warmup_s: float  # wall seconds of arrivals excluded from the statistics
    time_scale: float


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
            strategy = front.headers.get(STRATEGY_HEADER)
            got = resp.headers.get("x-routing-strategy")
            if strategy and got and got != strategy:
                return f"asked for strategy {strategy!r}, the service reports {got!r}"
    except Exception as exc:  # noqa: BLE001
        return f"smoke request failed: {type(exc).__name__}: {exc}"
    return None


def run_one(
    contender: Contender,
    wl: Workload,
    plan: Plan,
    seed: int,
    log_dir: Path,
    progress: Callable[[int, int, int], None] | None,
    request_timeout: float,
    drain_limit: float,
) -> dict[str, Any]:
    """Fresh fleet + this contender, replay ``plan``; returns the run record."""
    log_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rec: dict[str, Any] = {
        "contender": contender.name,
        "family": contender.family,
        "policy": contender.policy,
        "workload": plan.workload,
        "load": plan.load,
        "rate_wall": plan.rate_wall,
        "rate_sim": plan.rate_wall / plan.time_scale,
        "n": plan.n,
        "code": code_fingerprint(),
    }
    t_start = time.monotonic()
    phases: dict[str, float] = {}
    with fleet(log_dir, plan.time_scale, seed) as ports:
        phases["fleet_start"] = time.monotonic() - t_start
        front = contender.start(ports, log_dir, plan.time_scale)
        phases["router_start"] = time.monotonic() - t_start - phases["fleet_start"]
        try:
            problem = smoke(front)
            if problem:
                raise RuntimeError(problem)
            # The smoke request and start-up scrapes are not part of the measurement.
            for p in ports:
                with contextlib.suppress(Exception):
                    http_get(f"http://127.0.0.1:{p}/sim/stats?reset=1", timeout=2.0)
            offsets = wl.offsets(plan.rate_wall, plan.n)
            deadline = offsets[-1] + drain_limit
            t_run = time.monotonic()
            run = asyncio.run(
                run_load(
                    front.url,
                    wl,
                    rate=plan.rate_wall,
                    n=plan.n,
                    headers=front.headers,
                    request_timeout=request_timeout,
                    deadline=deadline,
                    progress=progress,
                )
            )
            phases["load"] = time.monotonic() - t_run
            rec["sim"] = sim_report(ports)
            dead = [p.name for p in front.procs if not p.alive()]
            if dead:
                rec["died"] = dead
        finally:
            t_stop = time.monotonic()
            front.stop()
            phases["router_stop"] = time.monotonic() - t_stop
    rec["setup_and_run_wall_s"] = time.monotonic() - t_start
    rec["phases_wall_s"] = {k: round(v, 2) for k, v in phases.items()}
    rec["loadavg_before"] = load_before
    rec["loadavg_after"] = os.getloadavg()[0]
    rec["client_send_lag_p99_wall_s"] = run.lag_p99_s
    rec["hit_deadline"] = run.hit_deadline
    measured = [r for r in run.results if r.scheduled >= plan.warmup_s]
    window = _window(measured, plan.warmup_s)
    s = summarize(
        measured, wall_s=window, time_scale=plan.time_scale, pods=[f"sim{i}" for i in range(N_SIMS)]
    )
    warm_errors = sum(1 for r in run.results if r.scheduled < plan.warmup_s and not r.ok)
    s["errors_total"] = s["errors"] + warm_errors
    s["warmup_requests"] = len(run.results) - len(measured)
    rec["summary"] = s
    _save_requests(log_dir / "requests.jsonl", run.results)
    return rec


def _window(measured: Sequence[RequestResult], start: float) -> float:
    """Wall seconds from the first measured send to the last measured completion."""
    ends = [r.sent + r.e2e for r in measured if r.ok and r.e2e is not None]
    return (max(ends) - start) if ends else math.nan


def _save_requests(path: Path, results: Sequence[RequestResult]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in results:
            d = r.to_dict()
            d.pop("itls", None)
            f.write(json.dumps(d) + "\n")


# ============================================================================ calibration
def calibrate(wl: Workload, time_scale: float, seed: int, log_dir: Path, n: int) -> dict[str, Any]:
    """Fleet capacity for ``wl``: closed loop through Envoy round-robin with every server's
    batch full and a queue behind it; the completion rate is the maximum throughput."""
    conc = int(N_SIMS * MAX_NUM_SEQS * 1.5)
    with fleet(log_dir, time_scale, seed) as ports:
        front = Contender("envoy", "round-robin").start(ports, log_dir, time_scale)
        try:
            run = asyncio.run(
                run_closed_loop(
                    front.url, wl, concurrency=conc, n=n, deadline=240.0, request_timeout=120.0
                )
            )
            sim = sim_report(ports)
        finally:
            front.stop()
    rps_wall, tps_wall = saturated_throughput(run.results, conc)
    errors = sum(1 for r in run.results if not r.ok)
    if not rps_wall > 0:
        raise RuntimeError(
            f"calibration of {wl.name} failed: {errors} errors of {len(run.results)}"
        )
    return {
        "capacity_rps_sim": rps_wall / time_scale,
        "capacity_rps_wall": rps_wall,
        "output_tokens_per_s_sim": tps_wall / time_scale,
        "concurrency": conc,
        "requests": len(run.results),
        "errors": errors,
        "wall_s": run.wall_s,
        "sim": sim,
        "time_scale": time_scale,
    }


# ============================================================================ reporting
def _ms(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1000:.0f}"


def _shares(share: dict[str, float]) -> str:
    return "/".join(f"{share.get(f'sim{i}', 0.0) * 100:.0f}" for i in range(N_SIMS))


def markdown(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    lines = [
        f"# Routing quality{' (quick)' if cfg['quick'] else ''}",
        "",
        f"`{doc['command']}` on {doc['environment']['cpus']} CPUs (shared machine), "
        f"{doc['environment']['started']} UTC, {doc['wall_minutes']:.1f} min. "
        f"Seed {cfg['seed']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in doc["environment"]["versions"].items())
        + ".",
        "",
        f"Fleet: {N_SIMS} × `vllmsim {' '.join(FLEET_ARGS)}` (cost model: simulator defaults, "
        "Llama-3-8B on one H100), restarted for every run. All latencies and rates are in "
        "**simulated** seconds (wall-clock measurements × the time scale). Statistics exclude "
        f"requests sent in the first {cfg['warmup_s']:g} s (wall) of a run; errors include them. "
        "`hit %` = the fleet's prefix-cache hit rate (tokens found / tokens looked up), "
        "`share` = % of requests served by sim0/sim1/sim2/sim3 (from `x-inference-pod`); "
        "`n` = requests sent in the run (warm-up included); **bold** = lowest TTFT p90 "
        "at that load. "
        f"Default strategy of the service: `{doc['default_strategy']}`.",
        "",
    ]
    for wname, w in doc["workloads"].items():
        cal = w["calibration"]
        lines += [
            f"## {wname}",
            "",
            f"{w['description']} Time scale {w['time_scale']:g} "
            f"(1 wall s = {w['time_scale']:g} simulated s). Capacity (closed loop through Envoy "
            f"round-robin, {cal['concurrency']} outstanding): "
            f"**{cal['capacity_rps_sim']:.1f} req/s**, "
            f"{cal['output_tokens_per_s_sim']:.0f} output tokens/s; prefix hit rate there "
            f"{cal['sim']['prefix_hit_rate'] * 100:.0f} %. Workload sha256 `{w['sha256'][:16]}…`.",
            "",
        ]
        lines += [
            "| load | contender | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | ITL p90 ms "
            "| e2e p90 s | out tok/s | errors | hit % | share % |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for load in w["loads"]:
            runs = [r for r in doc["runs"] if r["workload"] == wname and r["load"] == load]
            if not runs:
                continue
            p90s = [r["summary"]["ttft_s"]["p90"] for r in runs if "summary" in r]
            best = min((v for v in p90s if not math.isnan(v)), default=math.nan)
            where = f"{load * 100:.0f} % ({runs[0]['rate_sim']:.1f} req/s, n={runs[0]['n']})"
            for k, r in enumerate(runs):
                if k:
                    where = ""  # the load is written on the first row of its group only
                if "error" in r:
                    lines.append(
                        f"| {where} | {r['contender']} | failed: {r['error'][:150]} ||||||||"
                    )
                    continue
                s = r["summary"]
                hit = r.get("sim", {}).get("prefix_hit_rate", math.nan)
                name = r["contender"]
                if r["family"] == "extproc" and r["policy"] == doc["default_strategy"]:
                    name += " (default)"
                if _suspect(r):
                    name += " †"
                p90 = _ms(s["ttft_s"]["p90"])
                if s["ttft_s"]["p90"] == best:
                    p90 = f"**{p90}**"
                lines.append(
                    f"| {where} | {name} | {_ms(s['ttft_s']['p50'])} | {p90} | "
                    f"{_ms(s['ttft_s']['p99'])} | {s['itl_s']['p90'] * 1000:.1f} | "
                    f"{s['e2e_s']['p90']:.2f} | {s['output_tokens_per_s']:.0f} | "
                    f"{s['errors_total']} | {hit * 100:.0f} | {_shares(s['backend_share'])} |"
                )
        lines.append("")
    if doc.get("skipped"):
        lines += ["## Contenders that could not run", ""]
        lines += [f"* `{k}`: {v}" for k, v in doc["skipped"].items()]
        lines.append("")
    lines += ["## Targets of the strategy issue (informational)", ""]
    lines += [f"* {t}" for t in doc["targets"]] or ["* (not enough contenders in this run)"]
    lines.append("")
    fid = doc["fidelity"]
    changed = fid.get("code_changed_during_run") or []
    if changed:
        lines += [
            "**Warning: the repository changed while this benchmark ran** ("
            + ", ".join(changed)
            + " differ between runs, see `code` in the JSON); "
            "contenders were not measured on the same code. Re-run on a quiet tree.",
            "",
        ]
    lines += [
        "## Fidelity checks",
        "",
        "† = a run the shared box may have disturbed: the client sent requests more than "
        f"{SUSPECT_CLIENT_LAG_S * 1000:.0f} ms late (p99, wall), or a simulator's steps ended more "
        f"than {SUSPECT_SIM_LAG_S * 1000:.0f} ms late (p99) or had to resync; "
        f"{sum(1 for r in doc['runs'] if 'summary' in r and _suspect(r))} of "
        f"{len(doc['runs'])} runs.",
        "",
        f"* simulator pacing lag p99 (wall), worst run: {fid['worst_sim_lag_ms']:.1f} ms; "
        f"resyncs (steps > 100 ms late) over all runs: {fid['resyncs']}",
        f"* client send lag p99 (wall), worst run: {fid['worst_client_lag_ms']:.1f} ms "
        "(how late the open-loop client sent requests vs their schedule)",
        f"* load average (1 min) during runs: {fid['loadavg_min']:.1f} – {fid['loadavg_max']:.1f} "
        "on 2 cores (other work shares this machine)",
        "",
    ]
    return "\n".join(lines)


def targets(doc: dict[str, Any]) -> list[str]:
    """The later issue's goals, evaluated on this run's numbers (TTFT p90)."""
    out: list[str] = []

    def p90(wl: str, load: float, name: str) -> float | None:
        for r in doc["runs"]:
            if (
                r["workload"] == wl
                and r["load"] == load
                and r["contender"] == name
                and "summary" in r
            ):
                v = r["summary"]["ttft_s"]["p90"]
                return None if math.isnan(v) else v
        return None

    loads = sorted({r["load"] for r in doc["runs"]}, key=lambda x: abs(x - 0.85))
    if not loads:
        return out
    load = loads[0]
    sp = "shared-prefix"
    rr = p90(sp, load, "envoy:round-robin")
    cache_aware = [
        v
        for v in (p90(sp, load, f"{f}:cache_aware") for f in ("vllm-router", "sglang-router"))
        if v is not None
    ]
    for strat in PREFIX_AWARE:
        pc = p90(sp, load, f"extproc:{strat}")
        if pc is None:
            continue
        if rr:
            out.append(
                f"shared-prefix @ {load * 100:.0f} %: extproc:{strat} TTFT p90 = "
                f"{pc / rr:.2f} × Envoy round-robin's (target ≤ 0.20) — "
                f"{'met' if pc <= 0.2 * rr else 'NOT met'}"
            )
        if cache_aware:
            best = min(cache_aware)
            out.append(
                f"shared-prefix @ {load * 100:.0f} %: extproc:{strat} TTFT p90 = "
                f"{pc / best:.2f} × the best Rust cache_aware (target ≤ 0.80) — "
                f"{'met' if pc <= 0.8 * best else 'NOT met'}"
            )
    d = doc["default_strategy"]
    dv = p90("sharegpt", load, f"extproc:{d}")
    lo = [(p90("sharegpt", load, f"extproc:{s}"), s) for s in LOAD_ONLY]
    lo = [(v, s) for v, s in lo if v is not None]
    if dv is not None and lo:
        best, bs = min(lo)
        out.append(
            f"sharegpt @ {load * 100:.0f} %: default `{d}` TTFT p90 = {dv / best:.2f} × "
            f"the best load-only strategy (`{bs}`) (target ≤ 1, within run-to-run noise)"
        )
    return out


def plots(doc: dict[str, Any], stem: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for wname in doc["workloads"]:
        runs = [r for r in doc["runs"] if r["workload"] == wname and "summary" in r]
        if not runs:
            continue
        names = list(dict.fromkeys(r["contender"] for r in runs))
        fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
        panels = [
            ("TTFT p50 (ms)", lambda s: s["ttft_s"]["p50"] * 1000, True),
            ("TTFT p90 (ms)", lambda s: s["ttft_s"]["p90"] * 1000, True),
            ("e2e latency p90 (s)", lambda s: s["e2e_s"]["p90"], True),
        ]
        for ax, (title, fn, logy) in zip(axes, panels, strict=True):
            for name in names:
                pts = sorted(
                    (r["load"] * 100, fn(r["summary"])) for r in runs if r["contender"] == name
                )
                color, style, marker = _line_style(name, names)
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    linestyle=style,
                    marker=marker,
                    ms=4,
                    lw=1.4,
                    color=color,
                    label=name,
                )
            ax.set_title(title)
            ax.set_xlabel("load (% of fleet capacity)")
            if logy:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(f"Routing quality — {wname} (simulated time, 4 × vllmsim)")
        fig.tight_layout()
        path = RESULTS / f"{stem}-{wname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(ROOT)))
    return written


_RUST_COLORS = {
    "vllm-router": ("#0b2e6b", "#2f6db5", "#84b4ea"),
    "sglang-router": ("#6b0b0b", "#b53a2f", "#ea9a84"),
}
_POLICY_MARKERS = {"round_robin": "s", "power_of_two": "^", "cache_aware": "D"}


def _line_style(name: str, names: Sequence[str]) -> tuple[Any, str, str]:
    """Solid tab10 lines for our strategies, black for Envoy round-robin, blue/red dotted
    shades (marker = policy) for vllm-router/sglang-router."""
    family, _, policy = name.partition(":")
    if family == "extproc":
        import matplotlib.pyplot as plt

        ours = [n for n in names if n.startswith("extproc:")]
        return plt.get_cmap("tab10")(ours.index(name) % 10), "-", "o"
    if family == "envoy":
        return "black", "--", "o"
    shades = _RUST_COLORS.get(family, ("grey",) * 3)
    order = list(_POLICY_MARKERS)
    idx = order.index(policy) if policy in order else 0
    return shades[idx], ":", _POLICY_MARKERS.get(policy, "x")


# ============================================================================ main
def default_strategy() -> str:
    from extproc.config import Settings

    return str(Settings.model_fields["strategy"].default)


def all_strategies() -> list[str]:
    from extproc.strategies import STRATEGIES

    return list(STRATEGIES)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench_routing", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CI budget (< 5 min): one load point (85 %%), short runs, Rust routers "
        "with cache_aware only",
    )
    ap.add_argument(
        "--strategies",
        default=None,
        help="comma-separated extproc strategies (default: every registered one)",
    )
    ap.add_argument(
        "--contenders",
        default="extproc,envoy,vllm-router,sglang-router",
        help="families to run (comma-separated)",
    )
    ap.add_argument(
        "--rust-policies",
        default=None,
        help=f"policies of the Rust routers (default {','.join(routers.RUST_POLICIES)};"
        " quick: cache_aware)",
    )
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--loads", default=None, help="fractions of capacity, e.g. 0.5,0.85,1.1")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help="wall seconds of measured arrivals per run (default 6, quick 2.5)",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="wall seconds of arrivals before the measurement (default 1.5, quick 1)",
    )
    ap.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="arrival burstiness (Gamma shape; 1 = Poisson, < 1 burstier)",
    )
    ap.add_argument(
        "--capacity", default=None, help="skip calibration: WORKLOAD=REQ_PER_SIM_S[,...]"
    )
    ap.add_argument("--out", default=None, help="results stem (default routing / routing-quick)")
    ap.add_argument(
        "--report-only",
        type=Path,
        default=None,
        metavar="JSON",
        help="re-render the markdown and plots of an existing results JSON",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report_only:
        return report_only(a.report_only)
    t_begin = time.monotonic()
    quick = a.quick
    strategies = all_strategies()
    if a.strategies:
        wanted = [s.strip() for s in a.strategies.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in strategies]
        if unknown:
            print(f"unknown strategies {unknown}; registered: {strategies}", file=sys.stderr)
            return 2
        strategies = wanted
    families = [f.strip() for f in a.contenders.split(",") if f.strip()]
    rust_policies = (
        a.rust_policies.split(",")
        if a.rust_policies
        else ["cache_aware"]
        if quick
        else list(routers.RUST_POLICIES)
    )
    loads = (
        tuple(float(x) for x in a.loads.split(","))
        if a.loads
        else (QUICK_LOADS if quick else LOADS)
    )
    duration = a.duration if a.duration is not None else (2.5 if quick else 6.0)
    warmup = a.warmup if a.warmup is not None else (1.0 if quick else 1.5)
    wl_names = [w.strip() for w in a.workloads.split(",") if w.strip()]
    stem = a.out or ("routing-quick" if quick else "routing")
    capacity_override = dict(kv.split("=") for kv in a.capacity.split(",")) if a.capacity else {}

    contenders = build_contenders(strategies, families, rust_policies)
    skipped: dict[str, str] = {}
    for fam, check in (
        ("vllm-router", routers.vllm_router_available),
        ("sglang-router", routers.sglang_router_available),
    ):
        why = check()
        if why and any(c.family == fam for c in contenders):
            skipped[fam] = why
            contenders = [c for c in contenders if c.family != fam]

    RESULTS.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/bench_routing.py" + (
        ""
        if argv is None and len(sys.argv) < 2
        else " " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    doc: dict[str, Any] = {
        "command": cmd.strip(),
        "config": {
            "quick": quick,
            "seed": a.seed,
            "burstiness": a.burstiness,
            "loads": list(loads),
            "duration_s": duration,
            "warmup_s": warmup,
            "fleet_args": FLEET_ARGS,
            "n_sims": N_SIMS,
            "strategies": strategies,
            "rust_policies": rust_policies,
            "families": families,
        },
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "versions": routers.router_versions(),
        },
        "default_strategy": default_strategy(),
        "workloads": {},
        "runs": [],
        "skipped": skipped,
    }

    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        progress_ui = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            refresh_per_second=2,
            console=Console(soft_wrap=True),
        )
    except ImportError:  # pragma: no cover - rich is a dev dependency
        progress_ui = None

    total_runs = len(wl_names) * len(loads) * len(contenders)
    print(
        f"bench-routing: {len(contenders)} contenders x {len(wl_names)} workloads x "
        f"{len(loads)} loads = {total_runs} runs; contenders: "
        + ", ".join(c.name for c in contenders),
        flush=True,
    )
    if skipped:
        print(f"skipped: {skipped}", flush=True)

    with progress_ui if progress_ui is not None else contextlib.nullcontext():
        overall = (
            progress_ui.add_task("all runs", total=total_runs, info="") if progress_ui else None
        )
        for wname in wl_names:
            spec = WORKLOADS[wname]
            s = spec["time_scale"]
            wl = generate(
                spec["kind"], WORKLOAD_SIZE, a.seed, burstiness=a.burstiness, **spec["params"]
            )
            wl_path = wl.save(
                RUN_DIR / "workloads" / f"{wname}-seed{a.seed}-b{a.burstiness:g}.json"
            )
            wl = Workload.load(wl_path)  # replay from the file, as every contender does
            if wname in capacity_override:
                cap = float(capacity_override[wname])
                cal = {
                    "capacity_rps_sim": cap,
                    "capacity_rps_wall": cap * s,
                    "concurrency": 0,
                    "output_tokens_per_s_sim": math.nan,
                    "sim": {"prefix_hit_rate": math.nan},
                    "given": True,
                    "time_scale": s,
                }
            else:
                print(f"[{wname}] calibrating capacity ...", flush=True)
                cal = calibrate(
                    wl, s, a.seed, RUN_DIR / "logs" / wname / "calibration", n=220 if quick else 500
                )
            print(
                f"[{wname}] capacity {cal['capacity_rps_sim']:.1f} req/s (simulated), "
                f"{cal['capacity_rps_wall']:.1f} req/s wall",
                flush=True,
            )
            doc["workloads"][wname] = {
                "kind": spec["kind"],
                "params": wl.params,
                "time_scale": s,
                "sha256": wl.digest(),
                "file": str(wl_path.relative_to(ROOT)),
                "stats": wl.stats(),
                "calibration": cal,
                "loads": list(loads),
                "description": describe(wname, wl),
            }
            for load in loads:
                rate_wall = load * cal["capacity_rps_wall"]
                n = max(20, int(round(rate_wall * (duration + warmup))))
                n = min(n, len(wl.requests))
                plan = Plan(wname, load, rate_wall, n, warmup, s)
                for c in contenders:
                    task = (
                        progress_ui.add_task(
                            f"{wname} {load * 100:.0f}% {c.name}", total=n, info=""
                        )
                        if progress_ui
                        else None
                    )

                    def prog(sent: int, done: int, errors: int, task: Any = task) -> None:
                        if progress_ui is not None and task is not None:
                            progress_ui.update(
                                task, completed=done, info=f"sent {sent} err {errors}"
                            )

                    log_dir = (
                        RUN_DIR / "logs" / wname / f"{int(load * 100)}" / c.name.replace(":", "-")
                    )
                    try:
                        rec = run_one(
                            c,
                            wl,
                            plan,
                            a.seed,
                            log_dir,
                            prog,
                            request_timeout=60.0,
                            drain_limit=60.0,
                        )
                    except Exception as exc:  # noqa: BLE001 - record and go on with the others
                        rec = {
                            "contender": c.name,
                            "family": c.family,
                            "policy": c.policy,
                            "workload": wname,
                            "load": load,
                            "rate_sim": rate_wall / s,
                            "n": n,
                            "error": f"{type(exc).__name__}: {exc}"[:600],
                        }
                    doc["runs"].append(rec)
                    if progress_ui is not None and task is not None:
                        progress_ui.remove_task(task)
                        progress_ui.advance(overall)
                        progress_ui.console.print(one_line(rec))
                    else:
                        print(one_line(rec), flush=True)

    doc["wall_minutes"] = (time.monotonic() - t_begin) / 60
    doc["targets"] = targets(doc)
    doc["fidelity"] = fidelity(doc)
    doc["plots"] = plots(doc, stem)
    (RESULTS / f"{stem}.json").write_text(json.dumps(_clean(doc), indent=1, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(doc) + "\n")
    print(
        f"wrote bench/results/{stem}.md, {stem}.json, {', '.join(doc['plots'])} "
        f"in {doc['wall_minutes']:.1f} min"
    )
    for t in doc["targets"]:
        print("target:", t)
    failed = [r for r in doc["runs"] if "error" in r]
    return 1 if failed and len(failed) == len(doc["runs"]) else 0


def report_only(path: Path) -> int:
    doc = json.loads(path.read_text())

    def nan(o: Any) -> Any:  # null -> NaN, the inverse of _clean
        if o is None:
            return math.nan
        if isinstance(o, dict):
            return {k: nan(v) for k, v in o.items()}
        if isinstance(o, list):
            return [nan(v) for v in o]
        return o

    doc = nan(doc)
    stem = path.stem
    doc["targets"] = targets(doc)
    doc["fidelity"] = fidelity(doc)
    doc["plots"] = plots(doc, stem)
    path.with_suffix(".md").write_text(markdown(doc) + "\n")
    path.write_text(json.dumps(_clean(doc), indent=1, default=str) + "\n")
    print(f"re-rendered {path.with_suffix('.md')} and {', '.join(doc['plots'])}")
    return 0


def describe(wname: str, wl: Workload) -> str:
    st = wl.stats()
    if wl.kind == "shared-prefix":
        p = wl.params
        return (
            f"{p['num_groups']} groups × {p['system_prompt_len']}-token system prompt + "
            f"~{p['question_len']}-token question, ~{p['output_len']} output tokens, "
            f"groups drawn uniformly, {_arrivals(wl)}."
        )
    return (
        f"ShareGPT-like lengths: prompt median {st['prompt_tokens_p50']}, mean "
        f"{st['prompt_tokens_mean']:.0f}, max {st['prompt_tokens_max']} tokens; output median "
        f"{st['output_tokens_p50']}, mean {st['output_tokens_mean']:.0f}, max "
        f"{st['output_tokens_max']}; {_arrivals(wl)}."
    )


def _arrivals(wl: Workload) -> str:
    return (
        "Poisson arrivals"
        if wl.burstiness == 1.0
        else f"bursty arrivals (Gamma gaps, burstiness {wl.burstiness:g})"
    )


def one_line(rec: dict[str, Any]) -> str:
    head = f"{rec['workload']:>13} {rec['load'] * 100:4.0f}% {rec['contender']:<28}"
    if "error" in rec:
        return f"{head} FAILED {rec['error'][:200]}"
    s = rec["summary"]
    return (
        f"{head} TTFT p50/p90/p99 {_ms(s['ttft_s']['p50'])}/{_ms(s['ttft_s']['p90'])}/"
        f"{_ms(s['ttft_s']['p99'])} ms  e2e p90 {s['e2e_s']['p90']:.2f}s  "
        f"{s['output_tokens_per_s']:.0f} tok/s  err {s['errors_total']}  "
        f"hit {rec['sim']['prefix_hit_rate'] * 100:.0f}%  share {_shares(s['backend_share'])}  "
        f"[{rec['setup_and_run_wall_s']:.0f}s]"
    )


def fidelity(doc: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in doc["runs"] if "summary" in r]
    lags = [
        r["sim"]["sim_lag_p99_wall_s"] for r in ok if not math.isnan(r["sim"]["sim_lag_p99_wall_s"])
    ]
    la = [r["loadavg_before"] for r in ok] + [r["loadavg_after"] for r in ok]
    # Only the code a contender runs matters: extproc for our service, envoy.yaml for both
    # Envoy contenders, the simulator for everybody.
    uses = {"extproc": ("envoy.yaml", "extproc", "vllmsim"), "envoy": ("envoy.yaml", "vllmsim")}
    seen: dict[str, set[str]] = {}
    for r in doc["runs"]:
        for k in uses.get(r.get("family", ""), ("vllmsim",)):
            if k in r.get("code", {}):
                seen.setdefault(k, set()).add(r["code"][k])
    changed = sorted(k for k, vals in seen.items() if len(vals) > 1)
    return {
        "code_changed_during_run": changed,
        "worst_sim_lag_ms": max(lags) * 1000 if lags else math.nan,
        "resyncs": sum(r["sim"]["sim_resyncs"] for r in ok),
        "worst_client_lag_ms": max((r["client_send_lag_p99_wall_s"] for r in ok), default=0) * 1000,
        "loadavg_min": min(la, default=math.nan),
        "loadavg_max": max(la, default=math.nan),
    }


SUSPECT_CLIENT_LAG_S = 0.05
SUSPECT_SIM_LAG_S = 0.05


def _suspect(r: dict[str, Any]) -> bool:
    """A run whose measurement the box may have disturbed: the client sent requests > 50 ms
    late (p99, wall), a simulator's steps ended > 50 ms late (p99) or it had to resync."""
    sim = r.get("sim", {})
    return bool(
        r.get("client_send_lag_p99_wall_s", 0) > SUSPECT_CLIENT_LAG_S
        or sim.get("sim_lag_p99_wall_s", 0) > SUSPECT_SIM_LAG_S
        or sim.get("sim_resyncs", 0) > 0
    )


def _clean(o: Any) -> Any:
    """NaN/inf -> null (strict JSON), recursively."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


_ = percentile  # re-exported for callers that post-process results

if __name__ == "__main__":
    sys.exit(main())
