"""Sans-I/O ext_proc logic: ProcessingRequest in, serialized ProcessingResponse out.

No sockets, no timers: the gRPC shell in :mod:`extproc.grpc_server` only moves messages.
Responses are cached as serialized bytes per (phase, endpoint, strategy, reason): the common case
then costs one dict lookup instead of building and encoding a protobuf message.

Body modes (Envoy announces them in the first message's ``protocol_config``):

* NONE / header-only routes: decide on the request headers.
* BUFFERED (our envoy.yaml): Envoy sends the whole body in one message; decide there.
* FULL_DUPLEX_STREAMED (Istio, kgateway, the GIE reference config): Envoy streams the body in
  chunks and sends on to the backend only what *we* send back. Inference requests are collected
  until the end of the body, decided, then answered with the header answer (destination,
  metadata, content-length) followed by the body as ``StreamedBodyResponse`` chunks. Other
  requests are decided on their headers and their chunks echoed at once; response bodies too
  (Server-Sent Events pass through chunk by chunk).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2

from extproc.backends import BackendRegistry, PickToken
from extproc.decide import (
    Decision,
    NoBackends,
    Shed,
    SubsetUnavailable,
    UnknownModel,
    decide,
    host_of,
    pool_for,
)
from extproc.errors import openai_error
from extproc.gie_metrics import error_code, usage_from_response
from extproc.kv_prefix import PrefixSource, PromptPrefix
from extproc.observability import Metrics
from extproc.openai_request import LLM_PATHS, ParsedRequest, RequestError, parse_request, route_path
from extproc.prefix_index import PrefixIndex
from extproc.route_settings import DEFAULT as DEFAULT_ROUTE
from extproc.route_settings import RouteSettings
from extproc.strategies import Profile, Reason, RequestFacts, get_strategy

log = logging.getLogger(__name__)

DESTINATION_HEADER = "x-gateway-destination-endpoint"
STRATEGY_HEADER = "x-routing-strategy"
LB_NAMESPACE = "envoy.lb"  # read by Envoy's override_host load-balancing policy
# Endpoint-picker protocol, gateway -> service: the subset to pick from (request) and the
# endpoint that really served (response), in the ext_proc request's metadata_context.
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_KEY = "x-gateway-destination-endpoint-served"
OBSERVABILITY_NAMESPACE = "extproc"  # turned into x-routing-* response headers by envoy.yaml
_RESPONSE_CACHE_LIMIT = 4096

SESSION_HEADER = "x-session-id"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Body modes under which Envoy sends the whole body in one message (announced by Envoy in the
# first message's protocol_config).
_BUFFERED_MODES = frozenset({ProcessingMode.BUFFERED, ProcessingMode.BUFFERED_PARTIAL})
_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
_TAIL_BYTES = 8192  # enough for the final SSE chunk with usage, or a JSON answer's "usage"
# Body chunks sent back in duplex mode: Envoy's own chunks are smaller; the GIE reference EPP
# uses ~62 KB.
STREAM_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the shell needs: bytes to send (``response``, then ``more`` in order; empty = no
    answer yet), and the pick to release when the stream ends."""

    response: bytes
    token: PickToken | None = None
    more: tuple[bytes, ...] = ()
    immediate: bool = False  # an ImmediateResponse: Envoy ends the request with it


@dataclass(slots=True)
class StreamState:
    """Per ext_proc stream (= per HTTP request): what one phase leaves for the next."""

    route: RouteSettings = DEFAULT_ROUTE
    body_mode: int = 0  # ProcessingMode.BodySendMode Envoy announced in protocol_config
    response_body_mode: int = 0
    headers: dict[str, str] | None = None
    strategy: Profile | None = None  # the profile (API: strategy) this request is routed by
    awaiting_body: bool = False  # BUFFERED: the body message decides
    chunks: list[bytes] | None = None  # FULL_DUPLEX_STREAMED: body collected so far
    body_size: int = 0
    subset: frozenset[str] | None = None
    decision: Decision | None = None
    token: PickToken | None = None  # released by Processor.finish (the shell calls it)
    served: str | None = None
    # For the GIE objective series (request duration, tokens, running requests):
    started: float = 0.0
    model: str | None = None
    running_done: Callable[[], None] | None = None
    response_tail: bytes = b""  # the last bytes of the response body (usage is at the end)
    prefix: PromptPrefix | None = None  # the prompt as the prefix indexes see it


