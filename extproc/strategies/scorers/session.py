"""``session``: the same session always goes to the same server.

Key: header ``x-session-id``, else the body's ``user``. Rendezvous (highest-random-weight)
hashing over the candidates: xxh3_64(endpoint, seed = xxh3_64(key)), the highest scores 1, the
others 0. A session moves only when its server leaves the candidates (gone, unhealthy, outside
the model's pool), and then only that server's sessions move, spread over the rest. No key: no
opinion.

Reasons, for a profile with ``reason: session``: ``session`` (a key), ``no-session`` (none).

Hashing every candidate costs ~0.1 µs each (0.1 ms at 1,000 backends), so a key's home is
memoised per candidate list (the same list from one snapshot to the next while the pool does
not change): a pure function's results, bounded, dropped whole when full.
"""

from collections.abc import Sequence

import xxhash

from extproc.snapshot import BackendView
from extproc.strategies.base import Context, Params, Reason, Scorer, Scores, one_hot

MEMO_LIMIT = 65_536  # keys remembered (about 10 MB at most: keys are kept as their hash)
_memo: dict[tuple[int, int], int] = {}


def _encoded(candidates: Sequence[BackendView]) -> tuple[int, list[bytes]]:
    """The candidates' endpoints, encoded, and a fingerprint of that list."""
    endpoints = [b.endpoint.encode() for b in candidates]
    return hash(tuple(endpoints)), endpoints


def home(key: str, endpoints: Sequence[bytes]) -> int:
    """Position of the key's server among ``endpoints`` (rendezvous hashing)."""
    return _home(xxhash.xxh3_64_intdigest(key.encode()), endpoints)


def _home(seed: int, endpoints: Sequence[bytes]) -> int:
    h = xxhash.xxh3_64_intdigest
    weights = [h(e, seed=seed) for e in endpoints]
    return weights.index(max(weights))


def score(ctx: Context, params: Params) -> Scores | None:
    key = ctx.facts.session_key
    if not key:
        return None
    fingerprint, endpoints = ctx.column(_encoded)
    seed = xxhash.xxh3_64_intdigest(key.encode())  # (a client's long keys are not kept)
    at = _memo.get((fingerprint, seed))
    if at is None or at >= len(endpoints):  # (a hash collision of two lists: still in range)
        if len(_memo) >= MEMO_LIMIT:
            _memo.clear()
        at = _memo[fingerprint, seed] = _home(seed, endpoints)
    return one_hot(len(ctx.candidates), at)


def explain(ctx: Context, params: Params, chosen: BackendView) -> Reason:
    return Reason.SESSION if ctx.facts.session_key else Reason.NO_SESSION


SCORER = Scorer(
    "session",
    "the session key's server (rendezvous hashing)",
    score=score,
    needs_metrics=False,
    explain=explain,
)
