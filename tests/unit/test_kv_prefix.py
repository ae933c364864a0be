"""prefix_match per server: exact from KV events where a server sends them, else approximate."""

from __future__ import annotations

import time

import orjson
import pytest
from prometheus_client import CollectorRegistry

from extproc.kv_events import Batch, BlockStored
from extproc.kv_index import KvIndex, ServerBlocks
from extproc.kv_metrics import KvMetrics
from extproc.kv_prefix import RECENT_SECONDS, PrefixSource
from extproc.openai_request import parse_request
from extproc.prefix_index import PrefixIndex
from extproc.tokenizer import SimTokenizer, Tokenizers
from vllmsim import tokenizer as sim

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
BS = 16
SYSTEM = "You are a meticulous assistant. Answer in full sentences and cite sources. " * 4


def chat(text: str, model: str = "m"):
    body = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
    }
    return parse_request("/v1/chat/completions", orjson.dumps(body), max_bytes=1 << 20)


def publish(
    server: ServerBlocks, tokens: list[int], *, lora: str | None = None, seq: int = 0
) -> None:
    """What a vLLM server with this prompt cached would have sent (hashes are opaque to us)."""
    n = len(tokens) // BS
    server.on_batch(
        Batch(
            seq,
            0.0,
            [
                BlockStored(
                    block_hashes=[(seq << 20) + i for i in range(n)],
                    parent_block_hash=None,
                    token_ids=tokens[: n * BS],
                    block_size=BS,
                    medium="GPU",
                    lora_name=lora,
                    group_idx=0,
                )
            ],
        )
    )


def sim_tokens(parsed) -> list[int]:
    return sim.encode(sim.render_chat(parsed.messages))


def make(adapters: dict[str, frozenset[str]] | None = None):
    registry = CollectorRegistry()
    metrics = KvMetrics(registry)
    kv = KvIndex(max_blocks=10_000)
    for ep in (A, B, C):
        kv.add(ep)
    source = PrefixSource(
        PrefixIndex(),
        kv=kv,
        tokenizers=Tokenizers({"m": SimTokenizer(), "ad": SimTokenizer()}),
        metrics=metrics,
        adapter_endpoints=lambda model: (adapters or {}).get(model, frozenset()),
    )
    return source, kv, registry


