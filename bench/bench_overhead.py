"""Routing overhead: the same Envoy, direct to a backend vs. through the ext_proc service.

Run: ``make bench-overhead`` (or ``python bench/bench_overhead.py [--quick]``). Writes
bench/results/overhead.{json,md} (and overhead-profile.svg unless ``--no-profile``).

Everything runs on loopback, as real processes:

* a SEPARATE Envoy plays two fake vLLM servers (``direct_response`` only, see
  bench/overhead_backend.py): a canned chat completion, and ``/metrics`` = a real vLLM capture so
  the service's scraper parses real data every 100 ms. The backend costs microseconds, so the
  numbers measure routing, not inference;
* our service (``python -m extproc serve``, the service default strategy, weighted) with both backends;
* a BARE grpc.aio ext_proc processor (answers every request with one pre-serialized header
  mutation, nothing else) as the same-invocation floor of any grpc.aio service;
* ONE front Envoy rendered from envoy/envoy.yaml (devstack.render_local_config) with three
  listeners that differ only in the ext_proc filter: ``ingress`` (our service),
  ``ingress_direct`` (no ext_proc, straight to backend 0) and ``ingress_bare`` (bare processor).

Load: wrk (closed loop, keep-alive, POST /v1/chat/completions with a small JSON body) at 1 and
32 connections; every point gets a short warm-up, then a fixed duration, and is repeated
(``--repeats``, median reported), contenders interleaved so drift on the shared box spreads
evenly. If wrk is missing the bench installs it (``apt-get install -y wrk``, root only) and
otherwise falls back to a Python asyncio client, saying so in the results (that client is far
slower than Envoy, so its absolute numbers mostly measure itself).

Each point also records the CPU time every process used (from /proc), Envoy's ext_proc counters
(so a run where the service timed out and Envoy fell back - failure_mode_allow - cannot pass
for a fast one) and how the requests spread over the two backends. Finally py-spy profiles the
service under 32 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from common import write_results
from overhead_backend import metrics_fixture, render_fake_vllm_config

from devstack.envoy_config import render_local_config_dict
from devstack.processes import (
    PortInUseError,
    Proc,
    free_port,
    http_get,
    poll_until,
    port_is_open,
    start_envoy,
    start_extproc,
)

RESULTS = HERE / "results"
REQUEST_BODY = '{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
PATH = "/v1/chat/completions"
HEADERS_ONLY_PATH = "/v1/embeddings"  # envoy.yaml route 3: ext_proc sees the headers only

# Project targets (issue): what the service may add, measured against Envoy-direct on the same box.
TARGET_ADDED_P50_MS_C1 = 0.25
TARGET_RPS_RATIO = 0.30


# ============================================================================ load generators
def ensure_wrk(allow_install: bool) -> tuple[str | None, str]:
    """Path of wrk (installing the Debian package if missing and we are root), and a note."""
    found = shutil.which("wrk")
    if found:
        return found, ""
    if not allow_install:
        return None, "wrk not found and --no-install given"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "wrk not found and cannot apt-get install it (not root or no apt-get)"
    print("wrk not found: apt-get install -y wrk ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        cmd = ["apt-get", "install", "-y", "-qq", "wrk"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
        if r.returncode != 0:  # package lists may be missing on a fresh machine
            subprocess.run(
                ["apt-get", "update", "-qq"], capture_output=True, timeout=300, env=env, check=False
            )
            r = subprocess.run(
                cmd, capture_output=True, text=True, timeout=300, env=env, check=False
            )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"apt-get install wrk failed: {exc}"
    found = shutil.which("wrk")
    if found:
        return found, "wrk was installed by this run (apt-get install -y wrk)"
    return None, f"apt-get install wrk failed: {r.stderr.strip()[-300:]}"


WRK_LUA = r"""
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
%(extra_headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%%d,"duration_us":%%d,"errors_connect":%%d,"errors_read":%%d,' ..
    '"errors_write":%%d,"errors_status":%%d,"errors_timeout":%%d,"p50_us":%%.1f,"p90_us":%%.1f,' ..
    '"p99_us":%%.1f,"p999_us":%%.1f,"mean_us":%%.1f,"max_us":%%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max))
end
"""

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk_text(out: str) -> dict[str, float]:
    """Fallback parser for wrk's ``--latency`` text (used only if the Lua summary is missing)."""
    res: dict[str, float] = {}
    for pct, val, unit in re.findall(
        r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE
    ):
        res[f"p{pct}_ms"] = float(val) * _UNIT_MS[unit]
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non_2xx"] = float(m.group(1)) if m else 0.0
    return res


@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors + timeouts
    non_2xx: int
    duration_s: float


class WrkClient:
    name = "wrk"

    def __init__(self, path: str, workdir: Path) -> None:
        self.path = path
        self.workdir = workdir
        self._scripts: dict[tuple[tuple[str, str], ...], Path] = {}
        v = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10, check=False)
        self.version = (
            (v.stdout + v.stderr).strip().splitlines()[0]
            if (v.stdout + v.stderr).strip()
            else "wrk"
        )

    def _script(self, headers: dict[str, str]) -> Path:
        # The path comes from the URL on wrk's command line; the script sets method, body, headers.
        key = tuple(sorted(headers.items()))
        if key not in self._scripts:
            extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in key)
            p = self.workdir / f"wrk-{len(self._scripts)}.lua"
            p.write_text(WRK_LUA % {"body": REQUEST_BODY, "extra_headers": extra}, encoding="utf-8")
            self._scripts[key] = p
        return self._scripts[key]

    def run(
        self, url: str, connections: int, duration: float, headers: dict[str, str]
    ) -> LoadResult:
        threads = 1 if connections < 4 else 2 if (os.cpu_count() or 1) >= 2 else 1
        argv = [
            self.path,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "2s",
            "--latency",
            "-s",
            str(self._script(headers)),
            url,
        ]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"wrk failed ({r.returncode}): {r.stderr.strip()[-500:]}")
        m = re.search(r"^BENCHJSON (\{.*\})$", r.stdout, re.MULTILINE)
        if m is None:  # Lua summary missing: parse the --latency text
            t = parse_wrk_text(r.stdout)
            return LoadResult(
                t.get("rps", 0.0),
                t.get("p50_ms", float("nan")),
                t.get("p90_ms", float("nan")),
                t.get("p99_ms", float("nan")),
                int(t.get("requests", 0)),
                0,
                int(t["non_2xx"]),
                duration,
            )
        s = json.loads(m.group(1))
        dur = s["duration_us"] / 1e6
        return LoadResult(
            rps=s["requests"] / dur if dur else 0.0,
            p50_ms=s["p50_us"] / 1000,
            p90_ms=s["p90_us"] / 1000,
            p99_ms=s["p99_us"] / 1000,
            requests=int(s["requests"]),
            errors=int(
                s["errors_connect"] + s["errors_read"] + s["errors_write"] + s["errors_timeout"]
            ),
            non_2xx=int(s["errors_status"]),
            duration_s=dur,
        )


