"""extproc/prefix_index.py: the approximate prefix-cache index (what the gateway routed where)."""

from __future__ import annotations

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
    assert index.size("A") == 2 and index.matched_blocks("A", h[:1]) == 0  # oldest evicted
    index.set_capacity_from_cache_config("A", num_gpu_blocks=100, block_size=16)
    assert index.capacity("A") == 100 * 16 * 4 // 4
    index.purge(["A"])
    assert index.size("A") == 0 and index.capacity("A") == 2
