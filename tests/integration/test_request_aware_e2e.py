"""Request-aware routing through a REAL Envoy + service + simulators: the body phase,
model pools, bad bodies, prefix affinity, sessions, LoRA, route-level settings."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson
import pytest

from .e2e import all_fresh, backend_view, chat_body, eventually, get_json, long_requests, post

pytestmark = pytest.mark.integration

FAST = ["--time-scale", "10"]


async def upstream_requests(http: aiohttp.ClientSession, envoy_admin_url: str) -> int:
    async with http.get(envoy_admin_url + "/stats?filter=^cluster.vllm.upstream_rq_total$") as r:
        m = re.search(r"cluster\.vllm\.upstream_rq_total: (\d+)", await r.text())
        return int(m.group(1)) if m else 0


async def test_model_pools_never_cross_and_unknown_model_is_404(stack):
    s = stack(
        n_backends=3,
        common_sim_args=FAST,
        sim_args=[["--model", "model-a"], ["--model", "model-a"], ["--model", "model-b"]],
    )
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: all_fresh(http, s.admin_url))
        for strategy in ("least-request", "random", "round-robin", "weighted", "prefix-cache"):
            for _ in range(4):
                r = await post(
                    http,
                    s.url,
                    chat_body(model="model-b"),
                    headers={"x-routing-strategy": strategy},
                )
                assert r.status == 200 and r.pod == s.sim_endpoints[2], (strategy, r.pod)
                r = await post(
                    http,
                    s.url,
                    chat_body(model="model-a"),
                    headers={"x-routing-strategy": strategy},
                )
                assert r.status == 200 and r.pod in s.sim_endpoints[:2], (strategy, r.pod)
        before = await upstream_requests(http, s.envoy_admin_url)
        r = await post(http, s.url, chat_body(model="model-z"))
        assert r.status == 404
        err = r.json()["error"]
        assert (
            err["code"] == "model_not_found"
            and "model-a" in err["message"]
            and "model-b" in err["message"]
        )
        assert await upstream_requests(http, s.envoy_admin_url) == before


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b'{"model": "tiny-llama", "messages": [', 400, "invalid_json"),
        (b'"just a string"', 400, "invalid_json"),
        (orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}), 400, "missing_model"),
        (orjson.dumps({"model": ["tiny-llama"], "messages": []}), 400, None),
        (orjson.dumps(chat_body(stream="yes")), 400, None),
        (orjson.dumps(chat_body(max_tokens="many")), 400, None),
        (orjson.dumps({"model": "tiny-llama", "messages": "hello"}), 400, None),
        (orjson.dumps(chat_body(text="x" * (5 * 1024 * 1024))), 413, "request_too_large"),
    ],
    ids=[
        "truncated-json",
        "not-an-object",
        "missing-model",
        "model-wrong-type",
        "stream-wrong-type",
        "max-tokens-wrong-type",
        "messages-wrong-type",
        "too-large",
    ],
)
async def test_bad_bodies_get_openai_errors_and_never_reach_a_backend(stack, body, status, code):
    s = stack(n_backends=1, common_sim_args=FAST)
    async with aiohttp.ClientSession() as http:
        before = await upstream_requests(http, s.envoy_admin_url)
        r = await post(http, s.url, body)
        assert r.status == status, r.body[:300]
        assert r.headers["content-type"].startswith("application/json")
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "code"} and err["message"]
        assert err["type"] == "invalid_request_error"
        if code:
            assert err["code"] == code
        assert await upstream_requests(http, s.envoy_admin_url) == before
        # The service is still fine afterwards.
        assert (await post(http, s.url)).status == 200


async def test_paths_not_understood_are_routed_without_the_body(stack):
    s = stack(n_backends=2, common_sim_args=FAST)
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: all_fresh(http, s.admin_url))
        async with http.get(s.url + "/v1/models") as r:
            assert r.status == 200
            assert r.headers["x-routing-reason"] == "metrics"
            assert (await r.json())["data"][0]["id"] == "tiny-llama"


SYSTEM = (
    "You are a meticulous assistant for the ACME support desk. " * 12
)  # ~700 chars, many blocks


async def test_repeated_prefix_sticks_until_the_load_guard(stack):
    s = stack(n_backends=3, service_args=["--strategy", "prefix-cache"])
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: all_fresh(http, s.admin_url))
        picks = []
        for i in range(8):
            r = await post(http, s.url, chat_body(SYSTEM + f" Question {i}?", max_tokens=2))
            assert r.status == 200
            picks.append((r.pod, r.reason))
        home = picks[0][0]
        assert {p for p, _ in picks} == {home}
        assert all(reason == "prefix-hit" for _, reason in picks[1:]), picks
        # Load the home server directly (not through the gateway) past the default guard (> 8 and 1.5x).
        home_url = s.sim_urls[s.sim_endpoints.index(home)]
        async with long_requests(http, home_url, 12):

            async def loaded() -> bool:
                return (await backend_view(http, s.admin_url, home))["running"] >= 12

            await eventually(loaded)
            r = await post(http, s.url, chat_body(SYSTEM + " Question 99?", max_tokens=2))
            assert r.status == 200 and r.pod != home and r.reason == "load-guard", (r.pod, r.reason)


async def test_sessions_stick_and_move_when_their_server_dies(stack):
    s = stack(n_backends=3, common_sim_args=FAST)
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: all_fresh(http, s.admin_url))
        homes = {}

        async def home_of(sid: str) -> str:
            return (await post(http, s.url, headers={"x-session-id": sid})).pod

        # alice plus sessions until one lives on another server: the check that the others did
        # not move must always have something to check (hashing decides where sessions live).
        alice_home = await home_of("alice")
        others = []
        for i in range(40):
            if await home_of(f"user-{i}") != alice_home:
                others.append(f"user-{i}")
                break
        assert others, "40 sessions all hashed to one of 3 servers"
        for sid in ("alice", "bob", "carol", *others):
            seen = set()
            for _ in range(5):
                # The session route forces `session`, whatever the client asks for.
                r = await post(
                    http, s.url, headers={"x-session-id": sid, "x-routing-strategy": "random"}
                )
                assert r.status == 200 and r.headers["x-routing-strategy"] == "session"
                assert r.reason == "session"
                seen.add(r.pod)
            assert len(seen) == 1, (sid, seen)
            homes[sid] = seen.pop()
        victim = homes["alice"]
        s.sims[s.sim_endpoints.index(victim)].stop()

        async def alice_moved() -> str:
            # The SERVICE must move her (until it sees the server gone, Envoy's connect-failure
            # retry lands her somewhere at random: not what we test here).
            r = await post(http, s.url, headers={"x-session-id": "alice"})
            return r.pod if r.status == 200 and r.endpoint != victim and r.pod == r.endpoint else ""

        new_home = await eventually(alice_moved)
        for _ in range(5):
            assert (await post(http, s.url, headers={"x-session-id": "alice"})).pod == new_home
        assert any(home != victim for home in homes.values())
        for sid, home in homes.items():  # sessions of the other servers did not move
            if home != victim:
                r = await post(http, s.url, headers={"x-session-id": sid})
                assert (r.pod, r.endpoint) == (home, home), sid


async def test_session_key_from_the_body_user(stack):
    s = stack(n_backends=3, common_sim_args=FAST)
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: all_fresh(http, s.admin_url))
        pods = {
            (
                await post(
                    http,
                    s.url,
                    chat_body(user="user-42"),
                    headers={"x-routing-strategy": "session"},
                )
            ).pod
            for _ in range(6)
        }
        assert len(pods) == 1


async def test_lora_requests_prefer_the_server_running_the_adapter(stack):
    lora = ["--lora-modules", "ad1", "ad2", "--max-loras", "1", "--max-num-seqs", "8"]
    s = stack(n_backends=2, common_sim_args=lora)
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: all_fresh(http, s.admin_url))
        # Each server busy with a different adapter (its only slot taken), held directly.
        holds = [
            asyncio.create_task(
                post(
                    http,
                    s.sim_urls[i],
                    chat_body(model=ad, max_tokens=3000, ignore_eos=True),
                    timeout=120,
                )
            )
            for i, ad in ((0, "ad1"), (1, "ad2"))
            for _ in range(2)
        ]
        try:

            async def adapters_running() -> bool:
                views = [await backend_view(http, s.admin_url, e) for e in s.sim_endpoints]
                return views[0]["lora_running"] == ["ad1"] and views[1]["lora_running"] == ["ad2"]

            await eventually(adapters_running)
            for strategy in ("least-request", "random", "weighted"):
                for _ in range(3):
                    r = await post(
                        http,
                        s.url,
                        chat_body(model="ad2", max_tokens=2),
                        headers={"x-routing-strategy": strategy},
                    )
                    assert r.status == 200 and r.pod == s.sim_endpoints[1], (strategy, r.pod)
        finally:
            for t in holds:
                t.cancel()
            await asyncio.gather(*holds, return_exceptions=True)


async def test_route_level_strategy_overrides_service_default(stack):
    s = stack(n_backends=2, common_sim_args=FAST, service_args=["--strategy", "least-kv-cache"])
    async with aiohttp.ClientSession() as http:
        plain = await post(http, s.url)
        assert plain.headers["x-routing-strategy"] == "least-kv-cache"
        routed = await post(http, s.url, headers={"x-session-id": "s1"})
        assert routed.headers["x-routing-strategy"] == "session"
        data = await get_json(http, s.admin_url + "/settings")
        assert data["strategy"] == "least-kv-cache"
