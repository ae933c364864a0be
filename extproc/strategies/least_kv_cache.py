"""``least-kv-cache``: lowest KV-cache usage (``vllm:kv_cache_usage_perc``, 0..1).

KV usage lags new requests until their prefill runs, so in-flight requests break ties:
among equal usage the one with fewer requests sent since the last scrape wins.
"""

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import LowestCost


def kv_cost(b: BackendView, snap: Snapshot) -> float:
    # 1e-6 per pending request: smaller than any real usage step, enough to break ties.
    return b.kv_cache_usage + 1e-6 * snap.pending_of(b.index)


STRATEGY = LowestCost("least-kv-cache", kv_cost)
