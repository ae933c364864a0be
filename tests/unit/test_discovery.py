"""DNS discovery (extproc/discovery.py) with a scripted resolver: no real DNS, no sleeps."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from extproc import discovery
from extproc.discovery import Discovery, normalize_static, parse_dns_target, resolve_all


class FakeDns:
    """Stands in for ``discovery.resolve_all``: answers from a mutable table, or raises."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, int], list[str] | OSError] = {}
        self.lookups = 0

    def set(self, name: str, port: int, ips: list[str] | OSError) -> None:
        self.table[(name, port)] = ips

    async def __call__(self, name: str, port: int, *args: Any, **kwargs: Any) -> list[str]:
        self.lookups += 1
        answer = self.table.get((name, port), socket.gaierror(socket.EAI_NONAME, "unknown name"))
        if isinstance(answer, OSError):
            raise answer
        return [f"http://{ip}:{port}" for ip in answer]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    monkeypatch.setattr(discovery, "resolve_all", fake)
    return fake


class Changes:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, urls: list[str]) -> None:
        self.calls.append(list(urls))


async def test_first_resolution_publishes_static_plus_every_address(dns: FakeDns) -> None:
    dns.set("vllm", 8000, ["10.0.0.2", "10.0.0.1"])
    changes = Changes()
    d = Discovery(["http://10.9.9.9:7000"], ["vllm:8000"], changes)
    await d.refresh_once()
    assert changes.calls == [
        ["http://10.9.9.9:7000", "http://10.0.0.2:8000", "http://10.0.0.1:8000"]
    ]


async def test_added_and_removed_addresses_call_on_change_with_the_new_list(dns: FakeDns) -> None:
    dns.set("vllm", 8000, ["10.0.0.1", "10.0.0.2"])
    changes = Changes()
    d = Discovery([], ["vllm:8000"], changes)
    await d.refresh_once()
    dns.set("vllm", 8000, ["10.0.0.1", "10.0.0.2", "10.0.0.3"])  # scale-out
    await d.refresh_once()
    dns.set("vllm", 8000, ["10.0.0.3"])  # two replicas gone
    await d.refresh_once()
    assert changes.calls == [
        ["http://10.0.0.1:8000", "http://10.0.0.2:8000"],
        ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"],
        ["http://10.0.0.3:8000"],
    ]
    assert d.current() == ["http://10.0.0.3:8000"]


async def test_unchanged_answer_does_not_call_on_change(dns: FakeDns) -> None:
    dns.set("vllm", 8000, ["10.0.0.1"])
    changes = Changes()
    d = Discovery([], ["vllm:8000"], changes)
    for _ in range(3):
        await d.refresh_once()
    assert dns.lookups == 3 and len(changes.calls) == 1


async def test_failed_lookup_keeps_the_last_good_set(dns: FakeDns) -> None:
    dns.set("vllm", 8000, ["10.0.0.1", "10.0.0.2"])
    changes = Changes()
    d = Discovery([], ["vllm:8000"], changes)
    await d.refresh_once()
    dns.set("vllm", 8000, socket.gaierror(socket.EAI_AGAIN, "temporary failure in name resolution"))
    await d.refresh_once()
    await d.refresh_once()
    assert changes.calls == [["http://10.0.0.1:8000", "http://10.0.0.2:8000"]]  # never emptied
    assert d.current() == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    dns.set("vllm", 8000, ["10.0.0.2"])  # DNS answers again: the new set is published
    await d.refresh_once()
    assert changes.calls[-1] == ["http://10.0.0.2:8000"]


async def test_one_failing_target_does_not_hide_the_others(dns: FakeDns) -> None:
    dns.set("a", 8000, ["10.0.0.1"])
    dns.set("b", 9000, ["10.0.1.1"])
    changes = Changes()
    d = Discovery([], ["a:8000", "b:9000"], changes)
    await d.refresh_once()
    dns.set("a", 8000, OSError("resolver unreachable"))
    dns.set("b", 9000, ["10.0.1.1", "10.0.1.2"])
    await d.refresh_once()
    assert changes.calls[-1] == [
        "http://10.0.0.1:8000",
        "http://10.0.1.1:9000",
        "http://10.0.1.2:9000",
    ]


