"""``least-kv-cache``: lowest KV-cache usage (``vllm:kv_cache_usage_perc``, 0..1).

KV usage lags new requests until their prefill runs, so each request sent since the last
scrape adds the server's mean KV share per running request (usage / running; 1 % when idle).
Without that term every request between two scrapes lands on the same emptiest server.
"""

from collections.abc import Sequence

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import LowestCost


def kv_costs(candidates: Sequence[BackendView], snap: Snapshot) -> list[float]:
    p = snap.pending
    n = len(p)
    return [
        b.kv_cache_usage
        + (b.kv_cache_usage / b.running if b.running >= 1 else 0.01) * (p[b.index] if b.index < n else 0)
        for b in candidates
    ]


STRATEGY = LowestCost("least-kv-cache", kv_costs)
