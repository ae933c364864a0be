"""Kubernetes discovery end to end: a real ``extproc serve`` reading the fake API server.

The pods' IPs are real: each simulated pod is a vLLM simulator on its own loopback address
(127.0.0.2, 127.0.0.3, ...; all loopback on Linux), so the service scrapes them and Envoy
routes to them. The fake API server (tests/fake_k8s.py) speaks the list/watch protocol; no real
cluster is involved (docs/kubernetes.md says so too).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.envoy_config import render_local_config
from devstack.processes import (
    Proc,
    free_port,
    port_is_free,
    start_envoy,
    start_extproc,
    start_vllmsim,
)
from tests.fake_k8s import PODS, FakeKube, KubeState

from .e2e import chat_body, eventually, get_json, post

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
NS = "inference"  # the kubeconfig context's namespace: the service's default


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One simulator per loopback address, all on the same port (like pods of a Deployment)."""
    log_dir = tmp_path_factory.mktemp("k8s-sims")
    for _ in range(50):
        port = free_port(HOSTS[0])
        if all(port_is_free(port, h) for h in HOSTS):
            break
    procs = [start_vllmsim(port, host=h, log_dir=log_dir, wait=False) for h in HOSTS]
    try:
        for p in procs:
            p.wait_ready()
        yield port
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def k8s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKube]:
    """The fake API server, down (connection refused) until a test calls recover() or up()."""
    fake = FakeKube().start(listening=False)
    monkeypatch.setenv(
        "KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS))
    )
    try:
        yield fake
    finally:
        fake.stop()


class Service:
    def __init__(self, proc: Proc, grpc_port: int, admin_port: int) -> None:
        self.proc, self.grpc_port = proc, grpc_port
        self.admin = f"http://127.0.0.1:{admin_port}"

    async def pool(self, session: aiohttp.ClientSession) -> list[str]:
        data = await get_json(session, self.admin + "/backends")
        return sorted(b["endpoint"] for b in data["backends"])

    async def health(self, name: str) -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)).status

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")


