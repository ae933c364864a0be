"""Fault benchmark: what clients see when a backend or the service fails under load.

Run: ``make bench-faults`` (full, ~11 min) or ``make bench-faults ARGS=--quick`` (~4 min);
``--scenario backend-kill`` (repeatable / comma list) runs only some scenarios.
Writes ``bench/results/faults.{json,md}`` (``faults-quick.*`` with ``--quick``); per-request
records and every process log go to ``run/bench-faults/`` (not committed).
docs/benchmarks.md ("Faults") explains the method; in short:

* The real stack as real processes (``devstack.Stack``): 4 vLLM simulators
  (``--max-num-seqs 16 --num-gpu-blocks 1024 --time-scale 0.25``), the service with its
  default flags (real, wall-clock timers), Envoy rendered from envoy/envoy.yaml; a fresh stack
  per scenario. The Rust routers (sglang-router, vllm-router; PyPI, default flags) in front of
  the same kind of fleet go through the BACKEND faults with the same workload and seed.
* Load: open loop at 70 % of the fleet's capacity (the ShareGPT-like workload of
  bench-routing, whose calibrated capacity is read from bench/results/routing.json), half the
  requests streamed, half not (drawn from the seed).
* One fault per scenario at a fixed time (``FAULT_AT`` s after the first request), undone at
  ``RESTORE_AT`` where that applies; arrivals stop at ``DURATION``.
* Per scenario and contender: errors split into "in flight when the fault hit" and "started
  after" (during the fault / after the repair), how long after the fault the faulty backend
  still got new requests (``x-inference-pod`` of the answer, our ``x-routed-endpoint``, and
  errors that name no backend), TTFT p90 before / during / after the fault (streamed requests,
  wall-clock ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import signal
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import orjson  # noqa: E402
from common import code_fingerprint, markdown_table, write_results  # noqa: E402

from bench import routers  # noqa: E402
from bench.loadgen import SSEParser, StreamTimings, percentile  # noqa: E402
from bench.workloads import Workload, generate  # noqa: E402
from devstack.processes import (  # noqa: E402
    Proc,
    free_port,
    http_get,
    poll_until,
)
from devstack.stack import Stack  # noqa: E402

RUN_DIR = ROOT / "run" / "bench-faults"

# ----------------------------------------------------------------------------- fleet and load
N_SIMS = 4
# Same server shape as bench-routing (docs/benchmarks.md "Fleet, time scale and capacity").
FLEET_ARGS = ["--max-num-seqs", "16", "--num-gpu-blocks", "1024"]
# Simulated seconds per wall second. Slower than bench-routing's 0.5: the same relative load
# costs half the requests and SSE chunks per wall second (~16 req/s at 70 %), which keeps this
# 2-core box far from saturation while processes are killed and restarted next to the load.
TIME_SCALE = 0.25
LOAD = 0.70
# ShareGPT-like capacity of this fleet in simulated req/s (bench-routing calibration of
# 2026-11-25); refreshed from bench/results/routing.json when that file has one.
DEFAULT_CAPACITY_SIM = 89.85
STREAM_SHARE = 0.5
WORKLOAD_PARAMS = {"output_scale": 0.5, "output_max": 512}  # bench-routing's sharegpt
REQUEST_TIMEOUT = (
    30.0  # wall s per request; a request held by a SIGSTOPped backend resumes at SIGCONT
)
DRAIN_LIMIT = 30.0  # wall s after the last arrival before everything still open is cancelled
VICTIM = 1  # index of the backend that fails (sim1); the 5th (index 4) is the scale-out one
NEWCOMER = N_SIMS
SERVICE_ARGS = ["--log-level", "warning"]  # every other flag: the service's defaults
RUST_POLICY = "cache_aware"  # both routers' documented default policy
ROUTING_TARGET_S = 2.0  # no new request to a hung backend later than this after the fault


def capacity_from_routing_results() -> tuple[float, str]:
    path = HERE / "results" / "routing.json"
    with contextlib.suppress(Exception):
        cap = float(
            json.loads(path.read_text())["workloads"]["sharegpt"]["calibration"]["capacity_rps_sim"]
        )
        if cap > 0:
            return cap, f"bench/results/routing.json (sharegpt calibration, {cap:.1f} req/s)"
    return DEFAULT_CAPACITY_SIM, f"built-in default {DEFAULT_CAPACITY_SIM} req/s"


def make_workload(seed: int, n: int) -> tuple[Workload, list[bool]]:
    wl = generate("sharegpt", n, seed, **WORKLOAD_PARAMS)
    rng = random.Random(f"stream:{seed}")
    return wl, [rng.random() < STREAM_SHARE for _ in range(n)]


def sim_name(i: int) -> str:
    return f"sim{i}"


def sim_args(i: int) -> list[str]:
    return [*FLEET_ARGS, "--time-scale", f"{TIME_SCALE:g}", "--instance-name", sim_name(i)]


# ============================================================================ the client
@dataclass(slots=True)
class Rec:
    id: int
    stream: bool
    sent: float  # wall s since t0
    end: float | None = None  # completion or failure
    ok: bool = False
    status: int = 0
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    pod: str | None = None  # x-inference-pod (the server that answered)
    routed: str | None = None  # x-routed-endpoint (our service's choice)
    reason: str | None = None  # x-routing-reason (absent = routed without the service)


async def _one(
    session: Any, url: str, body: bytes, stream: bool, rec: Rec, t0: float, timeout: float
) -> None:
    import aiohttp

    st = StreamTimings(start=t0 + rec.sent)
    parser = SSEParser()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(
                url, data=body, headers={"content-type": "application/json"}
            ) as resp:
                rec.status = resp.status
                h = resp.headers
                rec.pod = h.get("x-inference-pod")
                routed = h.get("x-routed-endpoint")
                rec.routed = routed.split(",")[0].strip() if routed else None
                rec.reason = h.get("x-routing-reason")
                if resp.status >= 400:
                    text = (await resp.read())[:200].decode("utf-8", "replace")
                    rec.error = f"http {resp.status}: {text}"
                    return
                if not stream:
                    data = await resp.read()
                    obj = orjson.loads(data)
                    if not (isinstance(obj, dict) and obj.get("choices")):
                        rec.error = f"bad body: {data[:120]!r}"
                        return
                    rec.ok = True
                    rec.e2e = time.perf_counter() - t0 - rec.sent
                    return
                async for chunk in resp.content.iter_any():
                    t = time.perf_counter()
                    for ev in parser.feed(chunk):
                        st.on_event(ev, t)
                t = time.perf_counter()
                for ev in parser.flush():
                    st.on_event(ev, t)
                rec.ttft = st.ttft
                rec.e2e = t - t0 - rec.sent
                rec.error = st.failure()
                rec.ok = rec.error is None
    except TimeoutError:
        rec.error = "timeout"
    except asyncio.CancelledError:
        rec.error = "deadline: cancelled at the run's hard deadline"
        raise
    except (aiohttp.ClientError, OSError, orjson.JSONDecodeError) as exc:
        rec.error = f"connection: {type(exc).__name__}: {exc}"[:200]
    finally:
        rec.end = time.perf_counter() - t0
        if rec.ttft is None and st.first_token is not None:
            rec.ttft = st.ttft


async def run_open_loop(
    url: str,
    wl: Workload,
    streams: Sequence[bool],
    *,
    rate: float,
    duration: float,
    t0: float,
    timeout: float = REQUEST_TIMEOUT,
    drain_limit: float = DRAIN_LIMIT,
    progress: Callable[[float, int, int], None] | None = None,
) -> list[Rec]:
    """Send request i at ``t0 + offset_i`` (open loop) for ``duration`` wall seconds; wait for
    all (bounded by ``duration + drain_limit``); return one record per request sent."""
    import aiohttp

    offsets = [o for o in wl.offsets(rate) if o < duration]
    n = len(offsets)
    if n > len(wl.requests):
        raise ValueError("workload too short")
    bodies = [
        orjson.dumps(wl.body(r, stream=s))
        for r, s in zip(wl.requests[:n], streams[:n], strict=True)
    ]
    target = url.rstrip("/") + "/v1/chat/completions"
    recs: list[Rec] = []
    tasks: list[asyncio.Task[None]] = []
    connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,
    ) as session:
        loop = asyncio.get_running_loop()
        for i in range(n):
            delay = t0 + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = Rec(id=i, stream=streams[i], sent=time.perf_counter() - t0)
            recs.append(rec)
            tasks.append(
                loop.create_task(_one(session, target, bodies[i], streams[i], rec, t0, timeout))
            )
            if progress is not None and i % 64 == 0:
                progress(rec.sent, i + 1, sum(1 for r in recs if r.end is not None and not r.ok))
        hard_end = t0 + duration + drain_limit
        pending = [t for t in tasks if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=max(0.0, hard_end - time.perf_counter()))
            for t in still:
                t.cancel()
            await asyncio.gather(*still, return_exceptions=True)
    return recs


# ============================================================================ fleets
def make_stack(
    log_dir: Path, *, replicas: int = 1, standby: int = 1, sims_only: bool = False
) -> Stack:
    """The fleet (plus, unless ``sims_only``, the service and Envoy); ``standby`` simulators are
    declared but not started (scale-out)."""
    return Stack(
        log_dir=log_dir,
        n_backends=N_SIMS,
        standby_backends=standby,
        sim_args=[sim_args(i) for i in range(N_SIMS + standby)],
        service_args=SERVICE_ARGS,
        service_replicas=replicas,
        envoy_concurrency=1,
        sims_only=sims_only,
    )


def smoke(url: str) -> None:
    body = json.dumps(
        {
            "model": "tiny-llama",
            "max_tokens": 1,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "ping"}],
        }
    ).encode()

    def ok() -> bool:
        req = urllib.request.Request(
            url + "/v1/chat/completions",
            data=body,
            method="POST",
            headers={"content-type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=5) as resp:
            return resp.status == 200 and bool(resp.headers.get("x-inference-pod"))

    poll_until(ok, timeout=20, what=f"a 200 with x-inference-pod from {url}")


# ============================================================================ fault actions
class FaultError(RuntimeError):
    pass


def runtime_faults_supported(sim_url: str) -> bool:
    """True if the simulator has the runtime fault switch (``GET``/``POST /sim/faults``) with
    the two faults this bench switches."""
    with contextlib.suppress(Exception):
        status, body = http_get(sim_url + "/sim/faults", timeout=2.0)
        return status == 200 and {"metrics_latency", "fail_rate"} <= set(json.loads(body))
    return False


def set_runtime_fault(sim_url: str, faults: dict[str, Any]) -> None:
    req = urllib.request.Request(
        sim_url + "/sim/faults",
        data=json.dumps(faults).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=2) as resp:
        if resp.status != 200:
            raise FaultError(f"POST /sim/faults {faults} answered {resp.status}")


# The two faults vllmsim only has as start-up flags. With a runtime switch (POST /sim/faults)
# they are switched on the running server; without one they are EMULATED by restarting the
# server on its port with the flag (SIGTERM, 0.5 s grace, then start: requests in flight on it
# are cut and it refuses connections for ~1-2 s, which the report says).
FLAG_FAULTS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "metrics-hang": ({"metrics_latency": 3600.0}, ["--metrics-latency", "3600"]),
    "backend-500": ({"fail_rate": 1.0}, ["--fail-rate", "1"]),
}
CLEAR_FAULTS = {"metrics_latency": 0.0, "fail_rate": 0.0}


class Timeline:
    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.events: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def mark(self, what: str) -> float:
        t = self.now()
        with self.lock:
            self.events.append((round(t, 3), what))
        return t

    def wait_until(self, t: float) -> None:
        # Scheduling the fault at a fixed time of the run (not synchronisation).
        delay = self.t0 + t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    def first(self, prefix: str) -> float | None:
        return next((t for t, w in self.events if w.startswith(prefix)), None)


def flag_fault(fleet: Any, i: int, name: str, on: bool, tl: Timeline, runtime: bool) -> None:
    url = fleet.all_sim_urls[i]
    live, flags = FLAG_FAULTS[name]
    if runtime:
        set_runtime_fault(url, live if on else CLEAR_FAULTS)
        tl.mark(f"{name} {'on' if on else 'off'} (POST /sim/faults)")
        return
    proc = fleet.sim_proc(i)
    tl.mark(f"{name} {'on' if on else 'off'}: restarting {sim_name(i)} (emulation)")
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        proc.popen.wait(timeout=10)
    fleet.start_sim(i, flags if on else [])
    tl.mark(f"{sim_name(i)} up again{' with ' + ' '.join(flags) if on else ''}")


def backend_fault(kind: str, fleet: Any, i: int, on: bool, tl: Timeline, runtime: bool) -> None:
    """Start (on=True) or undo one backend fault on simulator ``i``."""
    proc = fleet.sim_proc(i)
    if kind == "backend-kill":
        if on:
            assert proc is not None
            proc.send_signal(signal.SIGKILL)
            tl.mark(f"SIGKILL {sim_name(i)}")
            proc.popen.wait(timeout=10)
        else:
            tl.mark(f"restarting {sim_name(i)}")
            fleet.start_sim(i)
            tl.mark(f"{sim_name(i)} ready")
    elif kind == "backend-stop":
        assert proc is not None
        proc.send_signal(signal.SIGSTOP if on else signal.SIGCONT)
        tl.mark(f"{'SIGSTOP' if on else 'SIGCONT'} {sim_name(i)}")
    elif kind in FLAG_FAULTS:
        flag_fault(fleet, i, kind, on, tl, runtime)
    else:
        raise ValueError(kind)


def add_router_worker(router_url: str, worker_url: str) -> str:
    """Register a worker with a running Rust router; returns the API that worked."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    attempts = [
        (
            "POST /workers",
            urllib.request.Request(
                router_url + "/workers",
                data=json.dumps({"url": worker_url}).encode(),
                method="POST",
                headers={"content-type": "application/json"},
            ),
        ),
        (
            "POST /add_worker",
            urllib.request.Request(
                router_url + f"/add_worker?url={worker_url}", data=b"", method="POST"
            ),
        ),
    ]
    errors = []
    for name, req in attempts:
        try:
            with opener.open(req, timeout=10) as resp:
                if resp.status < 300:
                    return name
                errors.append(f"{name}: {resp.status}")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{name}: {exc}")
    raise FaultError("could not add the worker: " + "; ".join(errors))