def sample(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_prefix_cached_by_traffic_outside_the_gateway_is_found():
    source, kv, registry = make()
    req = chat("What is the capital of France?")
    publish(kv.servers[B], sim_tokens(req))  # B served it directly: the gateway never saw it
    prefix = source.lookup(req)
    assert prefix.has_prompt and prefix.tokens is not None
    assert prefix.match(B) == 1.0 and prefix.match(A) == 0.0
    assert (prefix.source_for(B), prefix.source_for(C)) == ("exact", "approximate")
    # a different question with the same system prompt: the shared blocks only
    other = source.lookup(chat("And of Spain?"))
    assert 0.5 < other.match(B) < 1.0
    prefix.picked(B)
    other.picked(C)
    assert sample(registry, "extproc_prefix_source_total", source="exact") == 1
    assert sample(registry, "extproc_prefix_source_total", source="approximate") == 1
    assert sample(registry, "extproc_prompt_tokenize_total", result="ok") == 2


def test_server_without_events_falls_back_to_the_approximate_index():
    source, kv, _ = make()
    req = chat("Tell me about prefix caching in detail, please.")
    publish(kv.servers[A], [1] * BS)  # A publishes (unrelated blocks); C never does
    approx = source.approx
    approx.record(C, approx.hashes(req.model, req.prompt))  # the gateway routed it to C before
    prefix = source.lookup(req)
    assert prefix.match(C) == 1.0  # approximate: C never sent an event
    assert prefix.match(A) == 0.0  # exact: A's events say it does not hold it
    hashes = approx.hashes(req.model, req.prompt)
    approx.record(A, hashes, now=time.monotonic() - RECENT_SECONDS - 1)
    assert prefix.match(A) == 0.0  # an old guess of the gateway does not count where events exist


def test_a_recent_pick_counts_until_the_servers_events_can_tell():
    """The second request of a new prefix, sent while the first is still queued or in prefill
    (no BlockStored yet), goes where the first went: the pick itself counts for RECENT_SECONDS."""
    source, kv, _ = make()
    req = chat("Tell me about prefix caching in detail, please.")
    publish(kv.servers[A], [1] * BS)
    approx = source.approx
    approx.record(A, approx.hashes(req.model, req.prompt))  # just picked, no event yet
    prefix = source.lookup(req)
    assert prefix.match(A) == 1.0 and prefix.source_for(A) == "exact"
    assert prefix.match(B) == 0.0
    later = source.lookup(req)
    later._recent_since = time.monotonic() + 1  # as if RECENT_SECONDS had passed
    assert later.match(A) == 0.0  # then only the events count (e.g. it was evicted)


def test_no_tokenizer_for_the_model_means_approximate_everywhere():
    source, kv, registry = make()
    req = chat("hello", model="unknown-model")
    publish(kv.servers[A], sim_tokens(chat("hello")))
    prefix = source.lookup(req)
    assert prefix.tokens is None and prefix.source_for(A) == "approximate"
    assert sample(registry, "extproc_prompt_tokenize_total", result="no-tokenizer") == 1


def test_no_events_anywhere_skips_tokenizing():
    source, _, registry = make()
    prefix = source.lookup(chat("hello"))
    assert prefix.tokens is None
    assert sample(registry, "extproc_prompt_tokenize_total", result="ok") == 0


def test_adapter_requests_match_only_the_adapters_blocks():
    source, kv, _ = make(adapters={"ad": frozenset({A, B})})
    req = chat("Write a SQL query for the top customers.", model="ad")
    tokens = sim_tokens(req)
    publish(kv.servers[A], tokens, lora="ad")
    publish(kv.servers[B], tokens)  # the base model cached the same text: not reusable by "ad"
    prefix = source.lookup(req)
    assert prefix.match(A) == 1.0 and prefix.match(B) == 0.0


def test_short_prompts_and_block_sizes_per_server():
    source, kv, _ = make()
    req = parse_request(
        "/v1/completions",
        orjson.dumps({"model": "m", "prompt": "Hi there friend"}),
        max_bytes=1 << 20,
    )
    tokens = sim.encode_completion_prompt("Hi there friend")
    assert len(tokens) < BS
    publish(kv.servers[A], [1] * BS)
    prefix = source.lookup(req)
    assert prefix.approx_hashes == () and prefix.tokens is not None
    assert prefix.match(A) == 0.0  # no full block of 16: nothing to match
    # B caches in blocks of 4: the same prompt has full blocks there
    n = len(tokens) // 4
    kv.servers[B].on_batch(
        Batch(
            0,
            0.0,
            [
                BlockStored(
                    block_hashes=list(range(n)),
                    parent_block_hash=None,
                    token_ids=tokens[: n * 4],
                    block_size=4,
                )
            ],
        )
    )
    assert prefix.match(B) == 1.0


def test_approximate_only_source_is_todays_path():
    approx = PrefixIndex()
    source = PrefixSource(approx)
    req = chat("x" * 200)
    approx.record(A, approx.hashes(req.model, req.prompt))
    prefix = source.lookup(req)
    assert prefix.tokens is None and prefix.match(A) == 1.0 and prefix.has_prompt
    prefix.picked(A)  # no metrics: nothing to count, nothing breaks


def test_processor_routes_to_the_server_whose_events_hold_the_prefix():
    """End to end through the sans-I/O processor: B is the most loaded server, but its events say
    it holds the conversation's prefix; prefix-cache goes there (exact), and says so in the metric."""
    import random

    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    from extproc.observability import Metrics
    from extproc.processor import Processor, StreamState
    from extproc.strategies import FALLBACKS

    from .helpers import registry, scrape_ok, vm

    reg, _ = registry(3)
    for i in range(3):
        scrape_ok(reg, i, vm(running=[0, 3, 1][i], models=("m",)))
    endpoints = [r.endpoint for r in reg.records]
    metrics = Metrics()
    kv = KvIndex(max_blocks=10_000)
    for ep_ in endpoints:
        kv.add(ep_)
    kv_metrics = KvMetrics(metrics.registry)
    source = PrefixSource(
        PrefixIndex(), kv=kv, tokenizers=Tokenizers({"m": SimTokenizer()}), metrics=kv_metrics
    )
    proc = Processor(
        reg,
        default_strategy="prefix-cache",
        fallback=FALLBACKS["random"],
        metrics=metrics,
        rng=random.Random(0),
        prefix_source=source,
    )
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
    }
    publish(kv.servers[endpoints[1]], sim_tokens(chat("hi")))
    publish(kv.servers[endpoints[0]], [7] * BS)  # A publishes too, other blocks

    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

    headers = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=":path", raw_value=b"/v1/chat/completions"),
                    base_pb2.HeaderValue(key=":method", raw_value=b"POST"),
                ]
            )
        )
    )
    headers.protocol_config.request_body_mode = ProcessingMode.BUFFERED
    body_msg = ep.ProcessingRequest(
        request_body=ep.HttpBody(body=orjson.dumps(body), end_of_stream=True)
    )

    def route() -> str:
        state = StreamState()
        proc.handle(headers, state)
        out = ep.ProcessingResponse.FromString(proc.handle(body_msg, state).response)
        proc.finish(state)
        return (
            out.request_body.response.header_mutation.set_headers[0]
            .header.raw_value.decode()
            .split(",")[0]
        )

    assert route() == endpoints[1]
    assert (
        metrics.registry.get_sample_value("extproc_prefix_source_total", {"source": "exact"}) == 1
    )
    # B evicts the prefix (its first block): the least loaded server wins again
    from extproc.kv_events import BlockRemoved

    kv.servers[endpoints[1]].on_batch(Batch(1, 0.0, [BlockRemoved(block_hashes=[0], medium="GPU")]))
    assert route() == endpoints[0]


