"""The body phase: OpenAI body parsing, errors, model pools, per-route settings."""

from __future__ import annotations

import random

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.observability import Metrics
from extproc.openai_request import RequestError, parse_request
from extproc.processor import Processor, StreamState
from extproc.route_settings import RouteSettings, RouteSettingsCache, parse_route_settings
from extproc.strategies import FALLBACKS, STRATEGIES

from .helpers import registry, scrape_ok, vm

BUFFERED = ProcessingMode.BUFFERED


def headers_req(
    path="/v1/chat/completions", end_of_stream=False, body_mode=BUFFERED, method="POST", **headers
):
    hv = [
        base_pb2.HeaderValue(key=":path", raw_value=path.encode()),
        base_pb2.HeaderValue(key=":method", raw_value=method.encode()),
    ]
    hv += [
        base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode())
        for k, v in headers.items()
    ]
    req = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=hv), end_of_stream=end_of_stream
        )
    )
    if body_mode is not None:
        req.protocol_config.request_body_mode = body_mode
    return req


def body_req(body) -> ep.ProcessingRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True))


def chat(model="A", text="hello", **kw):
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}


def make(models=(("A",), ("A",), ("B",)), max_body_bytes=1 << 20):
    reg, _ = registry(len(models))
    for i, m in enumerate(models):
        scrape_ok(reg, i, vm(running=i, models=m))
    proc = Processor(
        reg,
        default_strategy="least-request",
        fallback=FALLBACKS["random"],
        metrics=Metrics(),
        rng=random.Random(0),
        max_body_bytes=max_body_bytes,
    )
    return proc, reg


def exchange(proc, body, state=None, **headers):
    state = state or StreamState()
    first = ep.ProcessingResponse.FromString(proc.handle(headers_req(**headers), state).response)
    assert first.WhichOneof("response") == "request_headers"
    assert not first.request_headers.response.HasField("header_mutation")  # waits for the body
    out = proc.handle(body_req(body), state)
    return ep.ProcessingResponse.FromString(out.response), out


def test_decides_at_the_body_with_the_model_pool():
    proc, _ = make()
    resp, out = exchange(proc, chat(model="B"))
    assert resp.WhichOneof("response") == "request_body"
    hdr = resp.request_body.response.header_mutation.set_headers[0].header
    assert hdr.raw_value == b"10.0.0.3:8000"  # model B has one server: nothing to fall back to
    assert resp.dynamic_metadata["envoy.lb"]["x-gateway-destination-endpoint"] == "10.0.0.3:8000"
    assert out.token is not None


def test_headers_only_mode_decides_at_headers():
    proc, _ = make()
    resp = ep.ProcessingResponse.FromString(
        proc.handle(headers_req(body_mode=None), StreamState()).response
    )
    value = resp.request_headers.response.header_mutation.set_headers[0].header.raw_value
    assert value.split(b",")[0] == b"10.0.0.1:8000"


def test_paths_not_understood_are_routed_without_the_body():
    proc, _ = make()
    resp = ep.ProcessingResponse.FromString(
        proc.handle(headers_req(path="/v1/embeddings"), StreamState()).response
    )
    assert resp.request_headers.response.HasField("header_mutation")