def headers_of(msg: ep.HttpHeaders) -> dict[str, str]:
    # Envoy fills raw_value (bytes); older versions fill value.
    return {
        h.key: (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
        for h in msg.headers.headers
    }


def routing_response(decision: Decision, expose: bool, phase: str) -> bytes:
    # The pick, then the fallbacks: Envoy's override_host tries them in order on retries.
    # Built field by field: with fallbacks (a new value per request at 1,000 backends) this
    # runs per decision, and Struct.update() costs 3x as much.
    endpoints = decision.endpoints
    resp = ep.ProcessingResponse()
    common = (
        resp.request_body.response if phase == "request_body" else resp.request_headers.response
    )
    option = common.header_mutation.set_headers.add()
    option.header.key = DESTINATION_HEADER
    option.header.raw_value = endpoints.encode()
    option.append_action = _OVERWRITE
    fields = resp.dynamic_metadata.fields
    fields[LB_NAMESPACE].struct_value.fields[DESTINATION_HEADER].string_value = endpoints
    if expose:
        seen = fields[OBSERVABILITY_NAMESPACE].struct_value.fields
        seen["strategy"].string_value = decision.strategy
        seen["reason"].string_value = decision.reason
        seen["endpoint"].string_value = decision.backend.endpoint
    return resp.SerializeToString()


def immediate_error(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None,
    details: str,
    param: str | None = None,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    headers = [("content-type", "application/json"), *extra_headers]
    resp = ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
            headers=ep.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                        append_action=_OVERWRITE,
                    )
                    for k, v in headers
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
        return ep.ProcessingResponse(
            request_headers=ep.HeadersResponse(response=common)
        ).SerializeToString()
    if kind == "request_body":
        return ep.ProcessingResponse(
            request_body=ep.BodyResponse(response=common)
        ).SerializeToString()
    if kind == "response_headers":
        return ep.ProcessingResponse(
            response_headers=ep.HeadersResponse(response=common)
        ).SerializeToString()
    if kind == "response_body":
        return ep.ProcessingResponse(
            response_body=ep.BodyResponse(response=common)
        ).SerializeToString()
    if kind == "request_trailers":
        return ep.ProcessingResponse(request_trailers=ep.TrailersResponse()).SerializeToString()
    if kind == "response_trailers":
        return ep.ProcessingResponse(response_trailers=ep.TrailersResponse()).SerializeToString()
    return b""


def streamed_body(kind: str, body: bytes, end_of_stream: bool) -> bytes:
    """A FULL_DUPLEX_STREAMED body answer: Envoy forwards exactly these bytes."""
    common = ep.CommonResponse(
        body_mutation=ep.BodyMutation(
            streamed_response=ep.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
        )
    )
    if kind == "request_body":
        return ep.ProcessingResponse(
            request_body=ep.BodyResponse(response=common)
        ).SerializeToString()
    return ep.ProcessingResponse(response_body=ep.BodyResponse(response=common)).SerializeToString()


def _content_length(n: int) -> bytes:
    """A request_headers answer that only sets content-length. Serialized protobuf messages
    merge when concatenated (repeated fields append), so ``routing answer + this`` is one answer
    with both mutations: the cached routing bytes stay shared."""
    mutation = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="content-length", raw_value=str(n).encode()),
        append_action=_OVERWRITE,
    )
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(
            response=ep.CommonResponse(header_mutation=ep.HeaderMutation(set_headers=[mutation]))
        )
    ).SerializeToString()


