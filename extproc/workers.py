"""``--workers N``, the main process's side: the run directory and the worker processes.

The main process keeps discovery, the scrapers, the admin server and the plaintext health port;
``N`` worker processes (``python -m extproc.worker``, :mod:`extproc.worker`) answer ext_proc on
the one ``--grpc-address``, each with its own SO_REUSEPORT listener: the kernel spreads
*connections* over them (Envoy keeps a few long-lived HTTP/2 connections, one per Envoy worker
thread, so see docs/scaling.md for what that means for the spread).

What crosses processes lives in a private run directory (``/dev/shm`` where it exists, mode
0700, removed at exit): the settings, the counters and the published state
(:mod:`extproc.shared_state`) and the workers' Prometheus files, which the admin ``/metrics``
merges with the main's own series.

A worker that dies is started again on the same row of the counters, after its open picks are
counted done (they died with it), with a backoff that grows while it keeps dying young; each
restart is logged and counted (``extproc_worker_restarts_total``). SIGTERM drains every worker
as one process drains (docs/reliability.md); SIGINT or a second SIGTERM stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.registry import Collector

from extproc.config import ConfigError, Settings
from extproc.shared_state import MainRegistry, SharedCounters, StateFile
from extproc.tls import load_pair, san_hosts, self_signed, write_pair

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
COUNTERS_FILE = "counters"
STATE_FILE = "state"
PROMETHEUS_DIR = "prometheus"
TLS_CERT_FILE = "tls-cert.pem"  # --tls-self-signed: the main's certificate, for the workers
TLS_KEY_FILE = "tls-key.pem"

# Tokenizers load at a worker's start: allow them time before calling the start failed.
START_TIMEOUT_S = 120.0
RESTART_BACKOFF_S = 0.5
MAX_RESTART_BACKOFF_S = 10.0
STABLE_AFTER_S = 30.0  # a worker that lived this long starts the backoff afresh when it dies
_POLL_S = 0.02


class WorkerStartError(OSError):
    """A worker did not come up (its own message is on stderr above)."""


def make_run_dir() -> Path:
    """A private directory named after this process; left-overs of dead mains (SIGKILL: nothing
    ran their cleanup) are removed first."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    for old in base.glob("extproc-*-*"):
        pid = old.name.split("-")[1]
        with contextlib.suppress(OSError):
            mine = old.is_dir() and old.stat().st_uid == os.getuid()
            if mine and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"extproc-{os.getpid()}-", dir=base))


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return True


def reserve_address(address: str) -> str:
    """Check that nothing listens on ``address`` (the workers share it with SO_REUSEPORT, which
    would otherwise silently share it with another service too); resolve port 0 to a free port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--grpc-address {address!r}: expected host:port with --workers")
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
        try:
            probe.bind((bare or "0.0.0.0", int(port)))
        except OSError as exc:
            raise OSError(f"cannot listen on gRPC address {address}: {exc.strerror}") from None
        return f"{host}:{probe.getsockname()[1]}"


def worker_address(settings: Settings, row: int) -> str:
    """Worker ``row``'s own address (``--worker-ports``)."""
    host = settings.grpc_address.rpartition(":")[0]
    return f"{host}:{settings.worker_ports + row}"


@dataclass
class _Worker:
    row: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    young_deaths: int = 0  # consecutive deaths before STABLE_AFTER_S
    watcher: asyncio.Task[None] | None = None


