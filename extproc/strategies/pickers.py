"""Pickers: how a profile turns scores into one backend.

``max`` takes the best score. ``near-best`` is the one against herding: the scraped signals
(token rate, KV usage, TTFT) lag the requests just sent, so between two scrapes the server that
looked best keeps looking best; among the candidates whose score is within ``tolerance`` of the
best it takes the least loaded by running + waiting + in-flight, a count that moves with every
pick. ``near-random`` samples uniformly among them instead (no shared in-flight count needed:
several service replicas do not herd either). ``random`` and ``round-robin`` ignore scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from extproc.snapshot import BackendView
from extproc.strategies.base import Context, Params, Picker, Ranking, Reason, position_of, selected


def pick_max(ctx: Context, ranking: Ranking | None, params: Params) -> BackendView:
    if ranking is None:
        return ctx.rng.choice(ctx.candidates)
    return ctx.candidates[ranking.best_one(ctx.rng)]


def pick_near_best(ctx: Context, ranking: Ranking | None, params: Params) -> BackendView:
    c = ctx.candidates
    sel = None if ranking is None else ranking.select(params["tolerance"])
    if isinstance(sel, int):
        return c[sel]
    loads: Sequence[float] = ctx.loads
    if sel is None:
        least = ctx.least_load  # every candidate: no pass over them all
    else:
        c, loads = selected(c, sel), selected(loads, sel)
        least = min(loads)
    if math.isnan(least):  # NaN loads (a broken metric): any of them
        return ctx.rng.choice(c)
    return c[position_of(loads, least, ctx.rng)]


def pick_near_random(ctx: Context, ranking: Ranking | None, params: Params) -> BackendView:
    return ctx.rng.choice(
        selected(ctx.candidates, None if ranking is None else ranking.select(params["tolerance"]))
    )


def pick_random(ctx: Context, ranking: Ranking | None, params: Params) -> BackendView:
    return ctx.rng.choice(ctx.candidates)


def pick_round_robin(ctx: Context, ranking: Ranking | None, params: Params) -> BackendView:
    c = ctx.candidates
    return c[ctx.facts.seq % len(c)]


PICKERS: dict[str, Picker] = {
    p.name: p
    for p in (
        Picker("max", pick_max, "the highest score; exact ties at random"),
        Picker(
            "near-best",
            pick_near_best,
            "of the candidates within `tolerance` of the highest score, the least loaded (running + "
            "waiting + in-flight); exact ties at random",
            {"tolerance": 0.0},
        ),
        Picker(
            "near-random",
            pick_near_random,
            "uniformly at random among the candidates within `tolerance` of the highest score",
            {"tolerance": 0.0},
        ),
        Picker("random", pick_random, "uniformly at random (scores ignored)", reason=Reason.RANDOM),
        Picker(
            "round-robin",
            pick_round_robin,
            "the request counter modulo the candidates (scores ignored)",
            reason=Reason.ROUND_ROBIN,
        ),
    )
}
