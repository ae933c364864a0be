"""The parts a routing profile is made of: request facts, the decision context, scores.

A decision runs like the Gateway API Inference Extension scheduler: *filters* narrow the
candidates (model pool, subset hint, health, LoRA affinity: all in :mod:`extproc.decide`),
*scorers* give every candidate a score in [0, 1] (higher is better), a *picker* chooses one.
A *profile* (what the API calls a strategy) is scorers with weights plus a picker, declared in
:mod:`extproc.strategies.profiles`; scorers live one per file in ``strategies/scorers/``.

Two kinds of scorer:

- a **load signal** (queue, KV usage, token rate, TTFT) reads only scraped metrics: it returns a
  :class:`Signal` per snapshot (a value per candidate, and what one request in flight adds to
  it). Its scores are computed once per scrape interval, and the in-flight correction
  (requests sent since the last scrape) is applied per decision, in one place
  (:meth:`Context.with_inflight`), to the candidates that have requests in flight;
- a **request scorer** (prefix match, session, LoRA) depends on the request: it returns
  :class:`Scores` per decision, or None when it has no opinion.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import compress, repeat
from operator import add, eq, ge, le, mul
from typing import Any, Literal, TypeVar

from extproc.snapshot import BackendView, Pool, Snapshot

Params = Mapping[str, float]
T = TypeVar("T")


class Reason(StrEnum):
    """Why a backend was chosen: the ``reason`` of metrics, logs and the x-routing-reason header."""

    METRICS = "metrics"  # a load-aware profile ranked candidates with known metrics
    COLD_CACHE = "cold-cache"  # no candidate has metrics yet (fallback, or priors only)
    ALL_UNHEALTHY = "all-unhealthy"  # every candidate is unhealthy: chosen among all of them
    FALLBACK_ERROR = "fallback-error"  # the profile raised: the fallback chose
    NO_BACKENDS = "no-backends"  # empty pool: Envoy's own policy chose
    RANDOM = "random"
    ROUND_ROBIN = "round-robin"
    PREFIX_HIT = "prefix-hit"
    PREFIX_MISS = "prefix-miss"
    LOAD_GUARD = "load-guard"  # the best prefix match was too loaded: the next best was taken
    SESSION = "session"
    NO_SESSION = "no-session"


def _no_prefix(endpoint: str) -> float:
    return 0.0


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
    # A superset of the backends whose prefix_match is above 0 (None: not known, ask every
    # candidate). The prefix indexes know who holds a prompt's first block: when they are few,
    # the prefix scorer asks only them.
    prefix_holders: Callable[[], Collection[str]] | None = None
    prompt_hashes: tuple[int, ...] = ()  # chained block hashes of the prompt (prefix index keys)
    # The gateway's subset hint (endpoint-picker protocol): pick only among backends at these
    # IPs. None = no hint (the whole pool).
    subset: frozenset[str] | None = None


# -- the in-flight correction: the one place it is computed ------------------------------------
def inflight(candidates: Sequence[BackendView], snap: Snapshot) -> Sequence[int]:
    """Requests sent to each candidate since its last good scrape, not yet in its scraped numbers.

    Every load signal adds these (the registry counts them per pick, see ``Snapshot.pending``):
    without them every request between two scrapes would see the same "best" server.
    """
    p = snap.pending
    n = len(p)
    if n == len(candidates) == len(snap.backends) and n and candidates[-1].index == n - 1:
        return p  # every backend, in snapshot order (candidates keep it): already aligned
    return [p[b.index] if b.index < n else 0 for b in candidates]


def request_loads(candidates: Sequence[BackendView], snap: Snapshot) -> list[float]:
    """running + waiting + in-flight per candidate: the load measure most scorers share."""
    return [b.running + b.waiting + x for b, x in zip(candidates, inflight(candidates, snap))]


def per_request_share(
    values: Sequence[float], candidates: Sequence[BackendView], idle: float
) -> list[float]:
    """``value / running`` per candidate: what one more request adds to a windowed signal (token
    rate, KV usage), the unit of its in-flight correction. A server running nothing gets the
    pool's mean per running request (``idle`` while nothing runs anywhere)."""
    running = [b.running for b in candidates]
    total = sum(running)
    mean = sum(values) / total if total >= 1 else idle
    return [v / r if r >= 1 else mean for v, r in zip(values, running)]


