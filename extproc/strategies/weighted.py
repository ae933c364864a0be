"""``weighted``: a weighted sum of normalised scorers, each in [0, 1] (higher is better).

score = (w_queue·queue + w_kv·kv + w_prefix·prefix + w_lora·lora) / (sum of weights)

- queue  = 1 − (load − min) / (max − min) over the candidates, load = running + waiting +
           in-flight (1 for all when equal)
- kv     = 1 − kv_cache_usage
- prefix = fraction of the prompt's blocks the server probably has cached
- lora   = for an adapter: 1 if running there, 0.5 if a free adapter slot, 0 otherwise;
           1 for every server on base-model requests (neutral)
Defaults queue 2, kv 2, prefix 3, lora 1 (the Inference Extension's default profile plus LoRA);
per route through Envoy (see README "Tuning"). Ties break at random. On a cold cache queue
and kv are priors (equal for all), so prefix and in-flight decide [``cold-cache``].
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import Choice, RequestFacts, pick_lowest, request_load


def lora_score(model: str | None, b: BackendView) -> float:
    if model is None or model not in b.adapters:
        return 1.0
    if model in b.lora_running:
        return 1.0
    return 0.5 if b.lora_room else 0.0


@dataclass(frozen=True, slots=True)
class Weighted:
    name: str = "weighted"
    needs_metrics: bool = False

    def choose(
        self, facts: RequestFacts, snap: Snapshot, candidates: Sequence[BackendView], rng: random.Random
    ) -> Choice:
        w = facts.weights
        total = (w.queue + w.kv + w.prefix + w.lora) or 1.0
        loads = [request_load(b, snap) for b in candidates]
        lo, hi = min(loads), max(loads)
        span = hi - lo
        scores = {}
        for b, load in zip(candidates, loads):
            queue = 1.0 - (load - lo) / span if span > 0 else 1.0
            kv = 1.0 - min(max(b.kv_cache_usage, 0.0), 1.0)
            prefix = facts.prefix_match(b.endpoint) if facts.has_prompt else 0.0
            s = w.queue * queue + w.kv * kv + w.prefix * prefix + w.lora * lora_score(facts.model, b)
            scores[b.index] = s / total
        chosen = pick_lowest(candidates, lambda b: -scores[b.index], rng)
        return chosen, ("metrics" if snap.everyone.eligible_known else "cold-cache")


STRATEGY = Weighted()
