"""extproc/prefix_index.py: the approximate prefix-cache index (what the gateway routed where)."""

from __future__ import annotations

import random

from extproc.prefix_index import PrefixIndex


def test_match_counts_the_longest_recorded_prefix():
    index = PrefixIndex(block_chars=4)
    a = index.hashes("m", "abcdefghijkl")  # 3 blocks
    index.record("A", a[:2])
    assert index.matched_blocks("A", a) == 2 and index.match_fraction("A", a) == 2 / 3
    assert index.matched_blocks("B", a) == 0 and index.match_fraction("A", ()) == 0.0
    assert index.hashes("other", "abcdefghijkl")[0] != a[0]  # the model seeds the chain


def test_since_counts_only_picks_recorded_at_or_after_it():
    index = PrefixIndex(block_chars=4)
    h = index.hashes("m", "abcdefgh")
    index.record("A", h, now=10.0)
    assert index.matched_blocks("A", h, since=10.0) == 2
    assert index.matched_blocks("A", h, since=10.5) == 0
    index.record("A", h[:1], now=11.0)  # a later pick refreshes the blocks it sent
    assert index.matched_blocks("A", h, since=10.5) == 1
    assert index.matched_blocks("A", h) == 2  # no bound: every recorded block


def test_capacity_is_an_lru_per_backend_and_purge_forgets():
    index = PrefixIndex(block_chars=4, default_capacity=2)
    h = index.hashes("m", "abcdefghijkl")
    index.record("A", h)
    # The tail goes first (as in vLLM): A still holds the prompt's first two blocks.
    assert index.size("A") == 2 and index.matched_blocks("A", h) == 2
    assert index.holders(h) == {"A"}
    index.set_capacity_from_cache_config("A", num_gpu_blocks=100, block_size=16)
    assert index.capacity("A") == 100 * 16 * 4 // 4
    index.purge(["A"])
    assert index.size("A") == 0 and index.capacity("A") == 2
    assert index.holders(h) == set() and index.holders(()) == set()


def test_holders_are_exactly_the_backends_that_match_part_of_a_prompt():
    """holders() stands in for asking every backend: it must name every backend whose match
    is above 0 and no other, through records, evictions and purges."""
    rng = random.Random(5)
    index = PrefixIndex(block_chars=4, default_capacity=12)
    texts = ["".join(rng.choice("ab") for _ in range(4 * rng.randint(1, 5))) for _ in range(40)]
    prompts = [index.hashes("m", t) for t in texts]
    backends = [f"b{i}" for i in range(5)]
    for step in range(600):
        if step % 97 == 96:
            index.purge([rng.choice(backends)])
        else:
            index.record(rng.choice(backends), rng.choice(prompts))
        for h in prompts:
            matching = {b for b in backends if index.matched_blocks(b, h) > 0}
            assert index.holders(h) == matching, (step, h)