def subset_hint(md: base_pb2.Metadata) -> frozenset[str] | None:
    """IPs of ``envoy.lb.subset_hint / x-gateway-destination-endpoint-subset`` (None: no hint).
    A list of ``ip:port`` strings per the protocol; a comma-separated string is accepted too."""
    fm = md.filter_metadata
    if SUBSET_NAMESPACE not in fm:
        return None
    fields = fm[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    value = fields[SUBSET_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        items = [
            v.string_value
            for v in value.list_value.values
            if v.WhichOneof("kind") == "string_value"
        ]
    elif kind == "string_value":
        items = value.string_value.split(",")
    else:
        items = []
    return frozenset(host_of(i.strip()) for i in items if i.strip())


def served_endpoint(md: base_pb2.Metadata) -> str | None:
    fm = md.filter_metadata
    if LB_NAMESPACE not in fm:
        return None
    fields = fm[LB_NAMESPACE].fields
    if SERVED_KEY not in fields:
        return None
    value = fields[SERVED_KEY].string_value.strip()
    return value.split(",", 1)[0].strip() or None


CONTINUE_FOR = {  # a plain CONTINUE answer per message kind (also the shell's last net)
    k: _continue(k)
    for k in (
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
        "request_trailers",
        "response_trailers",
    )
}


def _without_destination(kind: str) -> bytes:
    common = ep.CommonResponse(
        header_mutation=ep.HeaderMutation(remove_headers=[DESTINATION_HEADER])
    )
    if kind == "request_body":
        return ep.ProcessingResponse(
            request_body=ep.BodyResponse(response=common)
        ).SerializeToString()
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=common)
    ).SerializeToString()


_NO_DESTINATION = {k: _without_destination(k) for k in ("request_headers", "request_body")}

_NO_BACKENDS = immediate_error(
    503,
    "No inference backend is available to serve this request.",
    type_="service_unavailable",
    code="no_backends",
    details="extproc_no_backends",
)
_SUBSET_UNAVAILABLE = immediate_error(
    503,
    "None of the inference backends the gateway allowed for this request is ready.",
    type_="service_unavailable",
    code="no_ready_endpoint",
    details="extproc_subset_unavailable",
)
_SHED = immediate_error(
    429,
    "Every inference backend is at capacity; retry shortly.",
    type_="rate_limit_exceeded",
    code="overloaded",
    details="extproc_shed",
    extra_headers=(("retry-after", "1"),),
)


