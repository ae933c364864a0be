"""The immutable view of the backend pool that every routing decision reads.

A snapshot is rebuilt by :mod:`extproc.backends` once per scrape interval; a decision
pairs it with the live gateway-side in-flight counts (``pending``) and never mutates it.
Unknown backends carry *priors* instead of zeros so that a newcomer is neither flooded
(0 looks idle) nor starved (exclusion).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from extproc.metrics_parser import VllmMetrics


class Freshness(StrEnum):
    FRESH = "fresh"  # age <= stale_after
    STALE = "stale"  # older, but younger than max_metrics_age: last-known values still used
    UNKNOWN = "unknown"  # never scraped, or older than max_metrics_age: values are priors


@dataclass(frozen=True, slots=True)
class BackendView:
    """One backend as a strategy sees it. Load fields are measured or, if ``prior``, estimated."""

    index: int
    endpoint: str  # "ip:port", the value Envoy's override_host policy matches
    url: str
    freshness: Freshness
    healthy: bool  # False after N consecutive refused/erroring/unparsable scrapes
    overloaded: bool  # scrapes keep timing out: a busy server, never "idle"
    suspect: bool  # its last scrape failed or timed out: excluded while others are eligible
    scraped_at: float | None  # time.monotonic() of the last good scrape, None if never
    prior: bool  # True when the load fields below are priors, not measurements
    running: float
    waiting: float
    kv_cache_usage: float
    token_rate: float  # prompt + generation tokens/s over the recent window
    ttft: float  # recent mean time to first token, seconds
    metrics: VllmMetrics | None = None  # last-known raw values (models, LoRA, cache config)
    # Model ids served: the metrics' model_name labels plus /v1/models ids (LoRA adapters too).
    models: frozenset[str] = frozenset()
    adapters: frozenset[str] = frozenset()  # the subset of ``models`` that are LoRA adapters

    @property
    def known(self) -> bool:
        return self.freshness is not Freshness.UNKNOWN

    @property
    def lora_running(self) -> tuple[str, ...]:
        return self.metrics.lora_running if self.metrics else ()

    @property
    def lora_room(self) -> bool:
        """True if the server can load one more adapter without evicting a running one."""
        m = self.metrics
        return m is None or m.max_lora is None or len(m.lora_running) < m.max_lora


@dataclass(frozen=True, slots=True)
class Pool:
    """The backends a decision may choose from, with the eligibility facts of that subset."""

    # Healthy members whose last scrape worked (or that were never scraped yet); else the
    # healthy ones (all suspect: every /metrics stalls); else all members (none healthy).
    eligible: tuple[BackendView, ...]
    all_unhealthy: bool
    eligible_known: bool
    members: tuple[BackendView, ...] = ()  # every backend of the subset, eligible or not
    # LoRA adapters any eligible backend serves (a base model's request skips LoRA affinity)
    adapters: frozenset[str] = frozenset()
    # Values scorers derive from ``eligible`` alone (extproc.strategies Context.column): computed
    # once per snapshot build instead of once per request.
    cache: dict[object, object] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def of(views: tuple[BackendView, ...]) -> Pool:
        healthy = tuple(v for v in views if v.healthy)
        eligible = tuple(v for v in healthy if not v.suspect) or healthy or views
        adapters = frozenset().union(*(v.adapters for v in eligible if v.adapters))
        return Pool(
            eligible,
            bool(views) and not healthy,
            any(v.known for v in eligible),
            views,
            adapters,
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    backends: tuple[BackendView, ...] = ()
    built_at: float = 0.0
    # Requests sent to backend i since its last good scrape and not yet finished, aligned
    # with ``backends``. Added to scraped load so a burst between scrapes spreads out.
    pending: tuple[int, ...] = field(default=())
    # Indices i with pending[i] > 0, in any order; None: not known (derived from ``pending``).
    active: tuple[int, ...] | None = None
    # Precomputed once per build so a decision does no O(n) filtering:
    everyone: Pool = Pool((), False, False)  # the whole pool
    # Per served model id (base models and adapters). Empty when no backend reports models
    # (then requests are not filtered by model).
    model_pools: Mapping[str, Pool] = field(default_factory=dict)
    # Backends whose models are not known yet (never scraped): a model nobody known serves
    # may still be served by one of them.
    models_unknown: Pool = Pool((), False, False)

    def with_pending(
        self, pending: tuple[int, ...], active: tuple[int, ...] | None = None
    ) -> Snapshot:
        return Snapshot(
            self.backends,
            self.built_at,
            pending,
            active,
            self.everyone,
            self.model_pools,
            self.models_unknown,
        )

    @property
    def eligible(self) -> tuple[BackendView, ...]:
        return self.everyone.eligible

    @property
    def all_unhealthy(self) -> bool:
        return self.everyone.all_unhealthy

    @property
    def cold(self) -> bool:
        """No eligible backend has usable metrics: load-aware strategies cannot decide."""
        return not self.everyone.eligible_known
