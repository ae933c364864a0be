"""The service behind the gateways' own Envoy configs, with a REAL vLLM behind them (issue 8).

tests/integration/test_gateway_configs.py runs the same configs against simulators. A real vLLM
is uvicorn/FastAPI, and what a simulator could get wrong there is what this module checks,
through real Envoy + the real service + the session's real vLLM (the only backend of the pool):

* ``envoy/gie-reference.yaml``: ORIGINAL_DST on ``x-gateway-destination-endpoint`` (the service
  runs with ``--fallback-endpoints 0``, as it must there; with a one-server pool the list would
  hold one address anyway), FULL_DUPLEX_STREAMED both ways, fail closed;
* ``envoy/istio-style.yaml``: override_host on ``envoy.lb`` metadata, FULL_DUPLEX_STREAMED.

In FULL_DUPLEX_STREAMED mode the service collects the request body, decides, answers the
request headers with a new content-length and streams the body back; every response chunk
also passes through it. So: a chat completion comes back whole (the JSON parses) and is the
real vLLM's greedy answer, byte for byte the one vLLM gives when asked directly; a stream
arrives as Server-Sent Events chunk by chunk, ends with ``data: [DONE]``, carries the same
text as vLLM's direct stream (no chunk lost or doubled on the way through the service), and the
service counts its usage (final SSE chunk, ``stream_options.include_usage``) in the GIE series
``inference_objective_input_tokens`` / ``output_tokens``; a 1 MB body sent with a
content-length, with ``Transfer-Encoding: chunked`` (no content-length) and with ``Expect:
100-continue`` is parsed by vLLM and answered like the same body sent directly; bad JSON and an
unknown model are the service's own OpenAI errors and never reach vLLM (its
``http_requests_total`` says so).

One real vLLM serves both configs (module fixture per config, session vLLM: conftest.py).
Figures go to the session's figures.json under ``gateways``; docs/real-vllm.md quotes them.
"""

from __future__ import annotations

import random
import string
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.envoy_config import DEFAULT_TEMPLATE
from devstack.processes import http_get, poll_until

from .realvllm import MODEL, Gateway, RealVllm, Reply, chat, eventually, post, start_gateway

# The first test also waits for the session's real vLLM (it boots in 0.5-3 min).
pytestmark = pytest.mark.timeout(600)

ENVOY_DIR = DEFAULT_TEMPLATE.parent
CONFIGS: dict[str, Path] = {
    "gie-reference": ENVOY_DIR / "gie-reference.yaml",
    "istio-style": ENVOY_DIR / "istio-style.yaml",
}
# ORIGINAL_DST takes one address, not the service's ranked list (docs/envoy.md, "Gateway configs").
SERVICE_ARGS: dict[str, list[str]] = {
    "gie-reference": ["--fallback-endpoints", "0"],
    "istio-style": [],
}
SERVED = "x-gateway-destination-endpoint-served"  # istio-style: the host Envoy really used
CHAT = "/v1/chat/completions"
# A stream long enough to time its chunks: 400 tokens take this model 1.5-2.5 s on one core,
# and --max-model-len 512 leaves room for them after the prompt.
STREAM_TOKENS = 400
BODY_BYTES = 1_000_000
PIECE = 64 * 1024  # chunk size of the chunked upload


@pytest.fixture(scope="module", params=list(CONFIGS))
def gateway(
    request: pytest.FixtureRequest,
    tiny_model: Path,
    run_dir: Path,
    figures: dict[str, Any],
    real_vllm: RealVllm,
) -> Iterator[tuple[str, Gateway]]:
    """Envoy (this config) + the service around the session's real vLLM, one config at a time."""
    config: str = request.param
    failed_before = request.session.testsfailed
    gw = start_gateway(
        model_dir=tiny_model,
        log_dir=run_dir / "logs" / f"gateway-{config}",
        n_sims=0,
        vllm=real_vllm,
        envoy_template=CONFIGS[config],
        # --drain-seconds 0: a quick SIGTERM at teardown.
        service_args=["--drain-seconds", "0", *SERVICE_ARGS[config]],
    )
    try:
        # The service learns the model name from vLLM's /v1/models and its load from /metrics.
        poll_until(
            lambda: _service_knows_the_model(gw),
            timeout=30,
            proc=gw.service,
            what="the service: real vLLM fresh, with its model",
        )
        figures.setdefault("gateways", {})[config] = {"start_s": round(gw.timings["start_s"], 1)}
        print(
            f"\n{config}: Envoy {gw.url}, service {gw.admin_url}, real vLLM {gw.real} "
            f"(up in {gw.timings['start_s']:.0f} s)"
        )
        yield config, gw
    finally:
        if request.session.testsfailed > failed_before:
            print(f"\n----- process logs ({config}) -----\n{gw.log_tails(40)}")
        gw.stop()


