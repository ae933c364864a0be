"""The decision rules shared by every strategy: who is eligible, when to fall back.

Order of rules (each gives the ``reason`` reported to Envoy and in metrics):
1. no backend at all             -> :class:`NoBackends` (the service answers 503)
2. every backend unhealthy       -> all of them are candidates, reason ``all-unhealthy``
3. a load-aware strategy and no candidate has metrics -> fallback, reason ``cold-cache``
4. otherwise the strategy ranks the candidates: reason ``metrics`` (load-blind: its name)
5. the strategy raised           -> fallback, reason ``fallback-error`` (never a dropped request)
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import RequestFacts, Strategy

log = logging.getLogger(__name__)


class NoBackends(Exception):
    """The pool is empty: nothing can serve the request."""


@dataclass(frozen=True, slots=True)
class Decision:
    backend: BackendView
    strategy: str
    reason: str


def decide(
    strategy: Strategy, fallback: Strategy, facts: RequestFacts, snap: Snapshot, rng: random.Random
) -> Decision:
    candidates = snap.eligible
    if not candidates:
        raise NoBackends("no backend is configured or discovered")
    if strategy.needs_metrics and not snap.eligible_known:
        return Decision(fallback.choose(facts, snap, candidates, rng), strategy.name, "cold-cache")
    if snap.all_unhealthy:
        reason = "all-unhealthy"
    else:
        reason = "metrics" if strategy.needs_metrics else strategy.name
    try:
        chosen = strategy.choose(facts, snap, candidates, rng)
    except Exception:
        log.exception("strategy %s failed; routing by fallback %s", strategy.name, fallback.name)
        return Decision(fallback.choose(facts, snap, candidates, rng), strategy.name, "fallback-error")
    return Decision(chosen, strategy.name, reason)