def test_get_without_body_is_routed_at_headers():
    proc, _ = make()
    resp = ep.ProcessingResponse.FromString(
        proc.handle(
            headers_req(path="/v1/chat/completions", end_of_stream=True, method="GET"),
            StreamState(),
        ).response
    )
    assert resp.request_headers.response.HasField("header_mutation")


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "missing_model"),
        ({"model": 5, "messages": []}, 400, None),
        (chat(stream="yes"), 400, None),
        (chat(max_tokens=-1), 400, None),
        (chat(max_tokens="10"), 400, None),
        ({"model": "A", "messages": "hi"}, 400, None),
        ({"model": "A", "messages": [{"content": "no role"}]}, 400, None),
        (chat(model="nope"), 404, "model_not_found"),
        (chat(text="x" * 2000), 413, "request_too_large"),
    ],
)
def test_bad_bodies_get_openai_errors(body, status, code):
    proc, reg = make(max_body_bytes=1000)
    resp, out = exchange(proc, body)
    imm = resp.immediate_response
    assert imm.status.code == status
    err = orjson.loads(imm.body)["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if code:
        assert err["code"] == code
    assert out.token is None and reg.snapshot().pending == (0, 0, 0)  # nothing was routed


def test_model_not_found_lists_available_models():
    proc, _ = make()
    resp, _ = exchange(proc, chat(model="gpt-9"))
    assert "A, B" in orjson.loads(resp.immediate_response.body)["error"]["message"]


def test_completions_prompt_forms():
    for prompt in ["text", ["a", "b"], [1, 2, 3]]:
        assert (
            parse_request(
                "/v1/completions", orjson.dumps({"model": "m", "prompt": prompt}), max_bytes=1000
            ).model
            == "m"
        )
    with pytest.raises(RequestError):
        parse_request("/v1/completions", orjson.dumps({"model": "m"}), max_bytes=1000)
    with pytest.raises(RequestError):
        parse_request(
            "/v1/completions", orjson.dumps({"model": "m", "prompt": [True]}), max_bytes=1000
        )


def test_session_key_from_header_or_user():
    proc, reg = make(models=(("A",),) * 4)
    picks = set()
    for _ in range(10):
        resp, out = exchange(proc, chat(user="alice"), x_routing_strategy="session")
        picks.add(resp.dynamic_metadata["extproc"]["endpoint"])
        reg.on_done(out.token)
    assert len(picks) == 1
    resp, _ = exchange(proc, chat(), x_routing_strategy="session", x_session_id="bob")
    assert resp.dynamic_metadata["extproc"]["reason"] == "session"


def test_prefix_index_is_updated_on_every_pick():
    proc, _ = make(models=(("A",),) * 3)
    text = "You are a helpful assistant. " * 30
    first, _ = exchange(proc, chat(text=text + "Q1"))  # least-request records the prefix too
    home = first.dynamic_metadata["extproc"]["endpoint"]
    again, _ = exchange(proc, chat(text=text + "Q2"), x_routing_strategy="prefix-cache")
    assert again.dynamic_metadata["extproc"]["endpoint"] == home
    assert again.dynamic_metadata["extproc"]["reason"] == "prefix-hit"


def test_route_strategy_beats_client_header_and_default():
    proc, _ = make()
    route = parse_route_settings([("x-extproc-strategy", "round-robin")])
    resp, _ = exchange(proc, chat(), state=StreamState(route=route), x_routing_strategy="random")
    assert resp.dynamic_metadata["extproc"]["strategy"] == "round-robin"


def test_route_can_forbid_the_client_header():
    proc, _ = make()
    route = parse_route_settings([("x-extproc-allow-client-strategy", "false")])
    resp, _ = exchange(proc, chat(), state=StreamState(route=route), x_routing_strategy="bogus")
    assert resp.dynamic_metadata["extproc"]["strategy"] == "least-request"  # ignored, not a 400


def guarded(abs_: float):
    return STRATEGIES["prefix-cache"].with_params("prefix", {"guard_abs": abs_})


def test_route_settings_parsing_and_bad_values_ignored():
    s = parse_route_settings(
        [
            ("x-extproc-weights", "queue=3,prefix=5"),
            ("x-extproc-prefix-guard", "abs=8,rel=2"),
            ("other", "x"),
        ]
    )
    assert s.profiles["weighted"].weights == {"queue": 3, "kv": 1, "prefix": 5, "lora": 1}
    assert s.profiles["prefix-cache"].uses[0].params == {"guard_abs": 8, "guard_rel": 2}
    assert s.profiles["least-request"] is STRATEGIES["least-request"]  # the others untouched
    service = guarded(2.0)
    base = RouteSettings(profiles={**STRATEGIES, "prefix-cache": service})
    # The service's own profiles are the base: its guard is kept under a route's weights.
    assert (
        parse_route_settings([("x-extproc-weights", "kv=1")], base).profiles["prefix-cache"]
        is service
    )
    bad = parse_route_settings(
        [
            ("x-extproc-weights", "queue=-1"),
            ("x-extproc-strategy", "nope"),
            ("x-extproc-prefix-guard", "abs=1,far=2"),
        ]
    )
    assert bad.profiles == STRATEGIES and bad.strategy is None
    cache = RouteSettingsCache()
    md = (("x-extproc-strategy", "session"),)
    assert cache.get(md) is cache.get(md)


def test_partial_body_is_413():
    proc, _ = make()
    state = StreamState()
    proc.handle(headers_req(body_mode=ProcessingMode.BUFFERED_PARTIAL), state)
    partial = ep.ProcessingRequest(
        request_body=ep.HttpBody(body=b'{"model": "A", "mess', end_of_stream=False)
    )
    resp = ep.ProcessingResponse.FromString(proc.handle(partial, state).response)
    assert resp.immediate_response.status.code == 413
    assert orjson.loads(resp.immediate_response.body)["error"]["code"] == "request_too_large"


def test_buffered_body_followed_by_trailers_is_routed_not_413():
    # BUFFERED: end_of_stream=False on the body only means trailers follow; the body is whole.
    proc, _ = make()
    state = StreamState()
    proc.handle(headers_req(body_mode=BUFFERED), state)
    body = ep.ProcessingRequest(
        request_body=ep.HttpBody(body=orjson.dumps(chat(model="B")), end_of_stream=False)
    )
    resp = ep.ProcessingResponse.FromString(proc.handle(body, state).response)
    assert resp.WhichOneof("response") == "request_body"
    assert (
        resp.request_body.response.header_mutation.set_headers[0].header.raw_value
        == b"10.0.0.3:8000"
    )
    trailers = ep.ProcessingRequest(request_trailers=ep.HttpTrailers())
    assert ep.ProcessingResponse.FromString(proc.handle(trailers, state).response).HasField(
        "request_trailers"
    )


def test_partial_mode_whole_body_with_trailers_is_routed():
    proc, _ = make()
    state = StreamState()
    proc.handle(headers_req(body_mode=ProcessingMode.BUFFERED_PARTIAL), state)
    body = ep.ProcessingRequest(
        request_body=ep.HttpBody(body=orjson.dumps(chat(model="B")), end_of_stream=False)
    )
    resp = ep.ProcessingResponse.FromString(proc.handle(body, state).response)
    assert resp.WhichOneof("response") == "request_body"
