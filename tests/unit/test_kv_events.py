"""Decoding vLLM's KV-event frames: fixtures encoded by vLLM 0.32's own classes
(tests/fixtures/kv_events/, provenance in its README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from extproc.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    FrameError,
    decode_message,
    decode_payload,
    hash_key,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kv_events"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def _hash(value):
    return bytes.fromhex(value) if isinstance(value, str) else value


@pytest.mark.parametrize("name", sorted(MANIFEST["frames"]))
def test_fixture_frames_decode_to_what_vllm_encoded(name):
    spec = MANIFEST["frames"][name]
    batch = decode_payload((FIXTURES / spec["file"]).read_bytes(), seq=7)
    assert batch.seq == 7 and batch.ts == spec["ts"] and batch.undecodable == 0
    assert [type(e).__name__ for e in batch.events] == [e["type"] for e in spec["events"]]
    for got, want in zip(batch.events, spec["events"]):
        if isinstance(got, AllBlocksCleared):
            continue
        assert got.block_hashes == [_hash(h) for h in want["block_hashes"]]
        assert got.medium == want["medium"] and got.group_idx == want["group_idx"]
        if isinstance(got, BlockStored):
            assert got.parent_block_hash == (
                None if want["parent_block_hash"] is None else _hash(want["parent_block_hash"])
            )
            assert got.token_ids == want["token_ids"] and got.block_size == want["block_size"]
            assert (got.lora_name, got.lora_id) == (want["lora_name"], want["lora_id"])
            assert got.extra_keys == want["extra_keys"]


def test_vllm_hashes_are_ints_by_default_and_digests_on_request():
    default = decode_payload((FIXTURES / "stored_int.msgpack").read_bytes()).events[0]
    assert isinstance(default, BlockStored) and all(
        isinstance(h, int) for h in default.block_hashes
    )
    digests = decode_payload((FIXTURES / "stored.msgpack").read_bytes()).events[0]
    assert isinstance(digests, BlockStored)
    assert all(isinstance(h, bytes) and len(h) == 32 for h in digests.block_hashes)
    # one block, both forms: the same key in the index
    assert [hash_key(h) for h in digests.block_hashes] == [
        hash_key(h) for h in default.block_hashes
    ]


def test_multipart_message_topic_seq_payload():
    example = MANIFEST["multipart_example"]
    frames = [
        bytes.fromhex(example["topic_hex"]),
        bytes.fromhex(example["seq_hex"]),
        (FIXTURES / example["payload_file"]).read_bytes(),
    ]
    batch = decode_message(frames)
    assert batch.seq == example["seq"] == 41
    assert len(batch.events) == 2
    # vLLM's replay end marker is -1 as a signed 8-byte integer
    marker = decode_message(
        [
            b"",
            bytes.fromhex(example["replay_end_marker_hex"]),
            (FIXTURES / "removed_cleared.msgpack").read_bytes(),
        ]
    )
    assert marker.seq == -1


@pytest.mark.parametrize(
    "frames, message",
    [
        ([b"topic", b"\x00" * 8], "expected 3 frames"),
        ([b"topic", b"\x00" * 4, b"\x90"], "8"),
        ([b"topic", b"\x00" * 8, b"not msgpack at all"], "not a KV event batch"),
        ([b"topic", b"\x00" * 8, msgspec.msgpack.encode({"ts": 1})], "not a KV event batch"),
    ],
)
def test_bad_messages_raise_frame_error(frames, message):
    with pytest.raises(FrameError, match=message):
        decode_message(frames)


def test_legacy_array_events_and_unknown_events_in_one_batch():
    """Older vLLM encoded events as arrays [tag, fields...] (what llm-d decodes); a future or
    broken event is skipped and counted, the rest of the batch still applies."""
    payload = msgspec.msgpack.encode(
        [
            2.5,
            [
                ["BlockStored", [1, 2], None, [1, 2, 3, 4], 2, None, "GPU"],
                ["BlockRemoved", [2], "GPU"],
                ["AllBlocksCleared"],
                ["BlockMoved", [1]],
                {"type": "BlockStored", "block_hashes": "not a list"},
                {
                    "type": "BlockRemoved",
                    "block_hashes": [b"\x01" * 32],
                    "medium": None,
                    "future_field": 1,
                },
            ],
            0,
        ]
    )
    batch = decode_payload(payload)
    kinds = [type(e) for e in batch.events]
    assert [
        issubclass(k, c)
        for k, c in zip(kinds, (BlockStored, BlockRemoved, AllBlocksCleared, BlockRemoved))
    ] == [True] * 4
    assert batch.undecodable == 2
    first = batch.events[0]
    assert isinstance(first, BlockStored) and first.block_size == 2 and first.lora_name is None


def test_hash_key_takes_the_last_8_bytes_or_the_int():
    assert hash_key(b"\xff" * 24 + (5).to_bytes(8, "big")) == 5
    assert hash_key(7) == 7
    assert hash_key(-1) == 2**64 - 1
    assert hash_key(b"\x01") == 1
