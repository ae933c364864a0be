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


def _no_prefix(endpoint: str) -> float:
    return 0.0


@dataclass(frozen=True, slots=True)
class Weights:
    """Weights of the ``weighted`` strategy's scorers (per route via Envoy, see README)."""

    queue: float = 2.0
    kv: float = 2.0
    prefix: float = 3.0
    lora: float = 1.0


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the service knows about one request when it decides."""

    seq: int = 0  # per-process request counter (makes round-robin a pure function)
    path: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    model: str | None = None  # from the body, when the body was read
    session_key: str | None = None  # x-session-id header, else the body's "user"
    has_prompt: bool = False  # a prompt was read, so prefix_match is meaningful
    # Fraction (0..1) of this request's prompt blocks the backend probably has cached.
    # Read-only view of the prefix index; the processor records the pick afterwards.
    prefix_match: Callable[[str], float] = _no_prefix
    weights: Weights = Weights()
    # Load guard of prefix-cache: leave the best-matching server once its load exceeds the
    # least loaded candidate's by more than this many requests AND by this factor.
    prefix_guard_abs: float = 8.0
    prefix_guard_rel: float = 1.5
    prompt_hashes: tuple[int, ...] = ()  # chained block hashes of the prompt (prefix index keys)
    # The gateway's subset hint (endpoint-picker protocol): pick only among backends at these
    # IPs. None = no hint (the whole pool).
    subset: frozenset[str] | None = None


Choice = BackendView | tuple[BackendView, str]
"""A strategy returns the backend, or (backend, reason) to report a finer reason."""


class Strategy(Protocol):
    name: str
    # False for strategies that handle a cold cache themselves (random, round-robin, session,
    # prefix-cache, weighted); True ones get the fallback, reason ``cold-cache``.
    needs_metrics: bool

    def choose(
        self, facts: RequestFacts, snap: Snapshot, candidates: Sequence[BackendView], rng: random.Random
    ) -> Choice: ...


def request_loads(candidates: Sequence[BackendView], snap: Snapshot) -> list[float]:
    """running + waiting + sent-since-last-scrape: the load measure most strategies share."""
    p = snap.pending
    n = len(p)
    return [b.running + b.waiting + (p[b.index] if b.index < n else 0) for b in candidates]


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


def pick_min(candidates: Sequence[BackendView], costs: Sequence[float], rng: random.Random) -> BackendView:
    """Like :func:`pick_lowest` with the costs already computed (C-speed ``min``)."""
    best = min(costs)
    if best != best:  # NaN somewhere in front: fall back to the careful path
        return pick_lowest(candidates, lambda b: costs[candidates.index(b)], rng)
    ties = [b for b, c in zip(candidates, costs) if c == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


@dataclass(frozen=True, slots=True)
class LowestCost:
    """A strategy defined by the costs of the candidates (lower is better).

    ``costs`` gets all candidates at once: one list comprehension per decision instead of a
    Python call per backend keeps 1,000-backend pools fast.
    """

    name: str
    costs: Callable[[Sequence[BackendView], Snapshot], list[float]]
    needs_metrics: bool = True

    def choose(
        self, facts: RequestFacts, snap: Snapshot, candidates: Sequence[BackendView], rng: random.Random
    ) -> BackendView:
        return pick_min(candidates, self.costs(candidates, snap), rng)
