"""``kv``: free KV cache is better: score = 1 − estimated usage.

usage is ``vllm:kv_cache_usage_perc`` (0..1). It lags: a request holds KV blocks only once it
is prefilled. So each request not in the figure yet, waiting in the server's queue or in
flight (sent since the last scrape), adds the server's mean share per running request
(usage / running; the pool's mean share while the server runs nothing, 1 % while the whole
pool is idle).
"""

from collections.abc import Sequence

from extproc.snapshot import BackendView
from extproc.strategies.base import Scorer, Signal, per_request_share


def signal(candidates: Sequence[BackendView]) -> Signal:
    usage = [b.kv_cache_usage for b in candidates]
    share = per_request_share(usage, candidates, 0.01)
    return Signal(
        [u + s * b.waiting for u, s, b in zip(usage, share, candidates)], share, norm="absolute"
    )


SCORER = Scorer(
    "kv", "most free KV cache (1 - usage; waiting and in-flight requests included)", signal=signal
)
