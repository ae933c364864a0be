"""Pure parts of the routing benchmark: workloads, arrivals, statistics, SSE timing (no network)."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import yaml

from bench.loadgen import (
    RequestResult,
    SSEParser,
    StreamTimings,
    percentile,
    saturated_throughput,
    summarize,
)
from bench.workloads import (
    WORDS,
    Workload,
    arrival_offsets,
    generate,
    shared_prefix,
    sharegpt_like,
    unit_gaps,
)


# ================================================================================ workloads
@pytest.mark.parametrize("kind", ["sharegpt", "shared-prefix"])
def test_same_seed_same_workload(kind):
    a = generate(kind, 300, seed=7)
    b = generate(kind, 300, seed=7)
    assert a.digest() == b.digest()
    assert a.to_json() == b.to_json()
    assert [a.body(r) for r in a.requests] == [b.body(r) for r in b.requests]


@pytest.mark.parametrize("kind", ["sharegpt", "shared-prefix"])
def test_other_seed_other_workload(kind):
    assert generate(kind, 100, seed=1).digest() != generate(kind, 100, seed=2).digest()


def test_generation_ignores_global_random_state():
    random.seed(1)
    a = sharegpt_like(50, 3)
    random.seed(999)
    assert sharegpt_like(50, 3).digest() == a.digest()


def test_prefix_of_a_larger_workload_is_the_smaller_one():
    """Runs replay a prefix of the file; asking for more requests must not change the first ones."""
    small, big = sharegpt_like(50, 4), sharegpt_like(500, 4)
    assert big.requests[:50] == small.requests
    assert big.unit_gaps[:50] == small.unit_gaps


@pytest.mark.parametrize("kind", ["sharegpt", "shared-prefix"])
def test_save_load_round_trip(tmp_path, kind):
    wl = generate(kind, 120, seed=5, burstiness=0.5)
    loaded = Workload.load(wl.save(tmp_path / "w.json"))
    assert loaded.digest() == wl.digest()
    assert loaded.requests == wl.requests
    assert loaded.unit_gaps == wl.unit_gaps and loaded.burstiness == 0.5


def test_load_rejects_other_format_version(tmp_path):
    d = sharegpt_like(3, 1).to_dict()
    d["version"] = 999
    with pytest.raises(ValueError, match="format"):
        Workload.from_dict(d)


def test_words_are_single_tokens_for_the_simulator():
    from vllmsim.tokenizer import count_tokens

    assert all(1 <= len(w) <= 6 and w.isalpha() and w.islower() for w in WORDS)
    text = " ".join(WORDS)
    assert count_tokens(text) == len(WORDS)


def test_shared_prefix_groups_share_exactly_their_system_prompt():
    wl = shared_prefix(
        400, seed=2, num_groups=8, system_prompt_len=256, question_len=20, output_len=10
    )
    assert len(wl.systems) == 8 and len(set(wl.systems)) == 8
    assert {r.group for r in wl.requests} == set(range(8))  # every group is used
    for r in wl.requests:
        msgs = wl.messages(r)
        assert msgs[0] == {"role": "system", "content": wl.systems[r.group]}
        assert msgs[1]["role"] == "user"
        assert 7 <= r.max_tokens <= 13  # 10 +- 25 %
    assert len({r.user for r in wl.requests}) == len(wl.requests)  # questions are unique
    # the system prompts differ from their first token on (no accidental cross-group prefix)
    firsts = {s.split()[0] for s in wl.systems}
    assert len(firsts) == 8


def test_shared_prefix_system_prompt_length_in_tokens():
    from vllmsim.tokenizer import count_tokens

    wl = shared_prefix(5, seed=1, system_prompt_len=512)
    for s in wl.systems:
        assert abs(count_tokens(s) - 512) <= 3  # "g<k>" may be 2 pieces


def test_sharegpt_like_length_distribution():
    wl = sharegpt_like(4000, seed=11)
    pin = [r.prompt_words for r in wl.requests]
    pout = [r.max_tokens for r in wl.requests]
    assert 90 <= statistics.median(pin) <= 150
    assert statistics.mean(pin) > 1.4 * statistics.median(pin)  # heavy right tail
    assert 90 <= statistics.median(pout) <= 150
    assert min(pin) >= 4 and max(pin) <= 2048 and max(pout) <= 1024
    assert all(r.system is None and r.group is None for r in wl.requests)
    assert len({r.user.split()[0] for r in wl.requests}) == len(wl.requests)  # no shared prefix


def test_sharegpt_output_scale_keeps_the_shape():
    base = sharegpt_like(500, seed=3)
    half = sharegpt_like(500, seed=3, output_scale=0.5)
    for a, b in zip(base.requests, half.requests, strict=True):
        assert b.max_tokens == max(1, round(a.max_tokens * 0.5))
        assert a.user == b.user


def test_unknown_parameters_are_rejected():
    with pytest.raises(TypeError):
        sharegpt_like(5, 1, output_len=3)
    with pytest.raises(TypeError):
        shared_prefix(5, 1, input_median=3)
    with pytest.raises(ValueError):
        generate("nope", 5, 1)


def test_request_body_is_a_streaming_chat_with_fixed_output_length():
    wl = shared_prefix(3, seed=1)
    body = wl.body(wl.requests[0])
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == wl.requests[0].max_tokens
    assert body["messages"][0]["role"] == "system"


# ================================================================================ arrivals
@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_unit_gaps_have_mean_one_and_the_expected_dispersion(burstiness):
    gaps = unit_gaps(random.Random(0), 40_000, burstiness)
    m = statistics.fmean(gaps)
    cv = statistics.pstdev(gaps) / m
    assert m == pytest.approx(1.0, rel=0.03)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)  # Poisson: CV = 1
    assert all(g > 0 for g in gaps)


def test_poisson_counts_per_window_have_variance_equal_to_mean():
    offs = arrival_offsets(unit_gaps(random.Random(1), 50_000, 1.0), rate=10.0)
    counts = [0] * int(offs[-1])
    for t in offs:
        if int(t) < len(counts):
            counts[int(t)] += 1
    mean = statistics.fmean(counts)
    assert mean == pytest.approx(10.0, rel=0.03)
    assert statistics.pvariance(counts) == pytest.approx(mean, rel=0.1)


def test_offsets_scale_inversely_with_rate_and_are_increasing():
    wl = sharegpt_like(200, seed=9)
    o1, o4 = wl.offsets(1.0), wl.offsets(4.0)
    assert all(b > a for a, b in zip(o1, o1[1:], strict=False))
    assert o4 == pytest.approx([x / 4 for x in o1])
    assert wl.offsets(2.0, 10) == pytest.approx([x / 2 for x in o1[:10]])
    with pytest.raises(ValueError):
        wl.offsets(0.0)
    with pytest.raises(ValueError):
        wl.offsets(1.0, 201)


def test_bad_burstiness_is_rejected():
    with pytest.raises(ValueError):
        unit_gaps(random.Random(0), 3, 0.0)


# ================================================================================ statistics
def test_percentile_known_values():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    rng = random.Random(3)
    for n in (2, 7, 100, 1001):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (1, 10, 50, 90, 99, 99.9):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def _res(
    i, *, ok=True, ttft=0.1, e2e=1.0, itls=(0.01, 0.02), out=3, backend="sim0", error=None, sent=0.0
):
    return RequestResult(
        id=i,
        scheduled=sent,
        sent=sent,
        ok=ok,
        status=200 if ok else 500,
        error=error,
        ttft=ttft if ok else None,
        e2e=e2e if ok else None,
        itls=list(itls),
        chunks=out,
        output_tokens=out,
        expected_output_tokens=out,
        backend=backend,
    )


def test_summarize_converts_wall_to_simulated_time():
    rs = [
        _res(0, ttft=0.1, e2e=1.0, backend="sim0"),
        _res(1, ttft=0.3, e2e=2.0, backend="sim1"),
        _res(2, ok=False, error="http 500: boom"),
    ]
    s = summarize(rs, wall_s=10.0, time_scale=0.5, pods=["sim0", "sim1", "sim2"])
    assert s["requests"] == 3 and s["completed"] == 2 and s["errors"] == 1
    assert s["error_kinds"] == {"http 500": 1}
    assert s["ttft_s"]["p50"] == pytest.approx(0.1)  # (0.1+0.3)/2 * 0.5
    assert s["ttft_s"]["max"] == pytest.approx(0.15)
    assert s["e2e_s"]["p90"] == pytest.approx(0.5 * percentile([1.0, 2.0], 90))
    assert s["itl_s"]["p50"] == pytest.approx(0.5 * 0.015)
    assert s["duration_s"] == pytest.approx(5.0)
    assert s["output_tokens"] == 6
    assert s["output_tokens_per_s"] == pytest.approx(6 / 5.0)
    assert s["throughput_rps"] == pytest.approx(2 / 5.0)
    assert s["backend_share"] == {"sim0": 0.5, "sim1": 0.5, "sim2": 0.0}
    # TPOT = (e2e - ttft) / (tokens - 1), in simulated seconds
    assert s["tpot_s"]["max"] == pytest.approx(0.5 * (2.0 - 0.3) / 2)


def test_summarize_of_nothing_is_nan_not_an_exception():
    s = summarize([], wall_s=0.0)
    assert s["completed"] == 0 and math.isnan(s["ttft_s"]["p50"])


def test_saturated_throughput_counts_completions_while_backlogged():
    # 100 requests, one completion every 0.1 s from t=1 on; the last one is sent at t=8.
    rs = [
        _res(i, sent=min(i * 0.1, 8.0), e2e=1.0 + i * 0.1 - min(i * 0.1, 8.0)) for i in range(100)
    ]
    rps, tps = saturated_throughput(rs, concurrency=10)
    assert rps == pytest.approx(10.0, rel=0.05)
    assert tps == pytest.approx(30.0, rel=0.05)
    assert math.isnan(saturated_throughput(rs[:3], 10)[0])


# ================================================================================ SSE
def _events(chunks):
    p = SSEParser()
    out = []
    for c in chunks:
        out += p.feed(c)
    return out + p.flush()


def test_sse_events_split_anywhere_give_the_same_payloads():
    stream = (
        b'data: {"a":1}\n\n'
        b'data: {"b":2}\r\n\r\n'
        b": keep-alive comment\n\n"
        b'event: message\ndata: {"c":\n'
        b"data: 3}\n\n"
        b"data: [DONE]\n\n"
    )
    expected = [b'{"a":1}', b'{"b":2}', b'{"c":\n3}', b"[DONE]"]
    assert _events([stream]) == expected
    for cut in range(1, len(stream)):
        assert _events([stream[:cut], stream[cut:]]) == expected
    assert _events([bytes([b]) for b in stream]) == expected


def test_sse_unterminated_last_event_is_kept_on_flush():
    assert _events([b"data: x\n\ndata: tail"]) == [b"x", b"tail"]
    assert _events([b"data:nospace\n\n"]) == [b"nospace"]


def _chat_chunk(content=None, role=None, finish=None):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    import json

    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode()


def test_ttft_and_itl_from_a_chat_stream():
    st = StreamTimings(start=10.0)
    st.on_event(_chat_chunk(role="assistant", content=""), 10.05)  # role only: not a token
    st.on_event(_chat_chunk(" the"), 10.2)
    st.on_event(_chat_chunk(" of"), 10.25)
    st.on_event(_chat_chunk(" and", finish="length"), 10.4)
    st.on_event(b'{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3}}', 10.41)
    assert not st.done
    st.on_event(b"[DONE]", 10.42)
    assert st.done and st.error is None
    assert st.ttft == pytest.approx(0.2)
    assert st.itls() == pytest.approx([0.05, 0.15])
    assert st.output_tokens == 3 and st.usage_prompt_tokens == 12
    assert st.finish_reason == "length"


def test_completions_stream_and_token_count_without_usage():
    st = StreamTimings(start=0.0)
    for i, t in enumerate((0.1, 0.2, 0.35)):
        st.on_event(b'{"choices":[{"index":0,"text":"w%d","finish_reason":null}]}' % i, t)
    assert st.ttft == pytest.approx(0.1)
    assert st.output_tokens == 3  # falls back to the number of text chunks
    assert st.itls() == pytest.approx([0.1, 0.15])


def test_error_object_and_garbage_in_the_stream_are_reported():
    st = StreamTimings(start=0.0)
    st.on_event(b'{"error":{"message":"overloaded","code":503}}', 0.1)
    assert st.error == "overloaded" and st.ttft is None
    st2 = StreamTimings(start=0.0)
    st2.on_event(b"not json", 0.1)
    assert st2.error and "bad SSE payload" in st2.error


# ================================================================================ routers
def test_envoy_round_robin_config_drops_ext_proc_and_balances_round_robin():
    from bench.routers import envoy_round_robin_config

    cfg = yaml.safe_load(
        envoy_round_robin_config(
            listener_port=10001,
            admin_port=10002,
            backends=[("127.0.0.1", 8001), ("127.0.0.1", 8002)],
        )
    )
    res = cfg["static_resources"]
    text = yaml.safe_dump(cfg)
    assert "ext_proc" not in text.replace("ext_proc_stream_close", "")
    assert "lua" not in text  # the pick filter acts on ext_proc's answer only
    assert [c["name"] for c in res["clusters"]] == ["vllm"]
    vllm = res["clusters"][0]
    names = [p["typed_extension_config"]["name"] for p in vllm["load_balancing_policy"]["policies"]]
    assert names == ["envoy.load_balancing_policies.round_robin"]
    eps = vllm["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in eps] == [8001, 8002]
    assert res["listeners"][0]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 10001,
    }
