"""The decision rules shared by every strategy: who is eligible, when to fall back.

Order of rules (each gives the ``reason`` reported to Envoy and in metrics):
1. no backend at all             -> :class:`NoBackends` (the service answers 503)
2. a model was requested         -> only servers of that model (model pools); a model that no
   known server serves and no unknown server could serve -> :class:`UnknownModel` (404).
   A LoRA adapter prefers servers running it or with a free adapter slot.
3. every candidate unhealthy     -> all of them, reason ``all-unhealthy`` (``cold-cache`` if none
   of them has metrics yet)
4. a load-aware strategy and no candidate has metrics -> fallback, reason ``cold-cache``
5. otherwise the strategy ranks the candidates: reason ``metrics`` (or its own finer reason)
6. the strategy raised           -> fallback, reason ``fallback-error`` (never a dropped request)
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.snapshot import BackendView, Pool, Snapshot
from extproc.strategies.base import RequestFacts, Strategy

log = logging.getLogger(__name__)


class NoBackends(Exception):
    """The pool is empty: nothing can serve the request."""


class UnknownModel(Exception):
    """No server of the pool serves the requested model."""

    def __init__(self, model: str, available: Sequence[str]) -> None:
        super().__init__(model)
        self.model = model
        self.available = tuple(available)


@dataclass(frozen=True, slots=True)
class Decision:
    backend: BackendView
    strategy: str
    reason: str


def pool_for(facts: RequestFacts, snap: Snapshot) -> Pool:
    if facts.model is None or not snap.model_pools:
        return snap.everyone  # no model asked, or no server reports models: no filtering
    pool = snap.model_pools.get(facts.model)
    if pool is not None:
        return pool
    if snap.models_unknown.eligible:
        return snap.models_unknown  # maybe one of the servers we know nothing about yet
    raise UnknownModel(facts.model, sorted(snap.model_pools))


def lora_affine(model: str, candidates: tuple[BackendView, ...]) -> tuple[BackendView, ...]:
    """For an adapter: servers running it or with a free slot; never ones that must wait."""
    if not any(model in c.adapters for c in candidates):
        return candidates  # a base model
    affine = tuple(c for c in candidates if model in c.lora_running or c.lora_room)
    return affine or candidates


def decide(
    strategy: Strategy, fallback: Strategy, facts: RequestFacts, snap: Snapshot, rng: random.Random
) -> Decision:
    if not snap.backends:
        raise NoBackends("no backend is configured or discovered")
    pool = pool_for(facts, snap)
    candidates = pool.eligible
    if facts.model is not None and candidates:
        candidates = lora_affine(facts.model, candidates)
    if not candidates:
        raise NoBackends("no backend is configured or discovered")
    if strategy.needs_metrics and not pool.eligible_known:
        return Decision(_one(fallback.choose(facts, snap, candidates, rng)), strategy.name, "cold-cache")
    try:
        chosen = strategy.choose(facts, snap, candidates, rng)
    except Exception:
        log.exception("strategy %s failed; routing by fallback %s", strategy.name, fallback.name)
        return Decision(_one(fallback.choose(facts, snap, candidates, rng)), strategy.name, "fallback-error")
    if isinstance(chosen, tuple):
        backend, reason = chosen
    else:
        backend, reason = chosen, ("metrics" if strategy.needs_metrics else strategy.name)
    if pool.all_unhealthy and pool.eligible_known:
        # Only when something is known: a cold pool whose scrapes all fail (every vLLM still
        # loading) is a cold cache, not an outage.
        reason = "all-unhealthy"
    return Decision(backend, strategy.name, reason)


def _one(choice: BackendView | tuple[BackendView, str]) -> BackendView:
    return choice[0] if isinstance(choice, tuple) else choice
