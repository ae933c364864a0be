"""The exact per-server block index built from KV events."""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path

import pytest

from extproc.kv_events import AllBlocksCleared, Batch, BlockRemoved, BlockStored, decode_payload
from extproc.kv_index import BatchOutcome, KvIndex, ServerBlocks, chain_hashes, root_hash

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kv_events"
BS = 4


def vh(i: int) -> bytes:
    """A vLLM-style 32-byte block hash (opaque to the index)."""
    return hashlib.sha256(b"v%d" % i).digest()


def stored(
    first: int,
    tokens: list[int],
    parent: int | None = None,
    *,
    bs: int = BS,
    lora: str | None = None,
    medium: str | None = "GPU",
    group: int | None = 0,
    extra=None,
) -> BlockStored:
    n = len(tokens) // bs
    return BlockStored(
        block_hashes=[vh(first + i) for i in range(n)],
        parent_block_hash=None if parent is None else vh(parent),
        token_ids=tokens,
        block_size=bs,
        medium=medium,
        lora_name=lora,
        group_idx=group,
        extra_keys=extra if extra is not None else [None] * n,
    )


class Feed:
    """Sequence-numbered batches into one ServerBlocks."""

    def __init__(self, server: ServerBlocks) -> None:
        self.server = server
        self.seq = 0

    def __call__(self, *events, seq: int | None = None):
        self.seq = self.seq + 1 if seq is None else seq
        return self.server.on_batch(Batch(self.seq, 0.0, list(events)))


PROMPT = list(range(100, 120))  # 5 blocks of 4


def held(server: ServerBlocks, tokens=PROMPT, lora: str | None = None) -> int:
    return server.matched_blocks(chain_hashes(tokens, BS, root_hash(lora)))


def test_chain_hashes_are_full_blocks_only_and_prefix_stable():
    h = chain_hashes(PROMPT + [1, 2], BS, root_hash(None))
    assert len(h) == 5
    assert chain_hashes(PROMPT[:8], BS, root_hash(None)) == h[:2]  # a prefix hashes the same
    other = chain_hashes([999] + PROMPT[1:], BS, root_hash(None))
    assert not set(h) & set(other)  # one changed token changes every later block
    assert chain_hashes(array("I", PROMPT), BS, root_hash(None)) == h
    assert chain_hashes(PROMPT, BS, root_hash(None), max_blocks=2) == h[:2]
    assert chain_hashes(PROMPT[:3], BS, root_hash(None)) == ()
    assert root_hash("a") != root_hash("b") != root_hash(None)
    with pytest.raises(OverflowError):
        chain_hashes([-1] * BS, BS, root_hash(None))


def test_stored_blocks_match_the_prompt_that_produced_them():
    s = ServerBlocks(max_blocks=100)
    feed = Feed(s)
    assert not s.has_events and held(s) == 0
    a = feed(stored(0, PROMPT[:8]))  # blocks 0-1 from the root
    assert a.outcome is BatchOutcome.OK and a.stored == 1
    assert s.has_events and s.block_size == BS and len(s) == 2
    assert held(s) == 2
    feed(stored(2, PROMPT[8:16], parent=1))  # blocks 2-3 chained on vLLM hash 1
    assert held(s) == 4
    assert held(s, PROMPT[:4] + [0] * 16) == 1  # diverges after the first block


@pytest.mark.parametrize("frame", ["stored_int.msgpack", "stored.msgpack"])
def test_vllm_fixture_frames_build_the_index(frame):
    """vLLM 0.32 sends int hashes by default; the removal frame names the digest: the same key."""
    s = ServerBlocks(max_blocks=100)
    batch = decode_payload((FIXTURES / frame).read_bytes(), seq=0)
    s.on_batch(batch)
    tokens = list(range(11, 23))  # the fixture's 3 blocks of 4 tokens
    assert s.matched_blocks(chain_hashes(tokens, 4, root_hash(None))) == 3
    # removed (block 3) then AllBlocksCleared
    removed = decode_payload((FIXTURES / "removed_cleared.msgpack").read_bytes(), seq=1)
    s.on_batch(Batch(1, 0.0, removed.events[:1]))
    assert s.matched_blocks(chain_hashes(tokens, 4, root_hash(None))) == 2
    s.on_batch(Batch(2, 0.0, removed.events[1:]))
    assert len(s) == 0 and not s.by_vllm


def test_lora_blocks_chain_from_the_adapter_root():
    s = ServerBlocks(max_blocks=100)
    batch = decode_payload((FIXTURES / "lora_int.msgpack").read_bytes(), seq=0)
    a = s.on_batch(batch)  # two sql-lora blocks stored, then the second removed
    assert (a.stored, a.removed) == (1, 1)
    tokens = list(range(11, 19))
    assert s.matched_blocks(chain_hashes(tokens, 4, root_hash("sql-lora"))) == 1
    assert s.matched_blocks(chain_hashes(tokens, 4, root_hash(None))) == 0  # base model: no reuse


def test_other_tiers_groups_and_salted_blocks_never_match():
    s = ServerBlocks(max_blocks=100)
    a = s.on_batch(decode_payload((FIXTURES / "ignored.msgpack").read_bytes(), seq=0))
    assert a.ignored == 2  # CPU tier, KV cache group 1
    assert len(s) == 1  # the cache-salted block is kept (its children must chain) ...
    assert (
        s.matched_blocks(chain_hashes([1, 2, 3, 4], 4, root_hash(None))) == 0
    )  # ... but never matches
    feed = Feed(s)
    # removals of another tier do not touch the GPU index
    feed(stored(0, PROMPT[:4]))
    b = feed(BlockRemoved(block_hashes=[vh(0)], medium="CPU", group_idx=0))
    assert b.ignored == 1 and held(s) == 1


