"""extproc.tls (certificates, reload), the TLS settings, build_server with credentials and the
plaintext health port, in process (real gRPC servers on loopback)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import logging
import socket
import ssl
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from devstack.processes import free_port
from extproc.backends import BackendRegistry
from extproc.cli import main
from extproc.config import ConfigError, Settings, load_settings
from extproc.grpc_server import LIVENESS_NAME, READINESS_NAMES, build_server, set_serving
from extproc.health_port import build_health_server
from extproc.observability import Metrics
from extproc.processor import Processor
from extproc.strategies import FALLBACKS
from extproc.tls import (
    CertFiles,
    KeyPair,
    TLSError,
    fingerprint,
    load_pair,
    san_hosts,
    self_signed,
    server_credentials,
    write_pair,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _files(tmp_path: Path, pair: KeyPair, name: str = "tls") -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    write_pair(pair, cert, key)
    return cert, key


def _sans(pair: KeyPair) -> tuple[list[str], list[str]]:
    san = pair.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [
        str(a) for a in san.get_values_for_type(x509.IPAddress)
    ]


# -- the self-signed certificate ---------------------------------------------------------------
def test_self_signed_names_the_hosts_and_serves_a_year():
    pair = self_signed(["localhost", "127.0.0.1", "::1", "epp-7d9f"])
    dns, ips = _sans(pair)
    assert dns == ["localhost", "epp-7d9f"]
    assert ips == ["127.0.0.1", "::1"]
    cert = pair.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    assert cert.issuer == cert.subject  # self-signed
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=364) < lifetime < dt.timedelta(days=366)
    assert cert.not_valid_before_utc < dt.datetime.now(dt.UTC) < cert.not_valid_after_utc
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert (
        ExtendedKeyUsageOID.SERVER_AUTH
        in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    # Signed by its own key.
    cert.verify_directly_issued_by(cert)


def test_fingerprint_is_the_sha256_of_the_der_certificate():
    pair = self_signed(["localhost"])
    der = pair.certificate.public_bytes(serialization.Encoding.DER)
    assert pair.fingerprint.replace(":", "") == hashlib.sha256(der).hexdigest().upper()
    assert len(pair.fingerprint.split(":")) == 32
    assert fingerprint(pair.certificate) == pair.fingerprint
    assert pair.fingerprint in pair.describe() and "localhost" in pair.describe()


def test_self_signed_needs_a_host():
    with pytest.raises(ValueError, match="at least one"):
        self_signed([])


def test_two_self_signed_certificates_differ():
    assert self_signed(["localhost"]).fingerprint != self_signed(["localhost"]).fingerprint


def test_san_hosts(monkeypatch):
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    hosts = san_hosts("0.0.0.0:9002")
    assert hosts[:3] == ["localhost", "127.0.0.1", "::1"]
    assert socket.gethostname() in hosts and "10.1.2.3" in hosts and "0.0.0.0" not in hosts
    assert len(hosts) == len(set(hosts))
    assert "fd00::7" in san_hosts("[fd00::7]:9002")
    assert "[::]" not in san_hosts("[::]:9002") and "::" not in san_hosts("[::]:9002")[3:]
    assert san_hosts("epp.example:9002")[-1] == "epp.example"
    monkeypatch.delenv("POD_IP")
    assert "10.1.2.3" not in san_hosts("127.0.0.1:9002")
    # Every name makes a valid certificate (IP literals as IP SANs).
    _, ips = _sans(self_signed(san_hosts("[fd00::7]:9002")))
    assert all(ipaddress.ip_address(ip) for ip in ips) and "fd00::7" in ips


# -- PEM files ---------------------------------------------------------------------------------
def test_write_and_load_a_pair(tmp_path):
    pair = self_signed(["localhost"])
    cert, key = _files(tmp_path, pair)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    loaded = load_pair(cert, key)
    assert loaded.fingerprint == pair.fingerprint and loaded.key_pem == pair.key_pem


def test_a_chain_file_serves_its_first_certificate_as_the_leaf(tmp_path):
    leaf, other = self_signed(["leaf"]), self_signed(["intermediate"])
    cert, key = _files(tmp_path, leaf)
    cert.write_bytes(leaf.cert_pem + other.cert_pem)
    assert load_pair(cert, key).fingerprint == leaf.fingerprint


def _encrypted(pair: KeyPair) -> bytes:
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no-cert", r"--tls-cert .*tls\.crt: No such file"),
        ("no-key", r"--tls-key .*tls\.key: No such file"),
        ("cert-not-pem", "no PEM certificate"),
        ("key-not-pem", "no usable PEM private key"),
        ("encrypted-key", "encrypted"),
        ("other-key", "is not the key of the certificate"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, breakage, message):
    pair = self_signed(["localhost"])
    cert, key = _files(tmp_path, pair)
    if breakage == "no-cert":
        cert.unlink()
    elif breakage == "no-key":
        key.unlink()
    elif breakage == "cert-not-pem":
        cert.write_text("hello")
    elif breakage == "key-not-pem":
        key.write_bytes(pair.cert_pem)
    elif breakage == "encrypted-key":
        key.write_bytes(_encrypted(pair))
    else:
        key.write_bytes(self_signed(["localhost"]).key_pem)
    with pytest.raises(TLSError, match=message) as err:
        load_pair(cert, key)
    assert isinstance(err.value, ConfigError)  # the CLI prints it and exits 2


def test_an_expired_certificate_loads_with_a_warning(tmp_path, caplog):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "old.crt", tmp_path / "old.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with caplog.at_level(logging.WARNING, logger="extproc.tls"):
        pair = load_pair(cert_path, key_path)
    assert "expired" in caplog.text
    assert "CN=old" in pair.describe()  # no SAN: the subject names it


# -- rotation ----------------------------------------------------------------------------------
def test_cert_files_reload_only_a_changed_usable_pair(tmp_path, caplog):
    first = self_signed(["localhost"])
    cert, key = _files(tmp_path, first)
    files = CertFiles(str(cert), str(key))
    assert files.pair.fingerprint == first.fingerprint
    assert files.reload() is None and files.fetch() is None  # unchanged

    second = self_signed(["localhost"])
    # Half-way through a rotation: the new certificate with the old key.
    cert.write_bytes(second.cert_pem)
    with caplog.at_level(logging.WARNING, logger="extproc.tls"):
        assert files.reload() is None
    assert caplog.text.count("keeping the previous certificate") == 1
    assert files.pair.fingerprint == first.fingerprint
    with caplog.at_level(logging.WARNING, logger="extproc.tls"):
        assert files.reload() is None  # the same broken pair: said once, not per connection
    assert caplog.text.count("keeping the previous certificate") == 1

    write_pair(second, cert, key)
    assert isinstance(files.fetch(), grpc.ServerCertificateConfiguration)
    assert files.pair.fingerprint == second.fingerprint
    assert files.reload() is None  # taken once

    key.unlink()  # a Secret volume between its symlink swaps
    assert files.reload() is None and files.pair.fingerprint == second.fingerprint


# -- settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cli, message",
    [
        ({"tls_cert": "/x.crt"}, "go together"),
        ({"tls_key": "/x.key"}, "go together"),
        (
            {"tls_cert": "/x.crt", "tls_key": "/x.key", "tls_self_signed": True},
            "exclude each other",
        ),
    ],
)
def test_tls_settings_are_checked(cli, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(cli)


def test_tls_and_health_port_flags_exist():
    s = load_settings({})
    assert (s.tls_cert, s.tls_key, s.tls_self_signed, s.grpc_health_address) == ("", "", False, "")


def test_cli_exits_2_with_a_message_on_an_unreadable_certificate(tmp_path, capsys):
    code = main(
        [
            "serve",
            "--tls-cert",
            str(tmp_path / "nope.crt"),
            "--tls-key",
            str(tmp_path / "nope.key"),
            "--grpc-address",
            f"127.0.0.1:{free_port()}",
            "--admin-address",
            f"127.0.0.1:{free_port()}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "--tls-cert" in err and "nope.crt" in err and "Traceback" not in err


def test_server_credentials_follow_the_settings(tmp_path, caplog):
    assert server_credentials(Settings()) is None
    with caplog.at_level(logging.INFO, logger="extproc.tls"):
        assert isinstance(
            server_credentials(Settings(tls_self_signed=True)), grpc.ServerCredentials
        )
    assert "self-signed certificate: SHA-256 fingerprint" in caplog.text
    cert, key = _files(tmp_path, self_signed(["localhost"]))
    assert isinstance(
        server_credentials(Settings(tls_cert=str(cert), tls_key=str(key))), grpc.ServerCredentials
    )
    with pytest.raises(TLSError):
        server_credentials(Settings(tls_cert=str(cert), tls_key=str(tmp_path / "missing.key")))


# -- real servers ------------------------------------------------------------------------------
def _processor() -> tuple[Processor, BackendRegistry]:
    reg = BackendRegistry(stale_after=1.0, max_metrics_age=10.0)
    return Processor(
        reg, default_strategy="least-request", fallback=FALLBACKS["random"], metrics=Metrics()
    ), reg


def _peer_certificate(port: int) -> bytes:
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


async def _check(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return reply.status


async def test_tls_server_serves_the_files_and_picks_up_a_rotation(tmp_path):
    first = self_signed(["localhost", "127.0.0.1"])
    cert, key = _files(tmp_path, first)
    processor, reg = _processor()
    port = free_port()
    server, servicer, _ = build_server(
        processor,
        reg,
        f"127.0.0.1:{port}",
        server_credentials(Settings(tls_cert=str(cert), tls_key=str(key))),
    )
    await server.start()
    try:
        await set_serving(servicer, True)
        creds = grpc.ssl_channel_credentials(root_certificates=first.cert_pem)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            assert await _check(channel, "readiness") == SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _check(plain, "readiness")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        second = self_signed(["localhost"])
        write_pair(second, cert, key)
        # The next connection's handshake gets the new certificate, no restart.
        der = await asyncio.to_thread(_peer_certificate, port)
        assert hashlib.sha256(der).hexdigest().upper() == second.fingerprint.replace(":", "")
    finally:
        await server.stop(None)


async def test_health_port_says_what_the_main_port_says():
    processor, reg = _processor()
    main_port, health_port = free_port(), free_port()
    server, servicer, _ = build_server(processor, reg, f"127.0.0.1:{main_port}")
    health_server = build_health_server(servicer, f"127.0.0.1:{health_port}")
    await server.start()
    await health_server.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{main_port}") as main_ch,
            grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as health_ch,
        ):
            for ready, alive in ((True, True), (False, True), (False, False)):
                await set_serving(servicer, ready, alive=alive)
                for ch in (main_ch, health_ch):
                    for name in READINESS_NAMES:
                        assert await _check(ch, name) == (SERVING if ready else NOT_SERVING), name
                    assert await _check(ch, LIVENESS_NAME) == (SERVING if alive else NOT_SERVING)
            # Only health lives on the health port.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_ch.unary_unary("/envoy.service.ext_proc.v3.ExternalProcessor/Process")(
                    b"", timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await health_server.stop(None)
        await server.stop(None)


async def test_ports_in_use_are_os_errors():
    processor, reg = _processor()
    port = free_port()
    server, servicer, _ = build_server(processor, reg, f"127.0.0.1:{port}")
    await server.start()
    try:
        with pytest.raises(OSError, match="cannot listen on --grpc-health-address"):
            build_health_server(health.aio.HealthServicer(), f"127.0.0.1:{port}")
        with pytest.raises(OSError, match="cannot listen on gRPC address"):
            build_server(
                processor,
                reg,
                f"127.0.0.1:{port}",
                server_credentials(Settings(tls_self_signed=True)),
            )
    finally:
        await server.stop(None)
