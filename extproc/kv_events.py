"""vLLM's KV-cache events as they arrive on the wire (decoding only; no sockets here).

vLLM (``vllm/distributed/kv_events.py``, checked against 0.32) publishes one ZMQ multipart
message per engine step that changed the prefix cache: ``[topic, seq, payload]``, where
``seq`` is an 8-byte big-endian counter starting at 0 (per publisher process) and ``payload``
is msgpack of ``KVEventBatch``: an *array* ``[ts, events, data_parallel_rank]``. Each event is
a msgspec tagged struct, encoded as a *map* with ``"type"`` first:

* ``BlockStored``: ``block_hashes`` (vLLM's own hashes: 64-bit ints by default, the low 64 bits
  of a sha256; the 32-byte digests as ``bytes`` with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``),
  ``parent_block_hash`` (the hash
  of the block before the first one, ``None`` at the start of a sequence), ``token_ids`` (the
  tokens of all those blocks, ``block_size`` each), ``lora_id`` (deprecated), ``medium``
  (``"GPU"``, or a CPU/storage offload tier), ``lora_name``, ``extra_keys`` (per block: the
  LoRA name, multimodal ids, cache salt ... that entered the hash), ``group_idx`` (KV cache
  group of hybrid models), and newer optional fields we ignore.
* ``BlockRemoved``: ``block_hashes``, ``medium``, ``group_idx``.
* ``AllBlocksCleared``: the prefix cache was reset.

Older vLLM releases encoded events as *arrays* ``[tag, field, ...]`` (what llm-d's
kv-cache-manager decodes); both forms are accepted. Fields are matched by name (map form) or
position (array form); unknown fields are ignored and missing optional ones default to None.
"""

from __future__ import annotations

from typing import Any

import msgspec

BlockHash = bytes | int
TOPIC_ALL = b""  # ZMQ prefix filter: every topic


class BlockStored(msgspec.Struct, tag=True, frozen=True):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None = None
    token_ids: list[int] = []
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[list[Any] | None] | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, tag=True, frozen=True):
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, frozen=True):
    pass


class _LegacyBlockStored(BlockStored, tag="BlockStored", array_like=True, frozen=True):
    pass


class _LegacyBlockRemoved(BlockRemoved, tag="BlockRemoved", array_like=True, frozen=True):
    pass


class _LegacyAllBlocksCleared(
    AllBlocksCleared, tag="AllBlocksCleared", array_like=True, frozen=True
):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class Batch(msgspec.Struct, frozen=True):
    seq: int
    ts: float
    events: list[Event]
    undecodable: int = 0  # events of an unknown type or shape, skipped


class FrameError(ValueError):
    """A message that is not a KV-event batch at all."""


_batch_decoder = msgspec.msgpack.Decoder(_Batch)
_map_decoder = msgspec.msgpack.Decoder(BlockStored | BlockRemoved | AllBlocksCleared)
_array_decoder = msgspec.msgpack.Decoder(
    _LegacyBlockStored | _LegacyBlockRemoved | _LegacyAllBlocksCleared
)


def _is_msgpack_array(first: int) -> bool:
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def decode_payload(payload: bytes, seq: int = 0) -> Batch:
    """Decode one ``KVEventBatch`` payload; a bad event is skipped (counted), a bad batch raises."""
    try:
        raw = _batch_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FrameError(f"not a KV event batch: {exc}") from None
    events: list[Event] = []
    bad = 0
    for item in raw.events:
        data = bytes(item)
        decoder = _array_decoder if data and _is_msgpack_array(data[0]) else _map_decoder
        try:
            events.append(decoder.decode(data))
        except (msgspec.DecodeError, msgspec.ValidationError):
            bad += 1
    return Batch(seq, raw.ts, events, bad)


def decode_message(frames: list[bytes]) -> Batch:
    """``[topic, seq, payload]`` as vLLM's ``ZmqEventPublisher`` sends it."""
    if len(frames) != 3:
        raise FrameError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    _topic, seq_bytes, payload = frames
    if len(seq_bytes) != 8:
        raise FrameError(f"sequence frame has {len(seq_bytes)} bytes, expected 8")
    return decode_payload(payload, int.from_bytes(seq_bytes, "big", signed=True))


def hash_key(h: BlockHash) -> int:
    """vLLM's block hash as a 64-bit int: the last 8 bytes of a digest, big-endian, which is how
    vLLM itself turns a digest into its default int form (so both forms of one block agree)."""
    if isinstance(h, int):
        return h & 0xFFFF_FFFF_FFFF_FFFF
    return int.from_bytes(h[-8:], "big")
