"""The real service (in-process asyncio, real gRPC, real HTTP scrapes) against scripted backends.

Each backend is a real aiohttp server on loopback whose /metrics can be switched between the
real vLLM captures, 503 (a vLLM still loading), garbage, and "slow" at run time. The gRPC
client speaks ext_proc like Envoy does. Envoy itself is covered by test_routing_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from devstack.processes import free_port
from extproc.app import run
from extproc.config import load_settings

from .e2e import ok_scrapes

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"  # real vLLM captures, in the repo


def fixture(name: str, running: int | None = None) -> str:
    text = (FIXTURES / name).read_text()
    if running is not None:
        lines = [
            f'vllm:num_requests_running{{engine="0",model_name="tiny-llama"}} {float(running)}'
            if ln.startswith("vllm:num_requests_running{")
            else ln
            for ln in text.splitlines()
        ]
        text = "\n".join(lines) + "\n"
    return text


@dataclass
class FakeBackend:
    port: int
    mode: str = "ok"  # ok | 503 | garbage | slow | hang (until `release` is set)
    body: str = ""
    runner: web.AppRunner | None = None
    ok_served: int = 0  # /metrics answers with a 200 and the body
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def metrics(_: web.Request) -> web.StreamResponse:
            if self.mode == "503":
                return web.Response(status=503, text="model loading")
            if self.mode == "garbage":
                return web.Response(text="<html>oops</html>")
            if self.mode == "slow":  # answers after 5 s (or at once when the test ends)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), 5)
            if self.mode == "hang":  # a first scrape that has not answered yet (bounded)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), 30)
            self.ok_served += 1
            return web.Response(text=self.body)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release.set()
        if self.runner:
            await self.runner.cleanup()


@dataclass
class Service:
    grpc_address: str
    admin_url: str
    stub: ep_grpc.ExternalProcessorStub

    async def route(self, **headers: str) -> ep.ProcessingResponse:
        hv = [base_pb2.HeaderValue(key=":path", raw_value=b"/v1/completions")]
        hv += [
            base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode())
            for k, v in headers.items()
        ]
        req = ep.ProcessingRequest(
            request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv))
        )
        call = self.stub.Process(iter([req]))
        responses = [resp async for resp in call]  # read to the end: the stream closes cleanly
        assert len(responses) == 1
        return responses[0]

    async def open_stream(self, **headers: str) -> HeldStream:
        """A Process stream that stays open after the decision (as Envoy keeps it open until
        the HTTP request ends). Close it with :meth:`HeldStream.end`."""
        hv = [base_pb2.HeaderValue(key=":path", raw_value=b"/v1/completions")]
        hv += [
            base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode())
            for k, v in headers.items()
        ]
        req = ep.ProcessingRequest(
            request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv))
        )
        call = self.stub.Process()
        await call.write(req)
        resp = await call.read()
        assert resp is not grpc.aio.EOF
        return HeldStream(call, resp.dynamic_metadata["extproc"]["endpoint"])

    async def decision(self, **headers: str) -> tuple[str, str]:
        md = (await self.route(**headers)).dynamic_metadata["extproc"]
        return md["endpoint"], md["reason"]

    async def ok_scrapes(self) -> float:
        """Good scrapes the service counted (``extproc_scrapes_total{result="ok"}``), all backends."""
        async with aiohttp.ClientSession() as s:
            return await ok_scrapes(s, self.admin_url)

    async def backends(self) -> dict:
        async with aiohttp.ClientSession() as s, s.get(self.admin_url + "/backends") as r:
            return await r.json()


@dataclass
class HeldStream:
    call: grpc.aio.StreamStreamCall
    endpoint: str

    async def end(self) -> None:
        """Half-close like Envoy at the end of a request, then drain to the server's EOF."""
        await self.call.done_writing()
        assert await self.call.read() is grpc.aio.EOF