class AsyncioClient:
    """Fallback closed-loop HTTP/1.1 keep-alive client (one asyncio task per connection)."""

    name = "asyncio"
    version = "python asyncio fallback client (much slower than wrk: absolute numbers measure the client too)"

    def run(
        self, url: str, connections: int, duration: float, headers: dict[str, str]
    ) -> LoadResult:
        return asyncio.run(self._run(url, connections, duration, headers))

    async def _run(
        self, url: str, connections: int, duration: float, headers: dict[str, str]
    ) -> LoadResult:
        m = re.match(r"http://([^:/]+):(\d+)(/\S*)?$", url)
        assert m, url
        host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
        body = REQUEST_BODY.encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        req = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n{head}"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        lat: list[float] = []
        counts = {"err": 0, "non2xx": 0}
        deadline = time.perf_counter() + duration

        async def conn() -> None:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
            except (TimeoutError, OSError):
                counts["err"] += 1
                return
            try:
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    writer.write(req)
                    status_line = await asyncio.wait_for(reader.readline(), 2)
                    length = 0
                    while True:
                        line = await reader.readline()
                        if line in (b"\r\n", b""):
                            break
                        if line[:15].lower() == b"content-length:":
                            length = int(line[15:])
                    if length:
                        await reader.readexactly(length)
                    lat.append(time.perf_counter() - t0)
                    if not status_line.split(b" ", 2)[1].startswith(b"2"):
                        counts["non2xx"] += 1
            except (TimeoutError, OSError, asyncio.IncompleteReadError, IndexError):
                counts["err"] += 1
            finally:
                writer.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(conn() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
        lat.sort()

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000 if lat else float("nan")

        return LoadResult(
            len(lat) / elapsed,
            pct(50),
            pct(90),
            pct(99),
            len(lat),
            counts["err"],
            counts["non2xx"],
            elapsed,
        )


# ============================================================================ process stats
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its reaped children... plus all its threads (from /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def envoy_stats(admin_port: int) -> dict[str, float]:
    status, text = http_get(f"http://127.0.0.1:{admin_port}/stats?usedonly", timeout=3.0)
    out: dict[str, float] = {}
    if status != 200:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name] = float(value)
    return out


def host_rq_totals(admin_port: int) -> dict[str, float]:
    """cluster::host -> rq_total from Envoy's /clusters page."""
    status, text = http_get(f"http://127.0.0.1:{admin_port}/clusters", timeout=3.0)
    out: dict[str, float] = {}
    if status == 200:
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[2] == "rq_total":
                out[f"{parts[0]}::{parts[1]}"] = float(parts[3])
    return out


def service_decision_stats(admin_port: int) -> tuple[float, float]:
    """(sum, count) of extproc_decision_seconds from the service's admin /metrics."""
    status, text = http_get(f"http://127.0.0.1:{admin_port}/metrics", timeout=3.0)
    s = c = 0.0
    if status == 200:
        for line in text.splitlines():
            if line.startswith("extproc_decision_seconds_sum"):
                s = float(line.split()[-1])
            elif line.startswith("extproc_decision_seconds_count"):
                c = float(line.split()[-1])
    return s, c


def system_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine so far (all cores, from /proc/stat)."""
    try:
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return float("nan")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / _CLK_TCK


def children_cpu_seconds() -> float:
    """CPU of our reaped children (wrk, py-spy): they are gone before /proc can be read."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class ForeignLoad:
    """CPU used by processes that are NOT part of this benchmark (other engineers' tests)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def sample(self) -> float:
        ours = sum(cpu_seconds(p) for p in self.pids) + children_cpu_seconds() + self_cpu_seconds()
        return system_busy_seconds() - ours

    def cores_over(self, seconds: float) -> float:
        a, t = self.sample(), time.monotonic()
        time.sleep(seconds)
        return max(0.0, (self.sample() - a) / (time.monotonic() - t))


def wait_for_quiet(meter: ForeignLoad, max_cores: float, max_wait: float) -> float:
    """Wait (bounded) until other processes use less than ``max_cores``; returns the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        load = meter.cores_over(0.5)
        if load <= max_cores or time.monotonic() >= deadline:
            return load
        time.sleep(0.5)


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# ============================================================================ the rig
@dataclass
class Contender:
    key: str
    label: str
    listener: str  # key into Rig.ports
    headers: dict[str, str] = field(default_factory=dict)
    path: str = PATH
    stat_prefix: str = ""
    processor: str = ""  # key into Rig.procs whose CPU is "the processor"


CONTENDERS = [
    Contender("direct", "Envoy direct (no ext_proc)", "direct", stat_prefix="ingress_direct"),
    Contender(
        "service",
        "our service (default: weighted)",
        "ingress",
        stat_prefix="ingress_http",
        processor="service",
    ),
    Contender(
        "service_random",
        "our service (random)",
        "ingress",
        {"x-routing-strategy": "random"},
        stat_prefix="ingress_http",
        processor="service",
    ),
    Contender(
        "bare",
        "bare grpc.aio processor",
        "bare_listener",
        stat_prefix="ingress_bare",
        processor="bare",
    ),
    # envoy.yaml sends the body of /v1/(chat/)completions to the service (2 messages per request);
    # every other path is routed on the headers alone (1 message): this shows what the body costs.
    Contender(
        "service_headers",
        f"our service, headers-only route ({HEADERS_ONLY_PATH})",
        "ingress",
        stat_prefix="ingress_http",
        processor="service",
        path=HEADERS_ONLY_PATH,
    ),
    # The same routes with the body in FULL_DUPLEX_STREAMED mode, as Istio, kgateway and the GIE
    # reference config send it: the service collects the chunks, answers the headers, then streams
    # the body back (docs/endpoint-picker.md). Shows what the gateways' body mode costs vs BUFFERED.
    Contender(
        "service_duplex",
        "our service, FULL_DUPLEX_STREAMED body",
        "duplex_listener",
        stat_prefix="ingress_duplex",
        processor="service",
    ),
]


def _duplex_listener(ingress: dict[str, Any], port: int) -> dict[str, Any]:
    """A copy of ``ingress`` whose body routes send the body FULL_DUPLEX_STREAMED."""
    duplex = copy.deepcopy(ingress)
    duplex["name"] = "ingress_duplex"
    duplex["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    for chain in duplex["filter_chains"]:
        for f in chain["filters"]:
            if f["name"] != "envoy.filters.network.http_connection_manager":
                continue
            hcm = f["typed_config"]
            hcm["stat_prefix"] = "ingress_duplex"
            for vhost in hcm["route_config"]["virtual_hosts"]:
                for route in vhost["routes"]:
                    per = route.get("typed_per_filter_config", {}).get(
                        "envoy.filters.http.ext_proc", {}
                    )
                    mode = per.get("overrides", {}).get("processing_mode")
                    if mode and mode.get("request_body_mode") == "BUFFERED":
                        # Envoy requires trailers SEND with a duplex body.
                        mode.update(
                            request_body_mode="FULL_DUPLEX_STREAMED", request_trailer_mode="SEND"
                        )
    return duplex


def front_envoy_config(ports: dict[str, int]) -> str:
    """envoy/envoy.yaml rendered for loopback, plus a third listener that uses the bare processor."""
    backends = [("127.0.0.1", ports["backend0"]), ("127.0.0.1", ports["backend1"])]
    cfg = render_local_config_dict(
        listener_port=ports["ingress"],
        admin_port=ports["envoy_admin"],
        extproc_address=("127.0.0.1", ports["grpc"]),
        backends=backends,
        direct_listener_port=ports["direct"],
    )
    res = cfg["static_resources"]
    ingress = next(lst for lst in res["listeners"] if lst["name"] == "ingress")
    bare = copy.deepcopy(ingress)
    bare["name"] = "ingress_bare"
    bare["address"] = {
        "socket_address": {"address": "127.0.0.1", "port_value": ports["bare_listener"]}
    }
    for chain in bare["filter_chains"]:
        for f in chain["filters"]:
            if f["name"] == "envoy.filters.network.http_connection_manager":
                hcm = f["typed_config"]
                hcm["stat_prefix"] = "ingress_bare"
                for hf in hcm["http_filters"]:
                    if hf["name"] == "envoy.filters.http.ext_proc":
                        hf["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = (
                            "extproc_bare"
                        )
    res["listeners"].append(bare)
    res["listeners"].append(_duplex_listener(ingress, ports["duplex_listener"]))
    ext = next(c for c in res["clusters"] if c["name"] == "extproc")
    ext_bare = copy.deepcopy(ext)
    ext_bare["name"] = "extproc_bare"
    ext_bare["load_assignment"] = {
        "cluster_name": "extproc_bare",
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {
                                "socket_address": {
                                    "address": "127.0.0.1",
                                    "port_value": ports["bare_grpc"],
                                }
                            }
                        }
                    }
                ]
            }
        ],
    }
    res["clusters"].append(ext_bare)
    return (
        "# GENERATED by bench/bench_overhead.py (envoy/envoy.yaml + a bare-processor listener)\n"
        + yaml.safe_dump(cfg, sort_keys=False, width=10_000)
    )


