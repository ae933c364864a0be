"""KV-cache events like vLLM's ``ZmqEventPublisher`` (vllm/distributed/kv_events.py, 0.32).

Wire format (byte-identical to vLLM's for the same content; tests/vllmsim/test_kv_events.py
compares with fixtures encoded by vLLM's own classes): one ZMQ multipart message per engine
step that changed the prefix cache, ``[topic, seq (8-byte big-endian, from 0), payload]``, the
payload msgpack of ``KVEventBatch`` = ``[ts, [event, ...], data_parallel_rank]`` with events as
maps tagged ``"type"``: ``BlockStored`` (block_hashes, parent_block_hash, token_ids,
block_size, lora_id, medium, lora_name, extra_keys, group_idx), ``BlockRemoved``
(block_hashes, medium, group_idx), ``AllBlocksCleared``.

Block hashes are the simulator's own 64-bit chained hashes (vllmsim/tokenizer.py), sent as
integers like vLLM 0.32 by default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``: the low 64 bits
of its sha256); consumers treat them as opaque.

Bind or connect as vLLM does: an endpoint with ``*`` or ``::``, or ``ipc://``/``inproc://``,
binds; any other connects out. ``--kv-events-endpoint`` (not a vLLM flag) always binds, so a
test can publish on one loopback address. No replay socket (``replay_endpoint`` is refused).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec


class _Event(msgspec.Struct, omit_defaults=True, tag=True):
    pass


class BlockStored(_Event):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None


class BlockRemoved(_Event):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(_Event):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


MEDIUM_GPU = "GPU"


# Engine-side records (cheap tuples; turned into structs only when published).
StoredRecord = tuple[str, Sequence[int], int | None, Sequence[int], int, str | None, int | None]
# ("stored", hashes, parent, token_ids, block_size, lora_name, lora_id)
RemovedRecord = tuple[str, int]  # ("removed", hash)
ClearedRecord = tuple[str]  # ("cleared",)


def to_events(
    records: Sequence[tuple[Any, ...]],
) -> list[BlockStored | BlockRemoved | AllBlocksCleared]:
    """Engine records -> vLLM's event structs (one BlockRemoved per evicted hash, as vLLM)."""
    out: list[BlockStored | BlockRemoved | AllBlocksCleared] = []
    for rec in records:
        kind = rec[0]
        if kind == "stored":
            _, hashes, parent, tokens, block_size, lora, lora_id = rec
            out.append(
                BlockStored(
                    block_hashes=list(hashes),
                    parent_block_hash=parent,
                    token_ids=list(tokens),
                    block_size=block_size,
                    lora_id=lora_id,
                    medium=MEDIUM_GPU,
                    lora_name=lora,
                    extra_keys=[(lora,) if lora else None for _ in hashes],
                    group_idx=0,
                )
            )
        elif kind == "removed":
            out.append(BlockRemoved(block_hashes=[rec[1]], medium=MEDIUM_GPU, group_idx=0))
        else:
            out.append(AllBlocksCleared())
    return out


@dataclass(frozen=True)
class KvEventsSettings:
    endpoint: str
    topic: str = ""
    bind: bool = True
    hwm: int = 100_000


def parse_kv_events_config(text: str) -> KvEventsSettings | None:
    """vLLM's ``--kv-events-config`` JSON; None when events are off. Raises ValueError."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--kv-events-config is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("--kv-events-config must be a JSON object")  # noqa: TRY004 - a flag error
    known = {
        "enable_kv_cache_events",
        "publisher",
        "endpoint",
        "replay_endpoint",
        "buffer_steps",
        "hwm",
        "max_queue_size",
        "topic",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--kv-events-config: unknown field(s) {', '.join(unknown)}")
    if not data.get("enable_kv_cache_events"):
        return None
    publisher = data.get("publisher", "zmq")
    if publisher == "null":
        return None
    if publisher != "zmq":
        raise ValueError(f"--kv-events-config: unknown publisher {publisher!r} (zmq or null)")
    if data.get("replay_endpoint"):
        raise ValueError("--kv-events-config: replay_endpoint is not simulated")
    endpoint = data.get("endpoint", "tcp://*:5557")
    if not isinstance(endpoint, str) or not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"--kv-events-config: bad endpoint {endpoint!r}")
    topic = data.get("topic", "")
    hwm = data.get("hwm", 100_000)
    if not isinstance(topic, str) or not isinstance(hwm, int) or hwm < 0:
        raise ValueError("--kv-events-config: topic must be a string, hwm a non-negative integer")
    bind = "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))
    return KvEventsSettings(endpoint, topic, bind, hwm)


class KvEventPublisher:
    """A ZMQ PUB socket; ``publish`` never blocks (PUB drops at the high-water mark, as in vLLM)."""

    def __init__(self, settings: KvEventsSettings) -> None:
        import zmq

        self.settings = settings
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.set_hwm(settings.hwm)
        if settings.endpoint.startswith("tcp://["):
            self._sock.setsockopt(zmq.IPV6, 1)
        if settings.bind:
            self._sock.bind(settings.endpoint)
        else:
            self._sock.connect(settings.endpoint)
        self._topic = settings.topic.encode()
        self._encoder = msgspec.msgpack.Encoder()
        self._noblock = zmq.NOBLOCK
        self._again = zmq.Again
        self.seq = 0
        self.batches = 0
        self.events = 0

    def publish(self, records: Sequence[tuple[Any, ...]]) -> None:
        if not records:
            return
        events = to_events(records)
        payload = self._encoder.encode(
            KVEventBatch(ts=time.time(), events=events, data_parallel_rank=0)
        )
        try:
            self._sock.send_multipart(
                (self._topic, self.seq.to_bytes(8, "big"), payload), flags=self._noblock
            )
        except self._again:  # pragma: no cover - PUB drops instead of raising
            pass
        self.seq += 1  # a dropped message still uses its number: subscribers see the gap
        self.batches += 1
        self.events += len(events)

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
