"""Scale: the service against pools of 16 to 1,000 backends, and against several worker processes.

Run: ``make bench-scale`` (or ``python bench/bench_scale.py [--quick] [--parts a,b] ...``).
Writes bench/results/scale.{json,md}; a run of one part keeps the other part's last figures
(each part records its own date, commit and command).

(a) **Pool size** (``--pools``, default 16,128,512,1000). The fake vLLM servers are ONE Envoy
    process with one listener per server (bench/overhead_backend.py's ``direct_response``
    config: the real vLLM ``/metrics`` capture, a canned chat completion, ``GET /v1/models``)
    so a thousand servers cost a few percent of a core, not a thousand processes. The
    service scrapes all of them; a front Envoy rendered from envoy/envoy.yaml routes to all of
    them (``ingress``, through the service) or to the first one (``ingress_direct``). Per pool
    size, after a settle time, an IDLE window (no requests: what scraping alone costs) and a
    LOADED one (wrk, 32 connections, through the service, with Envoy direct measured right
    before it as the same-run baseline) record: the service's CPU (utime+stime of every process
    in its process group, from /proc, in cores), the scrape rate (``extproc_scrapes_total`` on
    the admin /metrics), the age of the metrics decisions read (admin ``/backends``, sampled
    every ``--age-every`` seconds: ``age_seconds`` plus the time since the snapshot was built),
    the event-loop lag, the decision time and routed req/s.
(b) **Workers** (``--workers``, default 1,2,4) on a pool of ``--workers-pool`` backends: routed
    req/s and added latency at 1 and 32 connections, each with Envoy direct in the same run.
    A value the service rejects (no ``--workers`` flag yet, or out of range) is skipped with its
    error in the results; ``1`` then runs without the flag (one process is one worker).

Every run is bounded: ``--max-minutes`` stops starting new points, every wait polls against a
deadline, wrk runs for a fixed time. ``--quick`` is a smoke run (16 backends, seconds per window).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from bench_overhead import (
    AsyncioClient,
    ForeignLoad,
    LoadResult,
    Rig,
    WrkClient,
    cpu_seconds,
    ensure_wrk,
    envoy_stats,
    fmt_ms,
    loadavg,
    post_once,
    service_decision_stats,
    system_busy_seconds,
    wait_for_quiet,
)
from common import RESULTS_DIR, code_fingerprint, write_atomic, write_results
from overhead_backend import metrics_fixture, render_fake_vllm_config

from devstack.envoy_config import render_local_config_dict
from devstack.processes import (
    PortInUseError,
    Proc,
    ProcessStartError,
    find_envoy,
    free_port,
    http_get,
    poll_until,
    port_is_free,
    start_envoy,
    start_extproc,
)

NAME = "scale"
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets of issue 10, evaluated next to the figures.
TARGET_AGE_P90_S = 1.0  # at 1,000 backends
TARGET_SCRAPE_CORES = 1.0  # at 1,000 backends
TARGET_RPS_KEEP = 0.8  # ext_proc throughput at 1,000 backends >= 0.8 x the 16-backend case
TARGET_WORKER_SCALING = 0.8  # N workers >= 0.8 x N x one worker, while cores are free


# ============================================================================ the tree measured
def git_out(*args: str) -> str:
    try:
        r = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout.rstrip()


def tree_state() -> dict[str, Any]:
    """Which code was measured: HEAD and how many files under extproc/ differ from it."""
    dirty = git_out("status", "--short", "extproc").splitlines()
    return {
        "commit": git_out("rev-parse", "HEAD") or None,
        "extproc_dirty_files": len(dirty),
        "extproc_dirty": dirty,
        # sha256 of extproc/*.py as measured: tells two dirty trees apart.
        "extproc_fingerprint": code_fingerprint()["extproc"],
    }


def envoy_version() -> str:
    try:
        r = subprocess.run(
            [find_envoy(), "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError, FileNotFoundError) as exc:
        return f"unknown ({exc})"
    m = re.search(r"/(\d+\.\d+\.\d+)/", r.stdout + r.stderr)
    return m.group(1) if m else (r.stdout + r.stderr).strip()[:80]


def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ============================================================================ process CPU
def group_cpu(pgid: int) -> dict[int, float]:
    """CPU seconds (utime+stime) of every live process in process group ``pgid``: the service
    and any worker or scraper processes it starts (devstack gives it its own group)."""
    out: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields: state ppid pgrp ... utime(11) stime(12)
            out[int(d.name)] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return out


def cores_between(before: dict[int, float], after: dict[int, float], seconds: float) -> list[float]:
    """Cores used by each process of a group over a window (new processes count from 0),
    largest first."""
    used = [after[p] - before.get(p, 0.0) for p in after]
    return sorted((max(0.0, u) / max(seconds, 1e-9) for u in used), reverse=True)


# ============================================================================ service counters
_RESULT = re.compile(r'result="([^"]*)"')


def service_counters(admin_port: int) -> dict[str, Any]:
    """Scrapes by result and the event-loop lag histogram's sum/count, from the admin /metrics."""
    status, text = http_get(f"http://127.0.0.1:{admin_port}/metrics", timeout=10.0)
    scrapes: dict[str, float] = {}
    lag = [0.0, 0.0]
    scrape_cpu = 0.0
    if status == 200:
        for line in text.splitlines():
            if line.startswith("extproc_scrape_cpu_seconds_total"):
                scrape_cpu += float(line.rsplit(" ", 1)[1])
            elif line.startswith("extproc_scrapes_total{"):
                m = _RESULT.search(line)
                key = m.group(1) if m else "?"
                scrapes[key] = scrapes.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
            elif line.startswith("extproc_event_loop_lag_seconds_sum"):
                lag[0] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("extproc_event_loop_lag_seconds_count"):
                lag[1] += float(line.rsplit(" ", 1)[1])
    return {"scrapes": scrapes, "lag_sum": lag[0], "lag_count": lag[1], "scrape_cpu": scrape_cpu}


