"""``least-request``: fewest requests, counting running + waiting + sent-since-last-scrape.

The in-flight term (``pending``) matters between scrapes: without it a burst of requests
arriving within one scrape interval would all pick the same "idle" server.
"""

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import LowestCost


def request_load(b: BackendView, snap: Snapshot) -> float:
    return b.running + b.waiting + snap.pending_of(b.index)


STRATEGY = LowestCost("least-request", request_load)