async def eventually(
    check: Callable[[], object], *, timeout: float = 5.0, interval: float = 0.02
) -> float:
    """Poll an async or sync predicate until truthy; return the elapsed seconds."""
    start = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def service(backends: list[FakeBackend], **settings: object) -> AsyncIterator[Service]:
    grpc_port, admin_port = free_port(), free_port()
    cli = {
        "grpc_address": f"127.0.0.1:{grpc_port}",
        "admin_address": f"127.0.0.1:{admin_port}",
        "backend": [b.url for b in backends],
        "scrape_timeout": 0.3,
        **settings,
    }
    stop = asyncio.Event()
    task = asyncio.create_task(run(load_settings(cli), stop=stop))
    channel = grpc.aio.insecure_channel(cli["grpc_address"])
    svc = Service(
        cli["grpc_address"],
        f"http://127.0.0.1:{admin_port}",
        ep_grpc.ExternalProcessorStub(channel),
    )

    async def admin_up() -> bool:
        try:
            await svc.backends()
            return True
        except aiohttp.ClientError:
            return False

    try:
        await eventually(admin_up, timeout=10)
        yield svc
    finally:
        stop.set()
        await channel.close()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., FakeBackend]]:
    made: list[FakeBackend] = []

    async def make(mode: str = "ok", body: str = "") -> FakeBackend:
        b = FakeBackend(free_port(), mode, body or fixture("vllm-metrics-real.txt"))
        await b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        await b.stop()


async def test_cold_start_then_metrics_from_the_first_good_scrape(fakes):
    a, b = await fakes("503"), await fakes("503")
    async with service([a, b], scrape_interval=0.1) as svc:
        for _ in range(20):
            endpoint, reason = await svc.decision()
            assert reason == "cold-cache" and endpoint in {a.endpoint, b.endpoint}
        assert await svc.ok_scrapes() == 0
        a.mode = b.mode = "ok"
        # Ordering, not wall-clock: once the service has counted a good scrape (counted after
        # the registry took it), the very next decision must use it; without waiting for the
        # periodic snapshot rebuild. And it must get there (generous deadline).
        deadline = time.monotonic() + 10
        while True:
            counted = await svc.ok_scrapes()
            endpoint, reason = await svc.decision()
            if counted:
                assert reason == "metrics", (
                    f"{counted} good scrape(s) counted, decision still {reason}"
                )
                break
            assert reason in ("cold-cache", "metrics")
            assert time.monotonic() < deadline, "no good scrape counted within 10 s"
        assert a.ok_served + b.ok_served >= 1


async def _reason_is(svc: Service, reason: str) -> bool:
    return (await svc.decision())[1] == reason


async def test_least_request_avoids_the_busy_backend(fakes):
    busy = await fakes(body=fixture("vllm-metrics-real-busy.txt"))  # 8 running
    idle = await fakes(body=fixture("vllm-metrics-real.txt"))  # 0 running
    async with service([busy, idle]) as svc:
        await eventually(lambda: _all_fresh(svc, 2))
        picks = [(await svc.decision())[0] for _ in range(5)]
        assert set(picks) == {idle.endpoint}  # 5 sequential requests each finish before the next


async def _all_fresh(svc: Service, n: int) -> bool:
    data = await svc.backends()
    return sum(b["freshness"] == "fresh" for b in data["backends"]) == n


async def test_broken_metrics_backend_is_avoided_then_comes_back(fakes):
    a = await fakes(body=fixture("vllm-metrics-real.txt", running=5))
    b = await fakes(body=fixture("vllm-metrics-real.txt", running=0))
    async with service([a, b]) as svc:
        await eventually(lambda: _all_fresh(svc, 2))
        b.mode = "garbage"  # the idle-looking one breaks

        async def b_unhealthy() -> bool:
            return any(
                x["endpoint"] == b.endpoint and not x["healthy"]
                for x in (await svc.backends())["backends"]
            )

        await eventually(b_unhealthy)
        assert {(await svc.decision())[0] for _ in range(10)} == {a.endpoint}
        b.mode = "ok"
        await eventually(lambda: _picks(svc, b.endpoint))


async def _picks(svc: Service, endpoint: str) -> bool:
    return (await svc.decision())[0] == endpoint