def backend_ages(admin_port: int) -> tuple[list[float], int]:
    """(age now of every scraped backend, number never scraped) from the admin /backends view.

    The view is the snapshot decisions read, rebuilt once per scrape interval; its ages are as
    of ``built_at`` (the service's time.monotonic(), the same clock as ours on one host), so
    the time since the build is added: that is how old the metrics a decision reads now are.
    """
    status, body = http_get(f"http://127.0.0.1:{admin_port}/backends", timeout=10.0)
    if status != 200:
        raise RuntimeError(f"/backends answered {status}")
    data = json.loads(body)
    since_build = time.monotonic() - float(data.get("built_at") or 0.0)
    lag = since_build if 0.0 <= since_build < 5.0 else 0.0
    ages, never = [], 0
    for b in data["backends"]:
        age = b.get("age_seconds")
        if age is None:
            never += 1
        else:
            ages.append(float(age) + lag)
    return ages, never


class AgeSampler:
    """Samples backend ages every ``every`` seconds in a thread while a window runs."""

    def __init__(self, admin_port: int, every: float) -> None:
        self.admin_port = admin_port
        self.every = every
        self.ages: list[float] = []
        self.never: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="age-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                ages, never = backend_ages(self.admin_port)
            except Exception as exc:  # noqa: BLE001 - a missed sample is reported, not fatal
                self.errors.append(repr(exc))
                continue
            self.ages += ages
            self.never.append(never)

    def __enter__(self) -> AgeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def summary(self, stale_after: float = 1.0) -> dict[str, Any]:
        a = sorted(self.ages)
        return {
            "age_samples": len(self.never),
            "age_p50_s": quantile(a, 0.5),
            "age_p90_s": quantile(a, 0.9),
            "age_max_s": a[-1] if a else None,
            "fresh_share": round(sum(x <= stale_after for x in a) / len(a), 4) if a else None,
            # Backends never scraped, at the last sample (their age is unknown, not counted above).
            "never_scraped": self.never[-1] if self.never else None,
            "age_sample_errors": len(self.errors),
        }


def quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[round(q * 100) - 1]


# ============================================================================ the rig
class ServiceRejected(RuntimeError):
    """The service exited with a usage/configuration error (exit 2) for the given arguments."""


class ScaleRig(Rig):
    """One Envoy of N fake vLLM servers ("backend") + the service + the front Envoy ("envoy"),
    on loopback. bench_overhead's Rig gives start (retried on a port taken meanwhile), stop and
    url; this one starts other processes."""

    def __init__(
        self,
        n_backends: int,
        log_dir: Path,
        envoy_concurrency: int = 1,
        service_args: list[str] | None = None,
        workers: int | None = None,  # None: no --workers flag
        worker_ports: bool = False,  # workers > 1: each its own port, all in Envoy's cluster
    ) -> None:
        super().__init__(log_dir, envoy_concurrency, service_args or [])
        self.n_backends = n_backends
        self.workers = workers
        self.worker_ports = worker_ports
        self.backend_ports: list[int] = []
        self.notes: list[str] = []
        self.settings: dict[str, Any] = {}  # the service's scrape settings (its /settings)
        self.fingerprint = ""  # of extproc/*.py when the service started (others edit the tree)

    @property
    def service(self) -> Proc:
        return self.procs["service"]

    def _start_once(self) -> None:
        self.fingerprint = code_fingerprint()["extproc"]
        self.backend_ports = [free_port() for _ in range(self.n_backends)]
        names = ("fake_admin", "grpc", "service_admin", "ingress", "direct", "envoy_admin")
        self.ports = {n: free_port() for n in names}
        p = self.ports
        # Thousands of listeners bind in a few seconds; the readiness check connects to each.
        start_timeout = 30.0 + self.n_backends * 0.05
        self.procs["backend"] = start_envoy(
            yaml.safe_dump(
                render_fake_vllm_config(self.backend_ports, p["fake_admin"], metrics_fixture()),
                sort_keys=False,
                width=10_000,
            ),
            log_dir=self.log_dir,
            admin_port=p["fake_admin"],
            name="fake-vllm-envoy",
            concurrency=1,
            timeout=start_timeout,
        )
        # The pool goes in a --config file: a thousand --backend flags make an unreadable argv.
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = self.log_dir / "service-backends.yaml"
        backends = [f"http://127.0.0.1:{port}" for port in self.backend_ports]
        config.write_text(yaml.safe_dump({"backend": backends}), encoding="utf-8")
        args = ["--config", str(config), "--log-level", "warning"]
        grpc_ports: list[int] | None = None
        if self.workers is not None:
            args += ["--workers", str(self.workers)]
            if self.worker_ports and self.workers > 1:
                base = free_port()  # worker i listens on base + i: find a free run of ports
                while not all(port_is_free(base + i) for i in range(self.workers)):
                    base = free_port()
                grpc_ports = [base + i for i in range(self.workers)]
                args += ["--worker-ports", str(base)]
        try:
            self.procs["service"] = start_extproc(
                grpc_port=p["grpc"],
                admin_port=p["service_admin"],
                backends=[],
                args=[*args, *self.service_args],
                log_dir=self.log_dir,
                timeout=start_timeout,
            )
        except PortInUseError:
            raise
        except ProcessStartError as exc:
            if "exited with code 2" in str(exc):  # argparse / settings error: a clear message
                lines = [ln.strip() for ln in exc.log_tail.splitlines() if ln.strip()]
                reason = next((ln for ln in reversed(lines) if "error" in ln.lower()), "")
                raise ServiceRejected(reason or (lines[-1] if lines else str(exc))) from None
            raise
        front = render_local_config_dict(
            listener_port=p["ingress"],
            admin_port=p["envoy_admin"],
            # With worker ports Envoy balances ext_proc streams over the workers; else its
            # connection(s) land on whichever worker accepted them on the shared port.
            extproc_address=None if grpc_ports else ("127.0.0.1", p["grpc"]),
            grpc_ports=grpc_ports,
            backends=[("127.0.0.1", port) for port in self.backend_ports],
            direct_listener_port=p["direct"],
        )
        self.procs["envoy"] = start_envoy(
            "# GENERATED by bench/bench_scale.py from envoy/envoy.yaml\n"
            + yaml.safe_dump(front, sort_keys=False, width=10_000),
            log_dir=self.log_dir,
            admin_port=p["envoy_admin"],
            name="front-envoy",
            concurrency=self.envoy_concurrency,
            timeout=start_timeout,
        )
        self._wait_routable()

    def _wait_routable(self) -> None:
        admin = self.ports["service_admin"]
        status, body = http_get(f"http://127.0.0.1:{admin}/settings", timeout=10.0)
        if status == 200:
            self.settings = {
                k: v for k, v in json.loads(body).items() if k.startswith(("scrape", "workers"))
            }

        def all_scraped() -> bool:
            ages, never = backend_ages(admin)
            return never == 0 and len(ages) == self.n_backends

        try:
            poll_until(
                all_scraped,
                timeout=30.0 + self.n_backends * 0.03,
                what=f"every one of {self.n_backends} backends scraped once",
                proc=self.service,
                max_interval=1.0,
            )
        except ProcessStartError as exc:
            if not self.service.alive():
                raise
            # A service that cannot keep up is what this bench measures: go on, report it.
            self.notes.append(f"{self.n_backends} backends: {str(exc).splitlines()[0]}")

        def extproc_healthy() -> bool:
            status, text = http_get(f"http://127.0.0.1:{self.ports['envoy_admin']}/clusters")
            flags = [
                ln
                for ln in text.splitlines()
                if ln.startswith("extproc::") and "::health_flags::" in ln
            ]
            return status == 200 and bool(flags) and all(ln.endswith("::healthy") for ln in flags)

        try:
            poll_until(
                extproc_healthy, timeout=20, what="Envoy to see the ext_proc cluster healthy"
            )
        except ProcessStartError:
            # One host in the cluster: Envoy's panic mode still sends it every stream. A service
            # too busy to answer its health check in time is a result, not a reason to stop.
            self.notes.append(
                f"{self.n_backends} backends: Envoy's gRPC health check of the service did not pass "
                "within 20 s (the service answered it too late); measured anyway"
            )

        def answers(listener: str, routed: bool) -> bool:
            status, headers = post_once(self.url(listener), {})
            return status == 200 and (not routed or "x-routed-endpoint" in headers)

        poll_until(lambda: answers("direct", False), timeout=30, what="a 200 through Envoy direct")
        poll_until(
            lambda: answers("ingress", True),
            timeout=30,
            what="a 200 routed by the service (x-routed-endpoint)",
            proc=self.service,
        )

    def wanted_scrapes_per_s(self) -> float | None:
        """Scrapes per second the pool asks for at the service's own --scrape-interval."""
        interval = self.settings.get("scrape_interval")
        return round(self.n_backends / interval, 1) if interval else None

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if not proc.alive():
                raise RuntimeError(f"{name} died ({proc.exit_description()}):\n{proc.log_tail()}")


