"""``least-kv-cache``: lowest KV-cache usage (``vllm:kv_cache_usage_perc``, 0..1).

KV usage lags new requests until their prefill runs, so in-flight requests break ties:
among equal usage the one with fewer requests sent since the last scrape wins.
"""

from collections.abc import Sequence

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import LowestCost


def kv_costs(candidates: Sequence[BackendView], snap: Snapshot) -> list[float]:
    # 1e-6 per pending request: smaller than any real usage step, enough to break ties.
    p = snap.pending
    n = len(p)
    return [b.kv_cache_usage + 1e-6 * (p[b.index] if b.index < n else 0) for b in candidates]


STRATEGY = LowestCost("least-kv-cache", kv_costs)
