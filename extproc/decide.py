"""The decision rules shared by every strategy: who is eligible, when to fall back.

Order of rules (each gives the ``reason`` reported to Envoy and in metrics):
1. no backend at all             -> :class:`NoBackends` (the service answers 503)
1b. the gateway sent a subset hint -> only backends at those IPs; none of them in the pool, or
   none of them healthy -> :class:`SubsetUnavailable` (always 503, as the protocol asks)
2. a model was requested         -> only servers of that model (model pools); a model that no
   known server serves and no unknown server could serve -> :class:`UnknownModel` (404).
   A LoRA adapter prefers servers running it or with a free adapter slot.
3. every candidate unhealthy     -> all of them, reason ``all-unhealthy`` (``cold-cache`` if none
   of them has metrics yet)
4. a profile whose scorers all need metrics, and no candidate has any -> fallback, reason
   ``cold-cache``
5. otherwise the profile scores the candidates and its picker chooses: reason ``metrics``
   (``cold-cache`` while only priors are known), or the one its reason scorer names
6. the profile raised            -> fallback, reason ``fallback-error`` (never a dropped request)

Shedding (``--shed-queue-depth``, off by default): when every eligible candidate's scraped
queue is above the limit -> :class:`Shed` (the service answers 429). A candidate without
measured metrics never counts as full: missing data never sheds a request.

Eligible means healthy and not *suspect* (last scrape failed or timed out); suspect backends
are used only when every healthy one is suspect, unhealthy ones only when all are.

Every decision also names up to ``n_fallbacks`` other eligible servers, least loaded first:
Envoy tries them in order when the pick refuses the connection (endpoint-picker protocol).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from heapq import nsmallest

from extproc.snapshot import BackendView, Pool, Snapshot
from extproc.strategies.base import Context, Reason, RequestFacts, request_loads
from extproc.strategies.profile import Profile

log = logging.getLogger(__name__)


class NoBackends(Exception):
    """The pool is empty: nothing can serve the request."""


class SubsetUnavailable(NoBackends):
    """The gateway's subset hint names no healthy backend of the pool."""


class Shed(Exception):
    """Every candidate's queue is above --shed-queue-depth: drop the request (429)."""


class UnknownModel(Exception):
    """No server of the pool serves the requested model."""

    def __init__(self, model: str, available: Sequence[str]) -> None:
        super().__init__(model)
        self.model = model
        self.available = tuple(available)


# Above this many candidates, fallbacks are ranked among a random sample of them: they are only
# used when the pick fails, so an O(n) ranking per request at 1,000 backends is not worth it.
FALLBACK_SAMPLE = 16


@dataclass(frozen=True, slots=True)
class Decision:
    backend: BackendView
    strategy: str
    reason: Reason
    fallbacks: tuple[BackendView, ...] = ()

    @property
    def endpoints(self) -> str:
        """``ip:port,ip:port,...``: the pick, then the fallbacks (the routing header's value)."""
        if not self.fallbacks:
            return self.backend.endpoint
        return ",".join([self.backend.endpoint, *(b.endpoint for b in self.fallbacks)])


def rank_fallbacks(
    chosen: BackendView,
    candidates: Sequence[BackendView],
    snap: Snapshot,
    n: int,
    rng: random.Random,
) -> tuple[BackendView, ...]:
    """Up to ``n`` candidates other than ``chosen``, least loaded first (ties at random)."""
    if n <= 0 or len(candidates) < 2:
        return ()
    size = len(candidates)
    if size > FALLBACK_SAMPLE + 1:
        # Evenly spread over the pool from a random start: cheaper than rng.sample, and not
        # neighbours (adjacent addresses often share a node, and fail together).
        start, k = rng.randrange(size), FALLBACK_SAMPLE + 1
        sample = [candidates[(start + j * size // k) % size] for j in range(k)]
        others = [b for b in sample if b.index != chosen.index][:FALLBACK_SAMPLE]
    else:
        others = [b for b in candidates if b.index != chosen.index]
        rng.shuffle(others)  # random order among equal loads (a cold pool is all ties)
    loads = request_loads(others, snap)
    best = nsmallest(n, range(len(others)), key=loads.__getitem__)
    return tuple(others[i] for i in best)


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


def host_of(endpoint: str) -> str:
    """``ip`` of ``ip:port`` / ``[v6]:port`` (a bare IP is returned as is)."""
    if endpoint.startswith("["):
        return endpoint[1 : endpoint.find("]")] if "]" in endpoint else endpoint
    host, sep, port = endpoint.rpartition(":")
    if not sep or host.count(":") or not port.isdigit():
        return endpoint  # a bare IPv4/IPv6 address
    return host


def subset_pool(pool: Pool, subset: frozenset[str]) -> Pool:
    """The members of ``pool`` at the hinted IPs; SubsetUnavailable if none is healthy."""
    members = tuple(v for v in pool.members if host_of(v.endpoint) in subset)
    narrowed = Pool.of(members)
    if not members or narrowed.all_unhealthy:
        raise SubsetUnavailable(f"no healthy backend among the {len(subset)} hinted address(es)")
    return narrowed


def shed(pool: Pool, depth: float) -> bool:
    """True when every eligible candidate reports a queue above ``depth`` (measured, not prior)."""
    return all(b.known and not b.prior and b.waiting > depth for b in pool.eligible)


def decide(
    strategy: Profile,
    fallback: Profile,
    facts: RequestFacts,
    snap: Snapshot,
    rng: random.Random,
    n_fallbacks: int = 0,
    shed_queue_depth: float | None = None,
) -> Decision:
    if not snap.backends:
        raise NoBackends("no backend is configured or discovered")
    pool = pool_for(facts, snap)
    if facts.subset is not None:
        pool = subset_pool(pool, facts.subset)
    if shed_queue_depth is not None and pool.eligible and shed(pool, shed_queue_depth):
        raise Shed(f"every candidate's queue is above {shed_queue_depth:g}")
    decision = _decide(strategy, fallback, facts, snap, pool, rng)
    if n_fallbacks > 0:
        fallbacks = rank_fallbacks(decision.backend, pool.eligible, snap, n_fallbacks, rng)
        decision = Decision(decision.backend, decision.strategy, decision.reason, fallbacks)
    return decision


def _decide(
    strategy: Profile,
    fallback: Profile,
    facts: RequestFacts,
    snap: Snapshot,
    pool: Pool,
    rng: random.Random,
) -> Decision:
    candidates = pool.eligible
    if facts.model is not None and facts.model in pool.adapters:  # (no O(pool) scan otherwise)
        candidates = lora_affine(facts.model, candidates)
    if not candidates:
        raise NoBackends("no backend is configured or discovered")
    ctx = Context(facts, snap, pool, candidates, rng)
    if strategy.needs_metrics and not pool.eligible_known:
        return Decision(fallback.choose(ctx)[0], strategy.name, Reason.COLD_CACHE)
    try:
        backend, reason = strategy.choose(ctx)
    except Exception:
        log.exception("strategy %s failed; routing by fallback %s", strategy.name, fallback.name)
        return Decision(fallback.choose(ctx)[0], strategy.name, Reason.FALLBACK_ERROR)
    if pool.all_unhealthy and pool.eligible_known:
        # Only when something is known: a cold pool whose scrapes all fail (every vLLM still
        # loading) is a cold cache, not an outage.
        reason = Reason.ALL_UNHEALTHY
    return Decision(backend, strategy.name, reason)
