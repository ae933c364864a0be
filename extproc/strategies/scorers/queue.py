"""``queue``: fewer requests is better.

load = running + waiting, plus 1 per request in flight (sent since the last scrape); min–max
normalised over the candidates and inverted: the least loaded scores 1, the most loaded 0 (a
range of at least one request). The Inference Extension's queue scorer, plus the in-flight
count, which moves with every pick: the signal that never herds.
"""

from collections.abc import Sequence

from extproc.snapshot import BackendView
from extproc.strategies.base import Scorer, Signal, scraped_load


def signal(candidates: Sequence[BackendView]) -> Signal:
    return Signal(scraped_load(candidates), 1.0)


SCORER = Scorer("queue", "fewest running + waiting + in-flight requests", signal=signal)
