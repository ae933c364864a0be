"""The endpoint-picker protocol as gateways speak it: FULL_DUPLEX_STREAMED bodies, the subset
hint, the served endpoint on the response path, 503/429 answers."""

from __future__ import annotations

import random

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from prometheus_client import generate_latest

from extproc.decide import host_of
from extproc.observability import Metrics
from extproc.processor import STREAM_CHUNK, Processor, StreamState, served_endpoint, subset_hint
from extproc.route_settings import RouteSettings, parse_route_settings
from extproc.strategies import FALLBACKS

from .helpers import registry, scrape_ok, vm
from .test_body_phase import chat, headers_req

DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED


def make(n=3, *, waiting=(0, 0, 0), running=None, shed=None, **kw):
    reg, _ = registry(n)
    for i in range(n):
        scrape_ok(
            reg, i, vm(running=(running or list(range(n)))[i], waiting=waiting[i], models=("A",))
        )
    proc = Processor(
        reg,
        default_strategy="least-request",
        fallback=FALLBACKS["random"],
        metrics=Metrics(),
        rng=random.Random(0),
        default_route=RouteSettings(shed_queue_depth=shed),
        **kw,
    )
    return proc, reg


def duplex_headers(
    path="/v1/chat/completions", end_of_stream=False, subset=None, response_mode=DUPLEX
):
    req = headers_req(path=path, end_of_stream=end_of_stream, body_mode=DUPLEX)
    req.protocol_config.response_body_mode = response_mode
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": subset})
        req.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return req


def chunk(data: bytes, eos: bool, kind="request_body") -> ep.ProcessingRequest:
    return ep.ProcessingRequest(**{kind: ep.HttpBody(body=data, end_of_stream=eos)})


def decode(raw: bytes) -> ep.ProcessingResponse:
    return ep.ProcessingResponse.FromString(raw)


def header_values(resp: ep.ProcessingResponse) -> dict[str, str]:
    muts = resp.request_headers.response.header_mutation.set_headers
    return {m.header.key: m.header.raw_value.decode() for m in muts}


def streamed(raws) -> tuple[bytes, list[bool]]:
    out, eos = b"", []
    for raw in raws:
        r = decode(raw)
        sr = (
            r.request_body if r.HasField("request_body") else r.response_body
        ).response.body_mutation.streamed_response
        out += sr.body
        eos.append(sr.end_of_stream)
    return out, eos


def send_duplex_body(proc, state, body: bytes, pieces: int = 3):
    step = max(1, len(body) // pieces)
    parts = [body[i : i + step] for i in range(0, len(body), step)]
    outs = [proc.handle(chunk(p, i == len(parts) - 1), state) for i, p in enumerate(parts)]
    for o in outs[:-1]:
        assert o.response == b"" and not o.more, "answered before the body ended"
    return outs[-1]


# -- FULL_DUPLEX_STREAMED -------------------------------------------------------------------
def test_duplex_collects_decides_then_streams_the_body_back_in_order():
    proc, reg = make()
    state = StreamState()
    assert proc.handle(duplex_headers(), state).response == b""  # waits for the body
    body = orjson.dumps(chat(text="x" * 200_000))
    out = send_duplex_body(proc, state, body, pieces=7)
    first = decode(out.response)
    assert first.WhichOneof("response") == "request_headers"
    hv = header_values(first)
    assert hv["x-gateway-destination-endpoint"].split(",")[0] == "10.0.0.1:8000"  # least loaded
    assert hv["content-length"] == str(len(body))
    assert (
        first.dynamic_metadata["envoy.lb"]["x-gateway-destination-endpoint"]
        == hv["x-gateway-destination-endpoint"]
    )
    data, eos = streamed(out.more)
    assert data == body
    assert eos == [False] * (len(eos) - 1) + [True]
    assert len(out.more) == -(-len(body) // STREAM_CHUNK)
    assert reg.snapshot().pending[0] == 1
    proc.finish(state)
    assert reg.snapshot().pending == (0, 0, 0)


def test_duplex_body_ended_by_trailers():
    proc, _ = make()
    state = StreamState()
    proc.handle(duplex_headers(), state)
    body = orjson.dumps(chat())
    assert proc.handle(chunk(body, False), state).response == b""
    out = proc.handle(ep.ProcessingRequest(request_trailers=ep.HttpTrailers()), state)
    assert "x-gateway-destination-endpoint" in header_values(decode(out.response))
    data, eos = streamed(out.more[:-1])
    assert data == body and eos == [False]
    assert decode(out.more[-1]).WhichOneof("response") == "request_trailers"


def test_duplex_empty_final_chunk_and_chunked_request_get_a_length():
    proc, _ = make()
    state = StreamState()
    proc.handle(duplex_headers(), state)
    body = orjson.dumps(chat())
    proc.handle(chunk(body, False), state)
    out = proc.handle(chunk(b"", True), state)
    assert header_values(decode(out.response))["content-length"] == str(len(body))
    assert streamed(out.more) == (body, [True])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (orjson.dumps(chat(model="nope")), 404, "model_not_found"),
    ],
)
def test_duplex_bad_requests_get_openai_errors_and_route_nothing(body, status, code):
    proc, reg = make()
    state = StreamState()
    proc.handle(duplex_headers(), state)
    out = proc.handle(chunk(body, True), state)
    resp = decode(out.response)
    assert out.immediate and not out.more
    assert resp.immediate_response.status.code == status
    assert orjson.loads(resp.immediate_response.body)["error"]["code"] == code
    assert reg.snapshot().pending == (0, 0, 0)


