"""``session``: the same session always goes to the same server.

Key: header ``x-session-id``, else the body's ``user``. Rendezvous (highest-random-weight)
hashing over the eligible servers of the request's model: score = xxh3_64(key, endpoint);
the highest wins. A session moves only when its server leaves the pool or turns unhealthy,
and then only that server's sessions move (spread over the rest). Requests without a key
go to the least loaded server [``no-session``].
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from extproc.snapshot import BackendView, Snapshot
from extproc.strategies.base import Choice, RequestFacts, pick_min, request_loads


def rendezvous(key: str, candidates: Sequence[BackendView]) -> BackendView:
    seed = xxhash.xxh3_64_intdigest(key.encode())
    h = xxhash.xxh3_64_intdigest
    return max(candidates, key=lambda b: (h(b.endpoint.encode(), seed=seed), b.endpoint))


@dataclass(frozen=True, slots=True)
class Session:
    name: str = "session"
    needs_metrics: bool = False

    def choose(
        self, facts: RequestFacts, snap: Snapshot, candidates: Sequence[BackendView], rng: random.Random
    ) -> Choice:
        if not facts.session_key:
            return pick_min(candidates, request_loads(candidates, snap), rng), "no-session"
        return rendezvous(facts.session_key, candidates), "session"


STRATEGY = Session()
