"""The service's own health and lifecycle, on a real ``extproc serve`` process.

* SIGTERM drains: gRPC health NOT_SERVING at once, decisions still answered for
  ``--drain-seconds``, then a clean exit.
* An empty pool is NOT_SERVING; by default the answer lets Envoy choose (no destination).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.processes import Proc, free_port, start_extproc
from extproc.grpc_server import SERVICE_NAME

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status


async def open_decided_stream(
    channel: grpc.aio.Channel,
) -> tuple[grpc.aio.StreamStreamCall, ep.ProcessingResponse]:
    """A Process stream that sent request headers (as Envoy does) and read the answer; still open."""
    call = channel.stream_stream(
        f"/{SERVICE_NAME}/Process",
        request_serializer=ep.ProcessingRequest.SerializeToString,
        response_deserializer=ep.ProcessingResponse.FromString,
    )()
    hv = [base_pb2.HeaderValue(key=":path", raw_value=b"/v1/models")]
    await call.write(
        ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv)))
    )
    return call, await asyncio.wait_for(call.read(), 5)


async def decide(channel: grpc.aio.Channel) -> ep.ProcessingResponse:
    call, resp = await open_decided_stream(channel)
    await call.done_writing()
    return resp


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def exits_cleanly(proc: Proc, timeout: float) -> None:
    async def exited() -> bool:
        return not proc.alive()

    await wait_for(exited, timeout, f"{proc.name} to exit")
    assert proc.returncode == 0, proc.log_tail()


async def test_sigterm_flips_health_at_once_keeps_answering_then_exits(log_dir: Path) -> None:
    grpc_port, admin_port = free_port(), free_port()
    # The backend need not answer: the pool is known, so the service is SERVING.
    proc = start_extproc(
        grpc_port=grpc_port,
        admin_port=admin_port,
        backends=[f"http://127.0.0.1:{free_port()}"],
        args=["--drain-seconds", "3"],
        log_dir=log_dir,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            assert await health_of(channel) == SERVING
            assert await health_of(channel, SERVICE_NAME) == SERVING
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()

            async def not_serving() -> bool:
                return await health_of(channel) == NOT_SERVING

            await wait_for(not_serving, 2, "NOT_SERVING after SIGTERM")
            assert await health_of(channel, SERVICE_NAME) == NOT_SERVING
            # Still deciding during the drain: Envoy may open streams until its health check flips.
            resp = await decide(channel)
            assert resp.request_headers.response.header_mutation.set_headers[0].header.key == (
                "x-gateway-destination-endpoint"
            )
            assert time.monotonic() - t0 < 3, "the decision above must fall inside the drain period"
        await exits_cleanly(proc, 15)
        assert time.monotonic() - t0 >= 3 - 0.1, "stopped before the drain period ended"
        assert "draining" in proc.log_path.read_text()
    finally:
        proc.stop()


async def test_empty_pool_is_not_serving_and_lets_envoy_choose(log_dir: Path) -> None:
    grpc_port, admin_port = free_port(), free_port()
    proc = start_extproc(grpc_port=grpc_port, admin_port=admin_port, backends=[], log_dir=log_dir)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            assert await health_of(channel) == NOT_SERVING
            resp = await decide(channel)
            assert resp.WhichOneof("response") == "request_headers"
            assert not resp.request_headers.response.header_mutation.set_headers
    finally:
        proc.stop()


async def test_streams_still_open_after_the_grace_end_with_status_ok(log_dir: Path) -> None:
    # Envoy counts an error end of an ext_proc stream as a failure (failure_mode_allowed, and a
    # cut response when fail-closed); an OK end is "no more processing". So a stream still open
    # when the service stops must end with OK.
    grpc_port, admin_port = free_port(), free_port()
    proc = start_extproc(
        grpc_port=grpc_port,
        admin_port=admin_port,
        backends=[f"http://127.0.0.1:{free_port()}"],
        args=["--drain-seconds", "0.5", "--stop-grace", "0.5"],
        log_dir=log_dir,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            call, answer = await open_decided_stream(channel)
            assert answer.HasField("request_headers")
            proc.send_signal(signal.SIGTERM)  # the stream stays open, like a long generation
            assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
        await exits_cleanly(proc, 10)
        assert "ended 1 open streams with status OK" in proc.log_path.read_text()
    finally:
        proc.stop()


async def test_health_answers_the_names_gateways_and_kubelets_probe(log_dir: Path) -> None:
    grpc_port, admin_port = free_port(), free_port()
    proc = start_extproc(
        grpc_port=grpc_port,
        admin_port=admin_port,
        backends=[f"http://127.0.0.1:{free_port()}"],
        args=["--drain-seconds", "3"],
        log_dir=log_dir,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            for name in ("", SERVICE_NAME, "readiness", "liveness"):
                assert await health_of(channel, name) == SERVING, name
            proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return await health_of(channel, "readiness") == NOT_SERVING

            await wait_for(not_ready, 2, "readiness NOT_SERVING after SIGTERM")
            # Draining is not dead: a kubelet's liveness probe must not restart it meanwhile.
            assert await health_of(channel, "liveness") == SERVING
    finally:
        proc.stop()
