"""Built-in strategies, registered explicitly here (no import side effects).

Adding a strategy: write one module exposing an object that satisfies
:class:`~extproc.strategies.base.Strategy`, then add it to ``_BUILTINS`` below.
"""

from __future__ import annotations

from extproc.strategies import (
    least_kv_cache,
    least_latency,
    least_request,
    prefix_cache,
    session,
    throughput,
    weighted,
)
from extproc.strategies.base import LowestCost, RequestFacts, Strategy, Weights, pick_lowest
from extproc.strategies.random_pick import RandomPick
from extproc.strategies.round_robin import RoundRobin

_BUILTINS: tuple[Strategy, ...] = (
    RandomPick(),
    RoundRobin(),
    least_request.STRATEGY,
    throughput.STRATEGY,
    least_kv_cache.STRATEGY,
    least_latency.STRATEGY,
    prefix_cache.STRATEGY,
    session.STRATEGY,
    weighted.STRATEGY,
)

STRATEGIES: dict[str, Strategy] = {s.name: s for s in _BUILTINS}
# Load-blind strategies that need nothing from the request: usable as --fallback.
FALLBACKS: dict[str, Strategy] = {s.name: s for s in _BUILTINS if s.name in ("random", "round-robin")}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}") from None


__all__ = ["FALLBACKS", "STRATEGIES", "LowestCost", "RequestFacts", "Strategy", "Weights", "get_strategy", "pick_lowest"]
