"""``round-robin``: the request counter modulo the eligible backends. Load-blind."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import RequestFacts


@dataclass(frozen=True, slots=True)
class RoundRobin:
    name: str = "round-robin"
    needs_metrics: bool = False

    def choose(
        self, facts: RequestFacts, snap: Snapshot, candidates: Sequence[BackendView], rng: random.Random
    ) -> BackendView:
        return candidates[facts.seq % len(candidates)]
