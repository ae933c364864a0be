"""``prefix``: the share of the prompt a server probably holds in its prefix cache.

match = fraction of the prompt's leading blocks found for the server in the prefix index (see
extproc/prefix_index.py). No prompt, or no server matches at all: no opinion.

Load guard (parameters ``guard_abs`` and ``guard_rel``, off by default): a candidate whose load
(running + waiting + in-flight) exceeds the least loaded candidate's by more than ``guard_abs``
requests AND by the factor ``guard_rel`` scores 0, so a hot prefix cannot bury one server: the
next best match, or the least loaded, takes the request (and then holds the prefix too). Like
the Rust routers' cache_aware balance thresholds.

Reasons, for a profile with ``reason: prefix``: ``prefix-hit`` (the pick holds the best match),
``load-guard`` (the best match was guarded away), ``prefix-miss`` (no match anywhere).
"""

import math
from collections.abc import Sequence
from itertools import compress

from extproc.snapshot import BackendView
from extproc.strategies.base import Context, Params, Reason, Scorer, Scores, direct


def _endpoints(candidates: Sequence[BackendView]) -> list[str]:
    return [b.endpoint for b in candidates]


def _positions(candidates: Sequence[BackendView]) -> dict[str, int]:
    return {b.endpoint: j for j, b in enumerate(candidates)}


def _matches(ctx: Context) -> tuple[list[float], list[int]]:
    """The match per candidate, and the positions (ascending) of those above 0."""
    facts = ctx.facts
    n = len(ctx.candidates)
    holders = None if facts.prefix_holders is None else facts.prefix_holders()
    if holders is None or len(holders) > n >> 2:  # many (a shared system prompt): ask everyone
        m = list(map(facts.prefix_match, ctx.column(_endpoints)))
        return m, list(compress(range(n), m))
    m = [0.0] * n  # few: ask only them, O(holders) rather than O(pool)
    held = []
    if holders:
        positions = ctx.column(_positions)
        match = facts.prefix_match
        for endpoint in holders:
            j = positions.get(endpoint)
            if j is not None and (x := match(endpoint)) > 0.0:  # a candidate holding some
                m[j] = x
                held.append(j)
        held.sort()
    return m, held


def score(ctx: Context, params: Params) -> Scores | None:
    if not ctx.facts.has_prompt:
        return None
    m, held = _matches(ctx)
    best = ctx.memo["prefix"] = max(map(m.__getitem__, held), default=0.0)
    if best <= 0.0:
        return None
    if params["guard_abs"] < math.inf:
        loads = ctx.loads
        lo = ctx.least_load
        limit = max(
            lo + params["guard_abs"], params["guard_rel"] * lo
        )  # guarded: a load above both
        for i in held:  # only the servers holding part of the prompt
            if loads[i] > limit:
                m[i] = 0.0
    return direct(m, held if len(held) <= len(m) >> 2 else None)


def explain(ctx: Context, params: Params, chosen: BackendView) -> Reason:
    best = ctx.memo.get("prefix", 0.0)
    if best <= 0.0:
        return Reason.PREFIX_MISS
    return (
        Reason.PREFIX_HIT if ctx.facts.prefix_match(chosen.endpoint) >= best else Reason.LOAD_GUARD
    )


SCORER = Scorer(
    "prefix",
    "largest share of the prompt probably in the server's prefix cache",
    score=score,
    needs_metrics=False,
    params={"guard_abs": math.inf, "guard_rel": 1.0},
    explain=explain,
)