def _positions(candidates: Sequence[BackendView]) -> dict[int, int]:
    return {b.index: j for j, b in enumerate(candidates)}


def scraped_load(candidates: Sequence[BackendView]) -> list[float]:
    """running + waiting per candidate, as scraped (no in-flight requests)."""
    return [float(b.running + b.waiting) for b in candidates]  # floats: int * float is slower


# Below this many candidates one C-speed pass is cheaper than the bookkeeping that avoids it.
_SCAN_BELOW = 64


def _by_load(candidates: Sequence[BackendView]) -> list[int]:
    """Positions sorted by scraped load (none with a NaN among them: no order to trust)."""
    loads = scraped_load(candidates)
    if any(x != x for x in loads):
        return []
    return sorted(range(len(loads)), key=loads.__getitem__)


class Context:
    """One decision: its request, snapshot, model pool and candidates, plus values derived from
    them, each computed at most once per decision (``pending``, ``loads``) or once per snapshot
    (:meth:`column`)."""

    __slots__ = (
        "_active",
        "_least",
        "_loads",
        "_pending",
        "candidates",
        "facts",
        "memo",
        "pool",
        "rng",
        "snap",
    )

    def __init__(
        self,
        facts: RequestFacts,
        snap: Snapshot,
        pool: Pool,
        candidates: Sequence[BackendView],
        rng: random.Random,
    ) -> None:
        self.facts = facts
        self.snap = snap
        self.pool = pool  # the request's model pool (after the subset hint); candidates are its eligible part
        self.candidates = candidates
        self.rng = rng
        self.memo: dict[str, Any] = {}  # scorers may leave values here for their explain()
        self._pending: Sequence[int] | None = None
        self._active: list[int] | None = None
        self._loads: list[float] | None = None
        self._least: float | None = None

    @property
    def pending(self) -> Sequence[int]:
        """The in-flight count per candidate (see :func:`inflight`)."""
        p = self._pending
        if p is None:
            p = self._pending = inflight(self.candidates, self.snap)
        return p

    @property
    def active(self) -> list[int]:
        """Positions (among the candidates) of those with requests in flight."""
        a = self._active
        if a is None:
            snap, p = self.snap, self.pending
            known = snap.active
            if known is None:  # a snapshot built without it (tests): derive it
                a = list(compress(range(len(p)), p)) if any(p) else []
            elif not known:
                a = []
            elif p is snap.pending:  # aligned: positions are backend indices
                a = list(known)
            else:
                pos = self.column(_positions)
                a = [pos[i] for i in known if i in pos]
            self._active = a
        return a

    def with_inflight(
        self, base: Sequence[float], unit: Sequence[float] | None = None
    ) -> list[float]:
        """THE in-flight correction: ``base[i] + unit[i] * in-flight[i]`` per candidate (``unit``
        1 when None): what one more request adds to a signal, times the requests sent to the
        candidate since its last scrape. Usually few candidates have requests in flight, and
        only their entries are touched."""
        active = self.active
        p = self.pending
        if len(active) > len(base) >> 2:  # most of them: one C-speed pass instead
            return list(map(add, base, p if unit is None else map(mul, unit, p)))
        out = list(base)
        if unit is None:
            for i in active:
                out[i] += p[i]
        else:
            for i in active:
                out[i] += unit[i] * p[i]
        return out

    @property
    def loads(self) -> list[float]:
        """running + waiting + in-flight per candidate."""
        x = self._loads
        if x is None:
            x = self._loads = self.with_inflight(self.column(scraped_load))
        return x

    @property
    def least_load(self) -> float:
        """``min(loads)`` without a pass over every candidate: requests in flight only add load,
        so the least is the least scraped load among the candidates with none in flight (from
        the candidates sorted by scraped load, once per snapshot) or one of those with some."""
        x = self._least
        if x is None:
            loads = self.loads
            order = None
            if len(loads) > _SCAN_BELOW and self.candidates is self.pool.eligible:
                order = self.column(_by_load)
            if not order:  # few, narrowed for this request, or a NaN load: the plain way
                x = min(loads)
            else:
                active = self.active
                busy = set(active)
                first = next((i for i in order if i not in busy), None)
                x = min(loads[i] for i in (active if first is None else [first, *active]))
            self._least = x
        return x

    def column(self, fn: Callable[[Sequence[BackendView]], Any], key: object = None) -> Any:
        """``fn(candidates)``, cached under ``key`` (default ``fn``) for the snapshot's lifetime
        when the candidates are the pool's eligible backends (the usual case): values that
        depend on scraped metrics only are then computed once per scrape interval, not once
        per request. ``fn`` must not depend on the request or on in-flight counts."""
        c = self.candidates
        if c is not self.pool.eligible:
            return fn(c)  # narrowed for this request (LoRA affinity): not shared
        cache = self.pool.cache
        k = fn if key is None else key
        found = cache.get(k)
        if found is None:
            found = cache[k] = fn(c)
        return found


