"""`make run` (python -m devstack) survives its children: a killed simulator is reported on the
terminal and the gateway keeps serving; a killed service is reported and restarted; only
SIGTERM stops the stack (exit 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from devstack.processes import free_port, poll_until, port_is_free

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _ports(n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p not in out:
            out.append(p)
    return out


def _chat(url: str) -> tuple[int, str]:
    body = json.dumps(
        {"model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=body,
        method="POST",
        headers={"content-type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        return resp.status, resp.headers.get("x-inference-pod", "")


def test_make_run_reports_dead_children_and_keeps_serving(tmp_path: Path) -> None:
    grpc, admin, envoy, envoy_admin = _ports(4)
    sim1 = free_port()  # the simulators take --first-sim-port and the next one
    while not port_is_free(sim1 + 1) or sim1 + 1 in (grpc, admin, envoy, envoy_admin):
        sim1 = free_port()
    sim2 = sim1 + 1
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    log_dir = tmp_path / "logs"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devstack",
                "--backends",
                "2",
                "--first-sim-port",
                str(sim1),
                "--grpc-port",
                str(grpc),
                "--service-admin-port",
                str(admin),
                "--envoy-port",
                str(envoy),
                "--envoy-admin-port",
                str(envoy_admin),
                "--log-dir",
                str(log_dir),
                "--envoy-concurrency",
                "1",
            ],
            cwd=ROOT,
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{envoy}"
    try:
        poll_until(
            lambda: "LLM gateway ready" in out.read_text(), timeout=60, what="the ready banner"
        )
        assert "restarted automatically" in out.read_text()
        assert _chat(url)[0] == 200

        # Kill simulator 2 (its own process group, like every child).
        sim_pids = _pids_listening(sim2)
        assert sim_pids, "simulator 2 not found"
        for pid in sim_pids:
            os.kill(pid, signal.SIGKILL)
        poll_until(
            lambda: (
                f"vLLM simulator 2 (vllmsim-{sim2}, pid" in err.read_text()
                and "killed by SIGKILL" in err.read_text()
            ),
            timeout=15,
            what="the death report on the terminal",
        )
        text = err.read_text()
        assert "still running: vLLM simulator 1" in text
        assert proc.poll() is None, "devstack must not stop because a child died"

        # The gateway keeps serving with what is left (the service excludes the dead one).
        def served_by_sim1() -> bool:
            status, pod = _chat(url)
            return status == 200 and pod == f"127.0.0.1:{sim1}"

        poll_until(served_by_sim1, timeout=15, what="a request served by simulator 1")

        # The service dies: reported and restarted.
        for pid in _pids_listening(admin):
            os.kill(pid, signal.SIGKILL)
        poll_until(
            lambda: "service restarted" in err.read_text(), timeout=40, what="the service restart"
        )
        poll_until(lambda: _chat(url)[0] == 200, timeout=15, what="serving after the restart")
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
    assert "devstack: stopped." in out.read_text()


def _pids_listening(port: int) -> list[int]:
    """PIDs with a listening TCP socket on ``port`` (from /proc, no external tools)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    pids = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    pids.append(int(pid_dir.name))
                    break
        except OSError:
            continue
    return pids
