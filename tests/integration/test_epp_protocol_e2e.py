"""The rest of the endpoint-picker protocol through real Envoy: the subset hint and shedding.

The subset hint is metadata a gateway sets before ext_proc. Here a small Lua filter in front of
the Istio-style config copies a test header into ``envoy.lb.subset_hint``, so each request can
carry its own subset, and the ext_proc filter forwards that namespace to the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from devstack import Stack
from devstack.envoy_config import HCM_FILTER, load_template

from .e2e import backend_view, chat_body, eventually, post

pytestmark = pytest.mark.integration

ISTIO = Path(__file__).resolve().parents[2] / "envoy" / "istio-style.yaml"

_SUBSET_FROM_HEADER = """
function envoy_on_request(handle)
  local subset = handle:headers():get("x-test-subset")
  if subset ~= nil then
    handle:streamInfo():dynamicMetadata():set(
      "envoy.lb.subset_hint", "x-gateway-destination-endpoint-subset", subset)
  end
end
"""


def _with_subset_from_header(dest: Path) -> Path:
    cfg = load_template(ISTIO)
    hcm = next(
        f["typed_config"]
        for listener in cfg["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == HCM_FILTER
    )
    filters = hcm["http_filters"]
    ext_proc = next(f for f in filters if f["name"] == "envoy.filters.http.ext_proc")
    forwarding = ext_proc["typed_config"]["metadata_options"]["forwarding_namespaces"]["untyped"]
    forwarding.append("envoy.lb.subset_hint")
    lua = {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": _SUBSET_FROM_HEADER},
        },
    }
    filters.insert(filters.index(ext_proc), lua)
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def test_subset_hint_restricts_the_pick_and_an_empty_one_is_503(
    stack, tmp_path: Path, http
) -> None:
    s: Stack = stack(
        n_backends=3,
        sim_hosts=["127.0.0.2", "127.0.0.3", "127.0.0.4"],  # the hint matches on IP
        common_sim_args=["--debug-echo"],
        envoy_template=_with_subset_from_header(tmp_path / "istio-subset.yaml"),
    )
    a, b, c = s.sim_endpoints
    # Only c, by IP and whatever port the gateway wrote; 12 requests would hit others otherwise.
    only_c = c.split(":")[0] + ":1"
    for i in range(12):
        r = await post(http, s.url, chat_body(f"q{i}"), headers={"x-test-subset": only_c})
        assert r.status == 200, r.body
        assert r.pod == c
        # The fallbacks obey the subset too: the answer names c alone.
        assert r.headers["x-vllmsim-destination"] == c
    # Two allowed: both used, the third never.
    seen = set()
    for i in range(16):
        r = await post(http, s.url, chat_body(f"w{i}"), headers={"x-test-subset": f"{a},{b}"})
        assert r.status == 200 and r.pod in (a, b)
        seen.add(r.pod)
    assert seen == {a, b}
    # Nothing of the pool in the subset: the protocol's 503, as OpenAI JSON; no backend reached.
    r = await post(http, s.url, chat_body(), headers={"x-test-subset": "192.0.2.7:8000"})
    assert r.status == 503, r.body
    assert r.json()["error"]["code"] == "no_ready_endpoint"
    assert "x-inference-pod" not in r.headers


async def test_shedding_answers_429_when_every_queue_is_full(stack, http) -> None:
    # One slow server that runs one sequence at a time: requests sent straight to it queue up.
    s: Stack = stack(
        n_backends=1,
        common_sim_args=["--max-num-seqs", "1", "--time-scale", "0.5"],
        service_args=["--shed-queue-depth", "1"],
    )
    sim = s.sim_urls[0]
    admin = s.service_admin_url()
    endpoint = s.sim_endpoints[0]
    long = chat_body("keep busy", max_tokens=200, ignore_eos=True)
    direct = [asyncio.ensure_future(post(http, sim, long, timeout=120)) for _ in range(3)]
    try:
        await eventually(lambda: _waiting_at_least(http, admin, endpoint, 2), timeout=20)
        r = await post(http, s.url, chat_body())
        assert r.status == 429, r.body
        assert r.headers.get("retry-after") == "1"
        err = r.json()["error"]
        assert err["code"] == "overloaded" and err["type"] == "rate_limit_exceeded"
        assert "x-inference-pod" not in r.headers
    finally:
        for t in direct:
            t.cancel()
        await asyncio.gather(*direct, return_exceptions=True)
    # The queue drains (the cancelled requests are aborted): routed again.
    await eventually(lambda: _waiting_at_least(http, admin, endpoint, 0, at_most=1), timeout=30)
    r = await post(http, s.url, chat_body())
    assert r.status == 200, r.body


async def _waiting_at_least(
    http, admin: str, endpoint: str, n: float, at_most: float | None = None
) -> bool:
    view = await backend_view(http, admin, endpoint)
    if at_most is not None:
        return view["freshness"] == "fresh" and view["waiting"] <= at_most
    return view["freshness"] == "fresh" and view["waiting"] >= n