class Processor:
    """Turns one ext_proc message into one answer, using the registry's current snapshot."""

    def __init__(
        self,
        registry: BackendRegistry,
        *,
        default_strategy: str,
        fallback: Profile,
        metrics: Metrics,
        expose_routing_headers: bool = True,
        prefix_index: PrefixIndex | None = None,
        prefix_source: PrefixSource | None = None,
        max_body_bytes: int = 4 * 1024 * 1024,
        default_route: RouteSettings = DEFAULT_ROUTE,
        fallback_endpoints: int = 3,
        reject_when_empty: bool = False,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.registry = registry
        # Resolved per request in the route's profile table (a route may override profiles).
        self.default_strategy = get_strategy(default_strategy, default_route.profiles)
        self.fallback = fallback
        self.metrics = metrics
        self.expose = expose_routing_headers
        # Exact (KV events) where a server publishes them, else the approximate index.
        self.prefix_source = prefix_source or PrefixSource(prefix_index or PrefixIndex())
        self.prefix_index = self.prefix_source.approx
        self.max_body_bytes = max_body_bytes
        self.fallback_endpoints = fallback_endpoints
        # Empty pool: answer 503 ourselves, or (default) let Envoy's fallback policy choose.
        self.reject_when_empty = reject_when_empty
        # Service-wide profiles and settings; a route's metadata overrides them.
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
                state.response_body_mode = req.protocol_config.response_body_mode
            if req.HasField("metadata_context"):
                state.subset = subset_hint(req.metadata_context)
            return self.on_request_headers(req.request_headers, state)
        if kind == "request_body":
            if state.body_mode == _DUPLEX:
                return self.on_duplex_body(req.request_body, state)
            if state.awaiting_body:
                return self.on_request_body(req.request_body, state)
        elif kind == "request_trailers" and state.chunks is not None:
            # Duplex body ended by trailers instead of an end_of_stream chunk.
            return self._duplex_decide(
                state, end_of_stream=False, then=CONTINUE_FOR["request_trailers"]
            )
        else:
            if state.served is None and req.HasField("metadata_context"):
                self._note_served(req.metadata_context, state)
            if kind == "response_headers":
                self._note_status(req.response_headers, state)
            elif kind == "response_body":
                body = req.response_body
                self._note_usage(body, state)
                if state.response_body_mode == _DUPLEX:
                    return Outcome(streamed_body("response_body", body.body, body.end_of_stream))
        return Outcome(CONTINUE_FOR.get(kind or "", b""))

    def finish(self, state: StreamState) -> None:
        """The ext_proc stream ended (= the HTTP request is over): release its pick."""
        token, state.token = state.token, None
        if token is not None:
            self.registry.on_done(token)
        done, state.running_done = state.running_done, None
        if done is not None:
            done()
            self.metrics.objective_duration(state.model, state.model, self._clock() - state.started)

    # -- phases ------------------------------------------------------------------------
    def on_request_headers(self, msg: ep.HttpHeaders, state: StreamState) -> Outcome:
        started = state.started = self._clock()
        headers = headers_of(msg)
        strategy = self._strategy_for(headers, state.route)
        if isinstance(strategy, bytes):
            return self._immediate(strategy, state, 400)
        path = route_path(headers.get(":path", ""))
        if msg.end_of_stream and path in LLM_PATHS and headers.get(":method") == "POST":
            # A generation request without a body: the same 400 as an unparsable one.
            state.headers, state.strategy = headers, strategy
            return self._decide_on_body(b"", True, state, "request_headers")
        if not msg.end_of_stream and path in LLM_PATHS:
            # Decide when the body arrives: the model, prompt and user live there.
            if state.body_mode in _BUFFERED_MODES:
                state.headers, state.strategy, state.awaiting_body = headers, strategy, True
                return Outcome(CONTINUE_FOR["request_headers"])
            if state.body_mode == _DUPLEX:
                # No answer yet: the header answer carries the destination, known at the body's end.
                state.headers, state.strategy, state.chunks = headers, strategy, []
                return Outcome(b"")
        facts = RequestFacts(
            seq=self._next_seq(),
            path=path,
            headers=headers,
            session_key=headers.get(SESSION_HEADER) or None,
            subset=state.subset,
        )
        return self._route(strategy, facts, state, "request_headers", started)

    def on_request_body(self, msg: ep.HttpBody, state: StreamState) -> Outcome:
        state.awaiting_body = False
        return self._decide_on_body(msg.body, msg.end_of_stream, state, "request_body")

    def on_duplex_body(self, msg: ep.HttpBody, state: StreamState) -> Outcome:
        chunks = state.chunks
        if chunks is None:  # decided on the headers already: pass the chunk on at once
            return Outcome(streamed_body("request_body", msg.body, msg.end_of_stream))
        state.body_size += len(msg.body)
        if state.body_size > self.max_body_bytes:
            state.chunks = None  # drop what was collected; nothing was routed yet
            self.metrics.rejected("request_too_large")
            return self._immediate(
                immediate_error(
                    413,
                    f"Request body exceeds {self.max_body_bytes} bytes.",
                    type_="invalid_request_error",
                    code="request_too_large",
                    details="extproc_bad_request",
                ),
                state,
                413,
            )
        chunks.append(msg.body)
        if not msg.end_of_stream:
            return Outcome(b"")
        return self._duplex_decide(state, end_of_stream=True)

    def _duplex_decide(
        self, state: StreamState, *, end_of_stream: bool, then: bytes = b""
    ) -> Outcome:
        body = b"".join(state.chunks or ())
        state.chunks = None
        outcome = self._decide_on_body(body, end_of_stream, state, "request_headers")
        if outcome.immediate:
            return outcome
        # The header answer first (it may carry the destination), with the length of the body
        # that follows (a chunked request gets one too), then the body itself, in order.
        n = len(body)
        pieces = [body[i : i + STREAM_CHUNK] for i in range(0, n, STREAM_CHUNK)] or [b""]
        more = [
            streamed_body("request_body", piece, end_of_stream and i == len(pieces) - 1)
            for i, piece in enumerate(pieces)
        ]
        if then:
            more.append(then)
        return Outcome(outcome.response + _content_length(n), outcome.token, tuple(more))

    def _decide_on_body(
        self, body: bytes, end_of_stream: bool, state: StreamState, phase: str
    ) -> Outcome:
        started = self._clock()
        headers = state.headers or {}
        path = route_path(headers.get(":path", ""))
        try:
            try:
                parsed = parse_request(path, body, max_bytes=self.max_body_bytes)
            except RequestError as err:
                # Not the end of the stream: in BUFFERED mode trailers follow a complete body; in
                # BUFFERED_PARTIAL mode Envoy may have cut the body at its buffer limit, which
                # shows as JSON that does not parse.
                if (
                    not end_of_stream
                    and state.body_mode == ProcessingMode.BUFFERED_PARTIAL
                    and err.status == 400
                ):
                    raise RequestError(
                        413,
                        "Request body exceeds the gateway's buffer limit.",
                        code="request_too_large",
                    ) from None
                raise
        except RequestError as err:
            self.metrics.rejected(err.code or f"http-{err.status}")
            return self._immediate(
                immediate_error(
                    err.status,
                    err.message,
                    type_=err.type,
                    code=err.code,
                    param=err.param,
                    details="extproc_bad_request",
                ),
                state,
                err.status,
            )
        state.model = parsed.model
        facts = self._facts_from_body(path, headers, parsed, state)
        strategy = state.strategy or self.default_strategy
        return self._route(strategy, facts, state, phase, started, parsed)

    def _note_served(self, md: base_pb2.Metadata, state: StreamState) -> None:
        """Count which endpoint really served (the gateway reports it on the response path) and
        move the in-flight count there when a retry or fallback served instead of the pick."""
        served = served_endpoint(md)
        if served is None:
            return
        state.served = served
        decision = state.decision
        if decision is None:
            self.metrics.served("unrouted")
            return
        if served == decision.backend.endpoint:
            self.metrics.served("pick")
            return
        self.metrics.served(
            "fallback" if any(b.endpoint == served for b in decision.fallbacks) else "other"
        )
        slot = self.registry.slot_of(served)
        if slot is not None and state.token is not None:
            self.registry.on_done(state.token)
            state.token = self.registry.on_pick(slot)

    # -- helpers -----------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _strategy_for(self, headers: dict[str, str], route: RouteSettings) -> Profile | bytes:
        """Route setting > client header (unless forbidden) > service default."""
        profiles = route.profiles
        if route.strategy is not None:
            return profiles[route.strategy]
        requested = headers.get(STRATEGY_HEADER)
        if requested and route.allow_client_strategy:
            found = profiles.get(requested.strip().lower())
            if found is None:
                self.metrics.rejected("unknown-strategy")
                return self._unknown_strategy(requested, profiles)
            return found
        return profiles.get(self.default_strategy.name, self.default_strategy)

    def _immediate(self, response: bytes, state: StreamState, status: int) -> Outcome:
        state.chunks = None  # Envoy ends the request: nothing more to collect
        code = error_code(status)
        if code is not None:
            self.metrics.objective_error(state.model, state.model, code)
        return Outcome(response, immediate=True)

    def _note_status(self, msg: ep.HttpHeaders, state: StreamState) -> None:
        """A model server's error answer counts in inference_objective_request_error_total."""
        if state.decision is None:
            return
        for h in msg.headers.headers:
            if h.key == ":status":
                value = h.raw_value.decode("ascii", "replace") if h.raw_value else h.value
                code = error_code(int(value), upstream=True) if value.isdigit() else None
                if code is not None:
                    self.metrics.objective_error(state.model, state.model, code)
                return

    def _note_usage(self, msg: ep.HttpBody, state: StreamState) -> None:
        if state.decision is None:
            return
        tail = state.response_tail + msg.body
        state.response_tail = tail[-_TAIL_BYTES:]
        if msg.end_of_stream:
            prompt, completion = usage_from_response(state.response_tail)
            state.response_tail = b""
            self.metrics.objective_tokens(state.model, state.model, prompt, completion)

    def _facts_from_body(
        self, path: str, headers: dict[str, str], parsed: ParsedRequest, state: StreamState
    ) -> RequestFacts:
        prefix = state.prefix = self.prefix_source.lookup(parsed)
        return RequestFacts(
            seq=self._next_seq(),
            path=path,
            headers=headers,
            model=parsed.model,
            session_key=headers.get(SESSION_HEADER) or parsed.user,
            has_prompt=prefix.has_prompt,
            prefix_match=prefix.match,
            prefix_holders=prefix.holders,
            prompt_hashes=prefix.approx_hashes,
            subset=state.subset,
        )

    def _route(
        self,
        strategy: Profile,
        facts: RequestFacts,
        state: StreamState,
        phase: str,
        started: float,
        parsed: ParsedRequest | None = None,
    ) -> Outcome:
        try:
            decision = decide(
                strategy,
                self.fallback,
                facts,
                self.registry.snapshot(),
                self.rng,
                self.fallback_endpoints,
                state.route.shed_queue_depth,
            )
        except SubsetUnavailable:
            self.metrics.rejected("subset-unavailable")
            return self._immediate(_SUBSET_UNAVAILABLE, state, 503)
        except Shed:
            self.metrics.rejected("shed")
            return self._immediate(_SHED, state, 429)
        except NoBackends:
            if self.reject_when_empty:
                self.metrics.rejected("no-backends")
                return self._immediate(_NO_BACKENDS, state, 503)
            # No destination: Envoy's override_host falls back to its own policy over the
            # cluster it knows (503 as OpenAI JSON from Envoy if that is empty too). A
            # client-sent destination header is removed: an ORIGINAL_DST cluster would obey it.
            self.metrics.decided(strategy.name, Reason.NO_BACKENDS, self._clock() - started)
            return Outcome(_NO_DESTINATION[phase])
        except UnknownModel as exc:
            self.metrics.rejected("model-not-found")
            return self._immediate(self._model_not_found(exc), state, 404)
        except Exception:  # a bug in a fallback itself: never drop the request
            log.exception("decision failed outright; routing at random")
            last_resort = self._last_resort(strategy, facts)
            if last_resort is None:
                return self._immediate(_NO_BACKENDS, state, 503)
            decision = last_resort
        if state.token is not None:  # decided twice on one stream: only the last pick counts
            self.registry.on_done(state.token)
        token = self.registry.on_pick(decision.backend.index)
        if state.running_done is None:
            self.metrics.objective_request(state.model, state.model)
            state.running_done = self.metrics.objective_running(state.model)
        state.decision, state.token = decision, token
        if facts.prompt_hashes:
            m = decision.backend.metrics
            if m is not None:
                self.prefix_index.set_capacity_from_cache_config(
                    decision.backend.endpoint, m.num_gpu_blocks, m.block_size
                )
            self.prefix_index.record(decision.backend.endpoint, facts.prompt_hashes)
        if state.prefix is not None:
            state.prefix.picked(decision.backend.endpoint)
        self.metrics.decided(decision.strategy, decision.reason, self._clock() - started)
        return Outcome(self._response_for(decision, phase), token)

    def _last_resort(self, strategy: Profile, facts: RequestFacts) -> Decision | None:
        snap = self.registry.snapshot()
        try:
            backends = pool_for(facts, snap).eligible or snap.backends  # stay in the model's pool
        except UnknownModel:
            backends = snap.backends
        if facts.subset is not None:  # and in the gateway's subset
            backends = tuple(b for b in backends if host_of(b.endpoint) in facts.subset)
        if not backends:
            return None
        return Decision(self.rng.choice(backends), strategy.name, Reason.FALLBACK_ERROR)

    def _response_for(self, decision: Decision, phase: str) -> bytes:
        key = (phase, decision.endpoints, decision.strategy, decision.reason)
        cached = self._responses.get(key)
        if cached is None:
            if len(self._responses) >= _RESPONSE_CACHE_LIMIT:
                self._responses.clear()  # endpoints churned (DNS); rebuilding is cheap
            cached = self._responses[key] = routing_response(decision, self.expose, phase)
        return cached

    @staticmethod
    def _unknown_strategy(requested: str, profiles: Mapping[str, Profile]) -> bytes:
        valid = ", ".join(profiles)
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