class Rig:
    """Backend Envoy + service + bare processor + front Envoy, all on loopback."""

    def __init__(self, log_dir: Path, envoy_concurrency: int, service_args: list[str]) -> None:
        self.log_dir = log_dir
        self.envoy_concurrency = envoy_concurrency
        self.service_args = service_args
        self.procs: dict[str, Proc] = {}
        self.ports: dict[str, int] = {}

    def url(self, listener: str, path: str = PATH) -> str:
        return f"http://127.0.0.1:{self.ports[listener]}{path}"

    def start(self, attempts: int = 3) -> Rig:
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return self
            except PortInUseError:
                self.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                self.stop()
                raise
        return self

    def _pick_ports(self) -> None:
        names = [
            "backend0",
            "backend1",
            "backend_admin",
            "grpc",
            "service_admin",
            "bare_grpc",
            "ingress",
            "direct",
            "bare_listener",
            "duplex_listener",
            "envoy_admin",
        ]
        self.ports = {n: free_port() for n in names}  # free_port never repeats itself

    def _start_once(self) -> None:
        self._pick_ports()
        p = self.ports
        backend_cfg = render_fake_vllm_config(
            [p["backend0"], p["backend1"]], p["backend_admin"], metrics_fixture()
        )
        self.procs["backend"] = start_envoy(
            yaml.safe_dump(backend_cfg, sort_keys=False, width=10_000),
            log_dir=self.log_dir,
            admin_port=p["backend_admin"],
            name="fake-vllm-envoy",
            concurrency=self.envoy_concurrency,
        )
        bare = Proc(
            "bare-processor",
            [
                sys.executable,
                str(HERE / "overhead_backend.py"),
                "bare-processor",
                "--port",
                str(p["bare_grpc"]),
                "--endpoint",
                f"127.0.0.1:{p['backend0']}",
            ],
            log_dir=self.log_dir,
            env={"PYTHONPATH": str(ROOT)},
        )
        bare.ready_check = lambda: port_is_open(p["bare_grpc"])
        bare.ready_what = f"bare processor on :{p['bare_grpc']}"
        self.procs["bare"] = bare
        self.procs["service"] = start_extproc(
            grpc_port=p["grpc"],
            admin_port=p["service_admin"],
            backends=[f"http://127.0.0.1:{p['backend0']}", f"http://127.0.0.1:{p['backend1']}"],
            args=["--log-level", "warning", *self.service_args],
            log_dir=self.log_dir,
        )
        bare.wait_ready(30)
        self.procs["envoy"] = start_envoy(
            front_envoy_config(p),
            log_dir=self.log_dir,
            admin_port=p["envoy_admin"],
            name="front-envoy",
            concurrency=self.envoy_concurrency,
        )
        self._wait_routable()

    def _wait_routable(self) -> None:
        """Both backends scraped (fresh metrics), both ext_proc clusters healthy, each path answers."""

        def fresh() -> bool:
            status, body = http_get(f"http://127.0.0.1:{self.ports['service_admin']}/backends")
            data = json.loads(body)
            return (
                status == 200
                and not data["cold"]
                and all(b["freshness"] == "fresh" for b in data["backends"])
            )

        poll_until(
            fresh,
            timeout=20,
            what="service to have fresh metrics of both backends",
            proc=self.procs["service"],
        )

        def healthy() -> bool:
            status, text = http_get(f"http://127.0.0.1:{self.ports['envoy_admin']}/clusters")
            lines = [
                ln
                for ln in text.splitlines()
                if "::health_flags::" in ln and ln.startswith(("extproc::", "extproc_bare::"))
            ]
            return (
                status == 200 and len(lines) == 2 and all(ln.endswith("::healthy") for ln in lines)
            )

        poll_until(healthy, timeout=20, what="Envoy to see both ext_proc clusters healthy")
        for c in CONTENDERS:
            status, headers = post_once(self.url(c.listener, c.path), c.headers)
            if status != 200:
                raise RuntimeError(f"sanity request through {c.key} answered {status}")
            if c.key.startswith("service") and "x-routed-endpoint" not in headers:
                raise RuntimeError(
                    f"{c.key}: no x-routed-endpoint header, the service did not route: {headers}"
                )

    def stop(self) -> None:
        for name in ("envoy", "service", "bare", "backend"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.stop()


def post_once(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url,
        data=REQUEST_BODY.encode(),
        method="POST",
        headers={"content-type": "application/json", **headers},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=3) as resp:
            resp.read()
            return int(resp.status), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return int(exc.code), {}


# ============================================================================ measuring
def measure_point(
    rig: Rig, client: Any, c: Contender, connections: int, duration: float, warmup: float
) -> dict[str, Any]:
    url = rig.url(c.listener, c.path)
    if warmup > 0:
        client.run(url, connections, warmup, c.headers)
    pids = {name: proc.pid for name, proc in rig.procs.items()}
    cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
    st0, hosts0 = envoy_stats(rig.ports["envoy_admin"]), host_rq_totals(rig.ports["envoy_admin"])
    dec0 = (
        service_decision_stats(rig.ports["service_admin"])
        if c.processor == "service"
        else (0.0, 0.0)
    )
    meter = ForeignLoad(list(pids.values()))
    f0, t0 = meter.sample(), time.monotonic()
    res = client.run(url, connections, duration, c.headers)
    foreign = max(0.0, (meter.sample() - f0) / (time.monotonic() - t0))
    cpu1 = {n: cpu_seconds(pid) for n, pid in pids.items()}
    st1, hosts1 = envoy_stats(rig.ports["envoy_admin"]), host_rq_totals(rig.ports["envoy_admin"])
    dec1 = (
        service_decision_stats(rig.ports["service_admin"])
        if c.processor == "service"
        else (0.0, 0.0)
    )
    n = max(1, res.requests)
    ext = {}
    if c.processor:
        pre = f"http.{c.stat_prefix}.ext_proc."
        for k in (
            "streams_started",
            "failure_mode_allowed",
            "message_timeouts",
            "stream_msgs_received",
            "spurious_msgs_received",
            "streams_failed",
        ):
            ext[k] = int(st1.get(pre + k, 0) - st0.get(pre + k, 0))
    spread = {
        h.split("::")[1]: int(hosts1.get(h, 0) - hosts0.get(h, 0))
        for h in hosts1
        if h.startswith(("vllm::", "vllm_direct::")) and hosts1.get(h, 0) - hosts0.get(h, 0) > 0
    }
    return {
        "rps": res.rps,
        "p50_ms": res.p50_ms,
        "p90_ms": res.p90_ms,
        "p99_ms": res.p99_ms,
        "requests": res.requests,
        "errors": res.errors,
        "non_2xx": res.non_2xx,
        "duration_s": res.duration_s,
        # CPU time per request (microseconds) of every process, over the measured window.
        "cpu_us_per_req": {k: round((cpu1[k] - cpu0[k]) / n * 1e6, 1) for k in pids},
        "cpu_cores": {k: round((cpu1[k] - cpu0[k]) / max(res.duration_s, 1e-9), 2) for k in pids},
        "ext_proc": ext,
        "backend_spread": spread,
        # Cores busy with processes that are not part of this bench while the point ran (noise).
        "foreign_cores": round(foreign, 2),
        "decision_us": round((dec1[0] - dec0[0]) / (dec1[1] - dec0[1]) * 1e6, 1)
        if dec1[1] > dec0[1]
        else None,
    }


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in runs if not math.isnan(r[key])]
    return statistics.median(vals) if vals else float("nan")