def envoy_host_healthy(envoy_admin: str, cluster: str, endpoint: str) -> bool:
    status, body = http_get(f"{envoy_admin}/clusters", timeout=1.0)
    if status != 200:
        return False
    for line in body.splitlines():
        if line.startswith(f"{cluster}::{endpoint}::health_flags::"):
            return line.rsplit("::", 1)[1].strip() == "healthy"
    return False


# ============================================================================ scenarios
@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    backend: bool  # a backend fault (the Rust routers run it too)
    target: str  # the stated target, or "" (informative)
    duration: float = 24.0
    fault_at: float = 8.0
    restore_at: float | None = 16.0

    def quick(self) -> Scenario:
        scale = 0.5
        return Scenario(
            self.name,
            self.title,
            self.backend,
            self.target,
            duration=max(14.0, self.duration * scale + 2),
            fault_at=4.0,
            restore_at=None if self.restore_at is None else 10.0,
        )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "backend-kill",
            "backend SIGKILL (restarted at the end of the fault window)",
            True,
            "0 errors among requests started after the fault",
        ),
        Scenario(
            "backend-stop",
            "backend SIGSTOP (hung; SIGCONT at the end of the fault window)",
            True,
            f"no new request to the hung backend later than {ROUTING_TARGET_S:g} s after the fault",
        ),
        Scenario(
            "metrics-hang",
            "backend /metrics hangs (inference still answers)",
            True,
            f"no new request to the backend later than {ROUTING_TARGET_S:g} s after the fault "
            "(routers that read /metrics; the Rust routers do not, so theirs is not judged)",
        ),
        Scenario("backend-500", "backend answers every inference request with HTTP 500", True, ""),
        Scenario(
            "backend-added", "a 5th backend starts mid-run (scale-out)", True, "", restore_at=None
        ),
        Scenario(
            "service-kill",
            "service SIGKILL (restarted at the end of the fault window)",
            False,
            "0 errors (fail-open)",
        ),
        Scenario(
            "service-rolling",
            "rolling restart of 2 service replicas (SIGTERM, wait for exit, "
            "start, wait until Envoy sees it healthy, then the other)",
            False,
            "0 errors",
            duration=36.0,
            restore_at=None,
        ),
    )
}
ROUTER_FAMILIES = ("sglang-router", "vllm-router")


