"""extproc/strategies/scorers/throughput.py, through the throughput profile."""

from __future__ import annotations

from ...helpers import registry, scrape_ok, vm
from ..helpers import run


def test_throughput_picks_lowest_token_rate(monkeypatch):
    reg, clock = registry(2)
    scrape_ok(reg, 0, vm(prompt=0, gen=0, running=1))
    scrape_ok(reg, 1, vm(prompt=0, gen=0, running=1))
    clock.advance(1.0)
    scrape_ok(reg, 0, vm(prompt=500, gen=500, running=1))  # 1000 tok/s
    scrape_ok(reg, 1, vm(prompt=50, gen=50, running=1))  # 100 tok/s
    assert run(reg, "throughput").backend.index == 1