async def test_failed_first_lookup_publishes_the_static_backends_only(dns: FakeDns) -> None:
    changes = Changes()  # "vllm" is not in the table: the lookup fails
    d = Discovery(["http://10.9.9.9:7000"], ["vllm:8000"], changes)
    await d.refresh_once()
    assert changes.calls == [["http://10.9.9.9:7000"]]


async def test_the_refresh_loop_follows_dns_changes(dns: FakeDns) -> None:
    dns.set("vllm", 8000, ["10.0.0.1"])
    changes = Changes()
    d = Discovery([], ["vllm:8000"], changes, refresh=0.01)
    await d.start()
    try:
        assert changes.calls == [["http://10.0.0.1:8000"]]  # start() resolves before returning
        dns.set("vllm", 8000, ["10.0.0.1", "10.0.0.2"])
        await _until(lambda: len(changes.calls) >= 2)
        assert changes.calls[1] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
        dns.set("vllm", 8000, OSError("down"))
        seen = dns.lookups
        await _until(lambda: dns.lookups >= seen + 3)  # the loop survives failures ...
        assert len(changes.calls) == 2  # ... and keeps the last good set
        dns.set("vllm", 8000, ["10.0.0.2"])
        await _until(lambda: len(changes.calls) >= 3)
        assert changes.calls[2] == ["http://10.0.0.2:8000"]
    finally:
        await d.stop()
    assert d._task is not None and d._task.done()  # stop() ends the refresh loop


async def test_static_only_discovery_starts_no_loop(dns: FakeDns) -> None:
    changes = Changes()
    d = Discovery(["http://10.0.0.1:8000"], [], changes, refresh=0.01)
    await d.start()
    await d.stop()
    assert changes.calls == [["http://10.0.0.1:8000"]] and dns.lookups == 0


async def _until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met within the deadline"
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------ parsing and static backends


@pytest.mark.parametrize("target", ["vllm", "vllm:", ":8000", "vllm:http"])
def test_bad_dns_target_is_rejected(target: str) -> None:
    with pytest.raises(ValueError, match="NAME:PORT"):
        parse_dns_target(target)


def test_dns_target_parses() -> None:
    assert parse_dns_target("vllm.ns.svc.cluster.local:8000") == ("vllm.ns.svc.cluster.local", 8000)


async def test_static_ip_urls_are_kept_and_host_names_resolved(dns: FakeDns) -> None:
    dns.set("sim-a", 8001, ["10.0.0.7", "10.0.0.8"])
    out = await normalize_static(["http://127.0.0.1:8000/", "127.0.0.2:8002", "http://sim-a:8001"])
    assert out == ["http://127.0.0.1:8000", "http://127.0.0.2:8002", "http://10.0.0.7:8001"]


async def test_static_url_without_port_or_unresolvable_fails(dns: FakeDns) -> None:
    with pytest.raises(ValueError, match="host:port"):
        await normalize_static(["http://127.0.0.1"])
    with pytest.raises(OSError):
        await normalize_static(["http://nowhere:8000"])


async def test_resolve_all_dedups_sorts_and_brackets_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    async def getaddrinfo(host: str, port: int, **kwargs: Any) -> list[Any]:
        assert host == "vllm" and port == 8000
        tcp = socket.SOCK_STREAM
        return [
            (socket.AF_INET, tcp, 6, "", ("10.0.0.2", port)),
            (socket.AF_INET, tcp, 6, "", ("10.0.0.1", port)),
            (socket.AF_INET, tcp, 6, "", ("10.0.0.2", port)),  # one answer per protocol/socktype
            (socket.AF_INET6, tcp, 6, "", ("fd00::1", port, 0, 0)),
        ]

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    assert await resolve_all("vllm", 8000, "any") == [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
        "http://[fd00::1]:8000",
    ]
