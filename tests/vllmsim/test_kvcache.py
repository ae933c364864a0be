"""BlockPool: LRU eviction order and bookkeeping invariants (property-based)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vllmsim.kvcache import BlockPool


def test_usage_excludes_the_null_block() -> None:
    pool = BlockPool(num_gpu_blocks=4097, block_size=16)
    pool.allocate(16)
    assert pool.usage() == 16 / 4096


def test_lru_eviction_order() -> None:
    pool = BlockPool(num_gpu_blocks=9, block_size=16)
    a = pool.allocate(2)
    b = pool.allocate(2)
    for blk, h in zip(a + b, (11, 12, 21, 22)):
        pool.register(blk, h)
    pool.release(a)
    pool.release(b)
    filler = pool.allocate(4)  # never-used blocks are handed out first: no eviction yet
    assert pool.evictions == 0 and pool.lookup([11, 12], 2) == a
    hit = pool.lookup([11, 12], 2)
    pool.touch(hit)  # A is used again ...
    pool.release(hit)  # ... and freed: it is now the most recently used
    pool.allocate(2)
    assert pool.evictions == 2
    assert pool.lookup([21, 22], 2) == []  # B evicted (least recently used)
    assert pool.lookup([11, 12], 2) == a
    pool.release(filler)


def test_tail_blocks_of_a_sequence_are_evicted_first() -> None:
    pool = BlockPool(num_gpu_blocks=4, block_size=16)
    seq = pool.allocate(3)
    for blk, h in zip(seq, (1, 2, 3)):
        pool.register(blk, h)
    pool.release(seq)
    pool.allocate(1)
    assert pool.lookup([1, 2, 3], 3) == seq[:2]  # the last block went first


ops = st.lists(st.tuples(st.sampled_from(["alloc", "free", "hit"]), st.integers(0, 6)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_pool_invariants(script: list[tuple[str, int]]) -> None:
    pool = BlockPool(num_gpu_blocks=12, block_size=4)
    owned: list[list[int]] = []
    next_hash = 1
    for op, k in script:
        if op == "alloc":
            got = pool.allocate(k)
            if got is None:
                assert k > pool.num_free
                continue
            for blk in got:
                pool.register(blk, next_hash)
                next_hash += 1
            owned.append(got)
        elif op == "free" and owned:
            pool.release(owned.pop(k % len(owned)))
        elif op == "hit":
            hits = [
                b
                for h in range(max(1, next_hash - k), next_hash)
                if (b := pool.cached.get(h)) is not None
            ]
            if hits and pool.cost_of_touch(hits) <= pool.num_free:
                pool.touch(hits)
                owned.append(hits)
        # invariants
        refs = [0] * pool.num_gpu_blocks
        for blocks in owned:
            for b in blocks:
                refs[b] += 1
        assert refs == pool.ref
        assert set(pool.free) == {b for b in range(1, 12) if refs[b] == 0}
        assert pool.num_used + pool.num_free == pool.num_usable
        assert 0.0 <= pool.usage() <= 1.0
        for h, b in pool.cached.items():
            assert pool.block_hash[b] == h