# -- load signals ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Signal:
    """A scraped load signal of every candidate, and its in-flight unit.

    Normalised per snapshot, by ``norm``:

    - ``"minmax"``: over the candidates' range, never narrower than the mean ``unit`` (one
      request's worth: noise between near-equal servers is not blown up to the whole [0, 1]);
    - ``"relative"``: against the largest value (score ``1 - value / max``): a ratio-scale
      signal whose relative differences should count as such, e.g. a token rate that differs
      by 20 % between servers scores 0.8 and 1, not 0 and 1;
    - ``"absolute"``: values are fractions in [0, 1] already (score ``1 - value``).

    (Inverted when higher is better.) Each request in flight adds ``unit`` to the value, so it
    may push a score below 0: the candidate then ranks below every scraped value.
    """

    values: Sequence[float]  # per candidate, without the requests in flight (NaN: never the best)
    unit: Sequence[float] | float  # what one more request adds, per candidate or for all
    lower_is_better: bool = True
    norm: Literal["minmax", "relative", "absolute"] = "minmax"

    def affine(self) -> tuple[Sequence[float], float, float]:
        """(values, offset, scale): score = offset + scale * value (infinities replaced by the
        worst finite value)."""
        values = self.values
        lo, hi = (min(values), max(values)) if values else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN first, or infinities: clean up
            finite = [x for x in values if math.isfinite(x)]
            lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
            worst = hi if self.lower_is_better else lo
            values = [x if math.isfinite(x) else worst for x in values]
        # (A NaN elsewhere stays: it compares false, so it is never the best, nor near it.)
        lower = self.lower_is_better
        if self.norm == "absolute":
            return (values, 1.0, -1.0) if lower else (values, 0.0, 1.0)
        if self.norm == "relative":
            top = max(abs(lo), abs(hi))
            if not 0.0 < top < math.inf:
                return values, 1.0, 0.0
            return (values, 1.0, -1.0 / top) if lower else (values, 0.0, 1.0 / top)
        unit = (
            self.unit
            if isinstance(self.unit, int | float)
            else (sum(self.unit) / len(self.unit) if self.unit else 0.0)
        )
        span = max(hi - lo, abs(unit))
        if not 0.0 < span < math.inf:
            return values, 1.0, 0.0  # all equal and no unit: no information
        if lower:
            return values, 1.0 + lo / span, -1.0 / span
        return values, 1.0 - hi / span, 1.0 / span


