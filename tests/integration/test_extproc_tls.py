"""TLS on the ext_proc gRPC port and the plaintext health port, with real processes.

* Envoy with an upstream TLS context (no verification, as gateways configure an endpoint picker)
  routes through a service started with ``--tls-self-signed``;
* Envoy verifying the certificate routes through a service started with ``--tls-cert/--tls-key``,
  and an Envoy trusting another CA does not reach it (fails open, visible in its stats);
* a plaintext client cannot use the TLS port, the ``--grpc-health-address`` port answers in
  plaintext for kubelets, also while draining;
* bad TLS input is a clear error exit.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack import Stack
from devstack.envoy_config import EXTPROC_CLUSTER, render_local_config, render_local_config_dict
from devstack.processes import (
    free_port,
    port_is_open,
    start_envoy,
    start_extproc,
    validate_envoy_config,
)
from extproc.grpc_server import SERVICE_NAME
from extproc.tls import self_signed, write_pair

from .e2e import Routed, envoy_stats, eventually, post

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TLS_SOCKET = "envoy.transport_sockets.tls"


def tls_stats(admin_url: str) -> dict[str, int]:
    return envoy_stats(admin_url, rf"^cluster\.{EXTPROC_CLUSTER}\.ssl\.")


async def routed_chat(url: str) -> Routed:
    """One chat request through Envoy, decided by the service (x-routed-endpoint set)."""
    async with aiohttp.ClientSession() as session:
        reply = await post(session, url)
    assert reply.status == 200, reply.body
    assert reply.endpoint, f"not decided by the service (failed open?): {reply.headers}"
    return reply


# --------------------------------------------------------------------------- rendering


def _common(**extra: Any) -> dict[str, Any]:
    return {
        "listener_port": 20001,
        "admin_port": 20002,
        "extproc_address": ("127.0.0.1", 20003),
        "backends": [("127.0.0.1", 20004)],
        **extra,
    }


def _extproc_tls(cfg: dict[str, Any]) -> dict[str, Any] | None:
    (cluster,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == EXTPROC_CLUSTER]
    sock = cluster.get("transport_socket")
    if sock is None:
        return None
    assert sock["name"] == TLS_SOCKET
    tls: dict[str, Any] = sock["typed_config"]
    return tls


def test_tls_touches_only_the_extproc_cluster(tmp_path: Path) -> None:
    plain = render_local_config_dict(**_common())
    unverified = render_local_config_dict(**_common(extproc_tls=True))
    verified = render_local_config_dict(**_common(extproc_tls_ca=tmp_path / "ca.pem"))
    assert _extproc_tls(plain) is None
    for cfg in (unverified, verified):
        tls = _extproc_tls(cfg)
        assert tls is not None and tls["sni"] == "localhost"
        assert tls["common_tls_context"]["alpn_protocols"] == ["h2"]
        assert tls["common_tls_context"]["tls_params"] == {
            "tls_maximum_protocol_version": "TLSv1_3"
        }
    assert "validation_context" not in _extproc_tls(unverified)["common_tls_context"]  # type: ignore[index]
    validation = _extproc_tls(verified)["common_tls_context"]["validation_context"]  # type: ignore[index]
    assert validation["trusted_ca"] == {"filename": str(tmp_path / "ca.pem")}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "localhost"}}
    ]
    # Everything else, the other clusters included, is the plain config.
    for cfg in (unverified, verified):
        for c in cfg["static_resources"]["clusters"]:
            c.pop("transport_socket", None)
        assert cfg == plain


def test_tls_variants_validate(envoy_bin: str, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    write_pair(self_signed(["localhost"]), ca, tmp_path / "ca.key")
    variants = {
        "extproc-tls": render_local_config(**_common(extproc_tls=True)),
        "extproc-tls-verified": render_local_config(**_common(extproc_tls_ca=ca)),
        "extproc-tls-two-replicas": render_local_config(
            **{k: v for k, v in _common().items() if k != "extproc_address"},
            grpc_ports=[20003, 20008],
            extproc_tls=True,
        ),
    }
    problems = []
    for name, text in variants.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        result = validate_envoy_config(path)
        out = result.stdout + result.stderr
        if result.returncode != 0 or "deprecated" in out.lower():
            problems.append(f"{name}: exit {result.returncode}\n{out[-3000:]}")
    assert not problems, "\n\n".join(problems)


# --------------------------------------------------------------------------- through Envoy


async def test_envoy_routes_through_a_self_signed_service(stack) -> None:
    s: Stack = stack(n_backends=2, extproc_tls="self-signed")
    reply = await routed_chat(s.url)
    assert reply.endpoint in s.sim_endpoints and reply.pod in s.sim_endpoints
    ssl_stats = tls_stats(s.envoy_admin_url)
    assert ssl_stats.get(f"cluster.{EXTPROC_CLUSTER}.ssl.handshake", 0) > 0, ssl_stats
    assert ssl_stats.get(f"cluster.{EXTPROC_CLUSTER}.ssl.connection_error", 0) == 0, ssl_stats
    assert ssl_stats.get(f"cluster.{EXTPROC_CLUSTER}.ssl.versions.TLSv1.3", 0) > 0, ssl_stats
    assert "--tls-self-signed" in s.service.argv  # type: ignore[union-attr]
    assert "self-signed certificate: SHA-256 fingerprint" in s.service.log_path.read_text()  # type: ignore[union-attr]


async def test_envoy_verifies_the_services_certificate(stack, log_dir: Path) -> None:
    s: Stack = stack(n_backends=2, extproc_tls="files")
    cert, key = s.tls_files
    argv = s.service.argv  # type: ignore[union-attr]
    i = argv.index("--tls-cert")
    assert argv[i : i + 4] == ["--tls-cert", str(cert), "--tls-key", str(key)]
    reply = await routed_chat(s.url)
    assert reply.endpoint in s.sim_endpoints
    ssl_stats = tls_stats(s.envoy_admin_url)
    assert ssl_stats.get(f"cluster.{EXTPROC_CLUSTER}.ssl.handshake", 0) > 0, ssl_stats
    assert ssl_stats.get(f"cluster.{EXTPROC_CLUSTER}.ssl.fail_verify_error", 0) == 0, ssl_stats
    assert ssl_stats.get(f"cluster.{EXTPROC_CLUSTER}.ssl.fail_verify_san", 0) == 0, ssl_stats
    tls = _extproc_tls(yaml.safe_load(s.envoy_config))
    assert tls is not None
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"] == {"filename": str(cert)}

    # The same service behind an Envoy that trusts another CA: the handshake is refused, so the
    # request is routed without the service (failure_mode_allow), and Envoy says why.
    stranger = log_dir / "stranger-ca.pem"
    write_pair(self_signed(["localhost"]), stranger, log_dir / "stranger-ca.key")
    listener, admin = free_port(), free_port()
    config = render_local_config(
        listener_port=listener,
        admin_port=admin,
        extproc_address=("127.0.0.1", s.service_grpc_port()),
        backends=[tuple(e.split(":")) for e in s.sim_endpoints],  # type: ignore[misc]
        extproc_tls_ca=stranger,
    )
    with start_envoy(
        config, log_dir=log_dir, admin_port=admin, name="envoy-stranger", concurrency=1
    ):
        admin_url = f"http://127.0.0.1:{admin}"
        async with aiohttp.ClientSession() as session:
            reply = await post(session, f"http://127.0.0.1:{listener}")
        assert reply.status == 200 and reply.pod in s.sim_endpoints  # failed open ...
        assert not reply.endpoint  # ... without the service's decision
        verify = tls_stats(admin_url)
        assert verify.get(f"cluster.{EXTPROC_CLUSTER}.ssl.fail_verify_error", 0) > 0, verify
        assert verify.get(f"cluster.{EXTPROC_CLUSTER}.ssl.handshake", 0) == 0, verify


# --------------------------------------------------------------------------- the ports themselves


def _served_certificate(port: int) -> bytes:
    """The DER certificate the TLS port presents (no verification: we want to see it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


async def _status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=3)).status