# ============================================================================ measuring
@dataclass
class Probe:
    """Counters read at one edge of a window."""

    t: float
    service: dict[int, float]
    fake: float
    front: float
    counters: dict[str, Any]
    decisions: tuple[float, float]
    busy: float
    envoy: dict[str, float]


def probe(rig: ScaleRig) -> Probe:
    return Probe(
        t=time.monotonic(),
        service=group_cpu(rig.service.pid),
        fake=cpu_seconds(rig.procs["backend"].pid),
        front=cpu_seconds(rig.procs["envoy"].pid),
        counters=service_counters(rig.ports["service_admin"]),
        decisions=service_decision_stats(rig.ports["service_admin"]),
        busy=system_busy_seconds(),
        envoy=envoy_stats(rig.ports["envoy_admin"]),
    )


def our_pids(rig: ScaleRig) -> list[int]:
    return [*group_cpu(rig.service.pid), rig.procs["backend"].pid, rig.procs["envoy"].pid]


def window_stats(rig: ScaleRig, p0: Probe, p1: Probe, foreign: float) -> dict[str, Any]:
    dur = max(p1.t - p0.t, 1e-9)
    per_proc = cores_between(p0.service, p1.service, dur)
    s0, s1 = p0.counters["scrapes"], p1.counters["scrapes"]
    by_result = {k: round(s1[k] - s0.get(k, 0.0)) for k in s1 if s1[k] - s0.get(k, 0.0) > 0}
    scrapes = sum(v for k, v in by_result.items() if k != "models_error")
    lag_n = p1.counters["lag_count"] - p0.counters["lag_count"]
    lag_s = p1.counters["lag_sum"] - p0.counters["lag_sum"]
    dec_n = p1.decisions[1] - p0.decisions[1]
    service_cores = sum(per_proc)
    return {
        "duration_s": round(dur, 2),
        "service_cores": round(service_cores, 3),
        "service_cores_per_process": [round(c, 3) for c in per_proc],
        # the scraper's own estimate of its CPU (extproc_scrape_cpu_seconds_total)
        "scrape_cores": round(
            (p1.counters.get("scrape_cpu", 0.0) - p0.counters.get("scrape_cpu", 0.0)) / dur, 3
        ),
        "fake_envoy_cores": round((p1.fake - p0.fake) / dur, 3),
        "front_envoy_cores": round((p1.front - p0.front) / dur, 3),
        "box_busy_cores": round((p1.busy - p0.busy) / dur, 2),
        "other_load_cores": round(foreign, 2),
        "scrapes_per_s": round(scrapes / dur, 1),
        "scrapes_ok_per_s": round(by_result.get("ok", 0) / dur, 1),
        "scrape_results": by_result,
        "service_cpu_us_per_scrape": round(service_cores * dur / scrapes * 1e6, 1)
        if scrapes
        else None,
        "loop_lag_mean_ms": round(lag_s / lag_n * 1000, 2) if lag_n else None,
        "decision_us": round((p1.decisions[0] - p0.decisions[0]) / dec_n * 1e6, 1)
        if dec_n
        else None,
    }


def ext_proc_delta(p0: Probe, p1: Probe) -> dict[str, int]:
    pre = "http.ingress_http.ext_proc."
    keys = ("streams_started", "failure_mode_allowed", "message_timeouts", "streams_failed")
    return {k: int(p1.envoy.get(pre + k, 0) - p0.envoy.get(pre + k, 0)) for k in keys}