async def test_slow_metrics_keep_the_backend_stale_and_busy_not_idle(fakes):
    a = await fakes(body=fixture("vllm-metrics-real.txt", running=2))
    b = await fakes(body=fixture("vllm-metrics-real.txt", running=20))
    async with service([a, b], stale_after=0.3, max_metrics_age=10.0) as svc:
        await eventually(lambda: _all_fresh(svc, 2))
        b.mode = "slow"  # every scrape now times out (0.3 s)

        async def b_stale_overloaded() -> bool:
            x = next(x for x in (await svc.backends())["backends"] if x["endpoint"] == b.endpoint)
            return (
                x["freshness"] == "stale"
                and x["overloaded"]
                and x["healthy"]
                and x["running"] == 20
            )

        await eventually(b_stale_overloaded, timeout=8)
        assert {(await svc.decision())[0] for _ in range(10)} == {a.endpoint}


async def test_scale_out_newcomer_is_neither_flooded_nor_starved(fakes):
    # Two known backends (2 and 6 running) and a newcomer whose first scrape has not answered
    # yet: it is in the pool with no data. Its prior is the median of the known (4): never 0
    # (it would be flooded), never excluded (starved), never the maximum (6).
    a = await fakes(body=fixture("vllm-metrics-real.txt", running=2))
    b = await fakes(body=fixture("vllm-metrics-real.txt", running=6))
    newcomer = await fakes("hang", body=fixture("vllm-metrics-real.txt", running=0))
    # Long interval and timeout: the known numbers and the picks' in-flight counts stay put for
    # the whole burst however slow the machine is, so the outcome is exact arithmetic.
    settings = {"scrape_interval": 2.0, "scrape_timeout": 20.0, "stale_after": 10.0}
    async with service([a, b, newcomer], **settings) as svc:
        await eventually(lambda: _all_fresh(svc, 2))
        views = {x["endpoint"]: x for x in (await svc.backends())["backends"]}
        assert (
            views[newcomer.endpoint]["freshness"] == "unknown"
            and views[newcomer.endpoint]["healthy"]
        )
        assert views[newcomer.endpoint]["prior"] and views[newcomer.endpoint]["running"] == 4
        # 12 streams held open (as Envoy holds them until the request ends): each pick counts
        # until it ends, so picks fill the lowest load: 2+6, 6+2, 4+4 -> 8 each.
        held = [await svc.open_stream(x_routing_strategy="least-request") for _ in range(12)]
        seen = {
            e: sum(h.endpoint == e for h in held)
            for e in (a.endpoint, b.endpoint, newcomer.endpoint)
        }
        assert sum(seen.values()) == 12
        assert 3 <= seen[newcomer.endpoint] <= 5, seen  # its fair share (4), neither 0 nor all
        assert seen[a.endpoint] > seen[newcomer.endpoint] > seen[b.endpoint], seen
        for h in held:
            await h.end()
        # Its first scrape answers: known and idle, so it now gets the traffic.
        newcomer.release.set()
        await eventually(lambda: _picks(svc, newcomer.endpoint), timeout=10)


async def test_inflight_released_when_stream_ends(fakes):
    a = await fakes()
    async with service([a]) as svc:
        await eventually(lambda: _all_fresh(svc, 1))

        async def inflight() -> int:
            return (await svc.backends())["backends"][0]["inflight"]

        assert await inflight() == 0
        first = await svc.open_stream()
        assert first.endpoint == a.endpoint
        assert await inflight() == 1  # counted from the decision on, while the stream is open
        second = await svc.open_stream()
        assert await inflight() == 2
        await first.end()
        await eventually(lambda: _inflight_is(svc, 1))
        await second.end()
        await eventually(lambda: _inflight_is(svc, 0))
        assert await inflight() == 0  # released exactly once, never below zero


async def _inflight_is(svc: Service, n: int) -> bool:
    return (await svc.backends())["backends"][0]["inflight"] == n


async def test_no_backends_answers_503_when_rejecting(fakes):
    async with service([], empty_pool="reject") as svc:
        resp = await svc.route()
        assert resp.immediate_response.status.code == 503
