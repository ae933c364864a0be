"""The sans-I/O message handler: ext_proc request in, serialized response out."""

from __future__ import annotations

import random

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.observability import Metrics
from extproc.processor import DESTINATION_HEADER, Processor
from extproc.strategies import FALLBACKS, STRATEGIES

from .helpers import registry, scrape_ok, vm


def headers_msg(**headers: str) -> ep.ProcessingRequest:
    hv = [
        base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode())
        for k, v in headers.items()
    ]
    hv.append(base_pb2.HeaderValue(key=":path", raw_value=b"/v1/chat/completions"))
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv))
    )


def make(n=2, expose=True, strategy="least-request", **kw):
    reg, clock = registry(n)
    proc = Processor(
        reg,
        default_strategy=strategy,
        fallback=FALLBACKS["random"],
        metrics=Metrics(),
        expose_routing_headers=expose,
        rng=random.Random(0),
        **kw,
    )
    return proc, reg


def decode(outcome) -> ep.ProcessingResponse:
    return ep.ProcessingResponse.FromString(outcome.response)


def test_routes_with_header_and_both_metadata_namespaces():
    proc, reg = make()
    scrape_ok(reg, 0, vm(running=5))
    scrape_ok(reg, 1, vm(running=0))
    out = proc.handle(headers_msg())
    resp = decode(out)
    hdr = resp.request_headers.response.header_mutation.set_headers[0].header
    # The pick, then the other server as fallback: header and envoy.lb metadata agree.
    assert (hdr.key, hdr.raw_value) == (DESTINATION_HEADER, b"10.0.0.2:8000,10.0.0.1:8000")
    md = resp.dynamic_metadata
    assert md["envoy.lb"][DESTINATION_HEADER] == "10.0.0.2:8000,10.0.0.1:8000"
    assert dict(md["extproc"]) == {
        "strategy": "least-request",
        "reason": "metrics",
        "endpoint": "10.0.0.2:8000",
    }
    assert out.token is not None and reg.snapshot().pending == (0, 1)


def test_routing_headers_can_be_switched_off():
    proc, reg = make(expose=False)
    resp = decode(proc.handle(headers_msg()))
    assert "extproc" not in resp.dynamic_metadata and "envoy.lb" in resp.dynamic_metadata


def test_client_header_selects_strategy():
    proc, reg = make(3)
    picks = [decode(proc.handle(headers_msg(x_routing_strategy="round-robin"))) for _ in range(3)]
    assert [p.dynamic_metadata["extproc"]["strategy"] for p in picks] == ["round-robin"] * 3
    assert len({p.dynamic_metadata["extproc"]["endpoint"] for p in picks}) == 3


@pytest.mark.parametrize("value", ["bogus", "LEAST-REQUEST-X", "x" * 500])
def test_unknown_strategy_is_400_openai_error(value):
    proc, _ = make()
    resp = decode(proc.handle(headers_msg(x_routing_strategy=value)))
    imm = resp.immediate_response
    assert imm.status.code == 400
    body = orjson.loads(imm.body)
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "unknown_routing_strategy"
    for name in STRATEGIES:
        assert name in body["error"]["message"]
    assert [h.header.raw_value for h in imm.headers.set_headers] == [b"application/json"]


def test_empty_strategy_header_uses_default():
    proc, _ = make()
    resp = decode(proc.handle(headers_msg(x_routing_strategy="")))
    assert resp.dynamic_metadata["extproc"]["strategy"] == "least-request"


def test_strategy_header_is_case_insensitive():
    proc, _ = make()
    resp = decode(proc.handle(headers_msg(x_routing_strategy="Round-Robin")))
    assert resp.dynamic_metadata["extproc"]["strategy"] == "round-robin"


def test_no_backends_is_503_openai_error_when_rejecting():
    proc, _ = make(0, reject_when_empty=True)
    resp = decode(proc.handle(headers_msg()))
    assert resp.immediate_response.status.code == 503
    assert orjson.loads(resp.immediate_response.body)["error"]["code"] == "no_backends"


def test_no_backends_lets_envoy_choose_by_default():
    proc, _ = make(0)
    out = proc.handle(headers_msg())
    resp = decode(out)
    # A plain CONTINUE: no destination header, no metadata; Envoy's fallback policy picks.
    assert resp.WhichOneof("response") == "request_headers"
    assert not resp.request_headers.response.header_mutation.set_headers
    assert not resp.HasField("dynamic_metadata") and out.token is None


def ranked_list(resp) -> list[str]:
    value = resp.request_headers.response.header_mutation.set_headers[0].header.raw_value.decode()
    assert resp.dynamic_metadata["envoy.lb"][DESTINATION_HEADER] == value
    return value.split(",")


def test_fallback_list_is_the_pick_then_least_loaded_distinct_servers():
    proc, reg = make(5)
    for i, running in enumerate([4, 0, 9, 2, 7]):
        scrape_ok(reg, i, vm(running=running))
    endpoints = ranked_list(decode(proc.handle(headers_msg())))
    # least-request picks .2 (0 running); then .4 (2), .1 (4), .5 (7): 3 fallbacks by default.
    assert endpoints == ["10.0.0.2:8000", "10.0.0.4:8000", "10.0.0.1:8000", "10.0.0.5:8000"]
    assert len(set(endpoints)) == len(endpoints)


def test_fallback_list_length_is_configurable_and_zero_is_just_the_pick():
    proc, reg = make(5, fallback_endpoints=1)
    assert len(ranked_list(decode(proc.handle(headers_msg())))) == 2
    proc, reg = make(5, fallback_endpoints=0)
    assert len(ranked_list(decode(proc.handle(headers_msg())))) == 1


def test_fallback_list_leaves_out_suspect_and_unhealthy_servers():
    proc, reg = make(4)
    for i in range(4):
        scrape_ok(reg, i, vm(running=0))
    recs = reg.records
    reg.record_failure(recs[1], "timeout", timeout=True)  # hung: suspect
    reg.record_failure(recs[2], "refused", timeout=False, down=True)  # dead: unhealthy at once
    for _ in range(20):
        assert set(ranked_list(decode(proc.handle(headers_msg())))) == {
            "10.0.0.1:8000",
            "10.0.0.4:8000",
        }


def test_handler_never_returns_an_empty_answer_for_trailers():
    proc, _ = make()
    msg = ep.ProcessingRequest(request_trailers=ep.HttpTrailers())
    assert decode(proc.handle(msg)).WhichOneof("response") == "request_trailers"


def test_broken_fallback_still_routes(monkeypatch):
    proc, reg = make()

    class Broken:
        name = "random"
        needs_metrics = False

        def choose(self, *a):
            raise RuntimeError("fallback bug")

    proc.fallback = Broken()
    resp = decode(proc.handle(headers_msg()))  # cold cache -> fallback -> raises -> last resort
    assert resp.dynamic_metadata["extproc"]["reason"] == "fallback-error"


def test_other_phases_get_a_plain_continue():
    proc, _ = make()
    msg = ep.ProcessingRequest(response_headers=ep.HttpHeaders())
    assert decode(proc.handle(msg)).WhichOneof("response") == "response_headers"


def test_decisions_are_counted():
    proc, reg = make()
    for _ in range(3):
        proc.handle(headers_msg())
    value = proc.metrics.registry.get_sample_value(
        "extproc_decisions_total", {"strategy": "least-request", "reason": "cold-cache"}
    )
    assert value == 3