class WorkerPool:
    def __init__(
        self,
        settings: Settings,
        run_dir: Path,
        counters: SharedCounters,
        registry: MainRegistry,
    ) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.prometheus_dir = run_dir / PROMETHEUS_DIR
        self.counters = counters
        self.registry = registry
        self.workers = [_Worker(i) for i in range(settings.workers)]
        self._stopping = False
        self._on_change: Callable[[int], None] = lambda up: None

    @classmethod
    def create(cls, settings: Settings) -> WorkerPool:
        """The run directory, counters and an empty published pool; no process yet."""
        address = reserve_address(settings.grpc_address)
        settings = settings.model_copy(update={"grpc_address": address})
        if settings.worker_ports + settings.workers - 1 > 65535:
            raise ConfigError(f"--worker-ports {settings.worker_ports}: ports run past 65535")
        for row in range(settings.workers if settings.worker_ports else 0):
            reserve_address(worker_address(settings, row))
        if settings.tls_cert:
            load_pair(settings.tls_cert, settings.tls_key)  # a bad file: exit 2 before any worker
        run_dir = make_run_dir()
        try:
            if settings.tls_self_signed:  # one certificate for every worker: made here
                pair = self_signed(san_hosts(address))
                write_pair(pair, run_dir / TLS_CERT_FILE, run_dir / TLS_KEY_FILE)
                log.info("TLS on the gRPC port with a self-signed certificate: %s", pair.describe())
                settings = settings.model_copy(
                    update={
                        "tls_self_signed": False,
                        "tls_cert": str(run_dir / TLS_CERT_FILE),
                        "tls_key": str(run_dir / TLS_KEY_FILE),
                    }
                )
            (run_dir / SETTINGS_FILE).write_text(settings.model_dump_json())
            (run_dir / PROMETHEUS_DIR).mkdir()
            counters = SharedCounters.create(run_dir / COUNTERS_FILE, settings.workers)
            registry = MainRegistry(
                counters,
                StateFile(run_dir / STATE_FILE, counters),
                stale_after=settings.stale_after,
                max_metrics_age=settings.max_metrics_age,
            )
            registry.publish()  # workers start from an (empty) pool, never from nothing
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return cls(settings, run_dir, counters, registry)

    # -- state ---------------------------------------------------------------------------
    def serving_pid(self, w: _Worker) -> int:
        """The pid of ``w``'s process once it serves, else 0."""
        proc = w.proc
        if proc is None or proc.returncode is not None:
            return 0
        return proc.pid if self.counters.worker_pid(w.row) == proc.pid else 0

    @property
    def up(self) -> int:
        return sum(1 for w in self.workers if self.serving_pid(w))

    @property
    def open_streams(self) -> int:
        return sum(self.counters.worker_streams(w.row) for w in self.workers if self.serving_pid(w))

    def set_serving(self, serving: bool) -> None:
        self.counters.serving = serving

    def describe(self) -> list[dict[str, object]]:
        return [
            {
                "worker": w.row,
                "pid": w.proc.pid if w.proc is not None else None,
                "serving": bool(self.serving_pid(w)),
                "open_streams": self.counters.worker_streams(w.row),
                "restarts": w.restarts,
            }
            for w in self.workers
        ]

    def collector(self) -> Collector:
        return _WorkersCollector(self)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, on_change: Callable[[int], None]) -> None:
        """Start every worker; return once all serve. A worker exiting first is an error."""
        self._on_change = on_change
        for w in self.workers:
            await self._spawn(w)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not all(self.serving_pid(w) for w in self.workers):
            for w in self.workers:
                if w.proc is not None and w.proc.returncode is not None:
                    code = w.proc.returncode
                    message = f"worker {w.row} exited with code {code} before serving"
                    raise ConfigError(message) if code == 2 else WorkerStartError(message)
            if loop.time() > deadline:
                raise WorkerStartError(f"workers not serving after {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(_POLL_S)
        for w in self.workers:
            w.watcher = asyncio.create_task(self._watch(w), name=f"worker-{w.row}")
        log.info(
            "%d workers serve ext_proc on %s (pids %s)",
            len(self.workers),
            self.settings.grpc_address,
            [w.proc.pid for w in self.workers if w.proc],
        )
        on_change(self.up)

    async def _spawn(self, w: _Worker) -> None:
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.prometheus_dir)
        root = str(Path(__file__).resolve().parent.parent)  # this very extproc, not another one
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "extproc.worker",
            str(self.run_dir),
            str(w.row),
            str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
        )
        w.started = asyncio.get_running_loop().time()

    async def _watch(self, w: _Worker) -> None:
        """Restart ``w`` whenever it dies, until the pool stops."""
        loop = asyncio.get_running_loop()
        while True:
            proc = w.proc
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            lived = loop.time() - w.started
            w.young_deaths = w.young_deaths + 1 if lived < STABLE_AFTER_S else 1
            delay = min(RESTART_BACKOFF_S * 2 ** (w.young_deaths - 1), MAX_RESTART_BACKOFF_S)
            self.counters.reset_row(w.row)  # its open picks died with it
            mark_process_dead(proc.pid, str(self.prometheus_dir))
            w.restarts += 1
            log.warning(
                "worker %d (pid %d) %s after %.1f s; restarting it in %.1f s",
                w.row,
                proc.pid,
                _describe_exit(code),
                lived,
                delay,
            )
            self._on_change(self.up)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            await self._spawn(w)
            assert w.proc is not None
            while not self.serving_pid(w) and w.proc.returncode is None:
                await asyncio.sleep(_POLL_S)
            if self.serving_pid(w):
                log.info("worker %d serves again (pid %d)", w.row, w.proc.pid)
                self._on_change(self.up)

    def drain(self) -> None:
        """SIGTERM every worker: each drains as one process does."""
        self._signal_all(signal.SIGTERM)

    async def stop(self, *, now: bool) -> None:
        """Wait for the workers to exit: after their drain (``now`` False), or at once (SIGINT)."""
        self._stopping = True
        self._signal_all(signal.SIGINT if now else signal.SIGTERM)
        s = self.settings
        timeout = (3.0 if now else s.drain_seconds + s.stop_grace) + 5.0
        await self._wait_all(timeout)

    async def close(self) -> None:
        """Kill what still runs and remove the run directory."""
        self._stopping = True
        if any(w.proc is not None and w.proc.returncode is None for w in self.workers):
            self._signal_all(signal.SIGKILL)
            await self._wait_all(5.0)
        for w in self.workers:
            if w.watcher is not None:
                w.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w.watcher
        with contextlib.suppress(BufferError):
            self.counters.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _signal_all(self, sig: signal.Signals) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def _wait_all(self, timeout: float) -> None:
        procs = [w.proc for w in self.workers if w.proc is not None]
        if not procs:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout)
        except TimeoutError:
            log.warning("workers still running after %.0f s: killing them", timeout)
            self._signal_all(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU of ``pid`` (Linux /proc), None where unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class _WorkersCollector(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily(
            "extproc_worker_up", "1 while the decision worker serves ext_proc.", labels=["worker"]
        )
        streams = GaugeMetricFamily(
            "extproc_worker_open_streams",
            "ext_proc streams (= HTTP requests) open in the worker: how the kernel spread Envoy's "
            "connections over the workers.",
            labels=["worker"],
        )
        restarts = CounterMetricFamily(
            "extproc_worker_restarts",
            "Times the worker was started again after it died.",
            labels=["worker"],
        )
        cpu = CounterMetricFamily(
            "extproc_worker_cpu_seconds",
            "CPU seconds of the worker's current process (user + system; restarts from 0).",
            labels=["worker"],
        )
        for w in self._pool.workers:
            label = [str(w.row)]
            pid = self._pool.serving_pid(w)
            up.add_metric(label, 1.0 if pid else 0.0)
            streams.add_metric(label, float(self._pool.counters.worker_streams(w.row)))
            restarts.add_metric(label, float(w.restarts))
            seconds = _cpu_seconds(pid) if pid else None
            if seconds is not None:
                cpu.add_metric(label, seconds)
        yield from (up, streams, restarts, cpu)
