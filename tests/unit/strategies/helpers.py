"""Helpers for the routing-decision tests (tests/unit/strategies/, tests/unit/test_decide.py)."""

from __future__ import annotations

import random

from extproc.decide import decide
from extproc.prefix_index import PrefixIndex
from extproc.strategies import FALLBACKS, PICKERS, SCORERS, STRATEGIES, RequestFacts
from extproc.strategies.base import Context
from extproc.strategies.profile import Profile, Use

from ..helpers import registry, scrape_ok, vm

RANDOM = FALLBACKS["random"]


def run(reg, name, facts=None, seed=0, profile=None, seq=0):
    """Decide with the built-in profile ``name`` (or ``profile``); ``seq`` when no ``facts``."""
    profile = profile or STRATEGIES[name]
    facts = facts or RequestFacts(seq=seq)
    return decide(profile, RANDOM, facts, reg.snapshot(), random.Random(seed))


def ctx_of(reg, facts=None, seed=0, candidates=None):
    snap = reg.snapshot()
    pool = snap.everyone
    return Context(
        facts or RequestFacts(),
        snap,
        pool,
        pool.eligible if candidates is None else candidates,
        random.Random(seed),
    )


def loaded(loads, **kw):
    reg, clock = registry(len(loads))
    for i, x in enumerate(loads):
        scrape_ok(reg, i, vm(running=x, **kw))
    return reg, clock


def profile(scorers, picker="max", **picker_params):
    uses = tuple(Use(SCORERS[n], w, dict(SCORERS[n].params)) for n, w in scorers.items())
    p = PICKERS[picker]
    return Profile("test", uses, p, {**p.params, **picker_params})


def prefix_facts(
    index: PrefixIndex, text: str, *, per_candidate: bool = False, **kw
) -> RequestFacts:
    """A prompt's facts as the processor builds them: the index names the holders
    (``per_candidate``: it does not, the scorer asks every candidate)."""
    hashes = index.hashes("m", text)

    return RequestFacts(
        has_prompt=True,
        prefix_match=lambda ep: index.match_fraction(ep, hashes),
        prefix_holders=None if per_candidate else lambda: index.holders(hashes),
        **kw,
    )
