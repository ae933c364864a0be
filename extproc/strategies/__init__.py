"""Built-in strategies, registered explicitly here (no import side effects).

Adding a strategy: write one module exposing an object that satisfies
:class:`~extproc.strategies.base.Strategy`, then add it to ``_BUILTINS`` below.
"""

from __future__ import annotations

from extproc.strategies import least_kv_cache, least_latency, least_request, throughput
from extproc.strategies.base import LowestCost, RequestFacts, Strategy, pick_lowest
from extproc.strategies.random_pick import RandomPick
from extproc.strategies.round_robin import RoundRobin

_BUILTINS: tuple[Strategy, ...] = (
    RandomPick(),
    RoundRobin(),
    least_request.STRATEGY,
    throughput.STRATEGY,
    least_kv_cache.STRATEGY,
    least_latency.STRATEGY,
)

STRATEGIES: dict[str, Strategy] = {s.name: s for s in _BUILTINS}
FALLBACKS: dict[str, Strategy] = {s.name: s for s in _BUILTINS if not s.needs_metrics}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}") from None


__all__ = ["FALLBACKS", "STRATEGIES", "LowestCost", "RequestFacts", "Strategy", "get_strategy", "pick_lowest"]