@pytest.fixture
def service(log_dir: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    started: list[Proc] = []

    async def start(*args: str) -> Service:
        grpc_port, admin_port = free_port(), free_port()
        proc = start_extproc(
            grpc_port=grpc_port,
            admin_port=admin_port,
            backends=[],
            args=["--drain-seconds", "0", *args],
            log_dir=log_dir,
            wait=False,
        )
        started.append(proc)
        await asyncio.to_thread(proc.wait_ready)  # admin up; the fake keeps serving meanwhile
        return Service(proc, grpc_port, admin_port)

    yield start
    failed = any(
        getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call")
    )
    for proc in started:
        if failed:
            print(f"\n----- {proc.name} log -----\n{proc.log_tail(60)}")
        proc.stop()


def eps(*hosts: str, port: int) -> list[str]:
    return sorted(f"{h}:{port}" for h in hosts)


async def test_the_service_follows_the_pool_and_its_pods(
    sims: int, k8s: FakeKube, service: Any
) -> None:
    port = sims
    k8s.recover()
    k8s.set_pool("vllm-pool", {"app": "vllm"}, [port], ns=NS)
    k8s.add_pod("a", HOSTS[0], {"app": "vllm", "tier": "gold"}, ns=NS)
    k8s.add_pod("b", HOSTS[1], {"app": "vllm"}, ns=NS, ready=False)
    k8s.add_pod("x", "127.0.0.9", {"app": "other"}, ns=NS)
    k8s.add_pod("elsewhere", "127.0.0.8", {"app": "vllm"}, ns="default")  # another namespace
    svc = await service("--k8s-inference-pool", "vllm-pool")
    async with aiohttp.ClientSession() as s:

        async def pool_is(expected: list[str]) -> None:
            await eventually(lambda: _eq(svc.pool(s), expected), timeout=15)

        await pool_is(eps(HOSTS[0], port=port))
        # The discovered IP is a real server: the service scrapes it.
        await eventually(lambda: _fresh(s, svc, f"{HOSTS[0]}:{port}"), timeout=15)
        assert await svc.health("readiness") == SERVING

        k8s.set_pod_ready("b", True, ns=NS)
        await pool_is(eps(HOSTS[0], HOSTS[1], port=port))
        k8s.add_pod("c", HOSTS[2], {"app": "vllm"}, ns=NS)
        await pool_is(eps(*HOSTS, port=port))
        k8s.set_pod_ready("a", False, ns=NS)
        await pool_is(eps(HOSTS[1], HOSTS[2], port=port))
        k8s.do(lambda st: st.set_pod_ready("a", True, ns=NS))
        k8s.terminate_pod("c", ns=NS)
        await pool_is(eps(HOSTS[0], HOSTS[1], port=port))
        k8s.delete_pod("c", ns=NS)

        # The pool's selector changes: only the gold pod stays.
        k8s.set_pool("vllm-pool", {"app": "vllm", "tier": "gold"}, [port], ns=NS)
        await pool_is(eps(HOSTS[0], port=port))
        # Its target ports change: every pod times every port.
        other = port + 1 if port < 65535 else port - 1
        k8s.set_pool("vllm-pool", {"app": "vllm"}, [port, other], ns=NS)
        await pool_is(
            sorted(eps(HOSTS[0], HOSTS[1], port=port) + eps(HOSTS[0], HOSTS[1], port=other))
        )
        k8s.set_pool("vllm-pool", {"app": "vllm"}, [port], ns=NS)
        await pool_is(eps(HOSTS[0], HOSTS[1], port=port))

        # 410 Gone, both ways: a change hidden by a compaction is found by the relist.
        for how, change in (
            ("event", lambda st: st.delete_pod("b", ns=NS)),
            ("status", lambda st: st.add_pod("c", HOSTS[2], {"app": "vllm"}, ns=NS)),
        ):
            lists = k8s.requests("list", PODS)

            def hidden(st: KubeState, change: Any = change, how: Any = how) -> None:
                change(st)
                st.expire(how)

            k8s.do(hidden)
            await pool_is(
                eps(HOSTS[0], port=port) if how == "event" else eps(HOSTS[0], HOSTS[2], port=port)
            )
            assert k8s.requests("list", PODS) > lists
        k8s.add_pod("b2", HOSTS[1], {"app": "vllm"}, ns=NS)  # watching again after the relists
        await pool_is(eps(*HOSTS, port=port))

        # The pool is deleted: no backends, not ready (liveness unaffected).
        k8s.delete_pool("vllm-pool", ns=NS)
        await pool_is([])
        await eventually(lambda: _status(svc, "readiness", NOT_SERVING), timeout=10)
        assert await svc.health("liveness") == SERVING
        assert "InferencePool inference/vllm-pool does not exist" in svc.log()
    assert "Traceback" not in svc.log()


async def test_an_api_outage_keeps_the_last_good_set(
    sims: int, k8s: FakeKube, service: Any
) -> None:
    port = sims
    k8s.recover()
    for name, host in zip("ab", HOSTS[:2], strict=True):
        k8s.add_pod(name, host, {"app": "vllm"}, ns=NS)
    svc = await service("--k8s-selector", "app=vllm", "--k8s-target-port", str(port))
    async with aiohttp.ClientSession() as s:
        await eventually(lambda: _eq(svc.pool(s), eps(HOSTS[0], HOSTS[1], port=port)), timeout=15)
        expected = eps(HOSTS[0], HOSTS[1], port=port)
        for mode, change in (
            ("503", lambda st: st.add_pod("c", HOSTS[2], {"app": "vllm"}, ns=NS)),
            ("refused", lambda st: st.delete_pod("a", ns=NS)),
            ("hang", lambda st: st.add_pod("a", HOSTS[0], {"app": "vllm"}, ns=NS)),
        ):
            requests, failures = k8s.requests(), svc.log().count("failed (")
            k8s.outage(mode)  # type: ignore[arg-type]

            async def noticed(
                requests: int = requests, failures: int = failures, mode: str = mode
            ) -> bool:
                if mode == "refused":
                    return svc.log().count("failed (") >= failures + 2
                # 503: answered failures; hang: the reconnected watch now waits for an answer.
                return k8s.requests() >= requests + (2 if mode == "503" else 1)

            await eventually(noticed, timeout=20)
            # Unreachable API, known pool: same backends, still ready, still routing.
            assert await svc.pool(s) == expected
            assert await svc.health("readiness") == SERVING
            k8s.do(change)  # the cluster changes meanwhile ...
            k8s.recover()  # ... and the service catches up once the API is back
            expected = {
                "503": eps(*HOSTS, port=port),
                "refused": eps(HOSTS[1], HOSTS[2], port=port),
                "hang": eps(*HOSTS, port=port),
            }[mode]
            await eventually(lambda expected=expected: _eq(svc.pool(s), expected), timeout=30)
    log = svc.log()
    assert "keeping the last known backends" in log and "API answers again" in log
    assert "Traceback" not in log


async def test_readiness_waits_for_the_first_sync(sims: int, k8s: FakeKube, service: Any) -> None:
    port = sims
    k8s.do(lambda st: st.add_pod("a", HOSTS[0], {"app": "vllm"}, ns=NS))
    k8s.do(lambda st: st.set_pool("vllm-pool", {"app": "vllm"}, [port], ns=NS))
    svc = await service("--k8s-inference-pool", "vllm-pool")  # the API refuses connections
    # Up (admin answered, gRPC serves health), alive, not ready: it does not know the pool yet.
    assert await svc.health("liveness") == SERVING
    for name in ("readiness", ""):
        assert await svc.health(name) == NOT_SERVING
    await eventually(lambda: _logged(svc, "failed ("), timeout=10)  # it did try
    assert await svc.health("readiness") == NOT_SERVING
    k8s.recover()
    await eventually(lambda: _status(svc, "readiness", SERVING), timeout=30)
    async with aiohttp.ClientSession() as s:
        assert await svc.pool(s) == eps(HOSTS[0], port=port)
    assert re.search(r"kubernetes discovery synced: 1 backend", svc.log())


async def test_chat_through_envoy_reaches_the_discovered_pods(
    sims: int, k8s: FakeKube, service: Any, log_dir: Path
) -> None:
    port = sims
    k8s.recover()
    k8s.set_pool("vllm-pool", {"app": "vllm"}, [port], ns=NS)
    for name, host in zip("abc", HOSTS, strict=True):
        k8s.add_pod(name, host, {"app": "vllm"}, ns=NS)
    svc = await service("--k8s-inference-pool", "vllm-pool")
    listener, envoy_admin = free_port(), free_port()
    config = render_local_config(
        listener_port=listener,
        admin_port=envoy_admin,
        extproc_address=("127.0.0.1", svc.grpc_port),
        backends=[(h, port) for h in HOSTS],
    )
    envoy = start_envoy(config, log_dir=log_dir, admin_port=envoy_admin, wait=False)
    try:
        await asyncio.to_thread(envoy.wait_ready)
        url = f"http://127.0.0.1:{listener}"
        async with aiohttp.ClientSession() as s:
            everyone = eps(*HOSTS, port=port)
            await eventually(lambda: _eq(svc.pool(s), everyone), timeout=15)
            for h in HOSTS:
                await eventually(lambda h=h: _fresh(s, svc, f"{h}:{port}"), timeout=15)
            r = await post(s, url, chat_body("hello"))  # the default strategy
            assert r.status == 200, r.body
            assert r.endpoint in everyone and r.pod == r.endpoint  # the pod that served is the pick
            served = set()
            for i in range(6):
                r = await post(
                    s, url, chat_body(f"hello {i}"), headers={"x-routing-strategy": "round-robin"}
                )
                assert r.status == 200 and r.pod == r.endpoint, (r.status, r.headers)
                served.add(r.pod)
            assert sorted(served) == everyone  # every discovered pod serves

            k8s.delete_pod("a", ns=NS)  # scale-in: the pod leaves the pool
            rest = eps(HOSTS[1], HOSTS[2], port=port)
            await eventually(lambda: _eq(svc.pool(s), rest), timeout=15)
            for i in range(8):
                r = await post(s, url, chat_body(f"after {i}"))
                assert r.status == 200 and r.endpoint in rest and r.pod in rest, (
                    r.status,
                    r.headers,
                )
    finally:
        envoy.stop()


async def _eq(value: Any, expected: Any) -> bool:
    return await value == expected


async def _fresh(s: aiohttp.ClientSession, svc: Service, endpoint: str) -> bool:
    data = await get_json(s, svc.admin + "/backends")
    return any(b["endpoint"] == endpoint and b["freshness"] == "fresh" for b in data["backends"])


async def _status(svc: Service, name: str, status: int) -> bool:
    return await svc.health(name) == status


async def _logged(svc: Service, text: str) -> bool:
    return text in svc.log()
