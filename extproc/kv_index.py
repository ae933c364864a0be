"""Exact prefix-cache state per server, built from its vLLM KV events.

vLLM's block hashes cannot be recomputed outside vLLM (sha256 over pickled tuples with a seed),
so every stored block is re-keyed by the service's OWN chained hash over the token ids the event
carries: ``own(block i) = xxh3_64(token ids of block i, seed=own(block i-1))``, the first block
seeded by :func:`root_hash` (the LoRA adapter, as in vLLM's hash). A request's prompt, tokenized
by the model's tokenizer, hashes the same way (:func:`chain_hashes`), so "does this server hold
the first k blocks of my prompt" is k dictionary lookups - or a binary search, since a chained
hash identifies the whole prefix before it.

Per server (:class:`ServerBlocks`):

* ``blocks``: own hash -> vLLM hash key, in LRU order (oldest first), capped at ``max_blocks``
  (memory stays bounded when removals are missed);
* ``by_vllm``: vLLM hash key -> own hash, so that ``parent_block_hash`` chains a new event onto
  blocks stored earlier and ``BlockRemoved`` (which names vLLM hashes only) finds its block.

:class:`KvIndex` keeps ``firsts``: each chain's first block -> the servers holding it. A server
matches no block of a prompt without its first one, so a decision asks only those servers.

A ``BlockStored`` whose parent is unknown (stored before we subscribed, or lost in a gap) cannot
be placed in a chain and is skipped (``orphan``). Only the GPU tier (``medium`` GPU or unset) of
KV cache group 0 is indexed: an offloaded block is not a prefix-cache hit for the scheduler, and
hybrid models repeat the same hashes per group. Blocks whose hash has extra keys beyond the LoRA
name (multimodal inputs, a cache salt) get a salted own hash: kept so their children chain, but a
text prompt never matches them.

Sequence numbers: each message carries the publisher's counter. A jump forward is a gap (events
lost, e.g. the ZMQ high-water mark): the index can no longer be trusted and is dropped, then
rebuilt from the next events. A jump backward is a restarted server (its cache is empty anyway).
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import xxhash

from extproc.kv_events import AllBlocksCleared, Batch, BlockRemoved, BlockStored, hash_key
from extproc.prefix_index import FirstBlocks

_BASE_ROOT = xxhash.xxh3_64_intdigest(b"extproc-kv-root")


def root_hash(lora: str | None) -> int:
    """Seed of a chain: adapters never share KV blocks with the base model or each other."""
    if not lora:
        return _BASE_ROOT
    return xxhash.xxh3_64_intdigest(lora.encode("utf-8", "surrogatepass"), seed=_BASE_ROOT)


def chain_hashes(
    tokens: Sequence[int] | array, block_size: int, root: int, max_blocks: int | None = None
) -> tuple[int, ...]:
    """Own hashes of the full blocks of ``tokens`` (a partial last block is not cached by vLLM).

    Raises OverflowError for token ids outside 0..2**32-1."""
    n = len(tokens) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n <= 0:
        return ()
    data = (
        tokens
        if isinstance(tokens, array) and tokens.typecode == "I"
        else array("I", tokens[: n * block_size])
    ).tobytes()
    step = block_size * 4
    seed = root
    out = []
    for i in range(n):
        seed = xxhash.xxh3_64_intdigest(data[i * step : (i + 1) * step], seed=seed)
        out.append(seed)
    return tuple(out)


class BatchOutcome(StrEnum):
    OK = "ok"
    GAP = "gap"  # events were lost: the index was dropped before applying this batch
    RESTART = "restart"  # the publisher's counter went back: a new server process


@dataclass(slots=True)
class Applied:
    """What one batch did, for the metrics."""

    outcome: BatchOutcome = BatchOutcome.OK
    stored: int = 0  # BlockStored events
    removed: int = 0
    cleared: int = 0
    orphan: int = 0  # blocks skipped: parent unknown
    ignored: int = 0  # events of another tier or KV cache group
    malformed: int = 0  # token count does not match block count x block size, bad token ids


@dataclass(slots=True)
class ServerBlocks:
    """The blocks one server holds in its GPU prefix cache, as its events tell."""

    max_blocks: int
    blocks: OrderedDict[int, int] = field(default_factory=OrderedDict)
    by_vllm: dict[int, int] = field(default_factory=dict)
    block_size: int = 0  # from the last BlockStored; 0 until the first one
    last_seq: int | None = None
    batches: int = 0  # batches received since the subscription started
    lru_evictions: int = 0
    # time.monotonic() of the last eviction the events reported (or the index was dropped): the
    # gateway's own picks from before it no longer say anything about this server's cache.
    evicted_at: float = float("-inf")
    endpoint: str = ""
    # The KvIndex's map of first blocks -> servers holding them (None: a server on its own).
    firsts: FirstBlocks | None = None
    own_firsts: set[int] = field(default_factory=set)  # the first blocks this server holds
    sizes: set[int] | None = None  # the KvIndex's block sizes seen (grows only)

    @property
    def has_events(self) -> bool:
        """Exact routing for this server: it publishes, and we know its block size."""
        return self.block_size > 0

    def __len__(self) -> int:
        return len(self.blocks)

    def clear(self) -> None:
        self.blocks.clear()
        self.by_vllm.clear()
        for own in list(self.own_firsts):
            self._forget_first(own)
        self.evicted_at = time.monotonic()

    def _add_first(self, own: int) -> None:
        self.own_firsts.add(own)
        if self.firsts is not None:
            self.firsts.add(own, self.endpoint)

    def _forget_first(self, own: int) -> None:
        self.own_firsts.discard(own)
        if self.firsts is not None:
            self.firsts.discard(own, self.endpoint)

    def on_batch(self, batch: Batch) -> Applied:
        applied = Applied()
        last = self.last_seq
        if last is not None and batch.seq != last + 1:
            applied.outcome = BatchOutcome.GAP if batch.seq > last else BatchOutcome.RESTART
            self.clear()
        self.last_seq = batch.seq
        self.batches += 1
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                applied.stored += 1
                self._stored(ev, applied)
            elif isinstance(ev, BlockRemoved):
                applied.removed += 1
                if _indexed(ev.medium, ev.group_idx):
                    self._removed(ev)
                else:
                    applied.ignored += 1
            elif isinstance(ev, AllBlocksCleared):
                applied.cleared += 1
                self.clear()
        return applied

    def _stored(self, ev: BlockStored, applied: Applied) -> None:
        if not _indexed(ev.medium, ev.group_idx):
            applied.ignored += 1
            return
        bs, n = ev.block_size, len(ev.block_hashes)
        if bs <= 0 or len(ev.token_ids) != n * bs:
            applied.malformed += 1
            return
        first = ev.parent_block_hash is None
        if ev.parent_block_hash is None:
            parent = root_hash(ev.lora_name)
        else:
            found = self.by_vllm.get(hash_key(ev.parent_block_hash))
            if found is None:
                applied.orphan += n
                return
            parent = found
        try:
            data = array("I", ev.token_ids).tobytes()
        except (OverflowError, TypeError):
            applied.malformed += 1
            return
        if bs != self.block_size:
            self.block_size = bs
            if self.sizes is not None:
                self.sizes.add(bs)
        step = bs * 4
        extra = ev.extra_keys
        blocks, by_vllm = self.blocks, self.by_vllm
        for i, vh in enumerate(ev.block_hashes):
            salt = _foreign_keys(extra[i] if extra and i < len(extra) else None, ev.lora_name)
            seed = parent if salt is None else xxhash.xxh3_64_intdigest(salt, seed=parent)
            own = xxhash.xxh3_64_intdigest(data[i * step : (i + 1) * step], seed=seed)
            vk = hash_key(vh)
            if own in blocks:
                blocks.move_to_end(own)
            blocks[own] = vk
            by_vllm[vk] = own
            if first and i == 0:
                self._add_first(own)
            parent = own
        excess = len(blocks) - self.max_blocks
        for _ in range(max(0, excess)):
            own, vk = blocks.popitem(last=False)
            if by_vllm.get(vk) == own:
                del by_vllm[vk]
            if own in self.own_firsts:
                self._forget_first(own)
            self.lru_evictions += 1

    def _removed(self, ev: BlockRemoved) -> None:
        by_vllm, blocks = self.by_vllm, self.blocks
        for vh in ev.block_hashes:
            own = by_vllm.pop(hash_key(vh), None)
            if own is not None:
                blocks.pop(own, None)
                if own in self.own_firsts:
                    self._forget_first(own)
                self.evicted_at = time.monotonic()

    def matched_blocks(self, hashes: tuple[int, ...]) -> int:
        """Leading blocks of ``hashes`` held, in O(log n) lookups: probe the first 1, 2, 4, 8 ...
        blocks until one is missing, then binary-search between the last two probes. vLLM frees a
        sequence tail first, so held blocks form a prefix; a block missing in between is found
        when a probe lands on it (the first block always is: without it vLLM hits nothing)."""
        blocks = self.blocks
        if not blocks or not hashes:
            return 0
        n = len(hashes)
        lo, count = 0, 1  # lo blocks known held; probe whether ``count`` are
        while count <= n and hashes[count - 1] in blocks:
            lo, count = count, count * 2
        hi = min(count - 1, n)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _indexed(medium: str | None, group_idx: int | None) -> bool:
    return (medium is None or medium.upper() == "GPU") and not group_idx


def _foreign_keys(keys: Sequence[object] | None, lora: str | None) -> bytes | None:
    """Extra hash keys of a block other than its LoRA name (which the root already carries)."""
    if not keys:
        return None
    rest = list(keys)
    if lora is not None and rest and rest[0] == lora:
        rest = rest[1:]
    return repr(rest).encode() if rest else None


class KvIndex:
    """Every subscribed server's :class:`ServerBlocks`, by endpoint (``ip:port``)."""

    def __init__(self, *, max_blocks: int = 100_000) -> None:
        self.max_blocks = max_blocks
        self.servers: dict[str, ServerBlocks] = {}
        self.firsts = FirstBlocks()  # a chain's first block -> servers holding it
        self.sizes: set[int] = set()  # block sizes servers published (grows only: a superset)

    def add(self, endpoint: str) -> ServerBlocks:
        server = self.servers.get(endpoint)
        if server is None:
            server = self.servers[endpoint] = ServerBlocks(
                self.max_blocks, endpoint=endpoint, firsts=self.firsts, sizes=self.sizes
            )
        return server

    def remove(self, endpoint: str) -> None:
        server = self.servers.pop(endpoint, None)
        if server is not None:
            server.clear()

    def holders(self, first_block: int) -> set[str] | frozenset[str]:
        """The servers holding the chain that starts with ``first_block`` (do not modify)."""
        return self.firsts.of(first_block)

    def get(self, endpoint: str) -> ServerBlocks | None:
        """The server's state if it has published events (else: use the approximate index)."""
        server = self.servers.get(endpoint)
        return server if server is not None and server.has_events else None
