"""The real ``extproc serve`` process: a pick stays counted while its ext_proc stream is open and
is released when the stream is cancelled (Envoy resets it when the client goes away), or when
the whole gRPC connection drops.

The backend is a loopback aiohttp server serving a real vLLM /metrics capture; the client
speaks ext_proc over grpc.aio like Envoy does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from devstack.processes import Proc, free_port, start_extproc

pytestmark = pytest.mark.integration

CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-metrics-real.txt"


@pytest.fixture
async def backend() -> AsyncIterator[str]:
    """A loopback backend whose /metrics is a real vLLM capture; yields its endpoint."""
    body = CAPTURE.read_text()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=body)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def serve(log_dir: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Factory: ``grpc_address, admin_url = await serve(endpoint)`` starts ``extproc serve``."""
    procs: list[Proc] = []

    async def start(endpoint: str) -> tuple[str, str]:
        grpc_port, admin_port = free_port(), free_port()
        proc = await asyncio.to_thread(
            start_extproc,
            grpc_port=grpc_port,
            admin_port=admin_port,
            backends=[f"http://{endpoint}"],
            args=["--scrape-interval", "0.1", "--drain-seconds", "0"],
            log_dir=log_dir,
        )
        procs.append(proc)
        return f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{admin_port}"

    yield start
    failed = any(
        getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call")
    )
    for p in procs:
        if failed:
            print(f"\n----- {p.log_path} -----\n{p.log_tail(40)}")
        p.stop()


def headers_request() -> ep.ProcessingRequest:
    hv = [
        base_pb2.HeaderValue(key=k, raw_value=v)
        for k, v in ((":method", b"POST"), (":path", b"/v1/completions"))
    ]
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv))
    )


async def open_stream(stub: ep_grpc.ExternalProcessorStub) -> tuple[grpc.aio.StreamStreamCall, str]:
    """Open a Process stream, send request headers, read the decision; the stream stays open."""
    call = stub.Process()
    await call.write(headers_request())
    resp = await asyncio.wait_for(call.read(), 10)
    assert resp is not grpc.aio.EOF
    return call, resp.dynamic_metadata["extproc"]["endpoint"]


async def inflight(http: aiohttp.ClientSession, admin_url: str, endpoint: str) -> int:
    async with http.get(admin_url + "/backends", timeout=aiohttp.ClientTimeout(total=10)) as r:
        data = await r.json()
    return next(b["inflight"] for b in data["backends"] if b["endpoint"] == endpoint)


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"condition not met within {timeout}s"
        await asyncio.sleep(0.02)


async def test_cancelled_stream_releases_its_inflight_pick(backend: str, serve) -> None:
    grpc_address, admin_url = await serve(backend)
    async with aiohttp.ClientSession() as http, grpc.aio.insecure_channel(grpc_address) as channel:
        stub = ep_grpc.ExternalProcessorStub(channel)
        assert await inflight(http, admin_url, backend) == 0
        call, endpoint = await open_stream(stub)
        assert endpoint == backend
        # Counted from the decision on: the admin read happens after the answer arrived.
        assert await inflight(http, admin_url, backend) == 1
        other, _ = await open_stream(stub)
        assert await inflight(http, admin_url, backend) == 2
        call.cancel()  # what Envoy does when the downstream request is reset
        await until(lambda: _is(http, admin_url, backend, 1))
        assert call.cancelled()
        # The other stream was untouched; it ends normally (half-close, server closes).
        await other.done_writing()
        assert await asyncio.wait_for(other.read(), 10) is grpc.aio.EOF
        await until(lambda: _is(http, admin_url, backend, 0))


async def test_dropped_connection_releases_every_open_pick(backend: str, serve) -> None:
    grpc_address, admin_url = await serve(backend)
    async with aiohttp.ClientSession() as http:
        channel = grpc.aio.insecure_channel(grpc_address)
        stub = ep_grpc.ExternalProcessorStub(channel)
        for _ in range(3):
            await open_stream(stub)
        assert await inflight(http, admin_url, backend) == 3
        await channel.close(grace=None)  # the whole HTTP/2 connection goes (Envoy restarted)
        await until(lambda: _is(http, admin_url, backend, 0))
        # The service still works for the next client.
        async with grpc.aio.insecure_channel(grpc_address) as again:
            call, endpoint = await open_stream(ep_grpc.ExternalProcessorStub(again))
            assert endpoint == backend and await inflight(http, admin_url, backend) == 1
            call.cancel()
            await until(lambda: _is(http, admin_url, backend, 0))


async def _is(http: aiohttp.ClientSession, admin_url: str, endpoint: str, n: int) -> bool:
    return await inflight(http, admin_url, endpoint) == n
