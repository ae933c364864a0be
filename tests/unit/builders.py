"""Shared builders for the fuzz tests: hypothesis strategies for ext_proc messages, pools,
metrics and route settings; the checker of an answer; an exact model of in-flight accounting.

Used by test_fuzz_processor.py (sans-I/O core) and test_fuzz_grpc.py (the real gRPC shell).
Plain value builders (vm, FakeClock) come from helpers.py.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import strategies as st

from extproc.backends import BackendRecord, BackendRegistry, PickToken
from extproc.metrics_parser import VllmMetrics
from extproc.openai_request import LLM_PATHS
from extproc.processor import DESTINATION_HEADER, LB_NAMESPACE, OBSERVABILITY_NAMESPACE, Processor
from extproc.snapshot import Snapshot
from extproc.strategies import FALLBACKS, STRATEGIES

from .helpers import vm

PHASES = (
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
)
BUFFERED_MODES = (ProcessingMode.BUFFERED, ProcessingMode.BUFFERED_PARTIAL)

# -- pools -------------------------------------------------------------------------------
# Distinct endpoints (one of them IPv6); a pool is an ordered subset.
URLS = tuple(f"http://10.0.0.{i}:8000" for i in range(1, 7)) + ("http://[fd00::7]:8000",)
BASE_MODELS = ("A", "B", "C")
ADAPTERS = ("lora-a", "lora-b")
MODELS = BASE_MODELS + ADAPTERS

pools = st.lists(st.sampled_from(URLS), unique=True, max_size=len(URLS))

_gauge = st.one_of(
    st.sampled_from([0.0, 1.0, 3.0, 1e9, 1e308, math.inf, math.nan, -1.0]),
    st.floats(min_value=0, max_value=500, allow_nan=False),
)
_maybe = st.one_of(st.none(), _gauge)
_counter = st.one_of(
    st.none(), st.sampled_from([0.0, 10.0, 1e12, math.inf, math.nan]), st.floats(0, 1e6)
)
_small_int = st.one_of(st.none(), st.sampled_from([0, 1, 16, 2**40]), st.integers(0, 10_000))


@st.composite
def vllm_metrics(draw: st.DrawFn) -> VllmMetrics:
    """Any VllmMetrics the parser could return, and some it should not (NaN, inf, negative)."""
    base = vm(
        running=draw(_gauge),
        waiting=draw(_gauge),
        kv=draw(
            st.one_of(
                st.none(), st.sampled_from([0.0, 0.5, 1.0, math.nan, math.inf]), st.floats(0, 1)
            )
        ),
        prompt=draw(_counter),
        gen=draw(_counter),
        ttft_sum=draw(_counter),
        ttft_count=draw(_counter),
        models=tuple(sorted(draw(st.sets(st.sampled_from(MODELS), max_size=3)))),
    )
    return replace(
        base,
        block_size=draw(_small_int),
        num_gpu_blocks=draw(_small_int),
        lora_running=tuple(draw(st.lists(st.sampled_from(ADAPTERS), max_size=2, unique=True))),
        lora_waiting=tuple(draw(st.lists(st.sampled_from(ADAPTERS), max_size=2, unique=True))),
        max_lora=draw(st.one_of(st.none(), st.integers(0, 3))),
    )


served_models = st.tuples(
    st.frozensets(st.sampled_from(MODELS), max_size=4),
    st.frozensets(st.sampled_from(ADAPTERS), max_size=2),
).map(lambda t: (t[0] | t[1], t[1]))  # adapters are served ids too


def supports_kwarg(fn: object, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


FAILURE_KINDS = ("timeout", "error") + (
    ("down",) if supports_kwarg(BackendRegistry.record_failure, "down") else ()
)


def record_failure(reg: BackendRegistry, rec: BackendRecord, kind: str) -> None:
    if kind == "down":
        reg.record_failure(rec, "refused", timeout=False, down=True)  # type: ignore[call-arg]
    else:
        reg.record_failure(rec, kind, timeout=kind == "timeout")


@dataclass(frozen=True)
class BackendSpec:
    """One backend's scripted history: scrapes that worked or failed, models it lists."""

    metrics: VllmMetrics | None
    failures: tuple[str, ...]  # failure kinds after the last good scrape
    models: tuple[frozenset[str], frozenset[str]] | None
    age: float  # clock advance after its good scrape


