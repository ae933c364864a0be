"""``throughput``: fewer tokens per second is better (the server with the most headroom).

rate = Δ(vllm:prompt_tokens_total + vllm:generation_tokens_total) / Δt over the last ~3 s of
scrapes (at least 0.5 s). The window lags the requests just sent, so each request not in it
yet, waiting in the server's queue or in flight, adds the server's mean rate per running
request (rate / running; the pool's mean while it runs nothing, 1 token/s while the whole pool
is idle). Min–max normalised over the candidates and inverted.
"""

from collections.abc import Sequence

from extproc.snapshot import BackendView
from extproc.strategies.base import Scorer, Signal, per_request_share


def signal(candidates: Sequence[BackendView]) -> Signal:
    rates = [b.token_rate for b in candidates]
    share = per_request_share(rates, candidates, 1.0)
    return Signal(
        [r + s * b.waiting for r, s, b in zip(rates, share, candidates)], share, norm="relative"
    )


SCORER = Scorer(
    "throughput", "lowest token rate (waiting and in-flight requests included)", signal=signal
)