# -- scores ------------------------------------------------------------------------------------
class Scores:
    """A score per candidate, in affine form: ``offset + scale * values[i]`` lies in [0, 1].

    The form lets a profile fold the normalisation into its weighted sum (one pass over the
    candidates for all scorers, none for a lone one). Min–max forms compute their range only
    when a profile needs it. Build one with :func:`direct`, :func:`inverted`,
    :func:`lower_is_better`, :func:`higher_is_better` or :func:`one_hot`.
    """

    __slots__ = ("_best", "_offset", "_scale", "higher", "nonzero", "values")

    def __init__(
        self,
        values: Sequence[float],
        scale: float | None = 1.0,
        offset: float = 0.0,
        *,
        higher: bool = True,
        nonzero: Sequence[int] | None = None,
    ):
        self.values = values
        # Positions (ascending) of the only non-zero values (>= 0, higher better), when few: a
        # profile adds just those, a ranking of these scores alone looks only at them.
        self.nonzero = nonzero
        self.higher = higher if scale is None else scale >= 0  # direction: higher values better?
        self._scale = scale  # None: min-max, computed on first use
        self._offset = offset
        self._best: float | None = None

    @property
    def best(self) -> float:
        """The best raw value (the highest, or the lowest when lower is better)."""
        b = self._best
        if b is None:
            v, nz = self.values, self.nonzero
            if nz is not None and self.higher:  # the rest are 0: no pass over them
                b = max(map(v.__getitem__, nz), default=0.0)
                if len(nz) < len(v):
                    b = max(b, 0.0)
            else:
                b = max(v) if self.higher else min(v)
            self._best = b
        return b

    @property
    def scale(self) -> float:
        if self._scale is None:
            self._minmax()
        return self._scale  # type: ignore[return-value]

    @property
    def offset(self) -> float:
        if self._scale is None:
            self._minmax()
        return self._offset

    def _minmax(self) -> None:
        v = self.values
        best = self._best
        lo = best if best is not None and not self.higher else min(v)
        hi = best if best is not None and self.higher else max(v)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or infinities: the finite range
            finite = [x for x in v if math.isfinite(x)]
            lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        span = hi - lo
        if span <= 0:
            self._scale, self._offset = 0.0, 1.0  # all equal: all score 1
        elif self.higher:
            self._scale, self._offset = 1.0 / span, -lo / span
        else:
            self._scale, self._offset = -1.0 / span, hi / span

    def normalised(self) -> list[float]:
        """The scores as a list (tests and debugging; profiles never need it)."""
        scale, offset = self.scale, self.offset
        return [
            min(1.0, max(0.0, offset + scale * v)) if math.isfinite(v) else 0.0 for v in self.values
        ]


def direct(values: Sequence[float], nonzero: Sequence[int] | None = None) -> Scores:
    """Values already in [0, 1], higher is better (``nonzero``: the positions of the only values
    above 0, if known)."""
    return Scores(values, nonzero=nonzero)


def inverted(values: Sequence[float]) -> Scores:
    """Values in [0, 1] where lower is better: the score is ``1 - value``."""
    return Scores(values, -1.0, 1.0)


def lower_is_better(costs: Sequence[float]) -> Scores:
    """Min–max normalised and inverted: the lowest cost scores 1, the highest 0 (all 1 when
    equal). NaN counts as the worst."""
    return Scores(costs, None, higher=False)


def higher_is_better(values: Sequence[float]) -> Scores:
    """Min–max normalised: the highest value scores 1, the lowest 0 (all 1 when equal)."""
    return Scores(values, None, higher=True)


def one_hot(n: int, i: int) -> Scores:
    """1 for candidate ``i``, 0 for the others."""
    values = [0.0] * n
    values[i] = 1.0
    return Scores(values, nonzero=(i,))


@dataclass(frozen=True, slots=True)
class Scorer:
    """One scorer: exactly one of ``signal`` (a load signal, per snapshot) and ``score`` (a
    request scorer: every candidate at once per decision, None for no opinion)."""

    name: str
    doc: str  # one line: what scores high (shown in errors and docs)
    signal: Callable[[Sequence[BackendView]], Signal] | None = None
    score: Callable[[Context, Params], Scores | None] | None = None
    needs_metrics: bool = True  # False: meaningful without scraped metrics (prefix, session, LoRA)
    params: Params = field(default_factory=dict)  # request scorers' parameters and their defaults
    # Names the decision's reason when a profile says ``reason: <this scorer>``.
    explain: Callable[[Context, Params, BackendView], Reason] | None = None

    def __post_init__(self) -> None:
        if (self.signal is None) == (self.score is None):
            raise ValueError(f"scorer {self.name}: give exactly one of signal= and score=")


