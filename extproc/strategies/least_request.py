"""``least-request``: fewest requests, counting running + waiting + sent-since-last-scrape.

The in-flight term (``pending``) matters between scrapes: without it a burst of requests
arriving within one scrape interval would all pick the same "idle" server.
"""

from extproc.strategies.base import LowestCost, request_loads

STRATEGY = LowestCost("least-request", request_loads)
