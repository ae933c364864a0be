"""HTTP tests against real in-process servers on free loopback ports."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import aiohttp
import orjson
import pytest

from vllmsim import tokenizer
from vllmsim.config import parse_args

from .conftest import metric, parse_metrics, poll


def sse_events(raw: str) -> list[str]:
    assert raw.endswith("\n\n"), "every SSE event ends with a blank line"
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


async def get_metrics(http: aiohttp.ClientSession, base: str) -> dict[Any, float]:
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse_metrics(await r.text())


async def test_models_health_and_pod_header(sim_factory, http) -> None:
    base, _ = await sim_factory(lora_modules=("ad1=/adapters/ad1",))
    port = base.rsplit(":", 1)[1]
    async with http.get(f"{base}/health") as r:
        assert r.status == 200
        assert r.headers["x-inference-pod"] == f"127.0.0.1:{port}"
    async with http.get(f"{base}/v1/models") as r:
        body = await r.json()
    assert [m["id"] for m in body["data"]] == ["tiny-llama", "ad1"]
    assert body["data"][0]["max_model_len"] == 512
    assert body["data"][1]["parent"] == "tiny-llama" and body["data"][1]["root"] == "/adapters/ad1"
    named, _ = await sim_factory(instance_name="pod-a")
    async with http.get(f"{named}/metrics") as r:
        assert r.headers["x-inference-pod"] == "pod-a"


async def test_completion_usage_uses_the_deterministic_tokenizer(sim_factory, http) -> None:
    base, _ = await sim_factory()
    prompt = "Hello there, general Kenobi! 42 droids."
    async with http.post(
        f"{base}/v1/completions",
        json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 7, "ignore_eos": True},
    ) as r:
        assert r.status == 200
        body = await r.json()
    choice, usage = body["choices"][0], body["usage"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert choice["finish_reason"] == "length"
    assert usage["prompt_tokens"] == len(tokenizer.encode_completion_prompt(prompt))
    assert usage["completion_tokens"] == 7 == tokenizer.count_tokens(choice["text"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7
    # without ignore_eos the request stops "naturally" (mean 8 tokens here) unless capped
    async with http.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 400}) as r:
        body = await r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    n = body["usage"]["completion_tokens"]
    assert 1 <= n < 400 and tokenizer.count_tokens(body["choices"][0]["text"]) == n


async def test_chat_completion_non_streaming(sim_factory, http) -> None:
    base, _ = await sim_factory()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    async with http.post(
        f"{base}/v1/chat/completions",
        json={"messages": msgs, "max_completion_tokens": 5, "ignore_eos": True},
    ) as r:
        body = await r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(tokenizer.render_chat(msgs)))
    assert body["usage"]["completion_tokens"] == 5


async def test_chat_streaming_with_usage(sim_factory, http) -> None:
    base, _ = await sim_factory()
    async with http.post(
        f"{base}/v1/chat/completions",
        json={
            "model": "tiny-llama",
            "stream": True,
            "max_tokens": 12,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "count to twelve"}],
        },
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert tokenizer.count_tokens(content) == 12
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])


async def test_completion_streaming_without_usage(sim_factory, http) -> None:
    base, _ = await sim_factory()
    async with http.post(
        f"{base}/v1/completions",
        json={"prompt": "abc", "stream": True, "max_tokens": 4, "ignore_eos": True},
    ) as r:
        events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert tokenizer.count_tokens("".join(c["choices"][0]["text"] for c in chunks)) == 4
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


LONG_PROMPT = " ".join(["word"] * 600)


@pytest.mark.parametrize(
    ("path", "payload", "status", "etype"),
    [
        ("/v1/completions", b"{not json", 400, "BadRequestError"),
        ("/v1/completions", b"[1, 2]", 400, "BadRequestError"),
        ("/v1/completions", b'{"model": "tiny-llama"}', 400, "BadRequestError"),
        ("/v1/chat/completions", b'{"model": "tiny-llama"}', 400, "BadRequestError"),
        ("/v1/completions", b'{"model": "gpt-9", "prompt": "x"}', 404, "NotFoundError"),
        ("/v1/completions", orjson.dumps({"prompt": LONG_PROMPT}), 400, "BadRequestError"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 600}', 400, "BadRequestError"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "BadRequestError"),
        (
            "/v1/completions",
            b'{"prompt": "x", "stream_options": {"include_usage": true}}',
            400,
            "BadRequestError",
        ),
        ("/v1/completions", b'{"prompt": "x", "n": 2}', 400, "BadRequestError"),
        ("/v1/chat/completions", b'{"messages": "hi"}', 400, "BadRequestError"),
    ],
)
async def test_errors_like_vllm(
    sim_factory, http, path: str, payload: bytes, status: int, etype: str
) -> None:
    base, _ = await sim_factory()
    async with http.post(
        base + path, data=payload, headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == status
        body = await r.json()
        assert r.headers["x-inference-pod"]
    assert body["error"]["type"] == etype and body["error"]["code"] == status
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_metrics_track_queue_and_aborts(sim_factory, http) -> None:
    # real time (scale 1) so requests stay in flight while we look at /metrics
    base, _ = await sim_factory(max_num_seqs=2, time_scale=1.0)

    async def stream_forever(i: int) -> None:
        async with http.post(
            f"{base}/v1/completions",
            json={"prompt": f"request {i}", "stream": True, "max_tokens": 400, "ignore_eos": True},
        ) as r:
            async for _ in r.content:
                pass

    tasks = [asyncio.create_task(stream_forever(i)) for i in range(5)]
    try:

        async def queued() -> bool:
            page = await get_metrics(http, base)
            return (
                metric(page, "vllm:num_requests_running") == 2
                and metric(page, "vllm:num_requests_waiting") == 3
            )

        await poll(queued)
        page = await get_metrics(http, base)
        assert metric(page, "vllm:kv_cache_usage_perc") > 0
        assert metric(page, "vllm:num_requests_waiting_by_reason", reason="capacity") == 3
        assert metric(page, "vllm:time_to_first_token_seconds_count") >= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drained() -> bool:  # client disconnects abort the requests and free their KV
        page = await get_metrics(http, base)
        return (
            metric(page, "vllm:num_requests_running") == 0
            and metric(page, "vllm:num_requests_waiting") == 0
            and metric(page, "vllm:kv_cache_usage_perc") == 0
        )

    await poll(drained)
    page = await get_metrics(http, base)
    assert (
        sum(
            metric(page, "vllm:request_success_total", finished_reason=r)
            for r in ("stop", "length", "abort")
        )
        == 0
    )


async def test_prefix_cache_counters(sim_factory, http) -> None:
    base, _ = await sim_factory()
    prompt = "The shared system prompt of a long agent conversation. " * 12
    plen = len(tokenizer.encode_completion_prompt(prompt))
    for _ in range(2):
        async with http.post(
            f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 2, "ignore_eos": True}
        ) as r:
            assert r.status == 200
    page = await get_metrics(http, base)
    assert metric(page, "vllm:prefix_cache_queries_total") == 2 * plen
    assert metric(page, "vllm:prefix_cache_hits_total") == (plen - 1) // 16 * 16
    assert metric(page, "vllm:prompt_tokens_total") == 2 * plen
    assert metric(page, "vllm:generation_tokens_total") == 4
    assert metric(page, "vllm:request_success_total", finished_reason="length") == 2
    assert metric(page, "vllm:e2e_request_latency_seconds_count") == 2


async def test_metrics_delay_then_ready(sim_factory, http) -> None:
    t0 = time.monotonic()
    base, _ = await sim_factory(metrics_delay=0.4)
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 503
    async with http.get(f"{base}/health") as r:
        assert r.status == 200  # only /metrics is cold

    async def ready() -> bool:
        async with http.get(f"{base}/metrics") as r:
            return r.status == 200

    await poll(ready, timeout=5)
    assert time.monotonic() - t0 >= 0.4


async def test_startup_delay(sim_factory, http) -> None:
    base, _ = await sim_factory(startup_delay=0.4)
    async with http.get(f"{base}/health") as r:
        assert r.status == 503
    async with http.post(f"{base}/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 503

    async def healthy() -> bool:
        async with http.get(f"{base}/health") as r:
            return r.status == 200

    await poll(healthy, timeout=5)


async def test_injected_failures(sim_factory, http) -> None:
    base, _ = await sim_factory(fail_rate=1.0, metrics_fail_rate=1.0)
    async with http.post(f"{base}/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 500
        assert (await r.json())["error"]["type"] == "InternalServerError"
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 500
    half, _ = await sim_factory(fail_rate=0.5, seed=3)
    statuses = []
    for _ in range(40):
        async with http.post(f"{half}/v1/completions", json={"prompt": "x", "max_tokens": 1}) as r:
            statuses.append(r.status)
    assert 5 <= statuses.count(500) <= 35 and statuses.count(200) + statuses.count(500) == 40


async def test_metrics_latency(sim_factory, http) -> None:
    base, _ = await sim_factory(metrics_latency=0.25)
    t0 = time.monotonic()
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200
    assert time.monotonic() - t0 >= 0.25


async def test_lora_requests_and_info_metric(sim_factory, http) -> None:
    base, _ = await sim_factory(lora_modules=("ad1", "ad2"), max_loras=1)
    for model in ("ad1", "ad2"):
        async with http.post(
            f"{base}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}
        ) as r:
            assert r.status == 200
            assert (await r.json())["model"] == model
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:lora_requests_info{")]
    assert lines and all('max_lora="1"' in ln for ln in lines)
    async with http.get(f"{base}/sim/stats") as r:
        stats = await r.json()
    assert stats["lora_loads"] == 2 and stats["loaded_loras"] == ["ad2"]


async def test_engine_clock_and_step_cost_model(sim_factory, http) -> None:
    # defaults: 6.5 ms per step + 35 us per prefill token + 20 us per decoding sequence
    base, _ = await sim_factory(time_scale=2.0)
    t0 = time.monotonic()
    async with http.post(
        f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 40, "ignore_eos": True}
    ) as r:
        assert r.status == 200
    wall = time.monotonic() - t0
    expected_sim = (0.0065 + 2 * 3.5e-5) + 39 * (0.0065 + 2e-5)
    assert wall >= expected_sim / 2.0 * 0.95  # never faster than its own (scaled) clock
    page = await get_metrics(http, base)
    e2e = metric(page, "vllm:e2e_request_latency_seconds_sum")
    # Reported in simulated seconds: at least the cost model's time (a wall-second figure would
    # be half of it), at most the scaled wall time the request really took. No fixed upper
    # factor: a stalled event loop on a busy machine legitimately stretches simulated time.
    assert expected_sim <= e2e <= wall * 2.0 + 0.01
    assert metric(page, "vllm:inter_token_latency_seconds_count") == 39
    # The step cost model itself is asserted exactly on a fake clock in test_engine.py.


async def test_same_seed_same_answer_on_every_instance(sim_factory, http) -> None:
    a, _ = await sim_factory(seed=5)
    b, _ = await sim_factory(seed=5)
    answers, pods = [], set()
    for base in (a, b):
        async with http.post(
            f"{base}/v1/completions", json={"prompt": "deterministic please", "max_tokens": 300}
        ) as r:
            answers.append((await r.json())["choices"][0]["text"])
            pods.add(r.headers["x-inference-pod"])
    assert answers[0] == answers[1] and len(pods) == 2


async def test_debug_echo_names_the_body_and_destination_it_received(sim_factory, http) -> None:
    assert parse_args(["--debug-echo"]).debug_echo and not parse_args([]).debug_echo
    base, _ = await sim_factory(debug_echo=True)
    raw = orjson.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "pad": "x" * 100_000}
    )
    for stream in (False, True):
        body = raw if not stream else raw[:-1] + b',"stream":true}'
        async with http.post(
            f"{base}/v1/chat/completions",
            data=body,
            headers={
                "content-type": "application/json",
                "x-gateway-destination-endpoint": "10.0.0.1:8000,10.0.0.2:8000",
            },
        ) as r:
            assert r.status == 200, await r.text()
            assert r.headers["x-vllmsim-body-bytes"] == str(len(body))
            assert r.headers["x-vllmsim-body-sha256"] == hashlib.sha256(body).hexdigest()
            assert r.headers["x-vllmsim-destination"] == "10.0.0.1:8000,10.0.0.2:8000"
    # Bad requests echo too (what arrived is the point); no echo without the flag.
    async with http.post(f"{base}/v1/completions", data=b"{not json") as r:
        assert r.status == 400 and r.headers["x-vllmsim-body-bytes"] == "9"
    plain, _ = await sim_factory()
    async with http.post(f"{plain}/v1/completions", json={"prompt": "a", "max_tokens": 1}) as r:
        assert r.status == 200 and "x-vllmsim-body-sha256" not in r.headers