backend_specs = st.builds(
    BackendSpec,
    metrics=st.one_of(vllm_metrics(), st.none(), vllm_metrics()),
    failures=st.lists(st.sampled_from(FAILURE_KINDS), max_size=4).map(tuple),
    models=st.one_of(st.none(), served_models),
    age=st.sampled_from([0.0, 0.5, 2.0, 20.0]),
)


@st.composite
def pool_specs(draw: st.DrawFn) -> tuple[list[str], list[BackendSpec]]:
    """A pool and one scripted history per member."""
    urls = draw(pools)
    return urls, draw(st.lists(backend_specs, min_size=len(urls), max_size=len(urls)))


def build_pool(reg: BackendRegistry, clock, urls: list[str], specs: list[BackendSpec]) -> None:
    """Scripted scrapes: fresh/stale/unknown (by clock), healthy/suspect/unhealthy, models."""
    reg.set_backends(urls)
    for rec, spec in zip(reg.records, specs):
        if spec.metrics is not None:
            reg.record_success(rec, spec.metrics, reg.begin_scrape(rec))
    for rec, spec in zip(reg.records, specs):
        for kind in spec.failures:
            reg.begin_scrape(rec)
            record_failure(reg, rec, kind)
        if spec.models is not None:
            reg.record_models(rec, *spec.models)
    clock.advance(max((s.age for s in specs), default=0.0))
    reg.rebuild()


# -- route settings (gRPC initial metadata) ----------------------------------------------
_number = st.sampled_from(["0", "1", "2.5", "1e308", "inf", "-1", "nan", "x", "", "1_0"])
_pairs = st.lists(
    st.tuples(
        st.sampled_from(["queue", "kv", "prefix", "lora", "abs", "rel", "bogus", ""]), _number
    ),
    max_size=4,
).map(lambda ps: ",".join(f"{k}={v}" if k else v for k, v in ps))
_strategy_names = st.one_of(
    st.sampled_from(list(STRATEGIES)),
    st.sampled_from(list(STRATEGIES)).map(str.upper),
    st.sampled_from(list(STRATEGIES)).map(lambda s: f" {s} "),
    st.sampled_from(["", "bogus", "random,round-robin", "x" * 300]),
)
_printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
route_metadata = st.lists(
    st.one_of(
        st.tuples(st.just("x-extproc-strategy"), _strategy_names),
        st.tuples(
            st.just("x-extproc-allow-client-strategy"),
            st.sampled_from(["true", "false", "0", "no", "OFF", "", "maybe"]),
        ),
        st.tuples(st.just("x-extproc-weights"), _pairs),
        st.tuples(st.just("x-extproc-prefix-guard"), _pairs),
        st.tuples(st.sampled_from(["x-extproc-other", "x-other", "user-agent"]), _printable),
    ),
    max_size=4,
)
"""(key, str value) pairs as grpc.aio hands them over (values printable ASCII, keys lower case)."""


# -- messages ----------------------------------------------------------------------------
PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/chat/completions?stream=1",
    "/v1/completions?",
    "/v1/embeddings",
    "/v1/models",
    "/",
    "",
    "/V1/chat/completions",
    "/v1/chat/completions/",
)
_paths = st.one_of(st.sampled_from(PATHS), st.text(max_size=20))
_strategy_header = st.one_of(_strategy_names, st.text(max_size=10))
_header_value = st.one_of(_strategy_header, _printable)


