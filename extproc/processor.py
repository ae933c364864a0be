"""Sans-I/O ext_proc logic: ProcessingRequest in, serialized ProcessingResponse out.

No sockets, no timers: the gRPC shell in :mod:`extproc.grpc_server` only moves messages.
Responses are cached as serialized bytes per (phase, endpoint, strategy, reason): the common case
then costs one dict lookup instead of building and encoding a protobuf message.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc.backends import BackendRegistry, PickToken
from extproc.decide import Decision, NoBackends, UnknownModel, decide, pool_for
from extproc.errors import openai_error
from extproc.observability import Metrics
from extproc.openai_request import LLM_PATHS, ParsedRequest, RequestError, parse_request, route_path
from extproc.prefix_index import PrefixIndex
from extproc.route_settings import DEFAULT as DEFAULT_ROUTE
from extproc.route_settings import RouteSettings
from extproc.strategies import STRATEGIES, RequestFacts, Strategy

log = logging.getLogger(__name__)

DESTINATION_HEADER = "x-gateway-destination-endpoint"
STRATEGY_HEADER = "x-routing-strategy"
LB_NAMESPACE = "envoy.lb"  # read by Envoy's override_host load-balancing policy
OBSERVABILITY_NAMESPACE = "extproc"  # turned into x-routing-* response headers by envoy.yaml
_RESPONSE_CACHE_LIMIT = 4096

SESSION_HEADER = "x-session-id"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Body modes under which Envoy sends the whole body in one message (announced by Envoy in the
# first message's protocol_config).
_BUFFERED_MODES = frozenset({ProcessingMode.BUFFERED, ProcessingMode.BUFFERED_PARTIAL})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the shell needs: bytes to send, and the pick to release when the stream ends."""

    response: bytes
    token: PickToken | None = None


@dataclass(slots=True)
class StreamState:
    """Per ext_proc stream (= per HTTP request): what the header phase leaves for the body phase."""

    route: RouteSettings = DEFAULT_ROUTE
    body_mode: int = 0  # ProcessingMode.BodySendMode Envoy announced in protocol_config
    headers: dict[str, str] | None = None
    strategy: Strategy | None = None
    awaiting_body: bool = False


def headers_of(msg: ep.HttpHeaders) -> dict[str, str]:
    # Envoy fills raw_value (bytes); older versions fill value.
    return {h.key: (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value) for h in msg.headers.headers}


def routing_response(decision: Decision, expose: bool, phase: str) -> bytes:
    # The pick, then the fallbacks: Envoy's override_host tries them in order on retries.
    endpoints = decision.endpoints
    mutation = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=endpoints.encode()),
        append_action=_OVERWRITE,
    )
    md = struct_pb2.Struct()
    md.update({LB_NAMESPACE: {DESTINATION_HEADER: endpoints}})
    if expose:
        md.update(
            {
                OBSERVABILITY_NAMESPACE: {
                    "strategy": decision.strategy,
                    "reason": decision.reason,
                    "endpoint": decision.backend.endpoint,
                }
            }
        )
    common = ep.CommonResponse(header_mutation=ep.HeaderMutation(set_headers=[mutation]))
    if phase == "request_body":
        resp = ep.ProcessingResponse(request_body=ep.BodyResponse(response=common), dynamic_metadata=md)
    else:
        resp = ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common), dynamic_metadata=md)
    return resp.SerializeToString()


def immediate_error(status: int, message: str, *, type_: str, code: str | None, details: str, param: str | None = None) -> bytes:
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
            body=openai_error(message, type_=type_, code=code, param=param),
            details=details,
        )
    )
    return resp.SerializeToString()


def _continue(kind: str) -> bytes:
    """A plain CONTINUE for a phase we do not act on."""
    common = ep.CommonResponse()
    if kind == "request_headers":
        return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common)).SerializeToString()
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


