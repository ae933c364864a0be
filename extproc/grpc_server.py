"""The asyncio gRPC shell around :class:`extproc.processor.Processor`.

Responses leave as pre-serialized bytes (identity serializer), so the common path does not
build a protobuf message per request. The in-flight count of a pick is released when
Envoy ends the ext_proc stream, which in our processing mode happens when the HTTP
request ends (see docs/envoy.md).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.backends import BackendRegistry
from extproc.processor import CONTINUE_FOR, Processor, StreamState
from extproc.route_settings import RouteSettingsCache

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
# Headroom over --max-body-bytes for the rest of a ProcessingRequest (headers, metadata).
_MESSAGE_HEADROOM = 1024 * 1024


def _identity(b: bytes) -> bytes:
    return b


class ExtProcHandler:
    def __init__(self, processor: Processor, registry: BackendRegistry) -> None:
        self.processor = processor
        self.registry = registry
        self.route_settings = RouteSettingsCache(processor.default_route)
        # Open Process calls -> "waiting in read()" (shutdown may only cancel those).
        self._streams: dict[asyncio.Task[object], bool] = {}
        self._closing = False

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def close_open_streams(self) -> int:
        """End every open stream with status OK (shutdown, after the grace period).

        OK, not CANCELLED: Envoy treats an OK end as "no more processing" and lets the HTTP
        request finish untouched, while an error end counts as a failure
        (``failure_mode_allowed``) and, fail-closed, cuts the response.
        """
        self._closing = True
        # Only a stream waiting in read() is cancelled: cancelling one inside write() breaks the
        # call (INTERNAL). A stream busy elsewhere sees _closing at the top of its loop.
        for task, reading in self._streams.items():
            if reading:
                task.cancel()
        return len(self._streams)

    async def process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        task = asyncio.current_task()
        streams = self._streams
        processor = self.processor
        # Per-route settings arrive as the stream's initial metadata (ExtProcPerRoute).
        state = StreamState(route=self.route_settings.get(context.invocation_metadata()))
        try:
            while not self._closing:
                streams[task] = True  # type: ignore[index]
                req = await context.read()
                streams[task] = False  # type: ignore[index]
                if req is grpc.aio.EOF:
                    break
                try:
                    outcome = processor.handle(req, state)
                except Exception:  # the processor already guards decisions; this is a last net
                    log.exception("ext_proc message handling failed; answering CONTINUE")
                    processor.metrics.handler_error()
                    # Envoy waits for an answer to every message: silence would cost the
                    # request message_timeout and then the fallback. CONTINUE costs nothing.
                    response = CONTINUE_FOR.get(req.WhichOneof("request") or "", b"")
                    if response:
                        await context.write(response)
                    continue
                if outcome.response:
                    await context.write(outcome.response)
                for response in outcome.more:  # FULL_DUPLEX_STREAMED: the body after the headers
                    await context.write(response)
        except asyncio.CancelledError:
            if not self._closing:
                raise  # the client (Envoy) went away
            # Returning normally ends the call with status OK (see close_open_streams).
        finally:
            streams.pop(task, None)  # type: ignore[arg-type]
            processor.finish(state)


def build_server(
    processor: Processor,
    registry: BackendRegistry,
    address: str,
    credentials: grpc.ServerCredentials | None = None,
    *,
    reuse_port: bool = False,
    also: tuple[str, ...] = (),
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, ExtProcHandler]:
    """The ext_proc + grpc.health.v1 server on ``address`` (and the addresses ``also``): TLS
    with ``credentials`` (extproc.tls.server_credentials), plaintext without. ``reuse_port``:
    share the port with the other ``--workers`` (the main checked that nothing else listens
    there)."""
    handler = ExtProcHandler(processor, registry)
    max_message = processor.max_body_bytes + _MESSAGE_HEADROOM
    rpc = grpc.stream_stream_rpc_method_handler(
        handler.process,
        request_deserializer=ep.ProcessingRequest.FromString,
        response_serializer=_identity,
    )
    server = grpc.aio.server(
        options=[
            # No SO_REUSEPORT: a second service on the same port must fail loudly, not share.
            # Workers of one service share it (the kernel spreads connections over them).
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # Envoy keeps one HTTP/2 connection with many streams: allow plenty of them.
            ("grpc.max_concurrent_streams", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # The default 4 MiB receive limit is below a 4 MiB body plus its envelope: a body
            # Envoy lets through must never be refused here.
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
        ]
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Process": rpc}),)
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for where in (address, *also):
        try:
            if credentials is not None:
                port = server.add_secure_port(where, credentials)
            else:
                port = server.add_insecure_port(where)
        except RuntimeError as exc:  # recent grpcio raises where older versions returned 0
            raise OSError(f"cannot listen on gRPC address {where}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on gRPC address {where}")
    return server, health_servicer, handler


# grpc.health.v1 service names, as gateways and kubelets probe them: readiness for "", the
# ext_proc service and "readiness" (Envoy's health check of the extproc cluster uses ""); the
# process being alive for "liveness" (it stays SERVING while draining: a kubelet must not kill
# a replica that is finishing its requests).
READINESS_NAMES = ("", SERVICE_NAME, "readiness")
LIVENESS_NAME = "liveness"


async def set_serving(
    health_servicer: health.aio.HealthServicer, serving: bool, *, alive: bool = True
) -> None:
    def status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        return (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    for name in READINESS_NAMES:
        await health_servicer.set(name, status(serving))
    await health_servicer.set(LIVENESS_NAME, status(alive))