@st.composite
def header_list(draw: st.DrawFn) -> list[base_pb2.HeaderValue]:
    """Arbitrary headers: LLM and other :path, x-routing-strategy, x-session-id, junk, non-UTF-8."""
    out = []
    if draw(st.booleans()) or draw(st.booleans()):
        out.append((":path", draw(_paths)))
    if draw(st.booleans()):
        out.append((":method", draw(st.sampled_from(["POST", "GET", "PUT"]))))
    if draw(st.integers(0, 3)) == 0:
        out.append(("x-routing-strategy", draw(_strategy_header)))
    if draw(st.booleans()):
        out.append(
            ("x-session-id", draw(st.one_of(st.sampled_from(["alice", "bob", ""]), _printable)))
        )
    out += draw(
        st.lists(
            st.tuples(
                st.one_of(
                    st.sampled_from(
                        [
                            ":path",
                            "x-routing-strategy",
                            "x-session-id",
                            DESTINATION_HEADER,
                            "content-type",
                            "X-Routing-Strategy",
                        ]
                    ),
                    st.text(max_size=8),
                ),
                _header_value,
            ),
            max_size=3,
        )
    )
    headers = []
    for key, value in out:
        form = draw(st.integers(0, 5))
        if form == 0:  # older Envoys fill `value`
            headers.append(base_pb2.HeaderValue(key=key, value=value))
        elif form == 1:  # raw bytes that are not UTF-8
            headers.append(
                base_pb2.HeaderValue(
                    key=key, raw_value=draw(st.binary(min_size=1, max_size=12)) + b"\xff"
                )
            )
        else:
            headers.append(base_pb2.HeaderValue(key=key, raw_value=value.encode()))
    return headers


_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    _json_scalar,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
_PREFIXES = (
    "",
    "You are a helpful assistant. " * 6,
    "Summarize the following document carefully. " * 8,
)
_text = st.tuples(st.sampled_from(_PREFIXES), st.text(max_size=80)).map("".join)
_model = st.one_of(
    st.sampled_from(MODELS), st.sampled_from(["nope", "", "a"]), st.text(max_size=12), json_values
)
_content = st.one_of(
    _text,
    st.none(),
    st.lists(
        st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": _text}), json_values),
        max_size=3,
    ),
    json_values,
)
_message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(st.sampled_from(["user", "system", "assistant"]), json_values),
        "content": _content,
    },
)
_optional_fields = {
    "user": st.one_of(st.sampled_from(["alice", "bob"]), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "max_tokens": st.one_of(st.integers(-5, 10**6), json_values),
    "max_completion_tokens": st.integers(-5, 10**6),
    "temperature": json_values,
}
valid_chat = st.fixed_dictionaries(
    {
        "model": st.sampled_from(MODELS + ("nope",)),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": _text}),
            min_size=1,
            max_size=3,
        ),
    },
    optional={"user": st.sampled_from(["alice", "bob"]), "stream": st.booleans()},
)
valid_completion = st.fixed_dictionaries(
    {
        "model": st.sampled_from(MODELS + ("nope",)),
        "prompt": st.one_of(
            _text,
            st.lists(_text, min_size=1, max_size=2),
            st.lists(st.integers(0, 50_000), min_size=1, max_size=8),
        ),
    }
)
openai_ish = st.fixed_dictionaries(
    {},
    optional={
        "model": _model,
        "messages": st.one_of(st.lists(_message, max_size=3), json_values),
        "prompt": st.one_of(
            _text, st.lists(st.one_of(_text, st.integers(0, 99)), max_size=3), json_values
        ),
        **_optional_fields,
    },
)


@st.composite
def body_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind <= 4:  # valid requests (a model may still be unknown or too large)
        return orjson.dumps(draw(st.one_of(valid_chat, valid_completion)))
    if kind == 5:
        return orjson.dumps(draw(openai_ish))
    if kind == 6:  # a valid body cut short (BUFFERED_PARTIAL at Envoy's limit)
        raw = orjson.dumps(draw(valid_chat))
        return raw[: draw(st.integers(0, len(raw)))]
    if kind == 7:
        return orjson.dumps(draw(json_values))
    if kind == 8:
        return draw(
            st.sampled_from(
                [b"", b"null", b"[]", b"{}", b' {"model": "A"} ', b"\xff\xfe{", b"{" * 2000]
            )
        )
    return draw(st.binary(max_size=64))