def idle_window(rig: ScaleRig, seconds: float, age_every: float) -> dict[str, Any]:
    meter = ForeignLoad(our_pids(rig))
    f0, t0 = meter.sample(), time.monotonic()
    p0 = probe(rig)
    with AgeSampler(rig.ports["service_admin"], age_every) as ages:
        time.sleep(seconds)  # the measured window itself, not a wait for something
    p1 = probe(rig)
    foreign = max(0.0, (meter.sample() - f0) / (time.monotonic() - t0))
    return {**window_stats(rig, p0, p1, foreign), **ages.summary()}


def load_point(
    rig: ScaleRig,
    client: Any,
    listener: str,
    connections: int,
    duration: float,
    warmup: float,
    age_every: float | None,
) -> dict[str, Any]:
    url = rig.url(listener)
    if warmup > 0:
        client.run(url, connections, warmup, {})
    meter = ForeignLoad(our_pids(rig))
    f0, t0 = meter.sample(), time.monotonic()
    p0 = probe(rig)
    sampler = AgeSampler(rig.ports["service_admin"], age_every or 1.0)
    with sampler if age_every else contextlib.nullcontext():
        res: LoadResult = client.run(url, connections, duration, {})
    p1 = probe(rig)
    foreign = max(0.0, (meter.sample() - f0) / (time.monotonic() - t0))
    rig.check_alive()
    out = {
        "listener": listener,
        "connections": connections,
        "rps": round(res.rps, 1),
        "p50_ms": round(res.p50_ms, 4),
        "p90_ms": round(res.p90_ms, 4),
        "p99_ms": round(res.p99_ms, 4),
        "requests": res.requests,
        "errors": res.errors,
        "non_2xx": res.non_2xx,
        "ext_proc": ext_proc_delta(p0, p1),
        **window_stats(rig, p0, p1, foreign),
    }
    # Requests Envoy sent on without an answer from the service (message_timeout, fail-open)
    # were not routed by it: they do not count as its throughput.
    ext = out["ext_proc"]
    started = ext["streams_started"]
    unrouted = min(ext["failure_mode_allowed"], started) if listener == "ingress" else 0
    out["unrouted"] = unrouted
    out["decided_rps"] = round(res.rps * (1 - unrouted / started), 1) if started else out["rps"]
    if listener == "ingress" and out["decided_rps"]:
        # What one routed request costs the service, scraping excluded: what a decision core
        # can route whatever the scraping takes (it runs in another process with --workers).
        out["decision_cpu_us"] = round(
            max(0.0, out["service_cores"] - out["scrape_cores"]) / out["decided_rps"] * 1e6, 1
        )
    if age_every:
        out.update(sampler.summary())
    return out


def run_checks(label: str, r: dict[str, Any]) -> list[str]:
    out = []
    if r["errors"] or r["non_2xx"]:
        out.append(f"{label}: {r['errors']} socket errors, {r['non_2xx']} non-2xx responses")
    ext = r["ext_proc"]
    if r["listener"] == "ingress" and (
        ext["failure_mode_allowed"] or ext["message_timeouts"] or ext["streams_failed"]
    ):
        out.append(
            f"{label}: Envoy routed without the service for some requests (failure_mode_allowed "
            f"{ext['failure_mode_allowed']}, message_timeouts {ext['message_timeouts']}, "
            f"streams_failed {ext['streams_failed']})"
        )
    return out


# ============================================================================ the two parts
@dataclass
class Plan:
    settle: float
    window: float
    duration: float
    warmup: float
    repeats: int
    age_every: float
    quiet_wait: float
    quiet_cores: float
    envoy_concurrency: int
    worker_ports: bool
    service_args: list[str]
    deadline: float
    log_dir: Path

    def time_left(self) -> bool:
        return time.monotonic() < self.deadline

    def quiet(self, rig: ScaleRig) -> None:
        if self.quiet_wait > 0:
            wait_for_quiet(ForeignLoad(our_pids(rig)), self.quiet_cores, self.quiet_wait)


