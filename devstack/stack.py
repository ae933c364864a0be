"""The whole local stack: N vLLM simulators + the ext_proc service + Envoy, on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from devstack.envoy_config import render_local_config
from devstack.processes import (
    DEFAULT_START_TIMEOUT,
    PortInUseError,
    Proc,
    free_port,
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

    # Filled by start().
    sims: list[Proc] = field(default_factory=list, init=False)
    service: Proc | None = field(default=None, init=False)
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

    @property
    def sim_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self._sim_ports()]

    @property
    def sim_endpoints(self) -> list[str]:
        """``ip:port`` of each simulator: the form of x-routed-endpoint / override_host."""
        return [f"127.0.0.1:{p}" for p in self._sim_ports()]

    @property
    def procs(self) -> list[Proc]:
        return [*self.sims, *(p for p in (self.service, self.envoy) if p is not None)]

    def _sim_ports(self) -> list[int]:
        return [self._ports[f"sim{i}"] for i in range(self.n_backends)]

    # ----------------------------------------------------------------- lifecycle
    def _pick_ports(self) -> None:
        fixed: dict[str, int | None] = {
            "grpc": self.grpc_port,
            "service_admin": self.service_admin_port,
            "envoy": self.envoy_port,
            "envoy_admin": self.envoy_admin_port,
        }
        if self.direct_listener:
            fixed["direct"] = self.direct_port
        if self.sim_ports is not None and len(self.sim_ports) != self.n_backends:
            raise ValueError(
                f"sim_ports has {len(self.sim_ports)} entries, n_backends={self.n_backends}"
            )
        for i in range(self.n_backends):
            fixed[f"sim{i}"] = self.sim_ports[i] if self.sim_ports is not None else None
        chosen: dict[str, int] = {}
        for key, port in fixed.items():
            if port is None:
                port = free_port()
                while port in chosen.values():
                    port = free_port()
            chosen[key] = port
        self._ports = chosen

    def _all_ports_fixed(self) -> bool:
        return (
            self.sim_ports is not None
            and None
            not in (self.grpc_port, self.service_admin_port, self.envoy_port, self.envoy_admin_port)
            and (not self.direct_listener or self.direct_port is not None)
        )

    def start(self) -> Stack:
        if self.n_backends < 1:
            raise ValueError("n_backends must be >= 1")
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
            extra = [*self.common_sim_args, *(self.sim_args[i] if i < len(self.sim_args) else ())]
            self.sims.append(start_vllmsim(port, args=extra, log_dir=log_dir, wait=False))
        for sim in self.sims:
            sim.wait_ready(self.start_timeout)

        self.service = start_extproc(
            grpc_port=self._ports["grpc"],
            admin_port=self._ports["service_admin"],
            backends=self.sim_urls,
            args=self.service_args,
            log_dir=log_dir,
            timeout=self.start_timeout,
        )

        self.envoy_config = render_local_config(
            listener_port=self._ports["envoy"],
            admin_port=self._ports["envoy_admin"],
            extproc_address=("127.0.0.1", self._ports["grpc"]),
            backends=[("127.0.0.1", p) for p in self._sim_ports()],
            direct_listener_port=self._ports.get("direct"),
        )
        self.envoy = start_envoy(
            self.envoy_config,
            log_dir=log_dir,
            admin_port=self._ports["envoy_admin"],
            concurrency=self.envoy_concurrency,
            log_level=self.envoy_log_level,
            timeout=self.start_timeout,
        )

    def stop(self) -> None:
        """Stop Envoy first (no new traffic), then the service, then the simulators."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.sims = []
        self.service = None
        self.envoy = None

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
