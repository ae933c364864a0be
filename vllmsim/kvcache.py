"""Paged KV cache with automatic prefix caching, after vLLM v1's BlockPool.

- Block 0 is the "null block" vLLM reserves, so usable blocks = num_gpu_blocks - 1 and
  kv_cache_usage_perc = used / (num_gpu_blocks - 1) (this is what the fixture shows:
  16 used of 4096 -> 0.0039072039).
- A full block is identified by a chained hash (see tokenizer.hash_block); once computed it is
  registered in ``cached`` and can be shared by any request whose prefix hashes match.
- Freed blocks keep their hash and go to the tail of the free queue; allocation takes from the
  head, so the least recently freed cached block is evicted first (LRU). A request's blocks are
  freed tail-first, so the end of a sequence is evicted before its (more shareable) start.
- A cache hit on a block sitting in the free queue pulls it out (ref count 0 -> 1).
- With KV events on (``events`` is a list), evictions and resets are recorded there in order
  (the engine adds the stores), for vllmsim/kv_events.py to publish once per step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class BlockPool:
    __slots__ = (
        "block_hash",
        "block_size",
        "cached",
        "enable_caching",
        "events",
        "evictions",
        "free",
        "num_gpu_blocks",
        "ref",
    )

    def __init__(self, num_gpu_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_gpu_blocks < 2:
            raise ValueError("need at least 2 GPU blocks (one is the null block)")
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref: list[int] = [0] * num_gpu_blocks
        self.block_hash: list[int | None] = [None] * num_gpu_blocks
        # OrderedDict as an O(1) doubly linked list: head = next to evict, tail = newest free.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_gpu_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.evictions = 0
        self.events: list[tuple[object, ...]] | None = None  # KV events of this step, if on

    # ---- queries -----------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_gpu_blocks - 1

    @property
    def num_free(self) -> int:
        """Free blocks, including cached blocks nobody references (they are evictable)."""
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_usable

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Longest run of cached blocks matching ``hashes`` from the start (no side effects)."""
        if not self.enable_caching:
            return []
        hits: list[int] = []
        cached = self.cached
        for h in hashes[:max_blocks]:
            bid = cached.get(h)
            if bid is None:
                break
            hits.append(bid)
        return hits

    def cost_of_touch(self, block_ids: Iterable[int]) -> int:
        """How many free-queue blocks a cache hit would take out of the free pool."""
        ref = self.ref
        return sum(1 for b in block_ids if ref[b] == 0)

    # ---- mutations ---------------------------------------------------------------------
    def touch(self, block_ids: Iterable[int]) -> None:
        ref, free = self.ref, self.free
        for b in block_ids:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        out: list[int] = []
        free, ref, block_hash, cached = self.free, self.ref, self.block_hash, self.cached
        for _ in range(n):
            b, _ = free.popitem(last=False)
            h = block_hash[b]
            if h is not None:  # evict: this block's content is about to be overwritten
                if cached.get(h) == b:
                    del cached[h]
                    if self.events is not None:
                        self.events.append(("removed", h))
                block_hash[b] = None
                self.evictions += 1
            ref[b] = 1
            out.append(b)
        return out

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per block; blocks reaching 0 become free (tail-first)."""
        ref, free = self.ref, self.free
        for b in reversed(block_ids):
            ref[b] -= 1
            if ref[b] == 0:
                # vLLM appends every freed block to the tail, hashed or not; we do the same
                # so eviction order matches the real engine.
                free[b] = None

    def register(self, block_id: int, h: int) -> bool:
        """Mark a full, computed block as reusable under hash ``h``; False if it was not new."""
        if not self.enable_caching:
            return False
        if h in self.cached:  # another block already holds this content; keep the first
            return False
        self.cached[h] = block_id
        self.block_hash[block_id] = h
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, like vLLM: refused (False) while any block is in use."""
        if self.num_used:
            return False
        for b in self.cached.values():
            self.block_hash[b] = None
        self.cached.clear()
        if self.events is not None:
            self.events.append(("cleared",))
        return True
