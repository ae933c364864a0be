"""``lora``: for a LoRA adapter, 1 where it is running, 0.5 where a free adapter slot can load
it, 0 where loading it would have to wait for a running adapter to finish. No opinion on
base-model requests. (decide.py already narrows adapter requests to servers running the adapter
or with a free slot; this scorer prefers the first.)
"""

from collections.abc import Sequence

from extproc.snapshot import BackendView
from extproc.strategies.base import Context, Params, Scorer, Scores, direct


def _adapters(candidates: Sequence[BackendView]) -> frozenset[str]:
    return frozenset().union(*(b.adapters for b in candidates))


def lora_score(model: str, b: BackendView) -> float:
    if model not in b.adapters or model in b.lora_running:
        return 1.0
    return 0.5 if b.lora_room else 0.0


def score(ctx: Context, params: Params) -> Scores | None:
    model = ctx.facts.model
    if model is None or model not in ctx.column(_adapters):
        return None
    return direct([lora_score(model, b) for b in ctx.candidates])


SCORER = Scorer(
    "lora",
    "the requested LoRA adapter running (1) or loadable (0.5)",
    score=score,
    needs_metrics=False,
)