_body_modes = st.one_of(
    st.sampled_from([m for _, m in ProcessingMode.BodySendMode.items()]), st.integers(0, 2**31 - 1)
)
# Request body modes for the fuzzers, whose model is "every message gets its own answer". In
# FULL_DUPLEX_STREAMED mode a generation request's header answer waits for the end of its body
# (docs/endpoint-picker.md): that exchange is tested in test_gateway_protocol.py and end to end,
# not here.
_request_body_modes = _body_modes.filter(lambda m: m != ProcessingMode.FULL_DUPLEX_STREAMED)


@st.composite
def request_headers_msg(draw: st.DrawFn, *, llm: bool = False) -> ep.ProcessingRequest:
    headers = draw(header_list())
    if llm:  # an LLM request Envoy buffers: the service decides at the body
        # Last: a later duplicate would win.
        headers.append(
            base_pb2.HeaderValue(
                key=":path", raw_value=draw(st.sampled_from(sorted(LLM_PATHS))).encode()
            )
        )
    req = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=headers),
            end_of_stream=draw(st.booleans()) and not llm,
        )
    )
    if llm or draw(st.booleans()):
        req.protocol_config.request_body_mode = (
            draw(st.sampled_from(BUFFERED_MODES)) if llm else draw(_request_body_modes)
        )
        req.protocol_config.response_body_mode = draw(_body_modes)
        req.protocol_config.send_body_without_waiting_for_header_response = draw(st.booleans())
    return req


@st.composite
def request_body_msg(draw: st.DrawFn) -> ep.ProcessingRequest:
    eos = draw(st.integers(0, 3)) > 0
    return ep.ProcessingRequest(
        request_body=ep.HttpBody(body=draw(body_bytes()), end_of_stream=eos)
    )


@st.composite
def other_phase_msg(draw: st.DrawFn) -> ep.ProcessingRequest:
    kind = draw(
        st.sampled_from(
            ["request_trailers", "response_headers", "response_body", "response_trailers", "empty"]
        )
    )
    if kind == "empty":
        return ep.ProcessingRequest()
    if kind == "response_headers":
        hv = [
            base_pb2.HeaderValue(
                key=":status", raw_value=draw(st.sampled_from([b"200", b"503", b"\xff"]))
            )
        ]
        return ep.ProcessingRequest(
            response_headers=ep.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=hv), end_of_stream=draw(st.booleans())
            )
        )
    if kind == "response_body":
        return ep.ProcessingRequest(
            response_body=ep.HttpBody(
                body=draw(st.binary(max_size=32)), end_of_stream=draw(st.booleans())
            )
        )
    trailers = ep.HttpTrailers(trailers=base_pb2.HeaderMap(headers=draw(header_list())))
    return ep.ProcessingRequest(**{kind: trailers})


any_message = st.one_of(request_headers_msg(), request_body_msg(), other_phase_msg())


@st.composite
def llm_exchange(draw: st.DrawFn) -> list[ep.ProcessingRequest]:
    """What Envoy sends for one buffered LLM request, with random extras and omissions."""
    msgs = [draw(request_headers_msg(llm=True)), draw(request_body_msg())]
    if draw(st.booleans()):
        msgs += [
            ep.ProcessingRequest(response_headers=ep.HttpHeaders()),
            ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: {}", end_of_stream=True)),
        ]
    extra = draw(st.lists(any_message, max_size=2))
    at = draw(st.integers(0, len(msgs)))
    return msgs[:at] + extra + msgs[at:]


message_sequences = st.one_of(st.lists(any_message, max_size=6), llm_exchange())


# -- processors ------------------------------------------------------------------------
@st.composite
def processor_kwargs(draw: st.DrawFn) -> dict[str, object]:
    kw: dict[str, object] = {
        "default_strategy": draw(st.sampled_from(list(STRATEGIES))),
        "fallback": FALLBACKS[draw(st.sampled_from(list(FALLBACKS)))],
        "expose_routing_headers": draw(st.booleans()),
        "max_body_bytes": draw(st.one_of(st.just(1 << 20), st.sampled_from([0, 64, 1000]))),
    }
    # Options that come and go with the service's evolution: fuzz them when they exist.
    if supports_kwarg(Processor.__init__, "fallback_endpoints"):
        kw["fallback_endpoints"] = draw(st.integers(0, 8))
    if supports_kwarg(Processor.__init__, "reject_when_empty"):
        kw["reject_when_empty"] = draw(st.booleans())
    return kw


