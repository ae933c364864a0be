"""extproc/strategies/scorers/kv.py, through the least-kv-cache profile."""

from __future__ import annotations

from ...helpers import registry, scrape_ok, vm
from ..helpers import run


def test_least_kv_cache_picks_lowest_usage():
    reg, _ = registry(3)
    for i, kv in enumerate([0.9, 0.2, 0.5]):
        scrape_ok(reg, i, vm(kv=kv, running=0))
    assert run(reg, "least-kv-cache").backend.index == 1