def median(rs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def added(routed: list[dict[str, Any]], direct: list[dict[str, Any]], key: str) -> float | None:
    """Latency the service adds: median routed minus median direct (same run)."""
    r, d = median(routed, key), median(direct, key)
    return round(r - d, 4) if r is not None and d is not None else None


def part_pools(plan: Plan, client: Any, pools: list[int], connections: int) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    notes: list[str] = []
    checks: list[str] = []
    for n in pools:
        if not plan.time_left():
            notes.append(f"{n} backends: not measured, --max-minutes reached")
            continue
        print(
            f"(a) {n} backends: starting the fakes, the service and the front Envoy ...", flush=True
        )
        t_start = time.monotonic()
        rig = ScaleRig(n, plan.log_dir / f"pool-{n}", plan.envoy_concurrency, plan.service_args)
        try:
            rig.start()
            started_s = time.monotonic() - t_start
            time.sleep(plan.settle)  # let the scrape loops reach their steady state
            plan.quiet(rig)
            idle = idle_window(rig, plan.window, plan.age_every)
            print(
                f"    idle: service {idle['service_cores']:.2f} cores, {idle['scrapes_ok_per_s']:,.0f} "
                f"scrapes/s ok (wanted {fmt_n(rig.wanted_scrapes_per_s())}), age p50 "
                f"{fmt_s(idle['age_p50_s'])} p90 {fmt_s(idle['age_p90_s'])}, fake Envoy "
                f"{idle['fake_envoy_cores']:.2f} cores",
                flush=True,
            )
            runs: dict[str, list[dict[str, Any]]] = {"direct": [], "routed": []}
            for rep in range(plan.repeats):
                for key, listener in (("direct", "direct"), ("routed", "ingress")):
                    if not plan.time_left():
                        notes.append(
                            f"{n} backends: {key} run {rep + 1} skipped, --max-minutes reached"
                        )
                        continue
                    plan.quiet(rig)
                    r = load_point(
                        rig,
                        client,
                        listener,
                        connections,
                        plan.duration,
                        plan.warmup,
                        plan.age_every if key == "routed" else None,
                    )
                    runs[key].append(r)
                    checks += run_checks(f"{n} backends, {key} run {rep + 1}", r)
                    print(
                        f"    {key:<6} c={connections}: {r['rps']:>8,.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                        f"p99 {r['p99_ms']:.3f} ms  service {r['service_cores']:.2f} cores",
                        flush=True,
                    )
            d_rps, r_rps = median(runs["direct"], "rps"), median(runs["routed"], "decided_rps")
            points.append(
                {
                    "backends": n,
                    "start_s": round(started_s, 1),
                    "settings": rig.settings,
                    "extproc_fingerprint": rig.fingerprint,
                    "wanted_scrapes_per_s": rig.wanted_scrapes_per_s(),
                    "idle": idle,
                    "direct": runs["direct"],
                    "routed": runs["routed"],
                    "direct_rps": d_rps,
                    "routed_rps": r_rps,
                    "routed_rps_raw": median(runs["routed"], "rps"),
                    "ratio_routed_direct": round(r_rps / d_rps, 3) if d_rps and r_rps else None,
                }
            )
        except ServiceRejected as exc:
            notes.append(f"{n} backends: the service refused to start: {exc}")
        except Exception as exc:  # noqa: BLE001 - one failed pool size must not lose the others
            notes.append(f"{n} backends: failed: {str(exc).splitlines()[0]}")
            print(f"    FAILED: {exc}", flush=True)
        finally:
            notes += rig.notes
            rig.stop()
    return {"points": points, "notes": notes, "checks": checks, "connections": connections}


def part_workers(
    plan: Plan, client: Any, workers: list[int], pool: int, conns: list[int]
) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    notes: list[str] = []
    checks: list[str] = []
    for w in workers:
        if not plan.time_left():
            notes.append(f"--workers {w}: not measured, --max-minutes reached")
            continue
        print(f"(b) --workers {w}, {pool} backends ...", flush=True)
        rig = ScaleRig(
            pool,
            plan.log_dir / f"workers-{w}",
            plan.envoy_concurrency,
            plan.service_args,
            w,
            worker_ports=plan.worker_ports,
        )
        flag = f"--workers {w}"
        try:
            try:
                rig.start()
            except ServiceRejected as exc:
                if w != 1:
                    raise
                notes.append(
                    f"--workers 1 rejected ({exc}): measured without the flag (one process)"
                )
                flag = "no --workers flag"
                rig = ScaleRig(
                    pool,
                    plan.log_dir / "workers-1-noflag",
                    plan.envoy_concurrency,
                    plan.service_args,
                )
                rig.start()
            time.sleep(plan.settle)
            runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for rep in range(plan.repeats):
                for c in conns:
                    for key, listener in (("direct", "direct"), ("routed", "ingress")):
                        if not plan.time_left():
                            notes.append(
                                f"--workers {w}: c={c} {key} run {rep + 1} skipped, --max-minutes reached"
                            )
                            continue
                        plan.quiet(rig)
                        one = load_point(rig, client, listener, c, plan.duration, plan.warmup, None)
                        runs.setdefault((key, c), []).append(one)
                        checks += run_checks(f"workers {w}, c={c}, {key} run {rep + 1}", one)
                        print(
                            f"    {key:<6} c={c:<3}: {one['rps']:>8,.0f} req/s  p50 {one['p50_ms']:.3f} ms  "
                            f"p99 {one['p99_ms']:.3f} ms  service {one['service_cores_per_process']} cores",
                            flush=True,
                        )
            for c in conns:
                d, r = runs.get(("direct", c), []), runs.get(("routed", c), [])
                if not d or not r:
                    continue
                d_rps, r_rps = median(d, "rps"), median(r, "decided_rps")
                points.append(
                    {
                        "workers": w,
                        "flag": flag,
                        "connections": c,
                        "direct_rps": d_rps,
                        "routed_rps": r_rps,
                        "routed_rps_raw": median(r, "rps"),
                        "extproc_fingerprint": rig.fingerprint,
                        "ratio_routed_direct": round(r_rps / d_rps, 3) if d_rps and r_rps else None,
                        "added_p50_ms": added(r, d, "p50_ms"),
                        "added_p99_ms": added(r, d, "p99_ms"),
                        "direct": d,
                        "routed": r,
                    }
                )
        except ServiceRejected as exc:
            notes.append(f"--workers {w}: skipped, the service rejects it: {exc}")
            print(f"    skipped: {exc}", flush=True)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"--workers {w}: failed: {str(exc).splitlines()[0]}")
            print(f"    FAILED: {exc}", flush=True)
        finally:
            notes += rig.notes
            rig.stop()
    return {"points": points, "notes": notes, "checks": checks, "pool": pool, "connections": conns}


# ============================================================================ targets
def pool_targets(a: dict[str, Any]) -> dict[str, Any]:
    pts = {p["backends"]: p for p in a["points"]}
    if not pts:
        return {}
    big, small = pts.get(1000) or pts[max(pts)], pts.get(16) or pts[min(pts)]
    idle = big["idle"]
    out: dict[str, Any] = {"at_backends": big["backends"], "baseline_backends": small["backends"]}
    out["age_p90_s"] = idle["age_p90_s"]
    out["age_p90_met"] = bool(
        idle["age_p90_s"] is not None
        and idle["age_p90_s"] <= TARGET_AGE_P90_S
        and not idle["never_scraped"]
    )
    out["scrape_cores"] = idle["service_cores"]
    out["scrape_cores_met"] = idle["service_cores"] <= TARGET_SCRAPE_CORES
    rb, rs = big["ratio_routed_direct"], small["ratio_routed_direct"]
    out["throughput_keep"] = round(rb / rs, 3) if rb and rs else None
    out["throughput_keep_raw"] = (
        round(big["routed_rps"] / small["routed_rps"], 3)
        if big["routed_rps"] and small["routed_rps"]
        else None
    )
    out["throughput_met"] = bool(
        out["throughput_keep"] and out["throughput_keep"] >= TARGET_RPS_KEEP
    )
    cb, cs = median(big["routed"], "decision_cpu_us"), median(small["routed"], "decision_cpu_us")
    out["decision_cpu_us"] = (cs, cb)
    out["decision_keep"] = round(cs / cb, 3) if cb and cs else None
    return out


