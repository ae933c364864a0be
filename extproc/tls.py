"""TLS for the ext_proc gRPC port: a PEM certificate/key pair from files, or a self-signed one.

Gateways that call an endpoint picker (Istio, the Gateway API Inference Extension's reference
configs) speak TLS to it WITHOUT verifying the certificate, so ``--tls-self-signed`` is enough for
them; ``--tls-cert``/``--tls-key`` serve a certificate a gateway can verify (cert-manager, a
Kubernetes Secret). The files are re-read when they change: every new connection first compares
their contents, so a rotated Secret is served to new connections without a restart (an open HTTP/2
connection keeps the certificate it was set up with). A half-written rotation (the certificate
and the key do not match yet) is logged and the previous pair stays in use.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from extproc.config import ConfigError, Settings

log = logging.getLogger(__name__)

SELF_SIGNED_DAYS = 365
# Hosts a self-signed certificate always names: loopback callers (Envoy next door, tests).
_ALWAYS = ("localhost", "127.0.0.1", "::1")
# Wildcard listen addresses name no host.
_ANY_HOST = {"", "0.0.0.0", "::", "[::]", "*"}


class TLSError(ConfigError):
    """Unusable TLS material (missing, unreadable, not PEM, key not matching the certificate)."""


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes  # the leaf first, then any intermediates
    key_pem: bytes
    certificate: x509.Certificate  # the leaf

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    def describe(self) -> str:
        """One log line's worth: fingerprint, names and expiry."""
        try:
            san = self.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = ", ".join(str(n.value) for n in san.value)
        except x509.ExtensionNotFound:
            names = self.certificate.subject.rfc4514_string()
        expires = self.certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
        return f"SHA-256 fingerprint {self.fingerprint}, names [{names}], valid until {expires}"


def fingerprint(cert: x509.Certificate) -> str:
    """``AB:CD:...``, as ``openssl x509 -fingerprint -sha256`` prints it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def san_hosts(grpc_address: str = "") -> list[str]:
    """Names for a self-signed certificate: loopback, this host's name (a pod's name in
    Kubernetes), ``$POD_IP`` (downward API) and the listen host if it is a specific one."""
    host = grpc_address.rpartition(":")[0] if ":" in grpc_address else grpc_address
    hosts = [*_ALWAYS, socket.gethostname(), os.environ.get("POD_IP", ""), host.strip("[]")]
    return list(dict.fromkeys(h for h in hosts if h and h not in _ANY_HOST))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def self_signed(hosts: Iterable[str], *, days: int = SELF_SIGNED_DAYS) -> KeyPair:
    """A fresh EC P-256 key and a self-signed server certificate naming ``hosts``."""
    names = list(dict.fromkeys(hosts))
    if not names:
        raise ValueError("a certificate needs at least one host name")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A little slack for clocks that are behind ours.
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([_general_name(h) for h in names]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), key_pem, cert)


def write_pair(pair: KeyPair, cert_path: Path, key_path: Path) -> None:
    """Write a pair as PEM files; the key readable by its owner only."""
    cert_path.write_bytes(pair.cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pair.key_pem)


def load_pair(cert_path: str | Path, key_path: str | Path) -> KeyPair:
    """Read and check a PEM certificate (chain) and its unencrypted private key."""
    return parse_pair(
        _read(cert_path, "--tls-cert"), _read(key_path, "--tls-key"), cert_path, key_path
    )


def parse_pair(
    cert_pem: bytes, key_pem: bytes, cert_path: str | Path, key_path: str | Path
) -> KeyPair:
    """Check PEM contents (the paths only name them in errors)."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSError(f"--tls-cert {cert_path}: no PEM certificate in it") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TLSError(
            f"--tls-key {key_path}: the key is encrypted; give an unencrypted PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSError(f"--tls-key {key_path}: no usable PEM private key in it") from None
    leaf = chain[0]
    if key.public_key() != leaf.public_key():
        raise TLSError(
            f"--tls-key {key_path} is not the key of the certificate in --tls-cert {cert_path}"
        )
    if leaf.not_valid_after_utc < dt.datetime.now(dt.UTC):
        log.warning(
            "the certificate in %s expired on %s; clients that verify it will refuse it",
            cert_path,
            leaf.not_valid_after_utc,
        )
    return KeyPair(cert_pem, key_pem, leaf)


def _read(path: str | Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSError(f"{flag} {path}: {exc.strerror or exc}") from None


class CertFiles:
    """``--tls-cert``/``--tls-key``, re-read when they change (rotation without restart).

    The contents are compared, not the stat: two small files read per new connection (Envoy
    keeps its connections for long) and no change is missed for a coarse mtime.
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.pair = load_pair(cert_path, key_path)
        # Last contents looked at, usable or not: a broken pair is reported once, not per connection.
        self._seen = (self.pair.cert_pem, self.pair.key_pem)

    def reload(self) -> KeyPair | None:
        """The new pair if the files changed and are usable; None otherwise (keep the old one)."""
        try:
            # A Kubernetes Secret volume swaps a symlink on update: reading follows it.
            contents = Path(self.cert_path).read_bytes(), Path(self.key_path).read_bytes()
        except OSError:
            return None
        if contents == self._seen:
            return None
        self._seen = contents
        try:
            pair = parse_pair(*contents, self.cert_path, self.key_path)
        except TLSError as exc:
            # Mid-rotation the certificate may be new and the key still old: the next change of
            # the files is tried again; nothing is lost meanwhile.
            log.warning(
                "TLS files changed but are not usable (%s); keeping the previous certificate", exc
            )
            return None
        self.pair = pair
        log.info("TLS certificate reloaded from %s: %s", self.cert_path, pair.describe())
        return pair

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: called before every TLS handshake on a new connection."""
        pair = self.reload()
        return None if pair is None else _config(pair)


def _config(pair: KeyPair) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)])


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials from the settings; None = plaintext. Raises TLSError."""
    if settings.tls_self_signed:
        pair = self_signed(san_hosts(settings.grpc_address))
        log.info("TLS on the gRPC port with a self-signed certificate: %s", pair.describe())
        return grpc.ssl_server_credentials([(pair.key_pem, pair.cert_pem)])
    if settings.tls_cert:
        files = CertFiles(settings.tls_cert, settings.tls_key)
        log.info("TLS on the gRPC port with %s: %s", settings.tls_cert, files.pair.describe())
        return grpc.dynamic_ssl_server_credentials(_config(files.pair), files.fetch)
    return None
