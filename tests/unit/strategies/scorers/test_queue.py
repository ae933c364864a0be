"""extproc/strategies/scorers/queue.py, through the least-request profile."""

from __future__ import annotations

from ...helpers import registry, scrape_ok, vm
from ..helpers import run


def test_least_request_counts_running_waiting_and_pending():
    reg, _ = registry(3)
    scrape_ok(reg, 0, vm(running=1, waiting=3))  # 4
    scrape_ok(reg, 1, vm(running=3, waiting=0))  # 3
    scrape_ok(reg, 2, vm(running=2, waiting=0))  # 2 + 2 pending = 4
    reg.on_pick(2)
    reg.on_pick(2)
    assert run(reg, "least-request").backend.index == 1