# ============================================================================ one run
@dataclass
class Contender:
    family: str  # extproc | sglang-router | vllm-router

    @property
    def name(self) -> str:
        return "extproc (default)" if self.family == "extproc" else f"{self.family}:{RUST_POLICY}"


def run_fault_script(
    sc: Scenario,
    fleet: Any,
    tl: Timeline,
    *,
    stack: Stack | None,
    router_url: str | None,
    runtime: bool,
    notes: list[str],
) -> None:
    """Runs in a thread: inject the scenario's fault at its time, undo it at restore time."""
    try:
        tl.wait_until(sc.fault_at)
        if sc.name == "backend-added":
            tl.mark(f"starting {sim_name(NEWCOMER)}")
            fleet.start_sim(NEWCOMER)
            tl.mark(f"{sim_name(NEWCOMER)} ready")
            if router_url is not None:
                api = add_router_worker(router_url, fleet.all_sim_urls[NEWCOMER])
                tl.mark(f"{sim_name(NEWCOMER)} added to the router ({api})")
            return
        if sc.name == "service-kill":
            assert stack is not None and stack.service is not None
            stack.service.send_signal(signal.SIGKILL)
            tl.mark("SIGKILL service")
            stack.service.popen.wait(timeout=10)
            tl.wait_until(sc.restore_at or sc.fault_at)
            tl.mark("restarting service")
            stack.start_service(0)
            tl.mark("service ready")
            return
        if sc.name == "service-rolling":
            assert stack is not None
            for j in range(stack.service_replicas):
                proc = stack.services[j]
                assert proc is not None
                proc.send_signal(signal.SIGTERM)
                tl.mark(f"SIGTERM replica {j}")
                proc.popen.wait(timeout=60)
                tl.mark(f"replica {j} exited ({proc.exit_description()})")
                stack.start_service(j)
                tl.mark(f"replica {j} ready")
                ep = f"127.0.0.1:{stack.service_grpc_port(j)}"
                poll_until(
                    lambda ep=ep: envoy_host_healthy(stack.envoy_admin_url, "extproc", ep),
                    timeout=20,
                    what=f"Envoy to see replica {j} healthy",
                )
                tl.mark(f"replica {j} healthy in Envoy")
            tl.mark("rolling restart done")
            return
        backend_fault(sc.name, fleet, VICTIM, True, tl, runtime)
        if sc.restore_at is not None:
            tl.wait_until(sc.restore_at)
            backend_fault(sc.name, fleet, VICTIM, False, tl, runtime)
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the run goes on
        tl.mark(f"FAULT SCRIPT ERROR: {exc}")
        notes.append(f"fault script error: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def run_scenario(
    sc: Scenario,
    contender: Contender,
    *,
    seed: int,
    rate: float,
    log_dir: Path,
    runtime_faults: bool | None,
) -> dict[str, Any]:
    log_dir.mkdir(parents=True, exist_ok=True)
    n_max = int(rate * sc.duration * 1.5) + 64
    wl, streams = make_workload(seed, n_max)
    notes: list[str] = []
    stack: Stack | None = None
    fleet: Any = None
    router: Proc | None = None
    router_url: str | None = None
    t_setup = time.monotonic()
    try:
        if contender.family == "extproc":
            stack = make_stack(log_dir, replicas=2 if sc.name == "service-rolling" else 1)
            stack.start()
            fleet = stack
            url = stack.url
            stack.wait_metrics_fresh()
        else:
            fleet = make_stack(log_dir, sims_only=True).start()
            port, prom = free_port(), free_port()
            start = (
                routers.start_sglang_router
                if contender.family == "sglang-router"
                else routers.start_vllm_router
            )
            router = start(
                port=port,
                prometheus_port=prom,
                worker_urls=fleet.all_sim_urls[:N_SIMS],
                policy=RUST_POLICY,
                log_dir=log_dir,
            )
            url = router_url = f"http://127.0.0.1:{port}"
        smoke(url)
        runtime = (
            runtime_faults
            if runtime_faults is not None
            else runtime_faults_supported(fleet.all_sim_urls[0])
        )
        if sc.name in FLAG_FAULTS and not runtime:
            notes.append(
                "emulated: vllmsim has no runtime fault switch, so the fault is "
                "switched on/off by restarting the backend with/without "
                f"`{' '.join(FLAG_FAULTS[sc.name][1])}` (requests in flight on it are "
                "cut, and it refuses connections for ~1-2 s each time)"
            )
        setup_s = time.monotonic() - t_setup
        t0 = time.perf_counter() + 0.2
        tl = Timeline(t0)
        th = threading.Thread(
            target=run_fault_script,
            name=f"fault-{sc.name}",
            daemon=True,
            args=(sc, fleet, tl),
            kwargs={"stack": stack, "router_url": router_url, "runtime": runtime, "notes": notes},
        )
        th.start()
        recs = asyncio.run(run_open_loop(url, wl, streams, rate=rate, duration=sc.duration, t0=t0))
        th.join(timeout=90)
        if th.is_alive():
            notes.append("fault script still running after the load ended")
        envoy_stats: dict[str, int] = {}
        if stack is not None:
            # What Envoy did about the fault: outlier ejections, retries, health-check failures.
            with contextlib.suppress(Exception):
                body = http_get(
                    f"{stack.envoy_admin_url}/stats?filter="
                    "cluster.vllm.(outlier|upstream_rq_retry|health_check|"
                    "upstream_rq_5xx|upstream_cx_connect_fail)",
                    timeout=2.0,
                )[1]
                for line in body.splitlines():
                    k, _, v = line.partition(": ")
                    if v.strip().isdigit() and int(v) > 0:
                        envoy_stats[k.strip()] = int(v)
        dead = [p.name for p in [*fleet.procs, *([router] if router else [])] if not p.alive()]
        if dead:
            notes.append("dead at the end: " + ", ".join(dead))
    finally:
        if fleet is not None:
            for i in range(N_SIMS + 1):
                p = fleet.sim_proc(i)
                if p is not None:
                    p.send_signal(signal.SIGCONT)
        if router is not None:
            router.stop()
        if fleet is not None:
            fleet.stop()
    endpoints = fleet.all_sim_endpoints
    rec = analyse(sc, contender, recs, tl, endpoints, rate)
    rec["notes"] = notes
    rec["envoy_stats"] = envoy_stats
    rec["setup_wall_s"] = round(setup_s, 1)
    rec["runtime_faults"] = runtime
    with (log_dir / "requests.jsonl").open("w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(asdict(r)) + "\n")
    return rec


# ============================================================================ analysis
def _p90_ms(xs: Sequence[float]) -> float:
    return percentile(xs, 90) * 1000 if xs else math.nan


def analyse(
    sc: Scenario,
    contender: Contender,
    recs: Sequence[Rec],
    tl: Timeline,
    endpoints: Sequence[str],
    rate: float,
) -> dict[str, Any]:
    events = tl.events
    T = sc.fault_at
    # End of the fault window: the repair (or, for a rolling restart / scale-out, the last
    # step of the procedure), else the scheduled time.
    if sc.name == "service-rolling":
        R = tl.first("rolling restart done") or sc.duration
    elif sc.name == "backend-added":
        R = (
            tl.first(f"{sim_name(NEWCOMER)} added")
            or tl.first(f"{sim_name(NEWCOMER)} ready")
            or sc.duration
        )
    else:
        R = sc.restore_at if sc.restore_at is not None else sc.duration
    victim_ep = endpoints[VICTIM]
    victim_pod = sim_name(VICTIM)

    def end(r: Rec) -> float:
        return r.end if r.end is not None else math.inf

    before = [r for r in recs if end(r) < T]
    inflight = [r for r in recs if r.sent < T <= end(r)]
    during = [r for r in recs if T <= r.sent < R]
    after = [r for r in recs if r.sent >= R]
    errs = lambda rs: sum(1 for r in rs if not r.ok)  # noqa: E731

    def ttft_p90(rs: Sequence[Rec]) -> float:
        return _p90_ms([r.ttft for r in rs if r.ok and r.stream and r.ttft is not None])

    out: dict[str, Any] = {
        "scenario": sc.name,
        "contender": contender.name,
        "family": contender.family,
        "fault_at_s": T,
        "window_end_s": round(R, 2),
        "duration_s": sc.duration,
        "rate_wall": rate,
        "requests": len(recs),
        "streamed": sum(1 for r in recs if r.stream),
        "errors_total": errs(recs),
        "errors_before": errs(before),
        "inflight_at_fault": len(inflight),
        "errors_inflight": errs(inflight),
        "errors_started_during": errs(during),
        "errors_started_after_repair": errs(after),
        "errors_started_after_fault": errs(during) + errs(after),
        "ttft_p90_ms": {
            "before": ttft_p90([r for r in recs if r.sent < T]),
            "during": ttft_p90(during),
            "after": ttft_p90(after),
        },
        "events": events,
        "error_kinds": _error_kinds([r for r in recs if not r.ok]),
    }
    if sc.backend and sc.name != "backend-added":
        # New requests that reached (or were sent to) the faulty backend after the fault.
        hit = [r for r in during if r.pod == victim_pod or r.routed == victim_ep]
        unnamed = [r for r in during if not r.ok and r.pod is None and r.routed is None]
        last_hit = max((r.sent - T for r in hit), default=None)
        last_any = max((r.sent - T for r in [*hit, *unnamed]), default=None)
        out["to_victim_after_fault"] = len(hit)
        out["to_victim_after_fault_served"] = sum(1 for r in hit if r.pod == victim_pod)
        out["unnamed_errors_after_fault"] = len(unnamed)
        out["last_to_victim_s"] = None if last_hit is None else round(last_hit, 2)
        out["last_to_victim_or_unnamed_error_s"] = None if last_any is None else round(last_any, 2)
    if sc.name == "backend-added":
        ready = tl.first(f"{sim_name(NEWCOMER)} ready")
        new_pod = sim_name(NEWCOMER)
        got = sorted(r.sent for r in recs if r.pod == new_pod)
        out["newcomer_ready_s"] = ready
        out["newcomer_first_request_after_ready_s"] = (
            round(got[0] - ready, 2) if got and ready is not None else None
        )
        window = [r for r in recs if ready is not None and r.sent >= ready + 2.0]
        out["newcomer_share_after"] = (
            sum(1 for r in window if r.pod == new_pod) / len(window) if window else None
        )
    if not sc.backend:
        win = [r for r in recs if r.sent < R and end(r) >= T]
        out["routed_without_service"] = sum(1 for r in win if r.ok and not r.reason)
    out["target_met"] = _target_met(sc, out, contender.family)
    return out


def _error_kinds(bad: Sequence[Rec]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in bad:
        e = r.error or "?"
        m = re.match(
            r"(http \d+|connection: \w+|timeout|stream error|incomplete|deadline|empty|"
            r"bad body)",
            e,
        )
        k = m.group(1) if m else e[:40]
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


def _target_met(sc: Scenario, out: dict[str, Any], family: str = "extproc") -> bool | None:
    if sc.name == "metrics-hang" and family != "extproc":
        # The Rust routers never read /metrics: for them the backend is healthy (it serves
        # every request), so there is nothing to avoid; reported, not judged.
        return None
    if sc.name == "backend-kill":
        return out["errors_started_after_fault"] == 0
    if sc.name in ("backend-stop", "metrics-hang"):
        last = out.get("last_to_victim_or_unnamed_error_s")
        return last is None or last <= ROUTING_TARGET_S
    if sc.name in ("service-kill", "service-rolling"):
        return out["errors_total"] == 0
    return None


# ============================================================================ report
def _f(x: Any, fmt: str = "{:.0f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return fmt.format(x)


def _yes(b: bool | None) -> str:
    return "–" if b is None else ("**yes**" if b else "**no**")


def markdown(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    lines = [
        f"# Faults{' (quick)' if cfg['quick'] else ''}",
        "",
        f"`{doc['command']}`, {doc['started']} UTC, {doc['wall_minutes']:.1f} min, seed "
        f"{cfg['seed']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
        + ". Code fingerprint: "
        + ", ".join(f"{k} `{v}`" for k, v in doc["code"].items())
        + ".",
        "",
        f"Stack: {N_SIMS} × `vllmsim {' '.join(FLEET_ARGS)} --time-scale {TIME_SCALE:g}` + "
        "the service (default flags, `--log-level warning`) + Envoy (envoy/envoy.yaml rendered "
        "for loopback, 1 worker); a 5th simulator is declared to the service and to Envoy's "
        "pool from the start but only started in `backend-added`. Rust routers: "
        f"`--policy {RUST_POLICY}`, otherwise their defaults, in front of the same fleet. "
        f"Load: open loop at {cfg['load'] * 100:.0f} % of the fleet's capacity "
        f"({cfg['capacity_source']}) = **{cfg['rate_wall']:.1f} req/s wall**, ShareGPT-like "
        f"requests, {STREAM_SHARE * 100:.0f} % streamed. A fresh stack per run. "
        "Times are wall-clock seconds from the first request; TTFT is wall-clock ms "
        f"(× {TIME_SCALE:g} for simulated time), streamed requests only.",
        "",
        "Columns: **in flight** = errors among requests in flight when the fault hit (of how "
        "many); **after fault** = errors among requests sent after the fault (during the fault "
        "window + after the repair); **last to victim** = latest send time, relative to the "
        "fault, of a request that the faulty backend answered or that was routed to it "
        "(`x-inference-pod`, `x-routed-endpoint`), or that failed without naming any backend; "
        "**TTFT p90** before / during / after the fault window.",
        "",
        "## Targets",
        "",
    ]
    trows = []
    for sc_name, runs in doc["scenarios"].items():
        sc = SCENARIOS[sc_name]
        if not sc.target:
            continue
        for r in runs:
            trows.append([sc_name, r["contender"], sc.target, _yes(r.get("target_met"))])
    lines.append(
        markdown_table(["scenario", "contender", "target", "met"], trows)
        if trows
        else "(no scenario with a target was run)\n"
    )
    for sc_name, runs in doc["scenarios"].items():
        sc = SCENARIOS[sc_name]
        lines += [f"## {sc_name}: {sc.title}", ""]
        if sc.target:
            lines += [f"Target: {sc.target}.", ""]
        rows = []
        for r in runs:
            t = r["ttft_p90_ms"]
            row = [
                r["contender"],
                r["requests"],
                r["errors_total"],
                r["errors_before"],
                f"{r['errors_inflight']} / {r['inflight_at_fault']}",
                f"{r['errors_started_after_fault']} ({r['errors_started_during']} + "
                f"{r['errors_started_after_repair']})",
            ]
            if sc.backend and sc_name != "backend-added":
                row.append(_f(r.get("last_to_victim_or_unnamed_error_s"), "{:.2f} s"))
            if sc_name == "backend-added":
                row.append(_f(r.get("newcomer_first_request_after_ready_s"), "{:.2f} s"))
                share = r.get("newcomer_share_after")
                row.append(_f(None if share is None else share * 100, "{:.0f} %"))
            if not sc.backend:
                row.append(r.get("routed_without_service", "–"))
            row += [_f(t["before"]), _f(t["during"]), _f(t["after"]), _yes(r.get("target_met"))]
            rows.append(row)
        head = ["contender", "requests", "errors", "before", "in flight", "after fault"]
        if sc.backend and sc_name != "backend-added":
            head.append("last to victim")
        if sc_name == "backend-added":
            head += ["1st request to new (after ready)", "new's share after"]
        if not sc.backend:
            head.append("served without the service")
        head += ["TTFT p90 before ms", "during", "after", "target met"]
        lines.append(markdown_table(head, rows, "l" + "r" * (len(head) - 1)))
        for r in runs:
            ev = "; ".join(f"{t:.2f} {w}" for t, w in r["events"])
            kinds = ", ".join(f"{k} ×{v}" for k, v in r["error_kinds"].items()) or "none"
            lines.append(f"* {r['contender']}: events: {ev}. Errors: {kinds}.")
            for note in r.get("notes", []):
                lines.append(f"  * note: {note.splitlines()[0]}")
        lines.append("")
    return "\n".join(lines)


def _render(doc: dict[str, Any]) -> str:
    # Failed runs have no table row; they stay in the JSON and are listed at the end.
    ok_doc = dict(doc)
    ok_doc["scenarios"] = {
        k: [r for r in v if "failed" not in r] for k, v in doc["scenarios"].items()
    }
    md = markdown(ok_doc)
    failed = [r for v in doc["scenarios"].values() for r in v if "failed" in r]
    if failed:
        md += (
            "\n## Runs that failed\n\n"
            + "\n".join(
                f"* {r['scenario']} / {r['contender']}: {r['failed'].splitlines()[0]}"
                for r in failed
            )
            + "\n"
        )
    return md


# ============================================================================ main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="shorter scenarios (fault at 4 s), Rust routers on backend-kill only",
    )
    ap.add_argument(
        "--scenario",
        action="append",
        default=[],
        help="run only these (repeatable or comma list): " + ", ".join(SCENARIOS),
    )
    ap.add_argument("--contenders", default="extproc,sglang-router,vllm-router")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--capacity",
        type=float,
        default=None,
        help="fleet capacity in simulated req/s (default: bench-routing's)",
    )
    ap.add_argument("--load", type=float, default=LOAD)
    ap.add_argument(
        "--runtime-faults",
        choices=("auto", "yes", "no"),
        default="auto",
        help="use vllmsim's POST /sim/faults (auto: when it answers)",
    )
    ap.add_argument("--out", default=None, help="results name (default faults / faults-quick)")
    ap.add_argument(
        "--report-only",
        type=Path,
        default=None,
        metavar="JSON",
        help="re-render the markdown (and re-judge the targets) of a results JSON",
    )
    a = ap.parse_args(argv)
    if a.report_only:
        doc = json.loads(a.report_only.read_text())
        for runs in doc["scenarios"].values():
            for r in runs:
                if "failed" not in r:
                    r["target_met"] = _target_met(SCENARIOS[r["scenario"]], r, r["family"])
        write_results(a.out or a.report_only.stem, doc, _render(doc))
        print(f"re-rendered bench/results/{a.out or a.report_only.stem}.md")
        return 0

    names = [n for item in a.scenario for n in item.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; valid: {', '.join(SCENARIOS)}")
    families = [f for f in a.contenders.split(",") if f]
    for fam in families:
        if fam == "sglang-router" and routers.sglang_router_available():
            print(f"skipping {fam}: {routers.sglang_router_available()}", file=sys.stderr)
        if fam == "vllm-router" and routers.vllm_router_available():
            print(f"skipping {fam}: {routers.vllm_router_available()}", file=sys.stderr)
    families = [
        f
        for f in families
        if not (
            (f == "sglang-router" and routers.sglang_router_available())
            or (f == "vllm-router" and routers.vllm_router_available())
        )
    ]
    cap, source = (a.capacity, "--capacity") if a.capacity else capacity_from_routing_results()
    rate = a.load * cap * TIME_SCALE
    runtime = {"auto": None, "yes": True, "no": False}[a.runtime_faults]
    out_name = a.out or ("faults-quick" if a.quick else "faults")
    started = time.time()
    run_dir = RUN_DIR / time.strftime("%Y%m%d-%H%M%S")
    doc: dict[str, Any] = {
        "command": " ".join(["python", "bench/bench_faults.py", *(argv or sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "versions": routers.router_versions(),
        "code": code_fingerprint(),
        "config": {
            "quick": a.quick,
            "seed": a.seed,
            "load": a.load,
            "capacity_sim": cap,
            "capacity_source": source,
            "rate_wall": rate,
            "time_scale": TIME_SCALE,
            "fleet_args": FLEET_ARGS,
            "service_args": SERVICE_ARGS,
            "rust_policy": RUST_POLICY,
            "stream_share": STREAM_SHARE,
            "request_timeout_s": REQUEST_TIMEOUT,
            "victim": sim_name(VICTIM),
        },
        "scenarios": {},
    }
    print(
        f"bench-faults: {len(names)} scenario(s), {rate:.1f} req/s wall "
        f"({a.load * 100:.0f} % of {cap:.1f} sim req/s × time scale {TIME_SCALE:g}); "
        f"logs in {run_dir}",
        flush=True,
    )
    for name in names:
        sc = SCENARIOS[name].quick() if a.quick else SCENARIOS[name]
        fams = ["extproc"] if "extproc" in families else []
        if sc.backend and (not a.quick or name == "backend-kill"):
            fams += [f for f in ROUTER_FAMILIES if f in families]
        for fam in fams:
            c = Contender(fam)
            t = time.monotonic()
            print(f"  {name:16s} {c.name:28s} ...", end="", flush=True)
            try:
                rec = run_scenario(
                    sc,
                    c,
                    seed=a.seed,
                    rate=rate,
                    log_dir=run_dir / name / fam,
                    runtime_faults=runtime,
                )
            except Exception as exc:  # noqa: BLE001 - one broken run must not lose the others
                print(f" FAILED: {str(exc).splitlines()[0]}", flush=True)
                rec = {
                    "scenario": name,
                    "contender": c.name,
                    "family": fam,
                    "failed": f"{type(exc).__name__}: {exc}"[:2000],
                }
                doc["scenarios"].setdefault(name, []).append(rec)
                continue
            doc["scenarios"].setdefault(name, []).append(rec)
            last = rec.get("last_to_victim_or_unnamed_error_s")
            print(
                f" {time.monotonic() - t:5.1f}s  n={rec['requests']} errors "
                f"{rec['errors_total']} (in flight {rec['errors_inflight']}, after "
                f"{rec['errors_started_after_fault']})"
                + (f" last-to-victim {last}s" if last is not None else "")
                + f" target {rec['target_met']}",
                flush=True,
            )
    doc["wall_minutes"] = (time.time() - started) / 60
    write_results(out_name, doc, _render(doc))
    print(f"wrote bench/results/{out_name}.md and .json ({doc['wall_minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