def test_app_wiring_of_the_exact_source(tmp_path, caplog):
    from extproc.app import _exact_prefix
    from extproc.backends import BackendRegistry
    from extproc.config import ConfigError, load_settings
    from extproc.observability import Metrics

    reg = BackendRegistry(stale_after=1.0, max_metrics_age=10.0)

    def build(**cli):
        return _exact_prefix(load_settings(cli), PrefixIndex(), reg, Metrics())

    source, subs = build()
    assert subs is None and source.kv is None and not source.exact_possible
    source, subs = build(tokenizer=["m=vllmsim"])
    assert subs is None and source.tokenizers is not None and "nothing to match" in caplog.text
    source, subs = build(kv_events_port=5557)
    assert subs is not None and source.kv is not None and source.tokenizers is None
    assert "without --tokenizer" in caplog.text
    source, subs = build(kv_events_endpoint=["10.0.0.1:8000=ipc:///tmp/x"], tokenizer=["*=vllmsim"])
    assert source.adapter_endpoints("m") == frozenset()  # no pool for it yet
    assert (
        source.exact_possible
        and subs is not None
        and subs.address_of("10.0.0.1:8000") == "ipc:///tmp/x"
    )
    with pytest.raises(ConfigError, match="no such file"):
        build(tokenizer=[f"m={tmp_path}/missing"])


def test_the_pick_and_its_source_are_logged_at_debug(caplog):
    import logging

    source, kv, _ = make()
    req = chat("Which source valued me?")
    publish(kv.servers[A], sim_tokens(req))
    with caplog.at_level(logging.DEBUG, logger="extproc.kv_prefix"):
        source.lookup(req).picked(A)
    assert f"picked {A}, exact match 1.000" in caplog.text


def test_holders_include_every_server_with_a_match_through_events_and_evictions():
    """holders() names the servers the prefix scorer asks (when few): it must include every
    server with a match above 0, whatever the events did: stores of several block sizes and an
    adapter, removals, clears, gaps, LRU evictions, the gateway's own picks, servers leaving."""
    import random

    from extproc.kv_events import AllBlocksCleared, BlockRemoved

    rng = random.Random(11)
    D, E = "10.0.0.4:8000", "10.0.0.5:8000"  # D: a block size of 4; E: no events ever
    source, kv, _ = make(adapters={"ad": frozenset({A, C})})
    kv.max_blocks = 40  # servers added from here on evict (LRU)
    kv.add(D)
    texts = [f"Question {i % 3}: " + "please explain " * (i % 4) for i in range(8)]
    requests = [chat(t, model="ad" if i % 5 == 4 else "m") for i, t in enumerate(texts)]
    seqs = {A: 0, B: 0, C: 0, D: 0}
    stored: dict[str, list[int]] = {ep: [] for ep in seqs}
    for step in range(250):
        ep = rng.choice(list(seqs))
        server = kv.servers.get(ep) or kv.add(ep)
        op = rng.random()
        req = rng.choice(requests)
        if op < 0.45:
            tokens = sim_tokens(req)
            bs = 4 if ep == D else BS
            n = len(tokens) // bs
            vh = [step * 1000 + i for i in range(n)]
            stored[ep] += vh
            seqs[ep] += 1
            lora = req.model if req.model == "ad" and ep in (A, C) else None
            event = BlockStored(vh, None, tokens[: n * bs], bs, lora, "GPU", 0)
            server.on_batch(Batch(seqs[ep], 0.0, [event]))
        elif op < 0.6 and stored[ep]:
            seqs[ep] += 1
            gone = rng.sample(stored[ep], min(3, len(stored[ep])))
            server.on_batch(Batch(seqs[ep], 0.0, [BlockRemoved(gone, "GPU", 0)]))
        elif op < 0.65:
            seqs[ep] += 1
            server.on_batch(Batch(seqs[ep], 0.0, [AllBlocksCleared()]))
        elif op < 0.7:
            seqs[ep] += 5  # a gap: the index is dropped, then rebuilt from the next events
        elif op < 0.73:
            kv.remove(ep)  # left the pool; comes back on a later step
        else:
            approx = source.approx
            approx.record(rng.choice([ep, E]), approx.hashes(req.model, req.prompt))
        for r in requests:
            prefix = source.lookup(r)
            every = {e for e in (A, B, C, D, E) if prefix.match(e) > 0.0}
            assert every <= set(prefix.holders()), (step, r.prompt)
        # and the map of first blocks neither leaks nor misses (memory stays bounded)
        held = {(h, e) for e, s in kv.servers.items() for h in s.own_firsts}
        assert held == {(h, e) for h, es in kv.firsts.items() for e in es}
        assert all(h in kv.servers[e].blocks for h, e in held), step
