"""extproc/strategies/scorers/lora.py: adapter affinity as a score."""

from __future__ import annotations

import random

from extproc.decide import decide
from extproc.strategies import SCORERS, RequestFacts

from ...helpers import registry, scrape_ok, vm
from ..helpers import RANDOM, ctx_of, profile


def test_lora_scorer_prefers_the_server_running_the_adapter():
    from dataclasses import replace as dc_replace

    reg, _ = registry(3)
    for i in range(3):
        reg.records[i].served_models = frozenset({"base", "ad1"})
        reg.records[i].adapters = frozenset({"ad1"})
    base = vm(models=("base",))
    scrape_ok(reg, 0, dc_replace(base, lora_running=(), max_lora=2))  # a free slot
    scrape_ok(reg, 1, dc_replace(base, lora_running=("ad1",), max_lora=2))  # running it
    scrape_ok(reg, 2, dc_replace(base, lora_running=("x", "y"), max_lora=2))  # full
    lora_only = profile({"lora": 1})
    ctx = ctx_of(reg, RequestFacts(model="ad1"))
    assert SCORERS["lora"].score(ctx, {}).normalised() == [0.5, 1.0, 0.0]
    assert (
        SCORERS["lora"].score(ctx_of(reg, RequestFacts(model="base")), {}) is None
    )  # a base model
    assert (
        decide(
            lora_only, RANDOM, RequestFacts(model="ad1"), reg.snapshot(), random.Random(0)
        ).backend.index
        == 1
    )
