"""extproc/strategies/scorers/latency.py, through the least-latency profile."""

from __future__ import annotations

from ...helpers import registry, scrape_ok, vm
from ..helpers import run


def test_least_latency_weighs_ttft_by_queue():
    reg, clock = registry(2)
    scrape_ok(reg, 0, vm(ttft_sum=0.0, ttft_count=0, waiting=0))
    scrape_ok(reg, 1, vm(ttft_sum=0.0, ttft_count=0, waiting=0))
    clock.advance(1.0)
    # backend 0: fast TTFT (0.1 s) but 9 queued -> 1.0 s; backend 1: 0.3 s, empty queue -> 0.3 s
    scrape_ok(reg, 0, vm(ttft_sum=1.0, ttft_count=10, waiting=9))
    scrape_ok(reg, 1, vm(ttft_sum=3.0, ttft_count=10, waiting=0))
    assert run(reg, "least-latency").backend.index == 1