# ============================================================================ profiling
def find_pyspy() -> tuple[str | None, str]:
    """py-spy from the venv or PATH; pip-installs it into this interpreter's environment if missing."""
    cand = [shutil.which("py-spy"), str(Path(sys.executable).parent / "py-spy")]
    for c in cand:
        if c and Path(c).exists():
            return c, ""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "py-spy"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    c = str(Path(sys.executable).parent / "py-spy")
    if Path(c).exists():
        return c, "py-spy was installed by this run (pip install py-spy)"
    return None, f"py-spy not available: {r.stderr.strip()[-300:]}"


def profile_service(
    rig: Rig, client: Any, duration: float, out_svg: Path, workdir: Path
) -> dict[str, Any]:
    """py-spy the service under 32 connections.

    Three passes, each under its own load run: Python stacks (non-blocking, barely perturbs the
    service) for the table, native stacks (py-spy pauses the process per sample, so the service
    runs slower meanwhile) to see where the C time of grpc goes, and the SVG flame graph
    (Python stacks).
    """
    pyspy, note = find_pyspy()
    if pyspy is None:
        return {"error": note}
    pid = rig.procs["service"].pid
    d = max(2, round(duration))
    c = next(x for x in CONTENDERS if x.key == "service")
    out: dict[str, Any] = {"pid": pid, "duration_s": d, "rate_hz": 100, "connections": 32}
    if note:
        out["note"] = note

    def one_pass(fmt: str, target: Path, native: bool) -> tuple[str | None, float]:
        argv = [
            pyspy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(d),
            "--rate",
            "100",
            "--format",
            fmt,
            "--output",
            str(target),
        ]
        argv += ["--native"] if native else ["--nonblocking"]
        spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.3)  # let py-spy attach before the load starts
            res = client.run(rig.url(c.listener, c.path), 32, d + 1, c.headers)
            _, err = spy.communicate(timeout=d + 30)
            if spy.returncode != 0 or not target.exists():
                return f"py-spy failed: {err.strip()[-500:]}", res.rps
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        return None, res.rps

    raw_py, raw_native = workdir / "profile-python.txt", workdir / "profile-native.txt"
    err, rps = one_pass("raw", raw_py, native=False)
    if err:
        return {**out, "error": err}
    out["rps_while_profiling"] = round(rps)
    out["python"] = summarize_stacks(raw_py.read_text())
    err, rps = one_pass("raw", raw_native, native=True)
    if err:
        out["native"] = {"error": err}
    else:
        out["native"] = {
            **summarize_stacks(raw_native.read_text()),
            "rps_while_profiling": round(rps),
        }
    err, _ = one_pass("flamegraph", out_svg, native=False)
    if err:
        out["svg_error"] = err
    else:
        out["svg"] = (
            str(out_svg.relative_to(ROOT)) if out_svg.is_relative_to(ROOT) else str(out_svg)
        )
    return out


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    for marker in (
        "site-packages/",
        "/lib/python3.11/",
        "/lib/python3.12/",
        "/lib/python3.13/",
        str(ROOT) + "/",
    ):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    fn = m.group("fn")
    if fn.startswith("0x"):  # unsymbolized native frame: keep only the library
        fn = "<native>"
    return f"{fn} ({f})"


