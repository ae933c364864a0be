"""Sans-I/O ext_proc logic: ProcessingRequest in, serialized ProcessingResponse out.

No sockets, no timers: the gRPC shell in :mod:`extproc.grpc_server` only moves messages.
Responses are cached as serialized bytes per (endpoint, strategy, reason): the common case
then costs one dict lookup instead of building and encoding a protobuf message.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc.backends import BackendRegistry, PickToken
from extproc.decide import Decision, NoBackends, decide
from extproc.errors import openai_error
from extproc.observability import Metrics
from extproc.strategies import STRATEGIES, RequestFacts, Strategy

log = logging.getLogger(__name__)

DESTINATION_HEADER = "x-gateway-destination-endpoint"
STRATEGY_HEADER = "x-routing-strategy"
LB_NAMESPACE = "envoy.lb"  # read by Envoy's override_host load-balancing policy
OBSERVABILITY_NAMESPACE = "extproc"  # turned into x-routing-* response headers by envoy.yaml
_RESPONSE_CACHE_LIMIT = 4096

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the shell needs: bytes to send, and the pick to release when the stream ends."""

    response: bytes
    token: PickToken | None = None


def headers_of(msg: ep.HttpHeaders) -> dict[str, str]:
    # Envoy fills raw_value (bytes); older versions fill value.
    return {h.key: (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value) for h in msg.headers.headers}


def routing_response(decision: Decision, expose: bool) -> bytes:
    endpoint = decision.backend.endpoint
    mutation = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=endpoint.encode()),
        append_action=_OVERWRITE,
    )
    md = struct_pb2.Struct()
    md.update({LB_NAMESPACE: {DESTINATION_HEADER: endpoint}})
    if expose:
        md.update(
            {OBSERVABILITY_NAMESPACE: {"strategy": decision.strategy, "reason": decision.reason, "endpoint": endpoint}}
        )
    resp = ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(
            response=ep.CommonResponse(header_mutation=ep.HeaderMutation(set_headers=[mutation]))
        ),
        dynamic_metadata=md,
    )
    return resp.SerializeToString()


def immediate_error(status: int, message: str, *, type_: str, code: str, details: str) -> bytes:
    resp = ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
            headers=ep.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
                        append_action=_OVERWRITE,
                    )
                ]
            ),
            body=openai_error(message, type_=type_, code=code),
            details=details,
        )
    )
    return resp.SerializeToString()


def _continue(kind: str) -> bytes:
    """A plain CONTINUE for a phase we did not ask for (robustness if Envoy sends it anyway)."""
    common = ep.CommonResponse()
    if kind == "request_body":
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common)).SerializeToString()
    if kind == "response_headers":
        return ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=common)).SerializeToString()
    if kind == "response_body":
        return ep.ProcessingResponse(response_body=ep.BodyResponse(response=common)).SerializeToString()
    if kind == "request_trailers":
        return ep.ProcessingResponse(request_trailers=ep.TrailersResponse()).SerializeToString()
    if kind == "response_trailers":
        return ep.ProcessingResponse(response_trailers=ep.TrailersResponse()).SerializeToString()
    return b""


_CONTINUE = {
    k: _continue(k) for k in ("request_body", "response_headers", "response_body", "request_trailers", "response_trailers")
}

_UNKNOWN_STRATEGY_DETAILS = "extproc_unknown_strategy"
_NO_BACKENDS = immediate_error(
    503,
    "No inference backend is available to serve this request.",
    type_="service_unavailable",
    code="no_backends",
    details="extproc_no_backends",
)


class Processor:
    """Turns one ext_proc message into one answer, using the registry's current snapshot."""

    def __init__(
        self,
        registry: BackendRegistry,
        *,
        default_strategy: str,
        fallback: Strategy,
        metrics: Metrics,
        expose_routing_headers: bool = True,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.registry = registry
        self.default_strategy = STRATEGIES[default_strategy]
        self.fallback = fallback
        self.metrics = metrics
        self.expose = expose_routing_headers
        self.rng = rng or random.Random()
        self._clock = clock
        self._seq = 0
        self._responses: dict[tuple[str, str, str], bytes] = {}

    def handle(self, req: ep.ProcessingRequest) -> Outcome:
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            return self.on_request_headers(req.request_headers)
        return Outcome(_CONTINUE.get(kind or "", b""))

    def on_request_headers(self, msg: ep.HttpHeaders) -> Outcome:
        started = self._clock()
        headers = headers_of(msg)
        strategy = self.default_strategy
        requested = headers.get(STRATEGY_HEADER)
        if requested:
            found = STRATEGIES.get(requested.strip().lower())
            if found is None:
                self.metrics.rejected("unknown-strategy")
                return Outcome(self._unknown_strategy(requested))
            strategy = found
        self._seq += 1
        facts = RequestFacts(seq=self._seq, path=headers.get(":path", ""), headers=headers)
        try:
            decision = decide(strategy, self.fallback, facts, self.registry.snapshot(), self.rng)
        except NoBackends:
            self.metrics.rejected("no-backends")
            return Outcome(_NO_BACKENDS)
        except Exception:  # a bug in a fallback itself: never drop the request
            log.exception("decision failed outright; routing at random")
            decision = self._last_resort(strategy)
            if decision is None:
                return Outcome(_NO_BACKENDS)
        token = self.registry.on_pick(decision.backend.index)
        self.metrics.decided(decision.strategy, decision.reason, self._clock() - started)
        return Outcome(self._response_for(decision), token)

    def _last_resort(self, strategy: Strategy) -> Decision | None:
        backends = self.registry.snapshot().backends
        if not backends:
            return None
        return Decision(self.rng.choice(backends), strategy.name, "fallback-error")

    def _response_for(self, decision: Decision) -> bytes:
        key = (decision.backend.endpoint, decision.strategy, decision.reason)
        cached = self._responses.get(key)
        if cached is None:
            if len(self._responses) >= _RESPONSE_CACHE_LIMIT:
                self._responses.clear()  # endpoints churned (DNS); rebuilding is cheap
            cached = self._responses[key] = routing_response(decision, self.expose)
        return cached

    @staticmethod
    def _unknown_strategy(requested: str) -> bytes:
        valid = ", ".join(STRATEGIES)
        return immediate_error(
            400,
            f"Unknown routing strategy {requested[:64]!r} in header {STRATEGY_HEADER}. Valid values: {valid}.",
            type_="invalid_request_error",
            code="unknown_routing_strategy",
            details=_UNKNOWN_STRATEGY_DETAILS,
        )
