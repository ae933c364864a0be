"""A profile: scorers with weights, a picker, and which scorer names the decision's reason.

score(candidate) = Σ weight · scorer score / Σ weight, in [0, 1]; the picker chooses from it.

The load signals' part of the sum depends on the snapshot only, so it is computed once per
snapshot: ``static[i]`` (the weighted sum of the scraped values' scores) and ``slope[i]`` (what
one request in flight changes it by). A decision then costs one copy of ``static``, the
in-flight correction of the few candidates with requests in flight, one pass per request
scorer that has an opinion, and the picker: fast at 1,000 backends, whatever the number of
load signals. (A scorer with no opinion adds the same to every candidate; its weight still
counts in Σ weight.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from extproc.snapshot import BackendView
from extproc.strategies.base import Context, Params, Picker, Ranking, Reason, Scorer, Scores


@dataclass(frozen=True, slots=True)
class Use:
    """One scorer in a profile."""

    scorer: Scorer
    weight: float
    params: Params  # the scorer's defaults, overridden by the profile


@dataclass(frozen=True, slots=True, eq=False)  # identity: a profile keys its per-snapshot cache
class Profile:
    name: str
    uses: tuple[Use, ...]
    picker: Picker
    picker_params: Params
    reason_from: str | None = None  # the scorer whose explain() names the reason
    description: str = ""
    # Derived once (per decision they would cost a loop):
    # True when every scorer needs scraped metrics: on a cold cache decide.py then uses the
    # fallback instead (reason ``cold-cache``).
    needs_metrics: bool = field(init=False)
    _signals: tuple[Use, ...] = field(init=False, repr=False)
    _requests: tuple[Use, ...] = field(init=False, repr=False)
    _explainer: Use | None = field(init=False, repr=False)
    _factor: float = field(init=False, repr=False)  # 1 / Σ weight

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        uses = self.uses
        set_(self, "needs_metrics", bool(uses) and all(u.scorer.needs_metrics for u in uses))
        set_(self, "_signals", tuple(u for u in uses if u.scorer.signal is not None))
        set_(self, "_requests", tuple(u for u in uses if u.scorer.score is not None))
        set_(
            self,
            "_explainer",
            next(
                (
                    u
                    for u in uses
                    if u.scorer.name == self.reason_from and u.scorer.explain is not None
                ),
                None,
            ),
        )
        total = sum(u.weight for u in uses)
        set_(self, "_factor", 1.0 / total if total > 0 else 1.0)

    @property
    def weights(self) -> dict[str, float]:
        return {u.scorer.name: u.weight for u in self.uses}

    def _static(self, ctx: Context) -> tuple[list[float], list[float]]:
        """Per snapshot: Σ weight · (offset + scale · value) and Σ weight · scale · unit (the
        profile has at least one load signal)."""
        static: list[float] = []
        slope: list[float] | None = None
        flat = 0.0  # the part of the slope that is the same for every candidate
        for k, use in enumerate(self._signals):
            sig = ctx.column(use.scorer.signal)  # type: ignore[arg-type]
            values, offset, scale = sig.affine()
            a, b = use.weight * offset, use.weight * scale
            if k == 0:
                static = [a + b * v for v in values]
            else:
                static = [s + a + b * v for s, v in zip(static, values)]
            unit = sig.unit
            if isinstance(unit, int | float):
                flat += b * unit
            elif slope is None:
                slope = [b * u for u in unit]
            else:
                slope = [s + b * u for s, u in zip(slope, unit)]
        if slope is None:
            return static, [flat] * len(static)
        return static, ([s + flat for s in slope] if flat else slope)

    def rank(self, ctx: Context) -> Ranking | None:
        """The combined score of every candidate; None when every candidate scores the same."""
        total: list[float] | None = None
        if self._signals:
            static, slope = ctx.column(lambda _: self._static(ctx), key=self)
            total = ctx.with_inflight(static, slope)
        for use in self._requests:
            s = use.scorer.score(ctx, use.params)  # type: ignore[misc]
            if s is None:
                continue  # no opinion: the same for every candidate
            if total is None:
                if len(self._requests) == 1:  # a lone scorer: rank on its own values, no pass
                    return Ranking(s, use.weight * self._factor)
                total = [0.0] * len(ctx.candidates)
            c = use.weight * s.scale  # the offset is the same for every candidate: dropped
            if not c:
                continue
            if s.nonzero is not None:  # e.g. the few servers holding the prompt's prefix
                v = s.values
                for i in s.nonzero:  # total is this decision's own list: updated in place
                    total[i] += c * v[i]
            else:
                total = [t + c * v for t, v in zip(total, s.values)]
        return None if total is None else Ranking(Scores(total), self._factor)

    def choose(self, ctx: Context) -> tuple[BackendView, Reason]:
        picker = self.picker
        if picker.reason is not None:  # load-blind: no scoring
            return picker.pick(ctx, None, self.picker_params), picker.reason
        chosen = picker.pick(ctx, self.rank(ctx), self.picker_params)
        ex = self._explainer
        if ex is not None:
            return chosen, ex.scorer.explain(ctx, ex.params, chosen)  # type: ignore[misc]
        return chosen, (Reason.METRICS if ctx.pool.eligible_known else Reason.COLD_CACHE)

    # -- derived profiles (per-route overrides, the legacy flags) -----------------------------
    def with_weights(self, weights: Mapping[str, float]) -> Profile:
        """Weights changed (0 removes a scorer, a new name adds one with its default parameters)."""
        from extproc.strategies.scorers import SCORERS

        unknown = sorted(set(weights) - set(SCORERS))
        if unknown:
            raise ValueError(f"unknown scorer(s) {unknown}; known: {sorted(SCORERS)}")
        uses = {u.scorer.name: u for u in self.uses}
        for name, w in weights.items():
            if not 0.0 <= w < float("inf"):
                raise ValueError(f"weight of {name} must be a finite non-negative number")
            old = uses.get(name)
            uses[name] = (
                replace(old, weight=w) if old else Use(SCORERS[name], w, dict(SCORERS[name].params))
            )
        return replace(self, uses=tuple(u for u in uses.values() if u.weight > 0))

    def with_params(self, scorer: str, params: Mapping[str, float]) -> Profile:
        """One scorer's parameters changed."""
        for i, use in enumerate(self.uses):
            if use.scorer.name == scorer:
                unknown = sorted(set(params) - set(use.scorer.params))
                if unknown:
                    raise ValueError(
                        f"scorer {scorer} has no parameter(s) {unknown}; known: {sorted(use.scorer.params)}"
                    )
                bad = sorted(k for k, v in params.items() if not v >= 0.0)
                if bad:
                    raise ValueError(f"parameter(s) {bad} of {scorer} must be non-negative numbers")
                new = replace(use, params={**use.params, **params})
                return replace(self, uses=self.uses[:i] + (new,) + self.uses[i + 1 :])
        raise ValueError(f"profile {self.name} has no scorer {scorer}")
