"""`make run` supervision (devstack.stack.Supervisor) with real small processes.

Each "child" is a real `python -m http.server` on a loopback port (GET / answers 200, the
supervisor's health probe). We kill / stop / let die one of them and check what the supervisor
says and that the others keep running. Everything is polled against deadlines.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from devstack.processes import Proc, free_port, http_get, poll_until
from devstack.stack import Stack, Supervisor, Watch


def _server(tmp_path: Path, name: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        name,
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(tmp_path),
        ],
        log_dir=tmp_path / "logs",
    )
    url = f"http://127.0.0.1:{port}/"
    proc.ready_check = lambda: http_get(url, timeout=1.0)[0] == 200
    proc.ready_what = f"{name} answering {url}"
    return proc.wait_ready(15), url


@pytest.fixture
def children(tmp_path: Path) -> Iterator[dict[str, tuple[Proc, str]]]:
    procs = {name: _server(tmp_path, name) for name in ("sim-a", "sim-b", "service")}
    try:
        yield procs
    finally:
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGCONT)
            proc.stop(timeout=2)


def _poll_lines(
    sup: Supervisor, lines: list[str], pred: Callable[[str], bool], timeout: float = 15.0
) -> str:
    found: list[str] = []

    def check() -> bool:
        sup.check()
        found[:] = [line for line in lines if pred(line)]
        return bool(found)

    poll_until(check, timeout=timeout, what="the supervisor's message", interval=0.1)
    return found[0]


def _watches(
    children: dict[str, tuple[Proc, str]], restart: dict[str, Callable[[], Proc]] | None = None
) -> list[Watch]:
    restart = restart or {}
    return [
        Watch(
            label=name,
            get=lambda name=name: children[name][0],
            health_url=url,
            restart=restart.get(name),
        )
        for name, (_, url) in children.items()
    ]


def _answers(url: str) -> bool:
    try:
        return http_get(url, timeout=1.0)[0] == 200
    except OSError:
        return False


def test_dead_child_is_reported_and_the_others_keep_running(children):
    lines: list[str] = []
    sup = Supervisor(_watches(children), say=lines.append, hang_after=1.0)
    sup.check()
    assert lines == []  # all healthy: nothing to say

    victim, _ = children["sim-a"]
    victim.send_signal(signal.SIGKILL)
    line = _poll_lines(sup, lines, lambda s: "sim-a" in s and "SIGKILL" in s)
    assert line.startswith("devstack: ")
    assert f"pid {victim.pid}" in line and "killed by SIGKILL (exit -9)" in line
    # it says it is not restarted, and what still runs
    assert any("sim-a is not restarted automatically" in s for s in lines)
    still = next(s for s in lines if "still running:" in s)
    assert "sim-b" in still and "service" in still and "sim-a" not in still.split(":", 2)[2]
    # the others still run and answer; the supervisor does not stop anything
    for name in ("sim-b", "service"):
        proc, url = children[name]
        assert proc.alive() and _answers(url)
    # reported once, not on every round
    n = len(lines)
    for _ in range(3):
        sup.check()
    assert len(lines) == n


def test_exit_code_is_reported(children):
    lines: list[str] = []
    sup = Supervisor(_watches(children), say=lines.append, hang_after=1.0)
    proc, _ = children["sim-b"]
    proc.send_signal(signal.SIGTERM)  # http.server dies of the default SIGTERM action
    line = _poll_lines(sup, lines, lambda s: "sim-b" in s and ("SIGTERM" in s or "code" in s))
    assert "killed by SIGTERM" in line or "exited with code" in line


def test_hung_child_is_reported_and_its_recovery_too(children):
    lines: list[str] = []
    sup = Supervisor(_watches(children), say=lines.append, hang_after=1.0, probe_timeout=0.3)
    victim, _ = children["sim-b"]
    victim.send_signal(signal.SIGSTOP)
    try:
        line = _poll_lines(sup, lines, lambda s: "sim-b" in s and "has not answered" in s)
        assert "process state: stopped" in line
        for name in ("sim-a", "service"):
            assert children[name][0].alive() and _answers(children[name][1])
    finally:
        victim.send_signal(signal.SIGCONT)
    _poll_lines(sup, lines, lambda s: "sim-b" in s and "again" in s)


def test_dead_service_is_restarted(children, tmp_path):
    lines: list[str] = []
    proc, url = children["service"]

    def restart() -> Proc:
        new = proc.respawn().wait_ready(15)
        children["service"] = (new, url)
        return new

    sup = Supervisor(_watches(children, {"service": restart}), say=lines.append, hang_after=1.0)
    proc.send_signal(signal.SIGKILL)
    _poll_lines(sup, lines, lambda s: "service restarted" in s)
    new, _ = children["service"]
    assert new is not proc and new.alive() and _answers(url)
    assert any("killed by SIGKILL" in s and "service" in s for s in lines)
    assert any("restarting service" in s for s in lines)


def test_restart_budget_is_bounded(children):
    lines: list[str] = []
    proc, url = children["service"]
    clock = [0.0]

    def restart() -> Proc:
        new = proc.respawn().wait_ready(15)
        children["service"] = (new, url)
        return new

    sup = Supervisor(
        _watches(children, {"service": restart}),
        say=lines.append,
        max_restarts=1,
        restart_window=60.0,
        clock=lambda: clock[0],
    )
    children["service"][0].send_signal(signal.SIGKILL)
    _poll_lines(sup, lines, lambda s: "service restarted" in s)
    children["service"][0].send_signal(signal.SIGKILL)
    _poll_lines(sup, lines, lambda s: "not restarting it again" in s)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and children["service"][0].alive():
        sup.check()
    assert not children["service"][0].alive()
    assert children["sim-a"][0].alive() and children["sim-b"][0].alive()


def test_worker_ports_put_every_worker_in_envoys_extproc_cluster(tmp_path):
    def extproc_ports(s: Stack) -> list[int]:
        s._pick_ports()
        cfg = yaml.safe_load(s._render_envoy())
        cluster = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "extproc")
        return [
            e["endpoint"]["address"]["socket_address"]["port_value"]
            for group in cluster["load_assignment"]["endpoints"]
            for e in group["lb_endpoints"]
        ]

    shared = Stack(log_dir=tmp_path, workers=3)
    assert extproc_ports(shared) == [shared.service_grpc_port()]
    own = Stack(log_dir=tmp_path, workers=3, worker_ports=True)
    ports = extproc_ports(own)
    assert len(ports) == 3 and ports == list(range(ports[0], ports[0] + 3))
    assert shared.service_grpc_port() not in ports
