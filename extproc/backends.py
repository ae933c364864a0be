"""Mutable per-backend state (scrape results, failures, in-flight) and the snapshot builder.

All mutation happens on the event loop thread; decisions only ever see the immutable
:class:`~extproc.snapshot.Snapshot` built here.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from extproc.metrics_parser import VllmMetrics
from extproc.snapshot import BackendView, Freshness, Pool, Snapshot

# Consecutive hard failures (HTTP error, unparsable page) before a backend is unhealthy.
UNHEALTHY_AFTER_FAILURES = 3
# Consecutive scrape timeouts that mark a backend "overloaded" (slow, not down). Reported only
# (/backends): routing already treats it as suspect from the first timeout.
OVERLOADED_AFTER_TIMEOUTS = 3
# Samples kept for rate/TTFT windows; at a 0.1 s interval this is about 3 s of history.
HISTORY_SAMPLES = 32
# Shortest window over which a token rate is trusted (shorter deltas are mostly noise).
MIN_RATE_WINDOW_S = 0.5
# A server answering most requests with 5xx looks idle (failing is fast), so it would attract
# traffic: over the sample window, this many 5xx POSTs making at least this share of the
# answered ones mark it *failing* (treated as suspect) until the window holds fewer.
FAILING_MIN_ERRORS = 3
FAILING_MIN_SHARE = 0.5


def endpoint_of(url: str) -> str:
    """``http://10.0.0.7:8000`` -> ``10.0.0.7:8000`` (what Envoy's override_host matches)."""
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        raise ValueError(f"backend URL needs a host and a port: {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port}"


@dataclass(slots=True)
class _Sample:
    t: float
    tokens: float | None
    ttft_sum: float | None
    ttft_count: float | None
    post_2xx: float = 0.0
    post_5xx: float = 0.0


@dataclass(slots=True)
class SharedSlot:
    """With ``--workers N``: the backend's column in the in-flight counters the processes share
    (:mod:`extproc.shared_state`). Written by the main process, read by the workers."""

    index: int  # the column
    # Bumped each time the column is given to a backend: a worker drops the release of a pick
    # made for an earlier occupant (its count stays in the column's base).
    epoch: int
    # sent total at the start of each recent scrape, by generation (the main's begin_scrape)
    started: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class BackendRecord:
    url: str
    endpoint: str
    slot: int = -1  # index in the current ordering; -1 once removed
    metrics: VllmMetrics | None = None
    last_ok: float | None = None  # monotonic time of the last good scrape
    failures: int = 0  # consecutive hard failures (refused, HTTP error, unparsable)
    timeouts: int = 0  # consecutive timeouts
    last_error: str = ""
    generation: int = 0  # bumped at every scrape start
    open_by_generation: dict[int, int] = field(default_factory=dict)
    pending: int = 0  # open requests picked after the start of the last good scrape
    inflight: int = 0  # all open requests routed here (for the gauge)
    history: deque[_Sample] = field(default_factory=lambda: deque(maxlen=HISTORY_SAMPLES))
    token_rate: float | None = None
    ttft: float | None = None
    failing: bool = False  # most recent POSTs answered 5xx (from http_requests_total)
    served_models: frozenset[str] = frozenset()  # ids from GET /v1/models
    adapters: frozenset[str] = frozenset()  # ids from /v1/models that have a parent (LoRA)
    shared: SharedSlot | None = None  # --workers N: its in-flight counters (None: one process)

    @property
    def healthy(self) -> bool:
        return self.failures < UNHEALTHY_AFTER_FAILURES

    @property
    def overloaded(self) -> bool:
        return self.timeouts >= OVERLOADED_AFTER_TIMEOUTS

    @property
    def suspect(self) -> bool:
        """From the first failed or timed-out scrape until the next good one: excluded while any
        other backend is eligible, and valued as the busiest (a vLLM whose /metrics stalls is
        saturated or hung, never idle). Refused or unreachable goes further: unhealthy at once."""
        return self.failures > 0 or self.timeouts > 0 or self.failing


@dataclass(frozen=True, slots=True)
class PickToken:
    """Returned by :meth:`BackendRegistry.on_pick`; hand it back to :meth:`on_done`."""

    record: BackendRecord
    generation: int


class BackendRegistry:
    def __init__(
        self,
        *,
        stale_after: float,
        max_metrics_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stale_after = stale_after
        self.max_metrics_age = max_metrics_age
        self._clock = clock
        self._records: dict[str, BackendRecord] = {}  # by URL
        self._ordered: list[BackendRecord] = []
        self._by_endpoint: dict[
            str, int
        ] = {}  # ip:port -> slot (the served endpoint Envoy reports)
        self._pending: list[int] = []
        self._active: set[int] = set()  # slots whose pending count is not 0
        self._base = Snapshot()
        self._views: ViewCache = {}  # rebuilds reuse the views of backends that did not change
        self._rebuild_scheduled = False

    # -- membership ---------------------------------------------------------------
    def set_backends(self, urls: Iterable[str]) -> tuple[list[BackendRecord], list[BackendRecord]]:
        """Replace the pool; returns (added, removed). Known backends keep their state."""
        wanted = []
        endpoints: set[str] = set()
        for u in dict.fromkeys(urls):
            # One backend per ip:port (Envoy's key): http://X:8000 and https://X:8000 are one host.
            ep = self._records[u].endpoint if u in self._records else endpoint_of(u)
            if ep not in endpoints:
                endpoints.add(ep)
                wanted.append(u)
        keep = set(wanted)
        added = [
            BackendRecord(url=u, endpoint=endpoint_of(u)) for u in wanted if u not in self._records
        ]
        removed = [r for u, r in self._records.items() if u not in keep]
        for r in added:
            self._records[r.url] = r
        for r in removed:
            r.slot = -1
            del self._records[r.url]
        self._ordered = [self._records[u] for u in wanted]
        for i, r in enumerate(self._ordered):
            r.slot = i
        self._by_endpoint = {r.endpoint: i for i, r in enumerate(self._ordered)}
        self._pending = [r.pending for r in self._ordered]
        self._active = {i for i, x in enumerate(self._pending) if x}
        self.rebuild()
        return added, removed

    def slot_of(self, endpoint: str) -> int | None:
        """The slot of the backend at ``ip:port``, None if it is not in the pool."""
        return self._by_endpoint.get(endpoint)

    @property
    def records(self) -> list[BackendRecord]:
        return list(self._ordered)

    # -- scrape results -------------------------------------------------------------
    def begin_scrape(self, record: BackendRecord) -> int:
        """Requests picked from now on are not in this scrape's numbers."""
        record.generation += 1
        return record.generation

    def record_success(
        self, record: BackendRecord, metrics: VllmMetrics, started_generation: int
    ) -> None:
        now = self._clock()
        # Transitions that change eligibility are published at once, not at the next tick.
        newcomer, was_suspect = record.last_ok is None, record.suspect
        record.metrics = metrics
        record.last_ok = now
        record.failures = 0
        record.timeouts = 0
        record.last_error = ""
        # Requests picked before the PREVIOUS scrape started are now part of running/waiting.
        # Not "before this scrape": a request picked just before the scrape began may still be
        # in Envoy (buffering its body, connecting) and not yet in vLLM's numbers. Counting it
        # once more for one interval is safer than forgetting it (that herds requests).
        for g in [g for g in record.open_by_generation if g < started_generation - 1]:
            record.pending -= record.open_by_generation.pop(g)
        self._sync_pending(record)
        self._update_windows(record, now, metrics)
        if newcomer or was_suspect != record.suspect:
            self._rebuild_soon()  # newcomer, cold start or recovery: without waiting a tick

    def record_failure(
        self, record: BackendRecord, error: str, *, timeout: bool, down: bool = False
    ) -> None:
        """``timeout``: no answer in time (slow or hung). ``down``: refused or no connection."""
        record.last_error = error
        was = (record.healthy, record.overloaded, record.suspect)
        if timeout:
            record.timeouts += 1
        elif down:
            record.failures = max(record.failures + 1, UNHEALTHY_AFTER_FAILURES)
        else:
            record.failures += 1
        if (record.healthy, record.overloaded, record.suspect) != was:
            self._rebuild_soon()  # suspect/unhealthy/overloaded: stop routing on the old view

    def record_models(
        self, record: BackendRecord, ids: frozenset[str], adapters: frozenset[str]
    ) -> None:
        if (ids, adapters) != (record.served_models, record.adapters):
            record.served_models, record.adapters = ids, adapters
            self._rebuild_soon()  # model pools changed: route by the new ones at once

    @staticmethod
    def _update_windows(record: BackendRecord, now: float, m: VllmMetrics) -> None:
        tokens = None
        if m.prompt_tokens is not None or m.generation_tokens is not None:
            tokens = (m.prompt_tokens or 0.0) + (m.generation_tokens or 0.0)
        hist = record.history
        if hist and tokens is not None and hist[-1].tokens is not None and tokens < hist[-1].tokens:
            hist.clear()  # counter reset: the server restarted
        # No series yet (no POST answered since start) counts as 0, so the first errors show.
        ok, err = m.post_2xx or 0.0, m.post_5xx or 0.0
        if hist and (err < hist[-1].post_5xx or ok < hist[-1].post_2xx):
            hist.clear()  # counter reset: the server restarted
        hist.append(_Sample(now, tokens, m.ttft_sum, m.ttft_count, ok, err))
        first = hist[0]
        errors = err - first.post_5xx
        answered = errors + ok - first.post_2xx
        record.failing = errors >= FAILING_MIN_ERRORS and errors >= FAILING_MIN_SHARE * answered
        span = now - first.t
        if span >= MIN_RATE_WINDOW_S and tokens is not None and first.tokens is not None:
            record.token_rate = (tokens - first.tokens) / span
        # Recent TTFT = delta sum / delta count over the window; else the lifetime mean.
        if m.ttft_sum is not None and m.ttft_count:
            if (
                first.ttft_count is not None
                and first.ttft_sum is not None
                and m.ttft_count > first.ttft_count
            ):
                record.ttft = (m.ttft_sum - first.ttft_sum) / (m.ttft_count - first.ttft_count)
            elif record.ttft is None:
                record.ttft = m.ttft_sum / m.ttft_count

    # -- in-flight accounting ------------------------------------------------------
    def on_pick(self, index: int) -> PickToken | None:
        if not 0 <= index < len(self._ordered):
            return None
        r = self._ordered[index]
        g = r.generation
        r.open_by_generation[g] = r.open_by_generation.get(g, 0) + 1
        r.pending += 1
        r.inflight += 1
        self._pending[index] = r.pending
        self._active.add(index)
        return PickToken(r, g)

    def on_done(self, token: PickToken) -> None:
        r = token.record
        r.inflight -= 1
        count = r.open_by_generation.get(token.generation)
        if count:  # else: a good scrape has already counted it
            if count == 1:
                del r.open_by_generation[token.generation]
            else:
                r.open_by_generation[token.generation] = count - 1
            r.pending -= 1
            self._sync_pending(r)

    def _sync_pending(self, r: BackendRecord) -> None:
        if 0 <= r.slot < len(self._pending):
            self._pending[r.slot] = r.pending
            if r.pending:
                self._active.add(r.slot)
            else:
                self._active.discard(r.slot)

    # -- snapshots -------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The current base snapshot with live pending counts (cheap: one tuple copy)."""
        base = self._base
        if len(base.backends) != len(self._pending):
            return base
        # The few slots with requests in flight: scorers correct only those (fast at 1,000).
        return base.with_pending(tuple(self._pending), tuple(self._active))

    def rebuild_view(self) -> Snapshot:
        """A fresh snapshot for observers (admin, metrics) without replacing the live one."""
        return build_snapshot(self._ordered, self._clock(), self.stale_after, self.max_metrics_age)

    def _rebuild_soon(self) -> None:
        """Publish a change that matters to routing before the event loop's next round.

        A rebuild is O(pool) (~6 ms at 1,000 backends): when a whole pool appears at once, or
        every backend turns suspect in the same stall, one rebuild per loop round serves them
        all instead of one per backend (O(pool^2), seconds of a blocked loop). Without a running
        loop (synchronous callers) it rebuilds at once.
        """
        if self._rebuild_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.rebuild()
            return
        self._rebuild_scheduled = True
        loop.call_soon(self._scheduled_rebuild)

    def _scheduled_rebuild(self) -> None:
        self._rebuild_scheduled = False
        self.rebuild()

    def rebuild(self) -> Snapshot:
        now = self._clock()
        self._base = build_snapshot(
            self._ordered, now, self.stale_after, self.max_metrics_age, self._views
        )
        return self._base


def _freshness(record: BackendRecord, now: float, stale_after: float, max_age: float) -> Freshness:
    if record.last_ok is None or record.metrics is None:
        return Freshness.UNKNOWN
    age = now - record.last_ok
    if age <= stale_after:
        return Freshness.FRESH
    if age <= max_age:
        return Freshness.STALE
    return Freshness.UNKNOWN


_LOAD_FIELDS = ("running", "waiting", "kv_cache_usage", "token_rate", "ttft")


def _measured(record: BackendRecord) -> tuple[float | None, ...]:
    """The load fields' measured values, in _LOAD_FIELDS order (None: not measured)."""
    m = record.metrics
    assert m is not None
    return (m.running, m.waiting, m.kv_cache_usage, record.token_rate, record.ttft)


# id(record) -> (record, what its view was built from, the view)
ViewCache = dict[int, tuple["BackendRecord", tuple[object, ...], BackendView]]


def build_snapshot(
    records: list[BackendRecord],
    now: float,
    stale_after: float,
    max_age: float,
    reuse: ViewCache | None = None,
) -> Snapshot:
    """Pure: records + clock -> snapshot, with priors for what is not known.

    Prior for an unknown backend (or a missing field): the median over fresh backends
    (over stale ones if none is fresh). A *suspect* backend (its last scrape failed or timed
    out) is valued at no less than the busiest backend that still answers: slow /metrics means
    busy, never idle. When none answers, suspects keep their own last numbers, so the ranking
    among them survives (an unknown suspect then gets the maximum of what is known).

    ``reuse`` (updated in place) memoises views: a backend not scraped since the last build,
    whose state, freshness, position and priors did not change either, keeps its view. At
    1,000 backends a build per scrape interval then creates views only for the backends
    scraped (or aged into another freshness) since.
    """
    states = [_freshness(r, now, stale_after, max_age) for r in records]
    values = [
        _measured(r) if st is not Freshness.UNKNOWN else None for r, st in zip(records, states)
    ]
    fresh = [v for v, st in zip(values, states) if v is not None and st is Freshness.FRESH]
    basis = fresh or [v for v in values if v is not None]
    answering = [v for v, r in zip(values, records) if v is not None and not r.suspect]
    median: list[float] = []
    worst: list[float] = []
    worst_answering: list[float] = []
    for f in range(len(_LOAD_FIELDS)):
        xs = [x for v in basis if (x := v[f]) is not None]
        median.append(float(statistics.median(xs)) if xs else 0.0)
        # For rate, "worst" is the highest load too: a busy server moves many tokens.
        worst.append(float(max(xs)) if xs else 0.0)
        ys = [y for v in answering if (y := v[f]) is not None]
        worst_answering.append(float(max(ys)) if ys else 0.0)
    fills = (tuple(median), tuple(worst), tuple(worst_answering))
    views: list[BackendView] = []
    cache: ViewCache = {}
    for i, (r, fresh_state, measured) in enumerate(zip(records, states, values)):
        suspect = r.suspect
        key: tuple[object, ...] = ()
        if reuse is not None:
            # What the view is built from (the priors only where they are used).
            uses = measured is None or suspect or None in measured
            key = (
                i,
                r.last_ok,
                measured,
                r.metrics,
                fresh_state,
                r.healthy,
                r.overloaded,
                suspect,
                r.served_models,
                r.adapters,
                fills if uses else None,
            )
            old = reuse.get(id(r))
            if old is not None and old[0] is r and old[1] == key:
                views.append(old[2])
                cache[id(r)] = old
                continue
        prior_src = worst if suspect else median
        filled: list[float]
        if measured is None:
            filled, prior = prior_src, True
        elif suspect:
            # Its last numbers may look idle (taken before it stalled): never better than the
            # busiest server that still answers.
            filled = [max(0.0 if x is None else x, w) for x, w in zip(measured, worst_answering)]
            prior = False
        else:
            filled = [p if x is None else x for x, p in zip(measured, prior_src)]
            prior = False
        running, waiting, kv_cache_usage, token_rate, ttft = filled
        view = BackendView(
            index=i,
            endpoint=r.endpoint,
            url=r.url,
            freshness=fresh_state,
            healthy=r.healthy,
            overloaded=r.overloaded,
            suspect=suspect,
            scraped_at=r.last_ok,
            prior=prior,
            running=running,
            waiting=waiting,
            kv_cache_usage=kv_cache_usage,
            token_rate=token_rate,
            ttft=ttft,
            metrics=r.metrics,
            models=r.served_models | frozenset(r.metrics.models if r.metrics else ()),
            adapters=r.adapters,
        )
        views.append(view)
        if reuse is not None:
            cache[id(r)] = (r, key, view)
    if reuse is not None:
        reuse.clear()
        reuse.update(cache)
    members: dict[str, list[BackendView]] = {}
    unknown_models: list[BackendView] = []
    for v in views:
        if not v.models:
            unknown_models.append(v)
        for model in v.models:
            members.setdefault(model, []).append(v)
    return Snapshot(
        backends=tuple(views),
        built_at=now,
        pending=tuple(r.pending for r in records),
        everyone=Pool.of(tuple(views)),
        model_pools={m: Pool.of(tuple(vs)) for m, vs in members.items()},
        models_unknown=Pool.of(tuple(unknown_models)),
    )
