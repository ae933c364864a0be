"""Where the backend list comes from: static ``--backend`` URLs and ``--backends-dns``.

DNS mode resolves NAME to *all* its addresses (what docker compose replicas and Kubernetes
headless services give you) and re-resolves periodically; a failed lookup keeps the last
good set rather than emptying the pool. Only addresses of ``--address-family`` are kept: a pick
must be a host Envoy's cluster knows, and envoy.yaml resolves IPv4 only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from extproc.supervise import spawn

log = logging.getLogger(__name__)


def parse_dns_target(target: str) -> tuple[str, int]:
    name, sep, port = target.rpartition(":")
    if not sep or not name or not port.isdigit():
        raise ValueError(f"--backends-dns expects NAME:PORT, got {target!r}")
    return name, int(port)


AddressFamily = Literal["ipv4", "ipv6", "any"]
_FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6, "any": socket.AF_UNSPEC}


async def resolve_all(name: str, port: int, family: AddressFamily = "ipv4") -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(name, port, family=_FAMILIES[family], type=socket.SOCK_STREAM)
    addrs = sorted({str(info[4][0]) for info in infos})
    return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addrs]


async def normalize_static(urls: Sequence[str], family: AddressFamily = "ipv4") -> list[str]:
    """Resolve host names in static URLs to an IP: Envoy matches hosts by ``ip:port``."""
    out = []
    for url in urls:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        host, port = parts.hostname, parts.port
        if not host or not port:
            raise ValueError(f"--backend needs scheme://host:port, got {url!r}")
        try:
            ipaddress.ip_address(host)
            out.append(urlunsplit(parts._replace(path="")).rstrip("/"))
        except ValueError:
            resolved = await resolve_all(host, port, family)
            if not resolved:
                raise ValueError(f"cannot resolve backend host {host!r}") from None
            out.append(resolved[0])
    return out


class Discovery:
    def __init__(
        self,
        static: Sequence[str],
        dns_targets: Sequence[str],
        on_change: Callable[[list[str]], None],
        *,
        refresh: float = 5.0,
        family: AddressFamily = "ipv4",
        on_error: Callable[[str], None] = lambda task: None,
    ) -> None:
        self.static = list(static)
        self.dns_targets = [parse_dns_target(t) for t in dns_targets]
        self.on_change = on_change
        self.refresh = refresh
        self.family: AddressFamily = family
        self.on_error = on_error
        self._dns: dict[tuple[str, int], list[str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._published: list[str] | None = None
        # Set after the first refresh: static and DNS lists are known at once (a failed lookup
        # is retried in the background; readiness then rests on the pool not being empty).
        self.synced = asyncio.Event()

    async def start(self) -> None:
        await self.refresh_once()
        if self.dns_targets:
            self._task = spawn("dns-discovery", self._loop, self.on_error)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def current(self) -> list[str]:
        urls = list(self.static)
        for target in self.dns_targets:
            urls += self._dns.get(target, [])
        return list(dict.fromkeys(urls))

    async def refresh_once(self) -> None:
        for name, port in self.dns_targets:
            try:
                self._dns[(name, port)] = await resolve_all(name, port, self.family)
            except OSError as exc:
                log.warning(
                    "DNS lookup of %s:%d failed (%s); keeping %d known backends",
                    name,
                    port,
                    exc,
                    len(self._dns.get((name, port), [])),
                )
        now = self.current()
        if now != self._published:
            self._published = now
            self.on_change(now)
        self.synced.set()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            await self.refresh_once()