def test_duplex_body_over_the_limit_is_413_and_dropped():
    proc, reg = make(max_body_bytes=1000)
    state = StreamState()
    proc.handle(duplex_headers(), state)
    assert proc.handle(chunk(b"x" * 600, False), state).response == b""
    out = proc.handle(chunk(b"x" * 600, False), state)
    assert decode(out.response).immediate_response.status.code == 413
    assert state.chunks is None  # what was collected is released at once
    assert reg.snapshot().pending == (0, 0, 0)


def test_duplex_other_paths_decide_on_headers_and_echo_chunks_at_once():
    proc, _ = make()
    state = StreamState()
    first = decode(proc.handle(duplex_headers(path="/v1/embeddings"), state).response)
    assert "x-gateway-destination-endpoint" in header_values(first)
    out = proc.handle(chunk(b"abc", False), state)
    assert streamed([out.response]) == (b"abc", [False])
    out = proc.handle(chunk(b"def", True), state)
    assert streamed([out.response]) == (b"def", [True])


def test_duplex_response_chunks_pass_through_at_once_and_usage_is_counted():
    proc, _ = make()
    state = StreamState()
    proc.handle(duplex_headers(), state)
    proc.handle(chunk(orjson.dumps(chat()), True), state)
    resp_headers = ep.ProcessingRequest(
        response_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")]
            )
        )
    )
    assert (
        decode(proc.handle(resp_headers, state).response).WhichOneof("response")
        == "response_headers"
    )
    sse = [
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n',
        b"data: [DONE]\n\n",
    ]
    echoed = [
        proc.handle(chunk(c, i == 2, "response_body"), state).response for i, c in enumerate(sse)
    ]
    assert streamed(echoed) == (b"".join(sse), [False, False, True])
    proc.finish(state)
    text = generate_latest(proc.metrics.registry).decode()
    assert (
        "inference_objective_input_tokens_count" in text
        and "inference_objective_request_total" in text
    )
    assert "inference_objective_request_duration_seconds_count" in text


def test_buffered_response_body_is_not_rewritten():
    proc, _ = make()
    state = StreamState()
    proc.handle(duplex_headers(response_mode=ProcessingMode.BUFFERED), state)
    proc.handle(chunk(orjson.dumps(chat()), True), state)
    resp = decode(proc.handle(chunk(b"{}", True, "response_body"), state).response)
    assert not resp.response_body.response.HasField("body_mutation")


