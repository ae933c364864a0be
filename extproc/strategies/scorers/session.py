"""``session``: the same session always goes to the same server.

Key: header ``x-session-id``, else the body's ``user``. Rendezvous (highest-random-weight)
hashing over the candidates: xxh3_64(endpoint, seed = xxh3_64(key)), the highest scores 1, the
others 0. A session moves only when its server leaves the candidates (gone, unhealthy, outside
the model's pool), and then only that server's sessions move, spread over the rest. No key: no
opinion.

Reasons, for a profile with ``reason: session``: ``session`` (a key), ``no-session`` (none).
"""

from collections.abc import Sequence

import xxhash

from extproc.snapshot import BackendView
from extproc.strategies.base import Context, Params, Reason, Scorer, Scores, one_hot


def _encoded(candidates: Sequence[BackendView]) -> list[bytes]:
    return [b.endpoint.encode() for b in candidates]


def home(key: str, endpoints: Sequence[bytes]) -> int:
    """Position of the key's server among ``endpoints`` (rendezvous hashing)."""
    h = xxhash.xxh3_64_intdigest
    seed = h(key.encode())
    weights = [h(e, seed=seed) for e in endpoints]
    return weights.index(max(weights))


def score(ctx: Context, params: Params) -> Scores | None:
    key = ctx.facts.session_key
    if not key:
        return None
    return one_hot(len(ctx.candidates), home(key, ctx.column(_encoded)))


def explain(ctx: Context, params: Params, chosen: BackendView) -> Reason:
    return Reason.SESSION if ctx.facts.session_key else Reason.NO_SESSION


SCORER = Scorer(
    "session",
    "the session key's server (rendezvous hashing)",
    score=score,
    needs_metrics=False,
    explain=explain,
)