def worker_targets(b: dict[str, Any], cores: int) -> list[dict[str, Any]]:
    c_hi = max(b["connections"]) if b["points"] else None
    pts = [p for p in b["points"] if p["connections"] == c_hi]
    one = next((p for p in pts if p["workers"] == 1), None)
    out = []
    for p in pts:
        if one is None or p["workers"] == 1:
            continue
        busy = median(p["routed"], "box_busy_cores") or 0.0
        scaling = (
            p["routed_rps"] / (p["workers"] * one["routed_rps"]) if one["routed_rps"] else None
        )
        out.append(
            {
                "workers": p["workers"],
                "connections": c_hi,
                "scaling": round(scaling, 3) if scaling is not None else None,
                "met": bool(scaling is not None and scaling >= TARGET_WORKER_SCALING),
                # The target holds "while cores are free": a box this busy had none left.
                "box_busy_cores": busy,
                "cores_free": busy < 0.9 * cores,
            }
        )
    return out


# ============================================================================ report
def fmt_s(x: float | None) -> str:
    return "–" if x is None else (f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s")


def fmt_n(x: float | None, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


def met(flag: bool | None) -> str:
    return "–" if flag is None else ("**met**" if flag else "**NOT met**")


def build_markdown(data: dict[str, Any]) -> str:
    host = data["host"]
    lines = [
        "# Scale: pool size and worker processes",
        "",
        '`make bench-scale` (bench/bench_scale.py; how it measures: docs/benchmarks.md, "Scale"). '
        f"Cores available to the run: **{host['cores_available']}** of {host['cpu_count']} "
        f"(shared box). Envoy {host['envoy']}, Python {host['python']}, load client {host['client']}.",
    ]
    a, b = data.get("a"), data.get("b")
    lines += ["", "## Targets (issue 10)", ""]
    lines += ["| target | measured | |", "|---|---|---|"]
    if a and a.get("targets"):
        t = a["targets"]
        n = t["at_backends"]
        lines += [
            f"| metrics age p90 ≤ {TARGET_AGE_P90_S:g} s at 1,000 backends | {fmt_s(t['age_p90_s'])} at {n} | {met(t['age_p90_met'])} |",
            f"| scraping ≤ {TARGET_SCRAPE_CORES:g} core at 1,000 backends (service CPU, no requests) | {t['scrape_cores']:.2f} cores at {n} | {met(t['scrape_cores_met'])} |",
            f"| ext_proc throughput at 1,000 backends ≥ {TARGET_RPS_KEEP:g}x the 16-backend case (routed/direct, same run) | "
            f"{fmt_n(t['throughput_keep'], '.2f')}x at {n} vs {t['baseline_backends']} (raw req/s: {fmt_n(t['throughput_keep_raw'], '.2f')}x) | {met(t['throughput_met'])} |",
        ]
        if t.get("decision_keep"):
            cs, cb = t["decision_cpu_us"]
            lines.append(
                f"| (diagnostic) what one decision core routes at 1,000 backends vs 16: service CPU per routed request, scraping excluded | "
                f"{fmt_n(t['decision_keep'], '.2f')}x ({cb:.0f} vs {cs:.0f} µs) | {met(t['decision_keep'] >= TARGET_RPS_KEEP)} |"
            )
    else:
        lines.append("| pool-size targets | part (a) not measured | – |")
    if b and b.get("targets"):
        for t in b["targets"]:
            free = (
                ""
                if t["cores_free"]
                else f" (box busy {t['box_busy_cores']:.1f} cores: no core was free)"
            )
            lines.append(
                f"| {t['workers']} workers ≥ {TARGET_WORKER_SCALING:g} x {t['workers']} x one worker, c={t['connections']} | "
                f"{fmt_n(t['scaling'], '.2f')} x {t['workers']} x one worker{free} | {met(t['met'])} |"
            )
    else:
        lines.append(
            f"| workers ≥ {TARGET_WORKER_SCALING:g} x N x one worker | no multi-worker figures (see part (b)) | – |"
        )

    if a:
        lines += ["", "## (a) Pool size", "", measured_line(a), ""]
        lines += [
            "Fake vLLM servers: one Envoy, one listener per server (`direct_response`: the real 52 KB "
            "`/metrics` capture, a canned chat completion, `/v1/models`). The service scrapes every server "
            "(*wanted/s* = servers / the service's `--scrape-interval`, read from its `/settings`); the front "
            "Envoy (`envoy/envoy.yaml`) has every server in its `vllm` cluster, with its active health "
            "checks (2 per server per second, to the fake Envoy).",
            "",
            f"**No requests** ({a['config']['window_s']:g} s after {a['config']['settle_s']:g} s settle; ages "
            f"sampled every {a['config']['age_every_s']:g} s from `/backends`, all backends pooled; *age* = how old the "
            "values a decision reads at that moment are: the snapshot's age plus the time since it was built):",
            "",
            "| backends | service CPU (cores) | scrapes/s ok | wanted/s | service CPU µs/scrape | age p50 | age p90 | age max | fresh (≤ 1 s) | never scraped | loop lag mean | fake Envoy (cores) | front Envoy (cores) | other load (cores) | service settings (`/settings`) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for p in a["points"]:
            i = p["idle"]
            lines.append(
                f"| {p['backends']:,} | {i['service_cores']:.2f} | {i['scrapes_ok_per_s']:,.0f} | "
                f"{fmt_n(p.get('wanted_scrapes_per_s'))} | {fmt_n(i['service_cpu_us_per_scrape'])} | "
                f"{fmt_s(i['age_p50_s'])} | {fmt_s(i['age_p90_s'])} | {fmt_s(i['age_max_s'])} | "
                f"{fmt_pct(i['fresh_share'])} | {fmt_n(i['never_scraped'])} | "
                f"{fmt_n(i['loop_lag_mean_ms'], '.1f')} ms | {i['fake_envoy_cores']:.2f} | "
                f"{i['front_envoy_cores']:.2f} | {i['other_load_cores']:.1f} | "
                f"{', '.join(f'{k} {v}' for k, v in p.get('settings', {}).items()) or '–'} |"
            )
        c = a["connections"]
        lines += [
            "",
            f"**Under load** (wrk, {c} connections, {a['config']['duration_s']:g} s after "
            f"{a['config']['warmup_s']:g} s warm-up, {a['config']['repeats']} run(s), median; Envoy direct "
            "right before each routed run). *Routed req/s* counts only requests the service answered in time; "
            "*unrouted* are those Envoy sent on without its answer (`message_timeout`, fail-open), all runs:",
            "",
            "| backends | direct req/s | routed req/s | routed/direct | vs smallest pool | unrouted | routed p50 ms | routed p99 ms | decision µs | service CPU (cores) | of which scraping | CPU µs per routed request, scraping excluded | scrapes/s ok | age p90 | loop lag mean | other load (cores) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        base = a["points"][0]["ratio_routed_direct"] if a["points"] else None
        for p in a["points"]:
            rs = p["routed"]
            rel = p["ratio_routed_direct"] / base if base and p["ratio_routed_direct"] else None
            lines.append(
                f"| {p['backends']:,} | {fmt_n(p['direct_rps'])} | {fmt_n(p['routed_rps'])} | "
                f"{fmt_n(p['ratio_routed_direct'], '.2f')}x | {fmt_n(rel, '.2f')}x | "
                f"{sum(r['unrouted'] for r in rs):,} | {fmt_ms(median(rs, 'p50_ms'))} | {fmt_ms(median(rs, 'p99_ms'))} | "
                f"{fmt_n(median(rs, 'decision_us'), '.0f')} | {fmt_n(median(rs, 'service_cores'), '.2f')} | "
                f"{fmt_n(median(rs, 'scrape_cores'), '.2f')} | {fmt_n(median(rs, 'decision_cpu_us'), '.0f')} | "
                f"{fmt_n(median(rs, 'scrapes_ok_per_s'))} | {fmt_s(median(rs, 'age_p90_s'))} | "
                f"{fmt_n(median(rs, 'loop_lag_mean_ms'), '.1f')} ms | "
                f"{other_load(rs)} |"
            )
        lines += notes_block(a)
    if b:
        lines += ["", "## (b) Workers", "", measured_line(b), ""]
        lines += [
            f"Pool of {b['pool']} fake servers; wrk at {', '.join(map(str, b['connections']))} connection(s), "
            f"{b['config']['duration_s']:g} s after {b['config']['warmup_s']:g} s warm-up, "
            f"{b['config']['repeats']} run(s), median; Envoy direct measured right before each routed run. "
            f"Front Envoy `--concurrency {b['config']['envoy_concurrency']}` (one HTTP/2 connection per "
            "ext_proc host per Envoy worker thread); "
            + (
                "each worker has its own port too (`--worker-ports`), all in Envoy's `extproc` cluster: "
                "Envoy balances streams over the workers. "
                if b["config"].get("worker_ports")
                else "the workers share one port (SO_REUSEPORT spreads connections, not streams). "
            )
            + "Service CPU is per process of its process group, largest first.",
            "",
            "| workers | conns | direct req/s | routed req/s | routed/direct | unrouted | added p50 ms | added p99 ms | service CPU per process (cores) | box busy (cores) | other load (cores) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for p in b["points"]:
            rs = p["routed"]
            per = rs[len(rs) // 2]["service_cores_per_process"] if rs else []
            lines.append(
                f"| {p['workers']}{'' if p['flag'].startswith('--') else ' (' + p['flag'] + ')'} | {p['connections']} | "
                f"{fmt_n(p['direct_rps'])} | {fmt_n(p['routed_rps'])} | {fmt_n(p['ratio_routed_direct'], '.2f')}x | "
                f"{sum(r['unrouted'] for r in rs):,} | {fmt_ms(p['added_p50_ms'])} | {fmt_ms(p['added_p99_ms'])} | "
                f"{' + '.join(f'{c:.2f}' for c in per if c >= 0.005) or '0'} | "
                f"{fmt_n(median(rs, 'box_busy_cores'), '.1f')} | "
                f"{other_load(rs)} |"
            )
        lines += notes_block(b)
    lines += [
        "",
        "Every run, every process's CPU, the scrape results and Envoy's ext_proc counters are in `scale.json`.",
    ]
    return "\n".join(lines) + "\n"


def other_load(runs: list[dict[str, Any]]) -> str:
    return " / ".join(f"{r['other_load_cores']:.1f}" for r in runs) or "–"


def fmt_pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.0f} %"


def measured_line(part: dict[str, Any]) -> str:
    m = part["measured"]
    commit = m["commit"] or "unknown"
    dirty = m["extproc_dirty_files"]
    tree = (
        "extproc/ clean"
        if not dirty
        else f"{dirty} file(s) under extproc/ differ from it: "
        + ", ".join(f"`{line}`" for line in m.get("extproc_dirty", []))
    )
    return (
        f"Measured {m['date']} on commit `{commit}` ({tree}; extproc/*.py fingerprint "
        f"`{m.get('extproc_fingerprint')}`), {m['cores_available']} cores available, "
        f"wall {m['wall_s']:.0f} s: `{m['command']}`"
    )


def notes_block(part: dict[str, Any]) -> list[str]:
    out = []
    if part.get("notes"):
        out += ["", "Notes:", ""] + [f"- {n}" for n in part["notes"]]
    if part.get("checks"):
        out += ["", "**Warnings:**", ""] + [f"- {c}" for c in part["checks"]]
    return out


# ============================================================================ main
def int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return vals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Scale: service CPU, scrape rate and metrics age against pool size (a); "
        "routed req/s and added latency against --workers (b)."
    )
    ap.add_argument("--parts", default="a,b", help="which parts: a, b or a,b (default a,b)")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 16 backends, workers 1, seconds per window"
    )
    ap.add_argument(
        "--pools",
        type=int_list,
        default=None,
        help="pool sizes for (a) (default 16,128,512,1000; quick 16)",
    )
    ap.add_argument(
        "--workers",
        type=int_list,
        default=None,
        help="--workers values for (b) (default 1,2,4; quick 1)",
    )
    ap.add_argument("--workers-pool", type=int, default=16, help="backends in (b) (default 16)")
    ap.add_argument(
        "--connections",
        type=int_list,
        default=[1, 32],
        help="connections in (b) (default 1,32); (a) uses the largest",
    )
    ap.add_argument(
        "--window",
        type=float,
        default=None,
        help="seconds of the idle window in (a) (default 20, quick 3)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds after start before measuring (default 5, quick 1)",
    )
    ap.add_argument(
        "--duration", type=float, default=None, help="seconds per load run (default 10, quick 2)"
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up seconds per load run (default 2, quick 1)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="load runs per point, median reported (default 2, quick 1)",
    )
    ap.add_argument(
        "--age-every",
        type=float,
        default=1.0,
        help="seconds between two /backends samples (default 1)",
    )
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=30.0,
        help="start no new point after this many minutes (default 30)",
    )
    ap.add_argument(
        "--envoy-concurrency",
        type=int,
        default=1,
        help="worker threads of the front Envoy (default 1)",
    )
    ap.add_argument(
        "--service-arg",
        action="append",
        default=[],
        help="extra argument for extproc serve (repeatable)",
    )
    ap.add_argument("--client", choices=("auto", "wrk", "asyncio"), default="auto")
    ap.add_argument(
        "--no-install", action="store_true", help="do not apt-get install wrk if it is missing"
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="wait up to this long for other load to calm down before each window (default 10, quick 0)",
    )
    ap.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="'calm' = other processes use less than this many cores",
    )
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where scale.json/.md go (default bench/results)",
    )
    ap.add_argument("--keep-logs", action="store_true", help="keep the process logs (printed path)")
    ap.add_argument(
        "--worker-ports",
        action="store_true",
        help="(b): give each worker its own port too (the service's --worker-ports) and list them "
        "all in Envoy's ext_proc cluster, so Envoy balances streams over the workers",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rebuild scale.md from the scale.json in --out-dir",
    )
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"a", "b"}:
        ap.error(f"--parts {args.parts!r}: expected a, b or a,b")
    args.parts = parts
    q = args.quick
    args.pools = args.pools or ([16] if q else [16, 128, 512, 1000])
    args.workers = args.workers or ([1] if q else [1, 2, 4])
    args.window = args.window if args.window is not None else (3.0 if q else 20.0)
    args.settle = args.settle if args.settle is not None else (1.0 if q else 5.0)
    args.duration = args.duration or (2.0 if q else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if q else 2.0)
    args.repeats = args.repeats or (1 if q else 2)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if q else 10.0)
    return args


