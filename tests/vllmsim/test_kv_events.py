"""vllmsim publishes vLLM's KV events: same bytes for the same content, from its own KV cache."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from extproc.kv_events import AllBlocksCleared as XCleared
from extproc.kv_events import BlockRemoved as XRemoved
from extproc.kv_events import BlockStored as XStored
from extproc.kv_events import decode_message, decode_payload
from extproc.kv_index import ServerBlocks, chain_hashes, root_hash
from vllmsim import tokenizer
from vllmsim.config import SimConfig, check, parse_args
from vllmsim.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    parse_kv_events_config,
    to_events,
)

from .conftest import make_engine, run_until

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kv_events"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def _event(spec: dict[str, Any]) -> Any:
    cls = {
        "BlockStored": BlockStored,
        "BlockRemoved": BlockRemoved,
        "AllBlocksCleared": AllBlocksCleared,
    }[spec["type"]]
    fields = {}
    for name in cls.__struct_fields__:
        value = spec.get(name)
        if name in ("block_hashes",):
            value = [bytes.fromhex(v) if isinstance(v, str) else v for v in value]
        elif name == "parent_block_hash" and isinstance(value, str):
            value = bytes.fromhex(value)
        elif name == "extra_keys" and value is not None:
            value = [tuple(k) if k is not None else None for k in value]
        fields[name] = value
    if "extra_keys" in fields and fields["extra_keys"] is None:
        del fields["extra_keys"]
    if "group_idx" in fields and fields["group_idx"] is None:
        del fields["group_idx"]
    return cls(**fields)


@pytest.mark.parametrize("name", sorted(MANIFEST["frames"]))
def test_same_bytes_as_vllm_for_the_same_events(name):
    spec = MANIFEST["frames"][name]
    batch = KVEventBatch(
        ts=spec["ts"],
        events=[_event(e) for e in spec["events"]],
        data_parallel_rank=spec["data_parallel_rank"],
    )
    assert msgspec.msgpack.encode(batch) == (FIXTURES / spec["file"]).read_bytes()


def test_records_become_vllm_events():
    events = to_events(
        [
            ("stored", [1, 2], None, list(range(8)), 4, None, None),
            ("stored", [3], 2, list(range(8, 12)), 4, "ad", 1),
            ("removed", 2),
            ("cleared",),
        ]
    )
    s1, s2, r, c = events
    assert s1.block_hashes == [1, 2] and s1.parent_block_hash is None
    assert s1.extra_keys == [None, None] and s1.group_idx == 0 and s1.medium == "GPU"
    assert s2.parent_block_hash == 2 and s2.extra_keys == [("ad",)] and s2.lora_id == 1
    assert isinstance(r, BlockRemoved) and r.block_hashes == [2]
    assert isinstance(c, AllBlocksCleared)
    # and the service's decoder reads them back
    payload = msgspec.msgpack.encode(KVEventBatch(ts=1.0, events=events, data_parallel_rank=0))
    back = decode_payload(payload).events
    assert [type(e) for e in back] == [XStored, XStored, XRemoved, XCleared]


def _engine_with_events(**cfg):
    eng = make_engine(**cfg)
    batches: list[list[tuple]] = []
    eng.enable_kv_events(batches.append)
    return eng, batches


def _add(eng, rid, prompt, max_tokens=4):
    req = eng.make_request(rid, prompt, max_tokens, ignore_eos=True)
    eng.add_request(req)
    return req


def test_engine_publishes_stores_per_step_and_hits_store_nothing():
    eng, batches = _engine_with_events()
    prompt = list(range(1, 41))  # 2 full blocks of 16 + 8
    req = _add(eng, "a", prompt, max_tokens=10)
    run_until(eng, lambda: req.done)
    stores = [r for b in batches for r in b if r[0] == "stored"]
    first = stores[0]
    assert first[1] == req.block_hashes[:2] and first[2] is None and list(first[3]) == prompt[:32]
    # output tokens fill the third block (40 prompt + 10 generated = 50 >= 48): stored chained
    assert any(r[2] == req.block_hashes[1] and r[1] == req.block_hashes[2:3] for r in stores)
    n = len(stores)
    req2 = _add(eng, "b", prompt[:32] + [99] * 8, max_tokens=1)
    run_until(eng, lambda: req2.done)
    new = [r for b in batches for r in b if r[0] == "stored"][n:]
    assert all(r[1][0] not in req.block_hashes[:2] for r in new)  # the hits are not stored again


def test_evictions_and_reset():
    eng, batches = _engine_with_events(num_gpu_blocks=9, max_model_len=64)  # 8 usable blocks
    reqs = [
        _add(eng, f"r{i}", list(range(1000 * i, 1000 * i + 48)), max_tokens=1) for i in range(4)
    ]
    run_until(eng, lambda: all(r.done for r in reqs))
    removed = [r[1] for b in batches for r in b if r[0] == "removed"]
    assert removed and eng.pool.evictions == len(removed)
    assert not set(removed) & set(eng.pool.cached)
    busy = _add(eng, "busy", list(range(5000, 5040)), max_tokens=50)
    eng.step()
    assert eng.pool.reset_prefix_cache() is False  # in use: refused like vLLM
    run_until(eng, lambda: busy.done)
    batches.clear()
    assert eng.pool.reset_prefix_cache() is True and not eng.pool.cached
    eng.flush_kv_events()
    assert batches == [[("cleared",)]]


def test_service_index_equals_the_simulators_own_cache():
    """Feed every event of a random workload to the service's index: for any prompt it then
    predicts exactly the prefix hit the simulator's own cache gives (evictions included)."""
    eng, batches = _engine_with_events(num_gpu_blocks=40, max_model_len=128, max_num_seqs=4)
    rng = random.Random(7)
    heads = [[rng.randrange(1, 10_000) for _ in range(32)] for _ in range(6)]
    prompts = [
        heads[rng.randrange(6)] + [rng.randrange(1, 10_000) for _ in range(rng.randrange(0, 40))]
        for _ in range(60)
    ]
    server = ServerBlocks(max_blocks=10_000)
    seq = 0
    for i, p in enumerate(prompts):
        req = _add(eng, f"r{i}", p, max_tokens=rng.randrange(1, 20))
        run_until(eng, lambda req=req: req.done)
        for b in batches:
            payload = msgspec.msgpack.encode(
                KVEventBatch(ts=0.0, events=to_events(b), data_parallel_rank=0)
            )
            server.on_batch(decode_payload(payload, seq))
            seq += 1
        batches.clear()
    assert eng.pool.evictions > 0
    for p in prompts + heads:
        sim_hits = len(eng.pool.lookup(_hashes(eng, p), 10_000))
        assert server.matched_blocks(chain_hashes(p, 16, root_hash(None))) == sim_hits
    assert len(server) == len(eng.pool.cached)


