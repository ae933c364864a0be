"""``--grpc-health-address``: grpc.health.v1 alone, always plaintext, on a port of its own.

A kubelet's gRPC probe does not speak TLS, so with TLS on the main port the probes go here.
The servicer is the main port's own object, registered on both servers, so the two ports can
never disagree about readiness or liveness.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2_grpc


def build_health_server(servicer: health.aio.HealthServicer, address: str) -> grpc.aio.Server:
    # No SO_REUSEPORT: a second process on the same port must fail loudly, not share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio's "Failed to bind to address ..."
        raise OSError(f"cannot listen on --grpc-health-address {address}: {exc}") from None
    return server