def test_salted_parent_keeps_children_unmatchable_but_chained():
    s = ServerBlocks(max_blocks=100)
    feed = Feed(s)
    feed(stored(0, PROMPT[:4], extra=[["salt"]]))
    a = feed(stored(1, PROMPT[4:8], parent=0))
    assert a.orphan == 0 and len(s) == 2
    assert held(s) == 0
    # a lora name first in the extra keys is the root's business, not a salt
    feed(stored(10, PROMPT[:4], lora="ad", extra=[["ad"]]))
    assert held(s, lora="ad") == 1


def test_orphans_and_malformed_events_are_skipped():
    s = ServerBlocks(max_blocks=100)
    feed = Feed(s)
    a = feed(stored(5, PROMPT[4:12], parent=4))  # parent never seen (stored before we subscribed)
    assert a.orphan == 2 and len(s) == 0
    bad = BlockStored(
        block_hashes=[vh(0)], parent_block_hash=None, token_ids=[1, 2, 3], block_size=4
    )
    zero = BlockStored(block_hashes=[vh(0)], parent_block_hash=None, token_ids=[], block_size=0)
    huge = BlockStored(
        block_hashes=[vh(0)], parent_block_hash=None, token_ids=[2**40, 1, 2, 3], block_size=4
    )
    b = feed(bad, zero, huge)
    assert b.malformed == 3 and len(s) == 0 and not s.has_events


def test_removed_blocks_and_unknown_removals():
    s = ServerBlocks(max_blocks=100)
    feed = Feed(s)
    feed(stored(0, PROMPT))  # 5 blocks
    feed(BlockRemoved(block_hashes=[vh(4), vh(3)], medium="GPU", group_idx=0))
    assert held(s) == 3
    feed(BlockRemoved(block_hashes=[vh(99)], medium=None))  # never stored: nothing happens
    assert len(s) == 3
    feed(BlockRemoved(block_hashes=[vh(0)], medium="GPU"))
    assert held(s) == 0  # the first block is gone: vLLM cannot hit the rest either


def test_re_stored_block_refreshes_lru_position():
    s = ServerBlocks(max_blocks=3)
    feed = Feed(s)
    feed(stored(0, PROMPT[:8]))  # blocks 0, 1
    feed(stored(100, [7] * 4))  # an unrelated block
    feed(stored(0, PROMPT[:4]))  # block 0 again (vLLM "full" report mode): most recent now
    feed(stored(200, [8] * 4))  # cap 3: the least recently stored (block 1) goes
    assert held(s) == 1 and len(s) == 3 and s.lru_evictions == 1
    assert len(s.by_vllm) == 3


def test_lru_cap_bounds_memory():
    s = ServerBlocks(max_blocks=10)
    feed = Feed(s)
    for i in range(50):
        feed(stored(1000 + i, [i] * 4))
    assert len(s) == 10 and len(s.by_vllm) == 10 and s.lru_evictions == 40


def test_sequence_gap_drops_the_index_and_rebuilds():
    s = ServerBlocks(max_blocks=100)
    feed = Feed(s)
    feed(stored(0, PROMPT[:8]), seq=10)
    assert feed(seq=11).outcome is BatchOutcome.OK
    a = feed(stored(10, [5] * 4), seq=14)  # 12 and 13 lost
    assert a.outcome is BatchOutcome.GAP
    assert held(s) == 0 and len(s) == 1  # rebuilt from the events after the gap
    r = feed(seq=0)  # the counter went back: a restarted server
    assert r.outcome is BatchOutcome.RESTART and len(s) == 0
    assert feed(seq=1).outcome is BatchOutcome.OK


def test_all_blocks_cleared():
    s = ServerBlocks(max_blocks=100)
    feed = Feed(s)
    feed(stored(0, PROMPT))
    a = feed(AllBlocksCleared())
    assert a.cleared == 1 and len(s) == 0 and held(s) == 0
    assert s.has_events  # still publishing: exact (an empty cache), not approximate


def test_binary_search_finds_the_longest_held_prefix():
    s = ServerBlocks(max_blocks=1000)
    feed = Feed(s)
    tokens = list(range(400))
    feed(stored(0, tokens))  # 100 blocks
    hashes = chain_hashes(tokens, BS, root_hash(None))
    assert s.matched_blocks(hashes) == 100
    feed(BlockRemoved(block_hashes=[vh(i) for i in range(37, 100)], medium="GPU"))
    assert s.matched_blocks(hashes) == 37
    assert s.matched_blocks(()) == 0


def test_index_add_get_remove():
    idx = KvIndex(max_blocks=5)
    server = idx.add("10.0.0.1:8000")
    assert idx.add("10.0.0.1:8000") is server and server.max_blocks == 5
    assert idx.get("10.0.0.1:8000") is None  # no events yet: approximate
    Feed(server)(stored(0, PROMPT[:4]))
    assert idx.get("10.0.0.1:8000") is server
    idx.remove("10.0.0.1:8000")
    idx.remove("10.0.0.1:8000")
    assert idx.get("10.0.0.1:8000") is None and idx.get("nope") is None
