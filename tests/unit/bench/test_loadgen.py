"""bench/loadgen.py: statistics and SSE timing (no network)."""

from __future__ import annotations

import math
import random

import pytest

from bench.loadgen import (
    RequestResult,
    SSEParser,
    StreamTimings,
    percentile,
    saturated_throughput,
    summarize,
)


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
