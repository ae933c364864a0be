"""``latency``: a lower expected time to first token is better.

expected = ttft × (1 + waiting + in-flight): ``ttft`` is Δsum/Δcount of
``vllm:time_to_first_token_seconds`` over the last ~3 s of scrapes (the lifetime mean until a
second sample exists; the pool median while a server has served nothing), floored at 1 ms.
Each request ahead of a new one (waiting, or in flight) delays its first token by about one
more prefill-and-schedule round. Min–max normalised over the candidates and inverted.
"""

from collections.abc import Sequence

from extproc.snapshot import BackendView
from extproc.strategies.base import Scorer, Signal


def signal(candidates: Sequence[BackendView]) -> Signal:
    ttft = [max(0.001, b.ttft) for b in candidates]
    return Signal([t * (1.0 + b.waiting) for t, b in zip(ttft, candidates)], ttft)


SCORER = Scorer(
    "latency", "lowest expected time to first token (in-flight included)", signal=signal
)