def make_client(args: argparse.Namespace, workdir: Path) -> tuple[Any, list[str]]:
    notes: list[str] = []
    wrk = None
    if args.client in ("auto", "wrk"):
        wrk, note = ensure_wrk(allow_install=not args.no_install)
        if note:
            notes.append(note)
        if wrk is None and args.client == "wrk":
            raise SystemExit(f"error: {note}")
    if wrk:
        return WrkClient(wrk, workdir), notes
    notes.append(
        "wrk unavailable: the Python asyncio client measured the load; it saturates long before Envoy, "
        "so req/s mostly measure the client"
    )
    return AsyncioClient(), notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_json = args.out_dir / f"{NAME}.json"
    if args.report_only:
        # Only the markdown changes; it keeps the footer of the run that measured the figures.
        saved = json.loads(out_json.read_text())
        out_md = out_json.with_suffix(".md")
        old = out_md.read_text().splitlines() if out_md.is_file() else []
        footer = next((ln for ln in reversed(old) if ln.startswith("_Measured")), "")
        write_atomic(out_md, build_markdown(saved) + (f"\n{footer}\n" if footer else ""))
        print(f"rebuilt {out_md} from {out_json}")
        return 0
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    client, client_notes = make_client(args, workdir)
    plan = Plan(
        settle=args.settle,
        window=args.window,
        duration=args.duration,
        warmup=args.warmup,
        repeats=args.repeats,
        age_every=args.age_every,
        quiet_wait=args.quiet_wait,
        quiet_cores=args.quiet_cores,
        envoy_concurrency=args.envoy_concurrency,
        worker_ports=args.worker_ports,
        service_args=args.service_arg,
        deadline=started + args.max_minutes * 60,
        log_dir=workdir / "logs",
    )
    cores = cores_available()
    command = " ".join(
        ["python", "bench/bench_scale.py", *(sys.argv[1:] if argv is None else argv)]
    )
    config = {
        "settle_s": plan.settle,
        "window_s": plan.window,
        "duration_s": plan.duration,
        "warmup_s": plan.warmup,
        "repeats": plan.repeats,
        "age_every_s": plan.age_every,
        "envoy_concurrency": plan.envoy_concurrency,
        "worker_ports": plan.worker_ports,
        "service_args": plan.service_args,
        "max_minutes": args.max_minutes,
        "quick": args.quick,
    }

    def measured(t0: float) -> dict[str, Any]:
        return {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            **tree_state(),
            "cores_available": cores,
            "loadavg": loadavg(),
            "command": command,
            "wall_s": round(time.monotonic() - t0, 1),
        }

    try:
        previous = json.loads(out_json.read_text()) if out_json.is_file() else {}
    except (OSError, ValueError):
        previous = {}
    data: dict[str, Any] = {
        "bench": NAME,
        "host": {
            "cores_available": cores,
            "cpu_count": os.cpu_count(),
            "envoy": envoy_version(),
            "python": sys.version.split()[0],
            "client": client.version,
        },
        "a": previous.get("a"),
        "b": previous.get("b"),
    }
    try:
        if "a" in args.parts:
            t0 = time.monotonic()
            c_hi = max(args.connections)
            a = part_pools(plan, client, args.pools, c_hi)
            a["notes"] = client_notes + a["notes"]
            a["config"] = {**config, "pools": args.pools}
            a["targets"] = pool_targets(a)
            prints = {p["extproc_fingerprint"] for p in a["points"]}
            if len(prints) > 1:
                a["checks"].append(
                    f"extproc/ changed during the run: the pool sizes ran on {len(prints)} different "
                    "trees (extproc_fingerprint per point in scale.json)"
                )
            a["measured"] = measured(t0)
            data["a"] = a
        if "b" in args.parts:
            t0 = time.monotonic()
            b = part_workers(plan, client, args.workers, args.workers_pool, args.connections)
            b["notes"] = client_notes + b["notes"]
            b["config"] = {**config, "workers": args.workers}
            b["targets"] = worker_targets(b, cores)
            b["measured"] = measured(t0)
            data["b"] = b
    finally:
        if args.keep_logs:
            print(f"logs kept in {plan.log_dir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    md = build_markdown(data)
    write_results(NAME, data, md, results_dir=args.out_dir)
    print()
    print(md)
    print(f"results: {out_json}, {out_json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
