"""A decision worker's parts that need no process (extproc/worker.py); the worker processes
are tested in tests/integration/test_workers.py."""

from __future__ import annotations

import pytest

from extproc.kv_index import KvIndex
from extproc.worker import KvIndexGauges
from extproc.worker import main as worker_main


def test_the_worker_entry_point_refuses_being_started_by_hand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert worker_main([]) == 2
    assert worker_main(["/nowhere", "x", "1"]) == 2
    assert "started by extproc" in capsys.readouterr().err
    # (die_with_the_main is not called here: it would tie the test runner's life to its parent;
    # tests/integration/test_workers.py kills a main and watches its workers go.)


def test_a_workers_kv_index_size_reaches_the_mains_metrics() -> None:
    index = KvIndex(max_blocks=100)
    server = index.add("10.0.0.1:8000")
    server.block_size = 16
    gauges = KvIndexGauges(index)
    gauges.update()
    assert gauges.block_size.labels("10.0.0.1:8000")._value.get() == 16
    index.remove("10.0.0.1:8000")
    gauges.update()  # left the pool: its series reads 0
    assert gauges.block_size.labels("10.0.0.1:8000")._value.get() == 0
    assert gauges.blocks.labels("10.0.0.1:8000")._value.get() == 0