# -- answers -------------------------------------------------------------------------------
def parse_endpoints(value: str) -> list[str]:
    """``ip:port`` or the ranked list ``ip:port,ip:port`` -> its elements."""
    return [p.strip() for p in value.split(",")]


@dataclass
class Answer:
    kind: str | None  # the response oneof, None if no answer
    endpoints: list[str] = field(default_factory=list)  # [pick, fallbacks...], empty if not routed
    status: int | None = None  # immediate response status
    error_code: object = None


def _common_responses(resp: ep.ProcessingResponse) -> list[tuple[str, ep.CommonResponse]]:
    return [
        ("request_headers", resp.request_headers.response),
        ("request_body", resp.request_body.response),
        ("response_headers", resp.response_headers.response),
        ("response_body", resp.response_body.response),
    ]


def check_answer(req: ep.ProcessingRequest, raw: bytes, token: PickToken | None = None) -> Answer:
    """Properties of one answer that need nothing but the message and the answer bytes."""
    kind = req.WhichOneof("request")
    assert isinstance(raw, bytes), type(raw)
    if kind is None:
        # Envoy never sends a message without a phase; there is nothing to answer.
        assert token is None
        if not raw:
            return Answer(None)
    assert raw, f"no answer to a {kind} message"
    resp = ep.ProcessingResponse.FromString(raw)
    which = resp.WhichOneof("response")
    assert which is not None, f"answer to {kind} has no response: {resp}"
    if kind is not None:
        assert which in (kind, "immediate_response"), f"answer to {kind} is a {which}"
    header_values = []
    for phase, common in _common_responses(resp):
        for opt in common.header_mutation.set_headers:
            if opt.header.key.lower() == DESTINATION_HEADER:
                assert phase == which, (phase, which)
                header_values.append(
                    opt.header.raw_value.decode() if opt.header.raw_value else opt.header.value
                )
    assert len(header_values) <= 1, f"destination header set twice: {header_values}"
    md = resp.dynamic_metadata
    md_value = None
    if LB_NAMESPACE in md.fields:
        md_value = md[LB_NAMESPACE][DESTINATION_HEADER]
        assert isinstance(md_value, str), md_value

    if which == "immediate_response":
        imm = resp.immediate_response
        assert 400 <= imm.status.code <= 599, imm.status.code
        assert not header_values and md_value is None, "an immediate response must not route"
        for opt in imm.headers.set_headers:
            assert opt.header.key.lower() != DESTINATION_HEADER
        assert [
            o.header.raw_value
            for o in imm.headers.set_headers
            if o.header.key.lower() == "content-type"
        ] == [b"application/json"]
        body = orjson.loads(imm.body)
        assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
        err = body["error"]
        assert {"message", "type", "code"} <= set(err), err
        assert (
            isinstance(err["message"], str)
            and err["message"]
            and isinstance(err["type"], str)
            and err["type"]
        )
        assert token is None, "a rejected request must not hold a pick"
        return Answer(which, status=imm.status.code, error_code=err["code"])

    if not header_values and md_value is None:
        assert token is None, "a pick that Envoy is not told about"
        return Answer(which)
    assert which in ("request_headers", "request_body"), f"routing in a {which} answer"
    assert header_values and md_value is not None, (
        "header and envoy.lb metadata must both carry the destination"
    )
    assert header_values[0] == md_value, (header_values, md_value)
    endpoints = parse_endpoints(md_value)
    assert all(endpoints), f"empty element in {md_value!r}"
    assert len(set(endpoints)) == len(endpoints), f"repeated endpoint in {md_value!r}"
    if OBSERVABILITY_NAMESPACE in md.fields and "endpoint" in md[OBSERVABILITY_NAMESPACE]:
        assert parse_endpoints(md[OBSERVABILITY_NAMESPACE]["endpoint"])[0] == endpoints[0]
    if token is not None:
        assert token.record.endpoint == endpoints[0], (token.record.endpoint, endpoints)
    return Answer(which, endpoints=endpoints)