# Where a sample's time goes, judged from its whole stack (first match wins).
_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    (
        "our decision code (Processor.handle: headers, strategy, in-flight, metrics)",
        ("Processor.handle",),
    ),
    (
        "/metrics scraping (GET + parse, snapshot rebuild)",
        (
            "extproc/scraper.py",
            "extproc/scrape_client.py",
            "metrics_parser",
            "aiohttp/",
            "BackendRegistry.rebuild",
        ),
    ),
    (
        "ext_proc stream handler minus decision (grpc.aio read/write/EOF)",
        ("ExtProcHandler.process",),
    ),
    (
        "grpc poller thread (C core: HTTP/2, completion queue, wake-ups)",
        ("Thread.run", "thread_run"),
    ),
    ("asyncio event loop machinery (select, callbacks, task steps)", ("asyncio/",)),
]


def _category(frames: list[str]) -> str:
    joined = ";".join(frames)
    for name, needles in _CATEGORIES:
        if any(n in joined for n in needles):
            return name
    return "other"


_IDLE_LEAVES = ("epoll_wait ", "EpollSelector.select ", "poll ", "select ")


def summarize_stacks(text: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive share of samples per function, and per category, from py-spy raw output."""
    self_c: collections.Counter[str] = collections.Counter()
    incl_c: collections.Counter[str] = collections.Counter()
    cat_c: collections.Counter[str] = collections.Counter()
    total = 0
    idle = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if frames[-1].startswith(_IDLE_LEAVES):  # a thread waiting for work, not spending CPU
            idle += n
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
        cat_c[_category(frames)] += n
    pct = lambda c: round(100.0 * c / total, 1) if total else 0.0
    return {
        "samples": total,
        # Samples of threads blocked in epoll/select (waiting, not working); the %s exclude them.
        "idle_samples_excluded": idle,
        "categories": [{"category": k, "pct": pct(v)} for k, v in cat_c.most_common()],
        "top_self": [{"function": f, "pct": pct(c)} for f, c in self_c.most_common(top)],
        "top_inclusive": [{"function": f, "pct": pct(c)} for f, c in incl_c.most_common(top + 10)],
    }


# ============================================================================ report
def fmt_ms(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.3f}"


def build_markdown(data: dict[str, Any]) -> str:
    cfg = data["config"]
    lines = [
        "# Routing overhead: Envoy direct vs. through the ext_proc service",
        "",
        (
            f"`make bench-overhead` on {data['date']}, {data['host']['cpus']} CPUs (shared; load average before "
            f"{data['host']['loadavg_before']}, after {data['host']['loadavg_after']}). Client: {data['client']}. "
            f"{cfg['duration_s']} s per point after {cfg['warmup_s']} s warm-up, {cfg['repeats']} run(s) per point "
            f"(median shown), contenders interleaved. Envoy: one front Envoy (`--concurrency {cfg['envoy_concurrency']}`) "
            "rendered from `envoy/envoy.yaml`; backends: a separate Envoy answering canned responses and the real vLLM "
            "`/metrics` capture. All on loopback."
        ),
    ]
    if data.get("notes"):
        lines += [""] + [f"> **Note:** {n}" for n in data["notes"]]
    lines += [
        "",
        "| contender | conns | req/s | p50 ms | p99 ms | req/s vs direct | added p50 ms | added p99 ms | processor CPU µs/req | Envoy CPU µs/req | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in data["points"]:
        ratio = "1.00x" if p["contender"] == "direct" else f"{p['ratio_rps']:.2f}x"
        proc_cpu = (
            statistics.median(r["cpu_us_per_req"][p["processor"]] for r in p["runs"])
            if p["processor"]
            else None
        )
        env_cpu = statistics.median(r["cpu_us_per_req"]["envoy"] for r in p["runs"])
        noise = " / ".join(f"{r['foreign_cores']:.1f}" for r in p["runs"])
        lines.append(
            f"| {p['label']} | {p['connections']} | {p['rps']:,.0f} | {fmt_ms(p['p50_ms'])} | {fmt_ms(p['p99_ms'])} | "
            f"{ratio} | {'–' if p['contender'] == 'direct' else fmt_ms(p['added_p50_ms'])} | "
            f"{'–' if p['contender'] == 'direct' else fmt_ms(p['added_p99_ms'])} | "
            f"{'–' if proc_cpu is None else f'{proc_cpu:.0f}'} | {env_cpu:.0f} | "
            f"{noise} |"
        )
    t = data["targets"]
    lines += [
        "",
        "Targets (our service, default strategy):",
        "",
        (
            f"- added p50 at 1 connection ≤ {TARGET_ADDED_P50_MS_C1} ms: measured **{fmt_ms(t['added_p50_ms_c1'])} ms** "
            f"→ {'met' if t['added_p50_met'] else 'NOT met'} (bare grpc.aio floor: {fmt_ms(t['bare_added_p50_ms_c1'])} ms)"
        ),
        (
            f"- routed throughput ≥ {TARGET_RPS_RATIO}x direct: measured **{t['rps_ratio_c32']:.3f}x** at 32 connections "
            f"→ {'met' if t['rps_ratio_met'] else 'NOT met'} (bare grpc.aio floor: {t['bare_rps_ratio_c32']:.3f}x)"
        ),
        "",
        "CPU per request at 32 connections (median of runs; CPU time from /proc over the measured window): "
        + ", ".join(f"{k} {v:.0f} µs" for k, v in t["cpu_us_per_req_c32"].items())
        + ". A single-threaded processor cannot exceed 1 s / its CPU per request on one core "
        + "(service: "
        + (
            f"{1e6 / t['cpu_us_per_req_c32']['service']:,.0f}"
            if t["cpu_us_per_req_c32"].get("service")
            else "–"
        )
        + " req/s), and on this 2-core box it shares the cores with both Envoys and wrk.",
        "",
        (
            "Per-run values, CPU per process, Envoy's ext_proc counters (`failure_mode_allowed` and `message_timeouts` "
            "must be 0, otherwise requests were routed without the service) and the split over the two backends are in "
            "`overhead.json`."
        ),
    ]
    checks = data.get("checks", [])
    if checks:
        lines += ["", "**Warnings:**", ""] + [f"- {c}" for c in checks]
    prof = data.get("profile")
    if prof and "python" in prof:
        py = prof["python"]
        lines += [
            "",
            f"## Profile of the service at {prof['connections']} connections",
            "",
            f"py-spy, {prof['rate_hz']} Hz, {prof['duration_s']} s per pass, {prof['rps_while_profiling']:,} req/s "
            f"meanwhile. Percentages are of BUSY samples (threads waiting in epoll/select are left out). "
            f"Python stacks ({py['samples']} busy samples, non-blocking)"
            + (f"; flame graph: `{prof['svg']}`" if prof.get("svg") else "")
            + ".",
            "",
            "| where the time goes (Python view) | % of samples |",
            "|---|---:|",
        ]
        lines += [f"| {r['category']} | {r['pct']} |" for r in py["categories"]]
        lines += ["", "| function (self time, Python view) | % |", "|---|---:|"]
        lines += [f"| `{r['function']}` | {r['pct']} |" for r in py["top_self"][:12]]
        nat = prof.get("native", {})
        if "top_self" in nat:
            lines += [
                "",
                (
                    f"Native stacks ({nat['samples']} busy samples; py-spy pauses the process per sample here, so the "
                    f"service ran at {nat['rps_while_profiling']:,} req/s): where the C time goes."
                ),
                "",
                "| function (self time, native view) | % |",
                "|---|---:|",
            ]
            lines += [f"| `{r['function']}` | {r['pct']} |" for r in nat["top_self"][:12]]
        elif nat:
            lines += ["", f"Native profile: {nat.get('error')}"]
    elif prof:
        lines += ["", f"Profile: {prof.get('error')}"]
    return "\n".join(lines) + "\n"


# ============================================================================ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Routing overhead: Envoy direct vs through the ext_proc service."
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="short run: 3 s per point, 1 s warm-up, 1 repeat, short profile",
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per measured point (default 8, quick 3)",
    )
    ap.add_argument(
        "--warmup", type=float, default=None, help="warm-up seconds per point (default 2, quick 1)"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per point, median reported (default 2, quick 1)",
    )
    ap.add_argument(
        "--connections", default="1,32", help="comma-separated connection counts (default 1,32)"
    )
    ap.add_argument(
        "--envoy-concurrency", type=int, default=1, help="worker threads of each Envoy (default 1)"
    )
    ap.add_argument("--client", choices=("auto", "wrk", "asyncio"), default="auto")
    ap.add_argument(
        "--no-install", action="store_true", help="do not apt-get install wrk if it is missing"
    )
    ap.add_argument(
        "--no-profile", action="store_true", help="skip the py-spy profile of the service"
    )
    ap.add_argument("--keep-logs", action="store_true", help="keep the process logs (printed path)")
    ap.add_argument(
        "--service-arg",
        action="append",
        default=[],
        help="extra argument for extproc serve (repeatable)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each point wait up to this many seconds for other processes to calm down "
        "(default 15, quick 5; 0 = never wait)",
    )
    ap.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="'calm' = other processes use less than this many cores (default 0.3)",
    )
    ap.add_argument(
        "--name", default="overhead", help="results name (bench/results/<name>.json/.md)"
    )
    args = ap.parse_args(argv)

    duration = args.duration or (3.0 if args.quick else 8.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    repeats = args.repeats or (1 if args.quick else 2)
    if args.quiet_wait is None:
        args.quiet_wait = 5.0 if args.quick else 15.0
    conns = [int(x) for x in args.connections.split(",") if x.strip()]

    notes: list[str] = []
    client: Any
    if args.client in ("auto", "wrk"):
        wrk, note = ensure_wrk(allow_install=not args.no_install)
        if note:
            notes.append(note)
        if wrk is None and args.client == "wrk":
            print(f"error: {note}", file=sys.stderr)
            return 2
    else:
        wrk = None
    workdir = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    if wrk:
        client = WrkClient(wrk, workdir)
    else:
        client = AsyncioClient()
        notes.append(
            "wrk unavailable: measured with the Python asyncio fallback client, which saturates long before "
            "Envoy does; ratios to direct UNDERSTATE the overhead at 32 connections. Install wrk "
            "(apt-get install -y wrk) for meaningful numbers."
        )
        print(f"NOTE: {notes[-1]}", flush=True)

    log_dir = workdir / "logs"
    rig = Rig(log_dir, args.envoy_concurrency, args.service_arg)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    load_before = loadavg()
    started = time.monotonic()
    profile: dict[str, Any] | None = None
    try:
        print(
            f"starting backend Envoy, service, bare processor and front Envoy (logs: {log_dir}) ...",
            flush=True,
        )
        rig.start()
        total = repeats * len(conns) * len(CONTENDERS)
        i = 0
        for rep in range(repeats):
            for n in conns:
                for c in CONTENDERS:
                    i += 1
                    if args.quiet_wait > 0:
                        meter = ForeignLoad([proc.pid for proc in rig.procs.values()])
                        wait_for_quiet(meter, args.quiet_cores, args.quiet_wait)
                    r = measure_point(rig, client, c, n, duration, warmup)
                    runs[(c.key, n)].append(r)
                    ext = r["ext_proc"]
                    print(
                        f"[{i}/{total}] run {rep + 1} c={n:<3} {c.label:<30} {r['rps']:>9,.0f} req/s  "
                        f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  other load {r['foreign_cores']:.2f} cores  "
                        f"errors {r['errors']} non-2xx {r['non_2xx']}"
                        + (
                            f"  fallback {ext.get('failure_mode_allowed', 0)} timeouts {ext.get('message_timeouts', 0)}"
                            if ext
                            else ""
                        ),
                        flush=True,
                    )
                    for name, proc in rig.procs.items():
                        if not proc.alive():
                            raise RuntimeError(f"{name} died:\n{proc.log_tail()}")
        if not args.no_profile:
            print("profiling the service under 32 connections with py-spy ...", flush=True)
            try:
                profile = profile_service(
                    rig,
                    client,
                    4.0 if args.quick else 8.0,
                    RESULTS / f"{args.name}-profile.svg",
                    workdir,
                )
            except Exception as exc:  # noqa: BLE001 - a failed profile must not lose the measurements
                profile = {"error": repr(exc)}
    finally:
        rig.stop()
        if args.keep_logs:
            print(f"logs kept in {log_dir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    # ------------------------------------------------------------------ aggregate
    points = []
    checks: list[str] = []
    for n in conns:
        base = runs[("direct", n)]
        base_rps, base_p50, base_p99 = (
            median_of(base, "rps"),
            median_of(base, "p50_ms"),
            median_of(base, "p99_ms"),
        )
        for c in CONTENDERS:
            rs = runs[(c.key, n)]
            rps, p50, p99 = median_of(rs, "rps"), median_of(rs, "p50_ms"), median_of(rs, "p99_ms")
            points.append(
                {
                    "contender": c.key,
                    "label": c.label,
                    "connections": n,
                    "processor": c.processor,
                    "rps": round(rps, 1),
                    "p50_ms": round(p50, 4),
                    "p90_ms": round(median_of(rs, "p90_ms"), 4),
                    "p99_ms": round(p99, 4),
                    "ratio_rps": round(rps / base_rps, 3) if base_rps else None,
                    "ratio_p50": round(p50 / base_p50, 2) if base_p50 else None,
                    "ratio_p99": round(p99 / base_p99, 2) if base_p99 else None,
                    "added_p50_ms": round(p50 - base_p50, 4),
                    "added_p99_ms": round(p99 - base_p99, 4),
                    "runs": rs,
                }
            )
            for r in rs:
                if r["errors"] or r["non_2xx"]:
                    checks.append(
                        f"{c.label} c={n}: {r['errors']} socket errors, {r['non_2xx']} non-2xx responses"
                    )
                ext = r["ext_proc"]
                if (
                    ext.get("failure_mode_allowed")
                    or ext.get("message_timeouts")
                    or ext.get("streams_failed")
                ):
                    checks.append(
                        f"{c.label} c={n}: Envoy routed without the processor for some requests "
                        f"(failure_mode_allowed {ext.get('failure_mode_allowed')}, message_timeouts "
                        f"{ext.get('message_timeouts')}, streams_failed {ext.get('streams_failed')})"
                    )

    def pt(key: str, n: int) -> dict[str, Any] | None:
        return next((p for p in points if p["contender"] == key and p["connections"] == n), None)

    c_lo, c_hi = min(conns), max(conns)
    s1, s32, b1, b32 = pt("service", c_lo), pt("service", c_hi), pt("bare", c_lo), pt("bare", c_hi)
    targets = {
        "added_p50_ms_c1": s1["added_p50_ms"] if s1 else None,
        "added_p50_target_ms": TARGET_ADDED_P50_MS_C1,
        "added_p50_met": bool(s1 and s1["added_p50_ms"] <= TARGET_ADDED_P50_MS_C1),
        "bare_added_p50_ms_c1": b1["added_p50_ms"] if b1 else None,
        "rps_ratio_c32": s32["ratio_rps"] if s32 else float("nan"),
        "rps_ratio_target": TARGET_RPS_RATIO,
        "rps_ratio_met": bool(s32 and s32["ratio_rps"] >= TARGET_RPS_RATIO),
        "bare_rps_ratio_c32": b32["ratio_rps"] if b32 else float("nan"),
        "cpu_us_per_req_c32": {
            label: statistics.median(r["cpu_us_per_req"][proc] for r in pt_["runs"])
            for label, pt_, proc in (
                ("service", s32, "service"),
                ("bare processor", b32, "bare"),
                ("front Envoy (routed)", s32, "envoy"),
                ("front Envoy (direct)", pt("direct", c_hi), "envoy"),
                ("fake-vLLM Envoy", pt("direct", c_hi), "backend"),
            )
            if pt_ is not None
        },
    }
    data = {
        "bench": "overhead",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "client": client.version,
        "config": {
            "duration_s": duration,
            "warmup_s": warmup,
            "repeats": repeats,
            "connections": conns,
            "envoy_concurrency": args.envoy_concurrency,
            "quick": args.quick,
            "service_args": args.service_arg,
            "request": {
                "method": "POST",
                "path": PATH,
                "headers_only_path": HEADERS_ONLY_PATH,
                "body": REQUEST_BODY,
            },
            "wall_s": round(time.monotonic() - started, 1),
        },
        "notes": notes,
        "targets": targets,
        "checks": checks,
        "points": points,
        "profile": profile,
    }
    md = build_markdown(data)
    write_results(args.name, data, md)
    print()
    print(md)
    print(
        f"results: {RESULTS / (args.name + '.json')}, {RESULTS / (args.name + '.md')}"
        + (f", {ROOT / profile['svg']}" if profile and profile.get("svg") else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
