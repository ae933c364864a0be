"""Approximate prefix-cache index: which backend probably holds which prompt prefix in KV cache.

The gateway has no tokenizer, so prompts are cut into blocks of ``block_chars`` characters
(~4 characters per token, so the default 64 ≈ 16 tokens, vLLM's default block size). Block i's
hash chains block i-1's (xxh3_64 seeded with the previous hash, the first seeded with the
model), so a hash identifies a whole prefix, like vLLM's own prefix-cache keys. Only full
blocks count, as in vLLM.

Each backend has an LRU of block hashes, sized from its ``vllm:cache_config_info``
(num_gpu_blocks × block_size tokens) when known, else ``default_capacity``. The index is
updated on every pick (the chosen backend will compute and cache those blocks) and a backend
that leaves the pool is purged. Memory is bounded: per-backend capacity is capped.

A pick touches its blocks last to first, so a prompt's first block is always the most recent of
its chain and is evicted last (as vLLM frees a sequence's tail first): a backend holds part of a
prompt only if it holds the first block. ``holders`` maps each first block to the backends
holding it, so a decision asks only those few (:meth:`holders`), not every backend of the pool.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import ItemsView, Iterable, KeysView

import xxhash

CHARS_PER_TOKEN = 4
MAX_BLOCKS_PER_PROMPT = 512  # longer prompts: the first 32K characters decide
_NOBODY: frozenset[str] = frozenset()


class FirstBlocks:
    """Which endpoints hold each chain's first block (both prefix indexes keep one)."""

    __slots__ = ("_by_block",)

    def __init__(self) -> None:
        self._by_block: dict[int, set[str]] = {}

    def add(self, block: int, endpoint: str) -> None:
        holders = self._by_block.get(block)
        if holders is None:
            self._by_block[block] = {endpoint}
        else:
            holders.add(endpoint)

    def discard(self, block: int, endpoint: str) -> None:
        """Forget ``endpoint`` as a holder of ``block`` (nothing if ``block`` is no first block)."""
        holders = self._by_block.get(block)
        if holders is not None:
            holders.discard(endpoint)
            if not holders:
                del self._by_block[block]

    def of(self, block: int) -> set[str] | frozenset[str]:
        """The endpoints holding ``block`` (do not modify)."""
        return self._by_block.get(block, _NOBODY)

    def blocks(self) -> KeysView[int]:
        return self._by_block.keys()

    def items(self) -> ItemsView[int, set[str]]:
        return self._by_block.items()


def block_hashes(model: str, text: str, block_chars: int = 64) -> tuple[int, ...]:
    seed = xxhash.xxh3_64_intdigest(model.encode())
    n = min(len(text) // block_chars, MAX_BLOCKS_PER_PROMPT)
    if text.isascii():  # the common case: slice the bytes once, no per-block encode
        data = text.encode()
        chunks = (data[i * block_chars : (i + 1) * block_chars] for i in range(n))
    else:
        chunks = (
            text[i * block_chars : (i + 1) * block_chars].encode("utf-8", "surrogatepass")
            for i in range(n)
        )
    out = []
    for chunk in chunks:
        seed = xxhash.xxh3_64_intdigest(chunk, seed=seed)
        out.append(seed)
    return tuple(out)


class PrefixIndex:
    def __init__(
        self, *, block_chars: int = 64, default_capacity: int = 50_000, max_capacity: int = 500_000
    ) -> None:
        self.block_chars = block_chars
        self.default_capacity = default_capacity
        self.max_capacity = max_capacity
        # block hash -> time.monotonic() of the last pick that sent it, oldest first
        self._lru: dict[str, OrderedDict[int, float]] = {}
        self._capacity: dict[str, int] = {}
        self._holders = FirstBlocks()

    def set_capacity_from_cache_config(
        self, endpoint: str, num_gpu_blocks: int | None, block_size: int | None
    ) -> None:
        if num_gpu_blocks and block_size:
            tokens = num_gpu_blocks * block_size
            blocks = tokens * CHARS_PER_TOKEN // self.block_chars
            self._capacity[endpoint] = max(1, min(blocks, self.max_capacity))

    def capacity(self, endpoint: str) -> int:
        return self._capacity.get(endpoint, self.default_capacity)

    def hashes(self, model: str, text: str) -> tuple[int, ...]:
        return block_hashes(model, text, self.block_chars)

    def matched_blocks(
        self, endpoint: str, hashes: tuple[int, ...], since: float | None = None
    ) -> int:
        """Leading blocks of ``hashes`` sent to ``endpoint`` (only by picks at or after
        ``since``, a time.monotonic() value, when given)."""
        lru = self._lru.get(endpoint)
        if not lru or not hashes:
            return 0
        # Chained hashes: block i present implies its whole prefix was cached, so binary search
        # for the longest present prefix (LRU may have evicted the middle; then we undercount).
        lo, hi = 0, len(hashes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            t = lru.get(hashes[mid - 1])
            if t is not None and (since is None or t >= since):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def match_fraction(
        self, endpoint: str, hashes: tuple[int, ...], since: float | None = None
    ) -> float:
        return self.matched_blocks(endpoint, hashes, since) / len(hashes) if hashes else 0.0

    def record(self, endpoint: str, hashes: tuple[int, ...], now: float | None = None) -> None:
        if not hashes:
            return
        lru = self._lru.get(endpoint)
        if lru is None:
            lru = self._lru[endpoint] = OrderedDict()
        t = time.monotonic() if now is None else now
        for h in reversed(hashes):  # the first block last: the most recent, evicted last
            if h in lru:
                lru.move_to_end(h)
            lru[h] = t
        self._holders.add(hashes[0], endpoint)
        excess = len(lru) - self.capacity(endpoint)
        for _ in range(max(0, excess)):
            self._holders.discard(lru.popitem(last=False)[0], endpoint)

    def holders(self, hashes: tuple[int, ...]) -> set[str] | frozenset[str]:
        """The backends holding at least the first block of ``hashes`` (do not modify)."""
        return self._holders.of(hashes[0]) if hashes else _NOBODY

    def purge(self, endpoints: Iterable[str]) -> None:
        for ep in endpoints:
            lru = self._lru.pop(ep, None)
            if lru:
                for block in self._holders.blocks() & lru.keys():  # C-speed, over the smaller
                    self._holders.discard(block, ep)
            self._capacity.pop(ep, None)

    def size(self, endpoint: str) -> int:
        return len(self._lru.get(endpoint, ()))
