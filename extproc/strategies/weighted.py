"""``weighted``: a weighted sum of normalised scorers, each in [0, 1] (higher is better).

score = (w_queue·queue + w_kv·kv + w_prefix·prefix + w_lora·lora) / (sum of weights)

- queue  = 1 − (load − min) / (max − min) over the candidates, load = running + waiting +
           in-flight (1 for all when equal)
- kv     = 1 − kv_cache_usage
- prefix = fraction of the prompt's blocks the server probably has cached
- lora   = for an adapter: 1 if running there, 0.5 if a free adapter slot, 0 otherwise;
           1 for every server on base-model requests (neutral)
Defaults queue 2, kv 2, prefix 3, lora 1 (the Inference Extension's default profile plus LoRA);
per route through Envoy (see README "Tuning"). Ties break at random. (Dividing by the sum of
the weights does not change the ranking, so the code skips it.) On a cold cache queue
and kv are priors (equal for all), so prefix and in-flight decide [``cold-cache``].
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import Choice, RequestFacts, pick_min, request_loads


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
        loads = request_loads(candidates, snap)
        lo, hi = min(loads), max(loads)
        span = hi - lo
        # Each scorer as one comprehension (fast for large pools); negated so that
        # pick_min picks the highest score.
        # Constant terms (w.queue·1, w.kv·1) do not change the ranking and are left out:
        # -(queue score) = wq·(load - lo) - w.queue, -(kv score) = w.kv·usage - w.kv.
        wq = w.queue / span if span > 0 else 0.0
        wkv = w.kv
        neg_scores = [wq * (x - lo) + wkv * b.kv_cache_usage for b, x in zip(candidates, loads)]
        if facts.has_prompt and w.prefix:
            match = facts.prefix_match
            neg_scores = [s - w.prefix * match(b.endpoint) for s, b in zip(neg_scores, candidates)]
        model = facts.model
        # For base-model requests every server scores 1 (a constant): skip the pass.
        if w.lora and model is not None and any(model in b.adapters for b in candidates):
            neg_scores = [s - w.lora * lora_score(model, b) for s, b in zip(neg_scores, candidates)]
        chosen = pick_min(candidates, neg_scores, rng)
        return chosen, ("metrics" if snap.everyone.eligible_known else "cold-cache")


STRATEGY = Weighted()
