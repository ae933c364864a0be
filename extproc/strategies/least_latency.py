"""``least-latency``: lowest expected time to first token.

expected_ttft = ttft_recent × (1 + queued), queued = waiting + sent-since-last-scrape.

``ttft_recent`` is Δsum/Δcount of ``vllm:time_to_first_token_seconds`` over the last ~3 s
of scrapes (the lifetime mean until a second sample exists; the pool median while a server
has served nothing). Each request ahead in the queue delays the first token by roughly one
more prefill-and-schedule round, hence the linear factor. Idle servers with no TTFT history
tie at the pool median and are broken by queue length, then at random. A floor of 1 ms keeps
the queue term meaningful when the TTFT estimate is ~0.
"""

from collections.abc import Sequence

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import LowestCost


def expected_ttfts(candidates: Sequence[BackendView], snap: Snapshot) -> list[float]:
    p = snap.pending
    n = len(p)
    return [
        (b.ttft if b.ttft > 1e-3 else 1e-3) * (1.0 + b.waiting + (p[b.index] if b.index < n else 0))
        for b in candidates
    ]


STRATEGY = LowestCost("least-latency", expected_ttfts)