# -- subset hint ----------------------------------------------------------------------------
def test_subset_hint_parsing():
    md = base_pb2.Metadata()
    assert subset_hint(md) is None
    md.filter_metadata["envoy.lb.subset_hint"].update({"other": 1})
    assert subset_hint(md) is None
    md.filter_metadata["envoy.lb.subset_hint"].update(
        {"x-gateway-destination-endpoint-subset": ["10.0.0.2:8000", "[fd00::1]:80", ""]}
    )
    assert subset_hint(md) == {"10.0.0.2", "fd00::1"}
    md.filter_metadata["envoy.lb.subset_hint"].update(
        {"x-gateway-destination-endpoint-subset": "10.0.0.1:1, 10.0.0.3"}
    )
    assert subset_hint(md) == {"10.0.0.1", "10.0.0.3"}
    md.filter_metadata["envoy.lb.subset_hint"].update({"x-gateway-destination-endpoint-subset": 5})
    assert subset_hint(md) == frozenset()


@pytest.mark.parametrize(
    ("endpoint", "host"),
    [
        ("10.0.0.1:80", "10.0.0.1"),
        ("10.0.0.1", "10.0.0.1"),
        ("[::1]:80", "::1"),
        ("::1", "::1"),
        ("[::1", "[::1"),
    ],
)
def test_host_of(endpoint, host):
    assert host_of(endpoint) == host


def test_subset_hint_narrows_the_pick_and_the_fallbacks_matching_on_ip():
    proc, _ = make(fallback_endpoints=3)
    state = StreamState()
    # The least loaded server (10.0.0.1) is outside the subset; the port is ignored (IP match).
    proc.handle(duplex_headers(subset=["10.0.0.3:9999", "10.0.0.2:8000"]), state)
    out = proc.handle(chunk(orjson.dumps(chat()), True), state)
    endpoints = header_values(decode(out.response))["x-gateway-destination-endpoint"].split(",")
    assert endpoints == ["10.0.0.2:8000", "10.0.0.3:8000"]


@pytest.mark.parametrize("subset", [[], ["192.0.2.1:8000"]])
def test_subset_with_no_backend_is_503(subset):
    proc, reg = make()
    state = StreamState()
    proc.handle(duplex_headers(subset=subset), state)
    out = proc.handle(chunk(orjson.dumps(chat()), True), state)
    resp = decode(out.response)
    assert resp.immediate_response.status.code == 503
    assert orjson.loads(resp.immediate_response.body)["error"]["code"] == "no_ready_endpoint"
    assert reg.snapshot().pending == (0, 0, 0)


def test_subset_of_unhealthy_backends_is_503():
    proc, reg = make()
    reg.record_failure(reg.records[1], "refused", timeout=False, down=True)
    state = StreamState()
    resp = decode(
        proc.handle(
            duplex_headers(path="/v1/models", end_of_stream=True, subset=["10.0.0.2:8000"]), state
        ).response
    )
    assert resp.immediate_response.status.code == 503


# -- served endpoint --------------------------------------------------------------------------
def served_req(endpoint: str) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest(
        response_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")]
            )
        )
    )
    req.metadata_context.filter_metadata["envoy.lb"].update(
        {"x-gateway-destination-endpoint-served": endpoint}
    )
    return req


def served_counts(proc) -> dict[str, float]:
    out = {}
    for line in generate_latest(proc.metrics.registry).decode().splitlines():
        if line.startswith("extproc_served_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


def test_served_endpoint_parsing():
    md = base_pb2.Metadata()
    assert served_endpoint(md) is None
    md.filter_metadata["envoy.lb"].update({"x": 1})
    assert served_endpoint(md) is None
    md.filter_metadata["envoy.lb"].update(
        {"x-gateway-destination-endpoint-served": " 10.0.0.1:8000,x "}
    )
    assert served_endpoint(md) == "10.0.0.1:8000"


def test_served_by_the_pick_a_fallback_or_another_host_and_inflight_follows():
    proc, reg = make(fallback_endpoints=1)
    for served, expected_pending in (
        ("10.0.0.1:8000", (1, 0, 0)),
        ("10.0.0.2:8000", (0, 1, 0)),
        ("10.0.0.3:8000", (0, 0, 1)),
    ):
        state = StreamState()
        proc.handle(duplex_headers(), state)
        proc.handle(chunk(orjson.dumps(chat()), True), state)
        assert state.decision.backend.endpoint == "10.0.0.1:8000"
        assert state.decision.fallbacks[0].endpoint == "10.0.0.2:8000"
        proc.handle(served_req(served), state)
        assert reg.snapshot().pending == expected_pending  # the count moved to who really serves
        proc.finish(state)
        assert reg.snapshot().pending == (0, 0, 0)
    assert served_counts(proc) == {"pick": 1.0, "fallback": 1.0, "other": 1.0}


def test_served_without_a_decision_is_counted_unrouted():
    proc, _ = make()
    state = StreamState()
    proc.handle(served_req("10.0.0.1:8000"), state)
    assert served_counts(proc) == {"unrouted": 1.0}


def test_upstream_error_status_is_counted():
    proc, _ = make()
    state = StreamState()
    proc.handle(duplex_headers(path="/v1/models", end_of_stream=True), state)
    req = ep.ProcessingRequest(
        response_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=":status", raw_value=b"500")]
            )
        )
    )
    proc.handle(req, state)
    assert 'error_code="ModelServerError"' in generate_latest(proc.metrics.registry).decode()


