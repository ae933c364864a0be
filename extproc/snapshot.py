"""The immutable view of the backend pool that every routing decision reads.

A snapshot is rebuilt by :mod:`extproc.backends` once per scrape interval; a decision
pairs it with the live gateway-side in-flight counts (``pending``) and never mutates it.
Unknown backends carry *priors* instead of zeros so that a newcomer is neither flooded
(0 looks idle) nor starved (exclusion).
"""

from __future__ import annotations

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
    age: float | None  # seconds since the last good scrape, None if never
    prior: bool  # True when the load fields below are priors, not measurements
    running: float
    waiting: float
    kv_cache_usage: float
    token_rate: float  # prompt + generation tokens/s over the recent window
    ttft: float  # recent mean time to first token, seconds
    metrics: VllmMetrics | None = None  # last-known raw values (models, LoRA, cache config)

    @property
    def known(self) -> bool:
        return self.freshness is not Freshness.UNKNOWN


@dataclass(frozen=True, slots=True)
class Snapshot:
    backends: tuple[BackendView, ...] = ()
    built_at: float = 0.0
    # Requests sent to backend i since its last good scrape and not yet finished, aligned
    # with ``backends``. Added to scraped load so a burst between scrapes spreads out.
    pending: tuple[int, ...] = field(default=())
    # Precomputed once per build so a decision does no O(n) filtering:
    eligible: tuple[BackendView, ...] = ()  # healthy backends, or all if none is healthy
    all_unhealthy: bool = False
    eligible_known: bool = False  # at least one eligible backend has real metrics

    def with_pending(self, pending: tuple[int, ...]) -> Snapshot:
        return Snapshot(self.backends, self.built_at, pending, self.eligible, self.all_unhealthy, self.eligible_known)

    @property
    def cold(self) -> bool:
        """No eligible backend has usable metrics: load-aware strategies cannot decide."""
        return not self.eligible_known

    def pending_of(self, index: int) -> int:
        return self.pending[index] if index < len(self.pending) else 0

    def by_endpoint(self, endpoint: str) -> BackendView | None:
        for b in self.backends:
            if b.endpoint == endpoint:
                return b
        return None
