"""``prefix-cache``: send a request to the server that probably holds its prompt prefix.

Rule (reasons in brackets):
1. match = fraction of the prompt's blocks the server probably has cached (the gateway's
   approximate prefix index, see extproc/prefix_index.py).
2. best = highest match; ties go to the lower load (running + waiting + in-flight), then random.
3. Load guard [``load-guard``]: if best's load exceeds the least loaded candidate's by more than
   ``prefix_guard_abs`` requests AND by the factor ``prefix_guard_rel``, the hot prefix would
   bury one server: take the least loaded instead (it then caches the prefix too, and later
   requests spread over both). Like the Rust routers' cache_aware balance thresholds.
4. No match at all [``prefix-miss``]: the least loaded candidate. Otherwise [``prefix-hit``].
With a cold cache the loads are priors plus in-flight, so prefix affinity still works.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import Choice, RequestFacts, pick_lowest, pick_min, request_loads


@dataclass(frozen=True, slots=True)
class PrefixCache:
    name: str = "prefix-cache"
    needs_metrics: bool = False

    def choose(
        self, facts: RequestFacts, snap: Snapshot, candidates: Sequence[BackendView], rng: random.Random
    ) -> Choice:
        load_list = request_loads(candidates, snap)
        least = pick_min(candidates, load_list, rng)
        if not facts.has_prompt:
            return least, "prefix-miss"
        loads = {b.index: x for b, x in zip(candidates, load_list)}
        matches = {b.index: facts.prefix_match(b.endpoint) for b in candidates}
        best_match = max(matches.values())
        if best_match <= 0.0:
            return least, "prefix-miss"
        best = pick_lowest(
            [b for b in candidates if matches[b.index] == best_match], lambda b: loads[b.index], rng
        )
        low, high = loads[least.index], loads[best.index]
        if high - low > facts.prefix_guard_abs and high > facts.prefix_guard_rel * low:
            return least, "load-guard"
        return best, "prefix-hit"


STRATEGY = PrefixCache()