# -- shedding --------------------------------------------------------------------------------
def test_sheds_with_429_only_when_every_candidate_is_full():
    proc, reg = make(waiting=(5, 6, 7), shed=4)
    state = StreamState(route=proc.default_route)  # as the gRPC shell builds it
    resp = decode(
        proc.handle(duplex_headers(path="/v1/models", end_of_stream=True), state).response
    )
    assert resp.immediate_response.status.code == 429
    hdrs = {h.header.key: h.header.raw_value for h in resp.immediate_response.headers.set_headers}
    assert hdrs["retry-after"] == b"1"
    assert orjson.loads(resp.immediate_response.body)["error"]["type"] == "rate_limit_exceeded"
    # One candidate with room: routed there.
    proc2, _ = make(waiting=(5, 3, 7), shed=4)
    resp = decode(
        proc2.handle(
            duplex_headers(path="/v1/models", end_of_stream=True),
            StreamState(route=proc2.default_route),
        ).response
    )
    assert header_values(resp)["x-gateway-destination-endpoint"].startswith("10.0.0.2:8000")


def test_never_sheds_on_missing_metrics():
    reg, _ = registry(2)  # never scraped: priors, not measurements
    proc = Processor(
        reg,
        default_strategy="least-request",
        fallback=FALLBACKS["random"],
        metrics=Metrics(),
        rng=random.Random(0),
        default_route=RouteSettings(shed_queue_depth=0.5),
    )
    resp = decode(
        proc.handle(
            duplex_headers(path="/v1/models", end_of_stream=True),
            StreamState(route=proc.default_route),
        ).response
    )
    assert resp.WhichOneof("response") == "request_headers"


def test_route_shed_setting():
    assert parse_route_settings([("x-extproc-shed-queue-depth", "8")]).shed_queue_depth == 8
    assert parse_route_settings([("x-extproc-shed-queue-depth", "0")]).shed_queue_depth is None
    assert parse_route_settings([("x-extproc-shed-queue-depth", "-1")]).shed_queue_depth is None
    assert parse_route_settings([("x-extproc-shed-queue-depth", "nan")]).shed_queue_depth is None


def test_no_destination_answer_removes_a_client_sent_header():
    reg, _ = registry(0)
    proc = Processor(
        reg, default_strategy="random", fallback=FALLBACKS["random"], metrics=Metrics()
    )
    resp = decode(
        proc.handle(
            headers_req(path="/v1/models", end_of_stream=True, body_mode=None), StreamState()
        ).response
    )
    assert list(resp.request_headers.response.header_mutation.remove_headers) == [
        "x-gateway-destination-endpoint"
    ]


def test_generation_post_without_a_body_is_400():
    proc, reg = make()
    for mode in (None, ProcessingMode.BUFFERED, DUPLEX):
        out = proc.handle(headers_req(end_of_stream=True, body_mode=mode), StreamState())
        resp = decode(out.response)
        assert resp.immediate_response.status.code == 400, mode
        assert orjson.loads(resp.immediate_response.body)["error"]["code"] == "invalid_json"
    assert reg.snapshot().pending == (0, 0, 0)