CONTINUE_FOR = {  # a plain CONTINUE answer per message kind (also the shell's last net)
    k: _continue(k)
    for k in (
        "request_headers", "request_body", "response_headers", "response_body", "request_trailers", "response_trailers"
    )
}

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
        prefix_index: PrefixIndex | None = None,
        max_body_bytes: int = 4 * 1024 * 1024,
        default_route: RouteSettings = DEFAULT_ROUTE,
        fallback_endpoints: int = 3,
        reject_when_empty: bool = False,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.registry = registry
        self.default_strategy = STRATEGIES[default_strategy]
        self.fallback = fallback
        self.metrics = metrics
        self.expose = expose_routing_headers
        self.prefix_index = prefix_index or PrefixIndex()
        self.max_body_bytes = max_body_bytes
        self.fallback_endpoints = fallback_endpoints
        # Empty pool: answer 503 ourselves, or (default) let Envoy's fallback policy choose.
        self.reject_when_empty = reject_when_empty
        # Service-wide weights / guards; a route's metadata overrides them field by field.
        self.default_route = default_route
        self.rng = rng or random.Random()
        self._clock = clock
        self._seq = 0
        self._responses: dict[tuple[str, str, str, str], bytes] = {}

    def handle(self, req: ep.ProcessingRequest, state: StreamState | None = None) -> Outcome:
        state = state if state is not None else StreamState(route=self.default_route)
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            if req.HasField("protocol_config"):
                state.body_mode = req.protocol_config.request_body_mode
            return self.on_request_headers(req.request_headers, state)
        if kind == "request_body" and state.awaiting_body:
            return self.on_request_body(req.request_body, state)
        return Outcome(CONTINUE_FOR.get(kind or "", b""))

    # -- phases ------------------------------------------------------------------------
    def on_request_headers(self, msg: ep.HttpHeaders, state: StreamState) -> Outcome:
        started = self._clock()
        headers = headers_of(msg)
        strategy = self._strategy_for(headers, state.route)
        if isinstance(strategy, bytes):
            return Outcome(strategy)
        path = route_path(headers.get(":path", ""))
        if state.body_mode in _BUFFERED_MODES and not msg.end_of_stream and path in LLM_PATHS:
            # Decide when the body arrives: the model, prompt and user live there.
            state.headers, state.strategy, state.awaiting_body = headers, strategy, True
            return Outcome(CONTINUE_FOR["request_headers"])
        facts = RequestFacts(seq=self._next_seq(), path=path, headers=headers, session_key=headers.get(SESSION_HEADER) or None)
        return self._route(strategy, facts, state.route, "request_headers", started)

    def on_request_body(self, msg: ep.HttpBody, state: StreamState) -> Outcome:
        started = self._clock()
        state.awaiting_body = False
        headers = state.headers or {}
        path = route_path(headers.get(":path", ""))
        try:
            try:
                parsed = parse_request(path, msg.body, max_bytes=self.max_body_bytes)
            except RequestError as err:
                # Not the end of the stream: in BUFFERED mode trailers follow a complete body; in
                # BUFFERED_PARTIAL mode Envoy may have cut the body at its buffer limit, which
                # shows as JSON that does not parse.
                if not msg.end_of_stream and state.body_mode == ProcessingMode.BUFFERED_PARTIAL and err.status == 400:
                    raise RequestError(
                        413, "Request body exceeds the gateway's buffer limit.", code="request_too_large"
                    ) from None
                raise
        except RequestError as err:
            self.metrics.rejected(err.code or f"http-{err.status}")
            return Outcome(
                immediate_error(
                    err.status, err.message, type_=err.type, code=err.code, param=err.param, details="extproc_bad_request"
                )
            )
        facts = self._facts_from_body(path, headers, parsed, state.route)
        strategy = state.strategy or self.default_strategy
        return self._route(strategy, facts, state.route, "request_body", started, parsed)

    # -- helpers -----------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _strategy_for(self, headers: dict[str, str], route: RouteSettings) -> Strategy | bytes:
        """Route setting > client header (unless forbidden) > service default."""
        if route.strategy is not None:
            return STRATEGIES[route.strategy]
        requested = headers.get(STRATEGY_HEADER)
        if requested and route.allow_client_strategy:
            found = STRATEGIES.get(requested.strip().lower())
            if found is None:
                self.metrics.rejected("unknown-strategy")
                return self._unknown_strategy(requested)
            return found
        return self.default_strategy

    def _facts_from_body(
        self, path: str, headers: dict[str, str], parsed: ParsedRequest, route: RouteSettings
    ) -> RequestFacts:
        index = self.prefix_index
        hashes = index.hashes(parsed.model, parsed.prompt)
        return RequestFacts(
            seq=self._next_seq(),
            path=path,
            headers=headers,
            model=parsed.model,
            session_key=headers.get(SESSION_HEADER) or parsed.user,
            has_prompt=bool(hashes),
            prefix_match=lambda endpoint: index.match_fraction(endpoint, hashes),
            weights=route.weights,
            prefix_guard_abs=route.prefix_guard_abs,
            prefix_guard_rel=route.prefix_guard_rel,
            prompt_hashes=hashes,
        )

    def _route(
        self,
        strategy: Strategy,
        facts: RequestFacts,
        route: RouteSettings,
        phase: str,
        started: float,
        parsed: ParsedRequest | None = None,
    ) -> Outcome:
        try:
            decision = decide(
                strategy, self.fallback, facts, self.registry.snapshot(), self.rng, self.fallback_endpoints
            )
        except NoBackends:
            if self.reject_when_empty:
                self.metrics.rejected("no-backends")
                return Outcome(_NO_BACKENDS)
            # No destination: Envoy's override_host falls back to its own policy over the
            # cluster it knows (503 as OpenAI JSON from Envoy if that is empty too).
            self.metrics.decided(strategy.name, "no-backends", self._clock() - started)
            return Outcome(CONTINUE_FOR[phase])
        except UnknownModel as exc:
            self.metrics.rejected("model-not-found")
            return Outcome(self._model_not_found(exc))
        except Exception:  # a bug in a fallback itself: never drop the request
            log.exception("decision failed outright; routing at random")
            decision = self._last_resort(strategy, facts)
            if decision is None:
                return Outcome(_NO_BACKENDS)
        token = self.registry.on_pick(decision.backend.index)
        if facts.prompt_hashes:
            m = decision.backend.metrics
            if m is not None:
                self.prefix_index.set_capacity_from_cache_config(decision.backend.endpoint, m.num_gpu_blocks, m.block_size)
            self.prefix_index.record(decision.backend.endpoint, facts.prompt_hashes)
        self.metrics.decided(decision.strategy, decision.reason, self._clock() - started)
        return Outcome(self._response_for(decision, phase), token)

    def _last_resort(self, strategy: Strategy, facts: RequestFacts) -> Decision | None:
        snap = self.registry.snapshot()
        try:
            backends = pool_for(facts, snap).eligible or snap.backends  # stay in the model's pool
        except UnknownModel:
            backends = snap.backends
        if not backends:
            return None
        return Decision(self.rng.choice(backends), strategy.name, "fallback-error")

    def _response_for(self, decision: Decision, phase: str) -> bytes:
        key = (phase, decision.endpoints, decision.strategy, decision.reason)
        cached = self._responses.get(key)
        if cached is None:
            if len(self._responses) >= _RESPONSE_CACHE_LIMIT:
                self._responses.clear()  # endpoints churned (DNS); rebuilding is cheap
            cached = self._responses[key] = routing_response(decision, self.expose, phase)
        return cached

    @staticmethod
    def _unknown_strategy(requested: str) -> bytes:
        valid = ", ".join(STRATEGIES)
        return immediate_error(
            400,
            f"Unknown routing strategy {requested[:64]!r} in header {STRATEGY_HEADER}. Valid values: {valid}.",
            type_="invalid_request_error",
            code="unknown_routing_strategy",
            param=STRATEGY_HEADER,
            details="extproc_unknown_strategy",
        )

    @staticmethod
    def _model_not_found(exc: UnknownModel) -> bytes:
        available = ", ".join(exc.available[:20])
        return immediate_error(
            404,
            f"The model {exc.model[:128]!r} does not exist. Available models: {available}.",
            type_="invalid_request_error",
            code="model_not_found",
            param="model",
            details="extproc_model_not_found",
        )
