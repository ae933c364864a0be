"""Exact prefix-cache state from KV events, end to end: real simulators publishing vLLM's KV
events over ZMQ, the real service subscribed to them, real Envoy.

Three simulators on their own loopback IPs (as pods have their own IPs):
* a (127.0.0.2) publishes on tcp://127.0.0.2:P, found by ``--kv-events-port P``;
* b (127.0.0.3) publishes on an ipc:// socket named by ``--kv-events-endpoint IP:PORT=ipc://...``;
* c (127.0.0.4) publishes nothing: the service's subscription to tcp://127.0.0.4:P stays silent
  and c is valued by the approximate index.
The service tokenizes with the simulators' own tokenizer (``--tokenizer tiny-llama=vllmsim``).
Requests name ``x-routing-strategy: prefix-cache`` so a prefix match decides.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack import Stack
from devstack.processes import free_port

from .e2e import MODEL, eventually, post

pytestmark = pytest.mark.integration

STRATEGY = {"x-routing-strategy": "prefix-cache"}


def conversation(system: str, question: str, max_tokens: int = 2) -> dict:
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }


def system_prompt(topic: str) -> str:
    return (
        f"You are the {topic} assistant of a large company. Answer questions about {topic} precisely, "
        "cite the relevant internal policy by number, and never invent facts you were not given. "
    ) * 3


async def service_metrics(
    http: aiohttp.ClientSession, admin: str
) -> dict[tuple[str, tuple], float]:
    async with http.get(admin + "/metrics") as r:
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def index_blocks(http: aiohttp.ClientSession, admin: str, endpoint: str) -> float:
    return (await service_metrics(http, admin)).get(
        ("extproc_kv_index_blocks", (("backend", endpoint),)), 0.0
    )


async def events_of(http: aiohttp.ClientSession, admin: str, endpoint: str, kind: str) -> float:
    m = await service_metrics(http, admin)
    return m.get(("extproc_kv_events_total", (("backend", endpoint), ("type", kind))), 0.0)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
def kv_stack(stack, log_dir) -> Stack:
    kv_port = free_port()
    ports = [free_port() for _ in range(3)]
    while len(set(ports)) < 3 or kv_port in ports:
        ports = [free_port() for _ in range(3)]
    ipc = f"ipc://{log_dir}/kv-b.sock"
    return stack(
        n_backends=3,
        sim_hosts=["127.0.0.2", "127.0.0.3", "127.0.0.4"],
        sim_ports=ports,
        # A small KV cache (64 blocks of 16 tokens) so that evictions are easy to cause.
        common_sim_args=["--num-gpu-blocks", "64", "--max-model-len", "1000", "--time-scale", "4"],
        sim_args=[
            ["--kv-events-endpoint", f"tcp://127.0.0.2:{kv_port}"],
            ["--kv-events-endpoint", ipc],
            [],
        ],
        service_args=[
            "--kv-events-port",
            str(kv_port),
            "--kv-events-endpoint",
            f"127.0.0.3:{ports[1]}={ipc}",
            "--tokenizer",
            f"{MODEL}=vllmsim",
        ],
    )


async def test_prefix_cached_outside_the_gateway_routes_there_until_evicted(
    kv_stack: Stack, http
) -> None:
    s = kv_stack
    a, b, c = s.sim_endpoints
    url_a, url_b, _ = s.sim_urls
    admin = s.service_admin_url()
    billing = system_prompt("billing")
    # Sent straight to b, around the gateway: the service sees only b's KV events.
    r = await post(http, url_b, conversation(billing, "How do I read my invoice?"))
    assert r.status == 200, r.body
    await eventually(lambda: index_blocks(http, admin, b), timeout=10)
    for i in range(6):
        r = await post(
            http, s.url, conversation(billing, f"Question {i} about refunds?"), headers=STRATEGY
        )
        assert r.status == 200, r.body
        assert (r.endpoint, r.pod, r.reason) == (b, b, "prefix-hit"), r.headers
    # a gets the same prefix directly too; then b evicts it (a flood of unrelated prompts sent
    # straight to it fills its 64-block cache): the next requests go to a, the only holder left.
    r = await post(http, url_a, conversation(billing, "Another direct question"))
    assert r.status == 200
    await eventually(lambda: index_blocks(http, admin, a), timeout=10)
    for i in range(12):
        r = await post(http, url_b, conversation(system_prompt(f"topic {i}"), "flood"))
        assert r.status == 200
    await eventually(lambda: events_of(http, admin, b, "BlockRemoved"), timeout=10)
    for i in range(4):
        r = await post(
            http, s.url, conversation(billing, f"After the eviction {i}?"), headers=STRATEGY
        )
        assert r.status == 200
        assert (r.endpoint, r.reason) == (a, "prefix-hit"), r.headers
    m = await service_metrics(http, admin)
    assert m[("extproc_prefix_source_total", (("source", "exact"),))] >= 10
    assert m.get(("extproc_kv_index_blocks", (("backend", c),)), 0.0) == 0.0  # c publishes nothing
    assert (
        m.get(("extproc_kv_event_batches_total", (("backend", a), ("outcome", "gap"))), 0.0) == 0.0
    )


async def test_server_without_events_falls_back_to_the_approximate_index(
    kv_stack: Stack, http
) -> None:
    s = kv_stack
    c = s.sim_endpoints[2]
    admin = s.service_admin_url()
    # Distinct prefixes through the gateway until one lands on c (idle servers: a random tie).
    for i in range(40):
        prompt = system_prompt(f"fallback {i}")
        r = await post(http, s.url, conversation(prompt, "first"), headers=STRATEGY)
        assert r.status == 200
        if r.endpoint == c:
            break
    else:
        pytest.fail("no request landed on c")
    before = (await service_metrics(http, admin)).get(
        ("extproc_prefix_source_total", (("source", "approximate"),)), 0
    )
    # c sends no events: the gateway's own record of that pick brings the prefix back to c,
    # while a and b, which publish, say exactly that they do not hold it.
    for i in range(4):
        r = await post(http, s.url, conversation(prompt, f"again {i}"), headers=STRATEGY)
        assert (r.status, r.endpoint, r.reason) == (200, c, "prefix-hit"), r.headers
    after = (await service_metrics(http, admin))[
        ("extproc_prefix_source_total", (("source", "approximate"),))
    ]
    assert after >= before + 4
