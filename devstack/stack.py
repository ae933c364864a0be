"""The whole local stack: N vLLM simulators + the ext_proc service + Envoy, on loopback.

Also the supervisor of ``make run`` (:class:`Supervisor`): it watches every process of a stack,
says on the terminal when one dies (exit code or signal) or stops answering its health endpoint
(hung, e.g. SIGSTOP), restarts the service and Envoy when they die, and never stops the stack
because of a child: only Ctrl-C/SIGTERM do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from devstack.envoy_config import render_local_config
from devstack.processes import (
    DEFAULT_START_TIMEOUT,
    PortInUseError,
    Proc,
    describe_exit,
    free_port,
    http_get,
    poll_until,
    port_is_free,
    start_envoy,
    start_extproc,
    start_vllmsim,
)


@dataclass
class Stack:
    """Start with ``with Stack(log_dir=...) as s:`` (or ``s.start()`` / ``s.stop()``).

    Ports left as None are picked with :func:`free_port`; if one of them is taken before the
    process binds it (another test run grabbed it), the whole start is retried with fresh ports
    up to ``start_attempts`` times. Explicit ports are never changed.
    """

    log_dir: Path
    n_backends: int = 3
    # Extra CLI args per simulator (index i -> simulator i); missing entries mean no extra args.
    sim_args: Sequence[Sequence[str]] = ()
    # Extra CLI args for every simulator, before the per-simulator ones.
    common_sim_args: Sequence[str] = ()
    # Extra CLI args for `extproc serve` (e.g. ["--strategy", "random"]).
    service_args: Sequence[str] = ()
    # Add Envoy's second listener that skips ext_proc and goes straight to backend 0.
    direct_listener: bool = False
    # Envoy worker threads. 1 by default: the box has 2 shared cores that the simulators and the
    # service need too; benchmarks may raise it.
    envoy_concurrency: int | None = 1
    envoy_log_level: str = "warn"
    sim_ports: Sequence[int] | None = None
    grpc_port: int | None = None
    service_admin_port: int | None = None
    envoy_port: int | None = None
    envoy_admin_port: int | None = None
    direct_port: int | None = None
    start_timeout: float = DEFAULT_START_TIMEOUT
    start_attempts: int = 3
    # Simulators declared to the service (--backend) and to Envoy's pool but NOT started:
    # scale-out without DNS. ``start_sim(n_backends + k)`` starts the k-th one later.
    standby_backends: int = 0
    # Service replicas behind Envoy's `extproc` cluster (rolling restarts). Extra replicas get
    # their own gRPC and admin ports; ``service_ports`` pins them as [(grpc, admin), ...].
    service_replicas: int = 1
    # Loopback address of simulator i (127.0.0.2, 127.0.0.3, ... are all loopback on Linux):
    # distinct IPs for what matches on IP alone (the endpoint-picker subset hint, pod IPs).
    # Missing entries mean 127.0.0.1.
    sim_hosts: Sequence[str] = ()
    service_ports: Sequence[tuple[int, int]] | None = None
    # TLS between Envoy and the service: "self-signed" = the service runs --tls-self-signed and
    # Envoy does not verify (the gateways' EPP setup); "files" = a certificate/key written to
    # log_dir/extproc-tls/ (``tls_files``), given with --tls-cert/--tls-key, and Envoy verifies
    # it with that certificate as its CA. "" = plaintext.
    extproc_tls: Literal["", "self-signed", "files"] = ""
    # Envoy config to render instead of envoy/envoy.yaml, e.g. envoy/gie-reference.yaml or
    # envoy/istio-style.yaml (the gateways' own styles; only addresses are rewritten).
    envoy_template: Path | None = None
    # Start the simulators only (no service, no Envoy): for routers that bring their own front
    # (the benchmarks' Envoy round-robin and Rust routers). url/admin_url are then unavailable.
    sims_only: bool = False
    # `extproc serve --workers N` (decision worker processes; 1 = one process). A --workers in
    # service_args wins.
    workers: int = 1
    # With workers > 1: each worker also listens on a port of its own (--worker-ports) and
    # Envoy's extproc cluster lists those, so Envoy balances every stream over the workers
    # (instead of the kernel spreading whole connections over the shared port).
    worker_ports: bool = False

    # Filled by start().
    sims: list[Proc] = field(default_factory=list, init=False)
    standby: list[Proc | None] = field(default_factory=list, init=False)
    services: list[Proc | None] = field(default_factory=list, init=False)
    envoy: Proc | None = field(default=None, init=False)
    envoy_config: str = field(default="", init=False)
    _ports: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    # ----------------------------------------------------------------- addresses
    @property
    def url(self) -> str:
        """Envoy listener, e.g. ``http://127.0.0.1:10000`` (append /v1/chat/completions)."""
        return f"http://127.0.0.1:{self._ports['envoy']}"

    @property
    def direct_url(self) -> str:
        """The listener without ext_proc (only with ``direct_listener=True``)."""
        if "direct" not in self._ports:
            raise AttributeError("Stack was started without direct_listener=True")
        return f"http://127.0.0.1:{self._ports['direct']}"

    @property
    def admin_url(self) -> str:
        """The service's admin HTTP server (/healthz, /metrics, ...)."""
        return f"http://127.0.0.1:{self._ports['service_admin']}"

    @property
    def envoy_admin_url(self) -> str:
        return f"http://127.0.0.1:{self._ports['envoy_admin']}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self._ports['grpc']}"

    def sim_host(self, i: int) -> str:
        return self.sim_hosts[i] if i < len(self.sim_hosts) else "127.0.0.1"

    @property
    def sim_urls(self) -> list[str]:
        return [f"http://{e}" for e in self.sim_endpoints]

    @property
    def sim_endpoints(self) -> list[str]:
        """``ip:port`` of each simulator: the form of x-routed-endpoint / override_host."""
        return [f"{self.sim_host(i)}:{p}" for i, p in enumerate(self._sim_ports())]

    @property
    def all_sim_urls(self) -> list[str]:
        """Every declared simulator, standby ones included (what the service is told)."""
        return [f"http://{e}" for e in self.all_sim_endpoints]

    @property
    def all_sim_endpoints(self) -> list[str]:
        return [f"{self.sim_host(i)}:{p}" for i, p in enumerate(self._all_sim_ports())]

    @property
    def service(self) -> Proc | None:
        """The first service replica (the only one unless ``service_replicas`` > 1)."""
        return self.services[0] if self.services else None

    @service.setter
    def service(self, proc: Proc | None) -> None:
        if self.services:
            self.services[0] = proc
        else:
            self.services = [proc]

    def service_admin_url(self, replica: int = 0) -> str:
        key = "service_admin" if replica == 0 else f"service_admin{replica}"
        return f"http://127.0.0.1:{self._ports[key]}"

    def service_grpc_port(self, replica: int = 0) -> int:
        return self._ports["grpc" if replica == 0 else f"grpc{replica}"]

    @property
    def procs(self) -> list[Proc]:
        return [
            *self.sims,
            *(p for p in self.standby if p is not None),
            *(p for p in self.services if p is not None),
            *([self.envoy] if self.envoy is not None else []),
        ]

    def _sim_ports(self) -> list[int]:
        return [self._ports[f"sim{i}"] for i in range(self.n_backends)]

    def _all_sim_ports(self) -> list[int]:
        return [self._ports[f"sim{i}"] for i in range(self.n_backends + self.standby_backends)]

    def sim_proc(self, i: int) -> Proc | None:
        """Simulator ``i`` counting standby ones after the started ones (None: not running)."""
        return self.sims[i] if i < self.n_backends else self.standby[i - self.n_backends]

    def _sim_extra_args(self, i: int) -> list[str]:
        return [*self.common_sim_args, *(self.sim_args[i] if i < len(self.sim_args) else ())]

    # ----------------------------------------------------------------- lifecycle
    def _pick_ports(self) -> None:
        fixed: dict[str, int | None] = (
            {}
            if self.sims_only
            else {
                "grpc": self.grpc_port,
                "service_admin": self.service_admin_port,
                "envoy": self.envoy_port,
                "envoy_admin": self.envoy_admin_port,
            }
        )
        if self.direct_listener:
            fixed["direct"] = self.direct_port
        if self.sim_ports is not None and len(self.sim_ports) not in (
            self.n_backends,
            self.n_backends + self.standby_backends,
        ):
            raise ValueError(
                f"sim_ports has {len(self.sim_ports)} entries, n_backends={self.n_backends}"
            )
        for j in range(1, self.service_replicas):
            pinned = self.service_ports[j] if self.service_ports is not None else (None, None)
            fixed[f"grpc{j}"], fixed[f"service_admin{j}"] = pinned
        for i in range(self.n_backends + self.standby_backends):
            pinned_sim = (
                self.sim_ports[i]
                if self.sim_ports is not None and i < len(self.sim_ports)
                else None
            )
            fixed[f"sim{i}"] = pinned_sim
        chosen: dict[str, int] = {}
        for key, port in fixed.items():
            if port is None:
                port = free_port()
                while port in chosen.values():
                    port = free_port()
            chosen[key] = port
        if self._worker_ports_on and not self.sims_only:
            n = self.workers
            base = free_port()
            while not all(
                base + i not in chosen.values() and base + i < 65536 and port_is_free(base + i)
                for i in range(n)
            ):
                base = free_port()
            chosen["worker_ports"] = base
        self._ports = chosen

    @property
    def _worker_ports_on(self) -> bool:
        return self.worker_ports and self.workers > 1

    def _all_ports_fixed(self) -> bool:
        return (
            self.sim_ports is not None
            and None
            not in (self.grpc_port, self.service_admin_port, self.envoy_port, self.envoy_admin_port)
            and (not self.direct_listener or self.direct_port is not None)
            and len(self.sim_ports) == self.n_backends + self.standby_backends
            and (self.service_replicas == 1 or self.service_ports is not None)
        )

    def start(self) -> Stack:
        if self.n_backends < 1:
            raise ValueError("n_backends must be >= 1")
        if self.extproc_tls not in ("", "self-signed", "files"):
            raise ValueError(
                f"extproc_tls must be '', 'self-signed' or 'files', not {self.extproc_tls!r}"
            )
        if self.extproc_tls == "files":  # a fresh pair per start; restarted services reuse it
            from extproc.tls import self_signed, write_pair

            self.tls_files[0].parent.mkdir(parents=True, exist_ok=True)
            write_pair(self_signed(["localhost", "127.0.0.1"]), *self.tls_files)
        attempts = 1 if self._all_ports_fixed() else max(1, self.start_attempts)
        for attempt in range(1, attempts + 1):
            self._pick_ports()
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
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        log_dir = Path(self.log_dir)
        # Launch all simulators first, then wait: they boot in parallel.
        for i, port in enumerate(self._sim_ports()):
            self.sims.append(
                start_vllmsim(
                    port,
                    host=self.sim_host(i),
                    args=self._sim_extra_args(i),
                    log_dir=log_dir,
                    wait=False,
                )
            )
        self.standby = [None] * self.standby_backends
        for sim in self.sims:
            sim.wait_ready(self.start_timeout)
        if self.sims_only:
            return

        # Replicas boot in parallel too.
        self.services = [self._launch_service(j) for j in range(self.service_replicas)]
        for svc in self.services:
            if svc is not None:
                svc.wait_ready(self.start_timeout)

        self.envoy_config = self._render_envoy()
        self.envoy = self._launch_envoy()

    @property
    def tls_files(self) -> tuple[Path, Path]:
        """(certificate, key) PEM files of ``extproc_tls="files"`` (the certificate is also
        Envoy's CA)."""
        tls_dir = Path(self.log_dir) / "extproc-tls"
        return tls_dir / "cert.pem", tls_dir / "key.pem"

    def _service_tls_args(self) -> list[str]:
        if self.extproc_tls == "self-signed":
            return ["--tls-self-signed"]
        if self.extproc_tls == "files":
            cert, key = self.tls_files
            return ["--tls-cert", str(cert), "--tls-key", str(key)]
        return []

    def _launch_service(self, replica: int, *, wait: bool = False) -> Proc:
        return start_extproc(
            grpc_port=self.service_grpc_port(replica),
            admin_port=self._ports["service_admin" if replica == 0 else f"service_admin{replica}"],
            backends=self.all_sim_urls,
            args=[
                *self._service_tls_args(),
                *(["--workers", str(self.workers)] if self.workers > 1 else []),
                *(
                    ["--worker-ports", str(self._ports["worker_ports"])]
                    if self._worker_ports_on
                    else []
                ),
                *self.service_args,
            ],
            log_dir=Path(self.log_dir),
            name="extproc" if replica == 0 else f"extproc-{replica}",
            timeout=self.start_timeout,
            wait=wait,
        )

    def _launch_envoy(self) -> Proc:
        return start_envoy(
            self.envoy_config,
            log_dir=Path(self.log_dir),
            admin_port=self._ports["envoy_admin"],
            concurrency=self.envoy_concurrency,
            log_level=self.envoy_log_level,
            timeout=self.start_timeout,
        )

    def _render_envoy(self) -> str:
        extproc = [("127.0.0.1", self.service_grpc_port(j)) for j in range(self.service_replicas)]
        if self._worker_ports_on:  # the workers' own ports: Envoy balances streams over them
            base = self._ports["worker_ports"]
            extproc = [("127.0.0.1", base + i) for i in range(self.workers)]
        kwargs: dict[str, Any] = {
            "listener_port": self._ports["envoy"],
            "admin_port": self._ports["envoy_admin"],
            "backends": [(self.sim_host(i), p) for i, p in enumerate(self._all_sim_ports())],
            "direct_listener_port": self._ports.get("direct"),
            "template": self.envoy_template,
            "extproc_tls": bool(self.extproc_tls),
            "extproc_tls_ca": self.tls_files[0] if self.extproc_tls == "files" else None,
        }
        if len(extproc) == 1:
            return render_local_config(extproc_address=extproc[0], **kwargs)
        # Several replicas: the renderer puts one loopback endpoint per gRPC port into the
        # `extproc` cluster.
        return render_local_config(grpc_ports=[p for _, p in extproc], **kwargs)

    # ----------------------------------------------------------------- fault injection / repair
    def start_sim(self, i: int, extra_args: Sequence[str] = (), *, wait: bool = True) -> Proc:
        """(Re)start simulator ``i`` (standby ones count after the started ones) on its port
        with its usual arguments plus ``extra_args``. The old process must have exited."""
        old = self.sim_proc(i)
        if old is not None and old.alive():
            raise RuntimeError(f"{old.name} is still running; stop it first")
        port = self._all_sim_ports()[i]
        proc = start_vllmsim(
            port,
            host=self.sim_host(i),
            args=[*self._sim_extra_args(i), *extra_args],
            log_dir=Path(self.log_dir),
            timeout=self.start_timeout,
            wait=False,
        )
        if i < self.n_backends:
            self.sims[i] = proc
        else:
            self.standby[i - self.n_backends] = proc
        return proc.wait_ready(self.start_timeout) if wait else proc

    def start_service(self, replica: int = 0, *, wait: bool = True) -> Proc:
        """(Re)start service replica ``replica`` on its ports (the old one must have exited)."""
        old = self.services[replica] if replica < len(self.services) else None
        if old is not None and old.alive():
            raise RuntimeError(f"{old.name} is still running; stop it first")
        proc = self._launch_service(replica)
        self.services[replica] = proc
        return proc.wait_ready(self.start_timeout) if wait else proc

    def start_envoy_again(self) -> Proc:
        """Restart Envoy with the same config (the old one must have exited)."""
        if self.envoy is not None and self.envoy.alive():
            raise RuntimeError("envoy is still running; stop it first")
        self.envoy = self._launch_envoy()
        return self.envoy

    def stop(self) -> None:
        """Stop Envoy first (no new traffic), then the service, then the simulators."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.sims = []
        self.standby = []
        self.services = []
        self.envoy = None

    def wait_metrics_fresh(self, timeout: float = 20.0) -> None:
        """Poll every service replica's /backends until each running simulator has fresh
        metrics there (what a long-running service has; benchmarks wait for it before load)."""
        running = {e for i, e in enumerate(self.all_sim_endpoints) if self.sim_proc(i) is not None}
        admins = [self.service_admin_url(j) for j, p in enumerate(self.services) if p is not None]

        def fresh() -> bool:
            for admin in admins:
                status, body = http_get(f"{admin}/backends", timeout=1.0)
                if status != 200:
                    return False
                have = {
                    b["endpoint"]
                    for b in json.loads(body).get("backends", [])
                    if b.get("freshness") == "fresh"
                }
                if not running <= have:
                    return False
            return True

        poll_until(
            fresh,
            timeout=timeout,
            what="fresh metrics of every running simulator",
            proc=self.service,
        )

    def dead(self) -> list[Proc]:
        """Processes of this stack that have exited."""
        return [p for p in self.procs if not p.alive()]

    def log_tails(self, lines: int = 30) -> str:
        """The last ``lines`` lines of every process log, for failure reports."""
        parts = []
        for path in sorted(Path(self.log_dir).glob("*.log")):
            try:
                text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"===== {path.name} (last {lines} lines) =====\n" + "\n".join(text))
        return "\n".join(parts)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ===================================================================================== supervision
@dataclass
class Watch:
    """One supervised process: how to find it, probe it and (optionally) restart it."""

    label: str  # "vLLM simulator 1", "service", "Envoy"
    get: Callable[[], Proc | None]
    health_url: str
    restart: Callable[[], Proc] | None = None
    # Filled by the supervisor.
    reported_dead: bool = False
    failing_since: float | None = None
    reported_hung: bool = False
    restarts: list[float] = field(default_factory=list)


class Supervisor:
    """Watches processes; reports deaths and hangs; restarts what may be restarted.

    ``check()`` does one round (call it every ~0.5 s). It never raises because of a child:
    a dead simulator is reported once and left dead (the service routes around it); a dead
    process with a ``restart`` callable is restarted, at most ``max_restarts`` times per
    ``restart_window`` seconds (then it is left dead and that is said too); a live process whose
    health endpoint fails for ``hang_after`` seconds is reported as not answering (with its
    kernel state, so a SIGSTOPped one reads "stopped"), and reported again when it recovers.
    Every message goes to ``say`` (one line each, prefixed ``devstack:``).
    """

    def __init__(
        self,
        watches: Sequence[Watch],
        *,
        say: Callable[[str], None],
        hang_after: float = 3.0,
        probe_timeout: float = 0.5,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watches = list(watches)
        self.say = say
        self.hang_after = hang_after
        self.probe_timeout = probe_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.clock = clock

    def _alive_labels(self) -> list[str]:
        out = []
        for w in self.watches:
            p = w.get()
            if p is not None and p.alive():
                out.append(w.label)
        return out

    def _emit(self, msg: str) -> None:
        self.say(f"devstack: {msg}")

    def check(self) -> None:
        for w in self.watches:
            proc = w.get()
            if proc is None:
                continue  # not started (standby)
            if not proc.alive():
                if not w.reported_dead:
                    w.reported_dead = True
                    w.failing_since = None
                    w.reported_hung = False
                    tail = proc.log_tail(5).strip()
                    self._emit(
                        f"{w.label} ({proc.name}, pid {proc.pid}) {describe_exit(proc.returncode)}"
                        + (
                            f"; last log lines ({proc.log_path}):\n    "
                            + tail.replace("\n", "\n    ")
                            if tail
                            else ""
                        )
                    )
                    self._maybe_restart(w, proc)
                    self._emit("still running: " + (", ".join(self._alive_labels()) or "nothing"))
                continue
            w.reported_dead = False
            ok = False
            with contextlib.suppress(Exception):
                ok = http_get(w.health_url, timeout=self.probe_timeout)[0] == 200
            now = self.clock()
            if ok:
                if w.reported_hung:
                    down = now - (w.failing_since or now)
                    self._emit(
                        f"{w.label} ({proc.name}) answers {w.health_url} again (after {down:.1f} s)"
                    )
                w.failing_since = None
                w.reported_hung = False
                continue
            if w.failing_since is None:
                w.failing_since = now
            elif not w.reported_hung and now - w.failing_since >= self.hang_after:
                w.reported_hung = True
                self._emit(
                    f"{w.label} ({proc.name}, pid {proc.pid}) has not answered {w.health_url} "
                    f"for {now - w.failing_since:.1f} s (process state: {proc.state()}) - hung? "
                    "The rest keeps serving."
                )

    def _maybe_restart(self, w: Watch, dead: Proc) -> None:
        if w.restart is None:
            self._emit(f"{w.label} is not restarted automatically; the rest keeps serving")
            return
        now = self.clock()
        w.restarts = [t for t in w.restarts if now - t < self.restart_window]
        if len(w.restarts) >= self.max_restarts:
            self._emit(
                f"{w.label} died {len(w.restarts)} times within {self.restart_window:.0f} s; "
                "not restarting it again"
            )
            return
        w.restarts.append(now)
        self._emit(
            f"restarting {w.label} (automatic restart {len(w.restarts)}/{self.max_restarts}"
            f" per {self.restart_window:.0f} s) ..."
        )
        try:
            proc = w.restart()
        except Exception as exc:  # noqa: BLE001 - a failed restart must not stop the stack
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._emit(f"restart of {w.label} failed ({first}); leaving it down")
            return
        w.reported_dead = False
        self._emit(f"{w.label} restarted ({proc.name}, pid {proc.pid})")


def _service_replica(stack: Stack, j: int) -> Proc | None:
    return stack.services[j] if j < len(stack.services) else None


def stack_watches(
    stack: Stack, *, restart_service: bool = True, restart_envoy: bool = True
) -> list[Watch]:
    """Watches for every process of a started stack (simulators are never restarted: their
    death is the failure the service is built to route around)."""
    watches: list[Watch] = []
    ports = stack._all_sim_ports()
    for i, port in enumerate(ports):
        kind = "vLLM simulator" if i < stack.n_backends else "standby vLLM simulator"
        watches.append(
            Watch(
                label=f"{kind} {i + 1}",
                get=functools.partial(stack.sim_proc, i),
                health_url=f"http://127.0.0.1:{port}/health",
            )
        )
    for j in range(stack.service_replicas):
        watches.append(
            Watch(
                label="service" if stack.service_replicas == 1 else f"service replica {j + 1}",
                get=functools.partial(_service_replica, stack, j),
                health_url=f"{stack.service_admin_url(j)}/healthz",
                restart=functools.partial(stack.start_service, j) if restart_service else None,
            )
        )
    watches.append(
        Watch(
            label="Envoy",
            get=lambda: stack.envoy,
            health_url=f"{stack.envoy_admin_url}/ready",
            restart=(lambda: stack.start_envoy_again().wait_ready(stack.start_timeout))
            if restart_envoy
            else None,
        )
    )
    return watches
