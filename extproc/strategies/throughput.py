"""``throughput``: lowest current token rate.

rate = Δ(vllm:prompt_tokens_total + vllm:generation_tokens_total) / Δt over the last
~3 s of scrapes (at least 0.5 s, so one scrape's jitter does not dominate). A server that
is busy moves many tokens per second; the one moving the fewest has the most headroom.
Requests sent since the last scrape are not in the rate yet, so each adds the server's mean
per-request rate (rate / running, or 1 token/s when idle) as an estimate.
"""

from collections.abc import Sequence

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import LowestCost


def rate_costs(candidates: Sequence[BackendView], snap: Snapshot) -> list[float]:
    p = snap.pending
    n = len(p)
    return [
        b.token_rate + (b.token_rate / b.running if b.running >= 1 else 1.0) * (p[b.index] if b.index < n else 0)
        for b in candidates
    ]


STRATEGY = LowestCost("throughput", rate_costs)