def _service_knows_the_model(gw: Gateway) -> bool:
    status, text = http_get(gw.admin_url + "/backends", timeout=2.0)
    if status != 200:
        return False
    (view,) = orjson.loads(text)["backends"]
    return bool(
        view["endpoint"] == gw.real
        and view["freshness"] == "fresh"
        and view["healthy"]
        and MODEL in view["models"]
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


def _record(figures: dict[str, Any], config: str, key: str, value: Any) -> None:
    figures.setdefault("gateways", {}).setdefault(config, {})[key] = value


async def _metric_samples(http: aiohttp.ClientSession, url: str) -> list[Any]:
    async with http.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
        assert r.status == 200
        text = await r.text()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


async def vllm_chat_requests(http: aiohttp.ClientSession, vllm_url: str) -> dict[str, float]:
    """{status class: count} of the chat requests the real vLLM answered (its own
    ``http_requests_total``, FastAPI instrumentator), e.g. ``{"2xx": 12, "4xx": 1}``."""
    out: dict[str, float] = {}
    for s in await _metric_samples(http, vllm_url):
        if s.name == "http_requests_total" and s.labels.get("handler") == CHAT:
            out[s.labels["status"]] = out.get(s.labels["status"], 0.0) + s.value
    return out


async def objective_tokens(http: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    """The service's GIE token histograms for model tiny-llama: input/output count and sum."""
    out = {"input_count": 0.0, "input_sum": 0.0, "output_count": 0.0, "output_sum": 0.0}
    for s in await _metric_samples(http, admin_url):
        if s.labels.get("model_name") != MODEL or s.labels.get("target_model_name") != MODEL:
            continue
        for kind in ("input", "output"):
            for part in ("count", "sum"):
                if s.name == f"inference_objective_{kind}_tokens_{part}":
                    out[f"{kind}_{part}"] = s.value
    return out


def _grew_by(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in {*before, *after}}


def _assert_real_completion(r: Reply, max_tokens: int) -> dict[str, Any]:
    assert r.status == 200, (r.status, r.headers, r.body[:500])
    answer: dict[str, Any] = r.json()  # the whole JSON came through (not cut, not padded)
    (choice,) = answer["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"], choice
    assert choice["finish_reason"] == "length", choice  # ignore_eos: exactly max_tokens
    assert answer["usage"]["completion_tokens"] == max_tokens, answer["usage"]
    # vLLM's own fingerprint (vllmsim has none): the real server answered.
    assert str(answer.get("system_fingerprint", "")).startswith("vllm-"), answer
    return answer


def _assert_served_by_real(config: str, gw: Gateway, r: Reply) -> None:
    if config == "istio-style":
        assert r.headers.get(SERVED) == gw.real, r.headers  # Envoy's selected host


async def _vllm_2xx_grows(
    http: aiohttp.ClientSession, gw: Gateway, before: dict[str, float], by: int
) -> None:
    async def grown() -> bool:
        now = await vllm_chat_requests(http, gw.real_url)
        return now.get("2xx", 0.0) - before.get("2xx", 0.0) == by

    await eventually(grown, timeout=10, what=f"real vLLM counted {by} more 2xx chat answers")


# --------------------------------------------------------------------------------------------
async def test_chat_completion_comes_from_the_real_vllm(
    gateway: tuple[str, Gateway], http: aiohttp.ClientSession, figures: dict[str, Any]
) -> None:
    config, gw = gateway
    body = chat("hello there", max_tokens=8, ignore_eos=True, temperature=0)
    served_before = await vllm_chat_requests(http, gw.real_url)
    tokens_before = await objective_tokens(http, gw.admin_url)
    r = await post(http, gw.url, body)
    chat_s = time.monotonic() - r.t
    answer = _assert_real_completion(r, 8)
    _assert_served_by_real(config, gw, r)
    await _vllm_2xx_grows(http, gw, served_before, 1)
    # Greedy decoding: the same text vLLM gives when asked directly, so the request it parsed
    # was the one the client sent.
    direct = _assert_real_completion(await post(http, gw.real_url, body), 8)
    assert answer["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert answer["usage"] == direct["usage"]
    # The service read usage from the JSON answer it streamed back (FULL_DUPLEX_STREAMED).
    usage = answer["usage"]

    async def counted() -> dict[str, float] | None:
        grew = _grew_by(tokens_before, await objective_tokens(http, gw.admin_url))
        want = {
            "input_count": 1.0,
            "input_sum": float(usage["prompt_tokens"]),
            "output_count": 1.0,
            "output_sum": 8.0,
        }
        return grew if grew == want else None

    await eventually(counted, timeout=10, what="GIE token series counted the chat's usage")
    _record(
        figures,
        config,
        "chat",
        {
            "status": r.status,
            "seconds": round(chat_s, 3),
            # FULL_DUPLEX_STREAMED response: Envoy drops vLLM's content-length and sends chunked.
            "response_framing": "content-length"
            if "content-length" in r.headers
            else r.headers.get("transfer-encoding", "?"),
            "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens")},
        },
    )


@dataclass
class Stream:
    """A streamed answer as the client saw it: the network reads and the SSE data lines."""

    headers: dict[str, str]
    reads: list[tuple[float, bytes]]  # (seconds after the request was sent, bytes of one read)

    @property
    def lines(self) -> list[bytes]:
        whole = b"".join(d for _, d in self.reads)
        return [ln.strip() for ln in whole.split(b"\n") if ln.startswith(b"data:")]

    def events(self) -> list[dict[str, Any]]:
        """The JSON events (``data: [DONE]`` excluded)."""
        return [orjson.loads(ln[len(b"data:") :]) for ln in self.lines if ln != b"data: [DONE]"]

    def text(self) -> str:
        return "".join(
            (e["choices"][0]["delta"].get("content") or "") for e in self.events() if e["choices"]
        )

    @property
    def arrivals(self) -> list[float]:
        """When each read that carried at least one data line arrived."""
        return [t for t, d in self.reads if b"data:" in d]


async def read_stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Stream:
    started = time.monotonic()
    async with http.post(url + CHAT, json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
        out = Stream({k.lower(): v for k, v in resp.headers.items()}, [])
        async for data in resp.content.iter_any():
            out.reads.append((time.monotonic() - started, data))
    return out


async def test_stream_arrives_chunk_by_chunk_and_its_usage_is_counted(
    gateway: tuple[str, Gateway], http: aiohttp.ClientSession, figures: dict[str, Any]
) -> None:
    config, gw = gateway
    body = chat(
        "count to many",
        max_tokens=STREAM_TOKENS,
        ignore_eos=True,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens_before = await objective_tokens(http, gw.admin_url)
    st = await read_stream(http, gw.url, body)
    _assert_served_by_real(config, gw, Reply(200, st.headers, b""))
    lines = st.lines
    assert lines and lines[-1] == b"data: [DONE]", lines[-3:]
    # include_usage: the last event has no choices and the usage of the whole generation.
    final = st.events()[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == STREAM_TOKENS, final
    assert str(final.get("system_fingerprint")).startswith("vllm-"), final  # the real server
    # Chunk by chunk: many separate network reads carried data lines, the first long before
    # the last (a buffered response arrives in one or two reads at the very end: measured with
    # response_body_mode BUFFERED, 2 reads of 401 lines, both at 1.67 s).
    arrivals = st.arrivals
    first, last = arrivals[0], arrivals[-1]
    print(
        f"\n{config}: {len(lines)} data lines in {len(arrivals)} reads, "
        f"first at {first * 1000:.0f} ms, last at {last * 1000:.0f} ms"
    )
    assert len(arrivals) >= 5, f"only {len(arrivals)} reads carried the {len(lines)} data lines"
    assert last - first >= 0.2 and first < last / 3, (first, last)

    usage = final["usage"]

    async def counted() -> dict[str, float] | None:
        grew = _grew_by(tokens_before, await objective_tokens(http, gw.admin_url))
        want = {
            "input_count": 1.0,
            "input_sum": float(usage["prompt_tokens"]),
            "output_count": 1.0,
            "output_sum": float(STREAM_TOKENS),
        }
        return grew if grew == want else None

    grew = await eventually(counted, timeout=10, what="GIE token series counted the stream's usage")

    # Every chunk passed through the service (FULL_DUPLEX_STREAMED response): none lost, none
    # doubled, in order. Greedy decoding makes vLLM's direct stream the reference.
    direct = await read_stream(http, gw.real_url, body)
    assert st.text() and st.text() == direct.text()
    assert final["usage"] == direct.events()[-1]["usage"]
    _record(
        figures,
        config,
        "stream",
        {
            "max_tokens": STREAM_TOKENS,
            "data_lines": len(lines),
            "reads_with_data": len(arrivals),
            "first_data_ms": round(first * 1000),
            "last_data_ms": round(last * 1000),
            "direct": {
                "data_lines": len(direct.lines),
                "reads_with_data": len(direct.arrivals),
                "first_data_ms": round(direct.arrivals[0] * 1000),
                "last_data_ms": round(direct.arrivals[-1] * 1000),
            },
            "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens")},
            "service_tokens_grew_by": grew,
        },
    )


def _big_body() -> bytes:
    """~1 MB: an extra field vLLM accepts and ignores (its request models allow extra fields),
    then the real request; ``messages`` last, so a cut body would lack them."""
    pad = "".join(random.Random(8).choices(string.ascii_letters + string.digits, k=BODY_BYTES))
    raw = orjson.dumps(
        {
            "padding": pad,
            "model": MODEL,
            "max_tokens": 16,
            "ignore_eos": True,
            "temperature": 0,
            "messages": [{"role": "user", "content": "what follows is padding"}],
        }
    )
    assert len(raw) > BODY_BYTES
    return raw


async def _in_pieces(raw: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(raw), PIECE):
        yield raw[i : i + PIECE]


async def _upload(
    http: aiohttp.ClientSession, url: str, raw: bytes, how: str
) -> tuple[Reply, dict[str, str], float]:
    """POST ``raw``: ``content-length``, ``chunked`` (an async generator: aiohttp sends
    Transfer-Encoding: chunked and no content-length) or ``expect-100`` (content-length and
    ``Expect: 100-continue``, what curl does for bodies over 1 MB). Returns the reply, the
    request headers as sent, and the seconds it took."""
    t = time.monotonic()
    data: bytes | AsyncIterator[bytes] = _in_pieces(raw) if how == "chunked" else raw
    async with http.post(
        url + CHAT,
        data=data,
        headers={"content-type": "application/json"},
        expect100=how == "expect-100",
    ) as resp:
        sent = {k.lower(): v for k, v in resp.request_info.headers.items()}
        reply = Reply(
            resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read(), t
        )
    return reply, sent, time.monotonic() - t


async def test_a_1mb_body_and_a_chunked_body_reach_the_real_vllm(
    gateway: tuple[str, Gateway], http: aiohttp.ClientSession, figures: dict[str, Any]
) -> None:
    config, gw = gateway
    raw = _big_body()
    direct = _assert_real_completion(await post(http, gw.real_url, raw), 16)
    served_before = await vllm_chat_requests(http, gw.real_url)
    seen: dict[str, Any] = {}
    for how in ("content-length", "chunked", "expect-100"):
        r, sent, seconds = await _upload(http, gw.url, raw, how)
        if how == "chunked":
            assert sent.get("transfer-encoding") == "chunked" and "content-length" not in sent, sent
        else:
            assert sent.get("content-length") == str(len(raw)), sent
            assert (sent.get("expect") == "100-continue") == (how == "expect-100"), sent
        answer = _assert_real_completion(r, 16)
        _assert_served_by_real(config, gw, r)
        # The body vLLM parsed was the client's: same prompt tokens, same greedy text as direct.
        assert answer["usage"] == direct["usage"], (how, answer["usage"], direct["usage"])
        assert answer["choices"][0]["message"] == direct["choices"][0]["message"], how
        seen[how] = {"status": r.status, "seconds": round(seconds, 3)}
    await _vllm_2xx_grows(http, gw, served_before, 3)
    _record(figures, config, "big_body", {"bytes": len(raw), "chunk_bytes": PIECE, **seen})


async def test_bad_json_and_unknown_model_are_the_services_answers(
    gateway: tuple[str, Gateway], http: aiohttp.ClientSession, figures: dict[str, Any]
) -> None:
    config, gw = gateway
    before = await vllm_chat_requests(http, gw.real_url)
    bad = b'{"model": "tiny-llama", "messages": ['

    r = await post(http, gw.url, bad)
    assert r.status == 400, r.body
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    # The service's OpenAI error (vLLM's own would say "type": "Bad Request").
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json", err

    unknown = await post(http, gw.url, chat("hi", model="no-such-model"))
    assert unknown.status == 404, unknown.body
    assert unknown.headers["content-type"] == "application/json"
    err404 = unknown.json()["error"]
    assert err404["code"] == "model_not_found" and err404["param"] == "model", err404
    # The name it knows came from the real vLLM's /v1/models.
    assert MODEL in err404["message"], err404

    # Control: the same bad JSON sent straight to vLLM is counted there (as a 4xx). Exactly one
    # more chat request counted means the two above never reached it.
    direct = await post(http, gw.real_url, bad)
    assert direct.status == 400, direct.body
    assert direct.json()["error"]["type"] != "invalid_request_error", direct.body

    async def one_more() -> dict[str, float] | None:
        grew = _grew_by(before, await vllm_chat_requests(http, gw.real_url))
        return grew if sum(grew.values()) >= 1 else None

    grew = await eventually(one_more, timeout=10, what="real vLLM counted the direct bad request")
    assert {k: v for k, v in grew.items() if v} == {"4xx": 1.0}, grew
    _record(
        figures,
        config,
        "errors",
        {
            "bad_json": [r.status, err["code"]],
            "unknown_model": [unknown.status, err404["code"]],
            "reached_vllm": 0,
        },
    )