def body_model(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None


def check_routing(
    answer: Answer, snap: Snapshot, model: str | None, registry: BackendRegistry
) -> None:
    """The pick and its fallbacks are backends of the snapshot, within the model's pool."""
    if not answer.endpoints:
        return
    current = {r.endpoint for r in registry.records}
    in_snap = {b.endpoint for b in snap.backends}
    for e in answer.endpoints:
        assert e in current and e in in_snap, f"{e} is not a backend of the pool {sorted(current)}"
    pick = answer.endpoints[0]
    if model is not None and snap.model_pools:
        pool = snap.model_pools.get(model)
        if pool is not None:
            members = {b.endpoint for b in snap.backends if model in b.models}
        else:  # only servers whose models are not known yet may serve it
            members = {b.endpoint for b in snap.backends if not b.models}
            pool = snap.models_unknown
        for e in answer.endpoints:
            assert e in members, f"{e} does not serve model {model!r} (pool {sorted(members)})"
        assert pick in {b.endpoint for b in pool.eligible}, (
            f"pick {pick} is not eligible in the {model!r} pool"
        )
    else:
        assert pick in {b.endpoint for b in snap.everyone.eligible}, f"pick {pick} is not eligible"


def check_rejection(answer: Answer, snap: Snapshot, model: str | None) -> None:
    """A 404 only for a model nobody may serve; a 503 only for an empty pool."""
    if answer.status == 404:
        assert model is not None and snap.model_pools and model not in snap.model_pools
        assert not snap.models_unknown.eligible
    if answer.status == 503:
        assert not snap.backends, "503 although the pool has backends"


# -- in-flight accounting ----------------------------------------------------------------
class InflightModel:
    """Exact expectation of every record's ``inflight`` and ``pending``.

    inflight = open picks of the record; pending = open picks of a generation that no good
    scrape has absorbed yet (record_success(started_generation=g) absorbs generations < g - 1).
    Records removed from the pool are kept: their open picks must still be released.
    """

    def __init__(self) -> None:
        self.records: dict[int, BackendRecord] = {}
        self.absorbed_below: dict[int, int] = {}
        self.open: Counter[tuple[int, int]] = Counter()  # (record id, generation) -> open picks

    def see(self, records: Iterable[BackendRecord]) -> None:
        for r in records:
            self.records.setdefault(id(r), r)

    def picked(self, token: PickToken) -> None:
        self.see([token.record])
        self.open[(id(token.record), token.generation)] += 1

    def released(self, token: PickToken) -> None:
        key = (id(token.record), token.generation)
        assert self.open[key] > 0, "token released twice"
        self.open[key] -= 1

    def scraped(self, record: BackendRecord, started_generation: int) -> None:
        k = id(record)
        self.absorbed_below[k] = max(self.absorbed_below.get(k, 0), started_generation - 1)

    def expected(self, record: BackendRecord) -> tuple[int, int]:
        k = id(record)
        floor = self.absorbed_below.get(k, 0)
        inflight = sum(n for (rid, _), n in self.open.items() if rid == k)
        pending = sum(n for (rid, g), n in self.open.items() if rid == k and g >= floor)
        return inflight, pending

    def check(self, registry: BackendRegistry) -> None:
        self.see(registry.records)
        for r in self.records.values():
            inflight, pending = self.expected(r)
            assert (r.inflight, r.pending) == (inflight, pending), (
                f"{r.endpoint} (slot {r.slot}): inflight/pending {(r.inflight, r.pending)}, expected {(inflight, pending)}"
            )
            assert sum(r.open_by_generation.values()) == r.pending, (
                r.endpoint,
                r.open_by_generation,
                r.pending,
            )
        assert registry.snapshot().pending == tuple(r.pending for r in registry.records)


def check_all_released(records: Iterable[BackendRecord], registry: BackendRegistry) -> None:
    """No stream open: nothing is in flight anywhere, including removed backends."""
    for r in records:
        assert (r.inflight, r.pending, r.open_by_generation) == (0, 0, {}), (
            f"leak on {r.endpoint} (slot {r.slot}): inflight {r.inflight}, pending {r.pending}, {r.open_by_generation}"
        )
    assert all(p == 0 for p in registry.snapshot().pending)