# -- the combined ranking a picker reads ---------------------------------------------------------
class Ranking:
    """A profile's combined score per candidate: ``constant + factor * scores`` in [0, 1]."""

    __slots__ = ("factor", "scores")

    def __init__(self, scores: Scores, factor: float) -> None:
        self.scores = scores  # one scorer's scores, or the weighted sum of several
        self.factor = factor  # its weight / the profile's total weight

    def select(self, tolerance: float) -> int | tuple[int, ...] | list[bool] | None:
        """The candidates whose combined score is at most ``tolerance`` below the best (0: exact
        ties): the position of the only one, their positions (ascending) or a mask over the
        candidates, or None for all."""
        s = self.scores
        v = s.values
        best = s.best
        if not math.isfinite(best):
            return self._careful(tolerance)
        step = 0.0
        if tolerance > 0.0:
            scale = abs(s.scale * self.factor)
            if scale == 0.0:
                return None
            step = tolerance / scale
        nz = s.nonzero
        if nz is not None and s.higher:  # values >= 0, all 0 but nz: no pass over the zeros
            cut = best - step
            if cut <= 0.0:
                return None  # the zeros are in: everyone
            keep = tuple(i for i in nz if v[i] >= cut)
            return keep[0] if len(keep) == 1 else keep
        if tolerance > 0.0:
            return list(
                map(ge, v, repeat(best - step)) if s.higher else map(le, v, repeat(best + step))
            )
        if v.count(best) == 1:  # the usual case: C-speed, no list built
            return v.index(best)
        return list(map(eq, v, repeat(best)))

    def best_one(self, rng: random.Random) -> int:
        """Position of the best candidate, exact ties broken at random (C-speed scans, no list
        built). NaN or infinities: at random among the finite best."""
        s = self.scores
        v = s.values
        best = s.best
        if not math.isfinite(best):
            sel = self._careful(0.0)
            positions = range(len(v)) if sel is None else list(compress(range(len(v)), sel))
            return rng.choice(positions)
        nz = s.nonzero
        if nz is not None and s.higher and best > 0.0:  # the best are among nz (ascending)
            ties = [i for i in nz if v[i] == best]
            # as position_of: the k-th of the ties in order, k at random (same draw)
            return ties[0] if len(ties) == 1 else ties[rng.randrange(len(ties))]
        return position_of(v, best, rng)

    def _careful(self, tolerance: float) -> list[bool] | None:
        """NaN or infinities among the values: rank the finite ones (none finite: all)."""
        s = self.scores
        sign = 1.0 if s.higher else -1.0
        signed = [sign * x if math.isfinite(x) else -math.inf for x in s.values]
        best = max(signed)
        if best == -math.inf:
            return None
        cut = best - (
            tolerance / abs(s.scale * self.factor) if tolerance > 0.0 and s.scale else 0.0
        )
        return [x >= cut for x in signed]


def position_of(values: Sequence[float], value: float, rng: random.Random) -> int:
    """Position of ``value`` in ``values``; several: one at random (C-speed scans, no list)."""
    i = values.index(value)
    ties = values.count(value)
    if ties > 1:
        for _ in range(rng.randrange(ties)):
            i = values.index(value, i + 1)
    return i


def selected(
    candidates: Sequence[T], selection: int | tuple[int, ...] | list[bool] | None
) -> Sequence[T]:
    """The candidates (or any list aligned with them) a :meth:`Ranking.select` result keeps."""
    if selection is None:
        return candidates
    if isinstance(selection, int):
        return (candidates[selection],)
    if isinstance(selection, tuple):
        return [candidates[i] for i in selection]
    return list(compress(candidates, selection))


@dataclass(frozen=True, slots=True)
class Picker:
    """Chooses one candidate from the ranking (None: every candidate scored the same)."""

    name: str
    pick: Callable[[Context, Ranking | None, Params], BackendView]
    doc: str
    params: Params = field(default_factory=dict)
    # Set for load-blind pickers (they ignore scores): the profile skips scoring, and this is the
    # decision's reason.
    reason: Reason | None = None

    @property
    def load_blind(self) -> bool:
        return self.reason is not None
