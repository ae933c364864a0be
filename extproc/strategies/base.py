"""What a strategy is: a pure function of (request facts, snapshot) -> one backend.

A strategy only ranks *candidates* it is given; the eligibility rules (unhealthy
exclusion, cold cache, fallback on error) live once in :mod:`extproc.decide`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from extproc.snapshot import BackendView, Snapshot


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the service knows about one request when it decides."""

    seq: int = 0  # per-process request counter (makes round-robin a pure function)
    path: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    model: str | None = None


class Strategy(Protocol):
    name: str
    # False for load-blind strategies (random, round-robin): they work on a cold cache.
    needs_metrics: bool

    def choose(
        self, facts: RequestFacts, snap: Snapshot, candidates: Sequence[BackendView], rng: random.Random
    ) -> BackendView: ...


def pick_lowest(
    candidates: Sequence[BackendView], cost: Callable[[BackendView], float], rng: random.Random
) -> BackendView:
    """The candidate with the lowest cost; exact ties are broken at random."""
    best: list[BackendView] = []
    best_cost = float("inf")
    for b in candidates:
        c = cost(b)
        if c < best_cost:
            best_cost, best = c, [b]
        elif c == best_cost:
            best.append(b)
    if not best:  # every cost was inf/nan: still answer
        return rng.choice(candidates)
    return best[0] if len(best) == 1 else rng.choice(best)


@dataclass(frozen=True, slots=True)
class LowestCost:
    """A strategy defined by a cost function of one backend (lower is better)."""

    name: str
    cost_of: Callable[[BackendView, Snapshot], float]
    needs_metrics: bool = True

    def choose(
        self, facts: RequestFacts, snap: Snapshot, candidates: Sequence[BackendView], rng: random.Random
    ) -> BackendView:
        return pick_lowest(candidates, lambda b: self.cost_of(b, snap), rng)