def _hashes(eng, prompt):
    req = eng.make_request("h", prompt, 1, True)
    eng._extend_hashes(req)
    return req.block_hashes


@pytest.mark.parametrize(
    "text, endpoint, bind",
    [
        (
            '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "kv"}',
            "tcp://*:5557",
            True,
        ),
        (
            '{"enable_kv_cache_events": true, "endpoint": "tcp://10.0.0.1:5557"}',
            "tcp://10.0.0.1:5557",
            False,
        ),
        ('{"enable_kv_cache_events": true, "endpoint": "ipc:///tmp/x"}', "ipc:///tmp/x", True),
    ],
)
def test_kv_events_config_like_vllm(text, endpoint, bind):
    s = parse_kv_events_config(text)
    assert s is not None and (s.endpoint, s.bind) == (endpoint, bind)


@pytest.mark.parametrize(
    "text, message",
    [
        ("nope", "not JSON"),
        ("[1]", "JSON object"),
        ('{"enable_kv_cache_events": true, "x": 1}', "unknown field"),
        ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "unknown publisher"),
        ('{"enable_kv_cache_events": true, "replay_endpoint": "tcp://*:5558"}', "replay"),
        ('{"enable_kv_cache_events": true, "endpoint": "http://x"}', "bad endpoint"),
        ('{"enable_kv_cache_events": true, "hwm": -1}', "hwm"),
    ],
)
def test_bad_kv_events_config(text, message):
    with pytest.raises(ValueError, match=message):
        parse_kv_events_config(text)


def test_kv_events_off_and_cli():
    assert parse_kv_events_config('{"enable_kv_cache_events": false}') is None
    assert parse_kv_events_config('{"enable_kv_cache_events": true, "publisher": "null"}') is None
    cfg = parse_args(["--kv-events-endpoint", "ipc:///tmp/kv"])
    assert cfg.kv_events_endpoint == "ipc:///tmp/kv"
    with pytest.raises(ValueError, match="exclude"):
        check(
            SimConfig(
                kv_events_endpoint="ipc:///x", kv_events_config='{"enable_kv_cache_events": true}'
            )
        )
    with pytest.raises(ValueError, match="must start with"):
        check(SimConfig(kv_events_endpoint="localhost:5557"))
    with pytest.raises(SystemExit):
        parse_args(["--kv-events-config", "{"])


async def test_server_publishes_over_zmq_and_resets(tmp_path, sim_factory, http):
    address = f"ipc://{tmp_path}/sim-kv"
    base, _app = await sim_factory(kv_events_endpoint=address)
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(address)
    try:
        deadline = time.monotonic() + 10
        while (
            True
        ):  # ZMQ's slow joiner: an idle reset publishes AllBlocksCleared; repeat until one arrives
            assert time.monotonic() < deadline, "no KV event arrived"
            async with http.post(base + "/reset_prefix_cache") as r:
                assert r.status == 200
            try:
                joined = decode_message(await asyncio.wait_for(sub.recv_multipart(), 0.2))
                break
            except TimeoutError:
                continue
        server = ServerBlocks(max_blocks=1000)
        server.on_batch(joined)
        body = {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "word " * 60}],
            "max_tokens": 2,
        }
        async with http.post(base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
        server.on_batch(decode_message(await asyncio.wait_for(sub.recv_multipart(), 5)))
        tokens = tokenizer.encode(tokenizer.render_chat(body["messages"]))
        assert server.matched_blocks(chain_hashes(tokens, 16, root_hash(None))) == len(tokens) // 16
        async with http.get(base + "/sim/stats") as r:
            stats = await r.json()
        assert stats["kv_events"]["endpoint"] == address and stats["kv_events"]["batches"] >= 1
        async with http.post(base + "/reset_prefix_cache") as r:
            assert r.status == 200
        frames = await asyncio.wait_for(sub.recv_multipart(), 5)
        cleared = decode_message(frames)
        assert [type(e) for e in cleared.events] == [XCleared]
    finally:
        sub.close(0)
        ctx.term()