async def test_tls_port_refuses_plaintext_and_the_health_port_answers_kubelets(
    log_dir: Path,
) -> None:
    grpc_port, admin_port, health_port = free_port(), free_port(), free_port()
    proc = start_extproc(
        grpc_port=grpc_port,
        admin_port=admin_port,
        backends=[f"http://127.0.0.1:{free_port()}"],
        args=[
            "--tls-self-signed",
            "--grpc-health-address",
            f"127.0.0.1:{health_port}",
            "--drain-seconds",
            "3",
        ],
        log_dir=log_dir,
    )
    try:
        # The certificate served is the one whose fingerprint was logged.
        der = await asyncio.to_thread(_served_certificate, grpc_port)
        served = hashlib.sha256(der).hexdigest().upper()
        logged = re.search(r"SHA-256 fingerprint ([0-9A-F:]+)", proc.log_path.read_text())
        assert logged and logged.group(1).replace(":", "") == served

        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _status(plain, "readiness")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        pem = ssl.DER_cert_to_PEM_cert(der).encode()
        async with (
            grpc.aio.secure_channel(
                f"127.0.0.1:{grpc_port}", grpc.ssl_channel_credentials(pem)
            ) as tls,
            grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as health,
        ):
            for name in ("", SERVICE_NAME, "readiness", "liveness"):
                assert await _status(health, name) == SERVING, name
                assert await _status(tls, name) == SERVING, name

            proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return await _status(health, "readiness") == NOT_SERVING

            await eventually(not_ready, timeout=2)
            # Draining: not ready, still alive - on both ports.
            assert await _status(health, "liveness") == SERVING
            assert await _status(tls, "readiness") == NOT_SERVING
            assert await _status(tls, "liveness") == SERVING

        async def exited() -> bool:
            return not proc.alive()

        await eventually(exited, timeout=15)
        assert proc.returncode == 0, proc.log_tail()
        assert not port_is_open(health_port) and not port_is_open(grpc_port)
    finally:
        proc.stop()


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "extproc",
        "serve",
        "--grpc-address",
        f"127.0.0.1:{free_port()}",
        "--admin-address",
        f"127.0.0.1:{free_port()}",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("missing-cert", 2, "--tls-cert {missing}: No such file or directory"),
        ("cert-only", 2, "--tls-cert and --tls-key go together"),
        ("not-pem", 2, "no PEM certificate"),
        ("health-port-taken", 1, "cannot listen on --grpc-health-address"),
    ],
)
def test_bad_tls_input_is_a_clear_error_exit(
    tmp_path: Path, case: str, code: int, message: str
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    write_pair(self_signed(["localhost"]), cert, key)
    missing = tmp_path / "missing.crt"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = {
            "missing-cert": ["--tls-cert", str(missing), "--tls-key", str(key)],
            "cert-only": ["--tls-cert", str(cert)],
            "not-pem": ["--tls-cert", str(key), "--tls-key", str(key)],
            "health-port-taken": [
                "--tls-self-signed",
                "--grpc-health-address",
                f"127.0.0.1:{taken.getsockname()[1]}",
            ],
        }[case]
        result = _serve(*args)
    assert result.returncode == code, result.stderr
    assert message.format(missing=missing) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
