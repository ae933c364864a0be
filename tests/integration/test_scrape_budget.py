"""--scrape-budget with many backends: the real service (``python -m extproc serve``) scrapes 200
cheap fake servers (bench/metrics_fakes.py, one process, the real vLLM captures); the fakes
count the GETs each port gets, so the intervals are measured on the servers' side."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.processes import free_port, http_get, poll_until, start_extproc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BACKENDS, BUSY, BASE = 200, 4, 0.2
IDLE_TARGET = 5.0  # phase 2's budget aims idle backends at 5x the base interval (cap: 10x)


@pytest.fixture
def fake_ports() -> Iterator[list[int]]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "metrics_fakes.py"), "--count", str(BACKENDS),
         "--busy", str(BUSY)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "bench/metrics_fakes.py did not start"
        yield json.loads(line)["ports"]
    finally:
        proc.terminate()
        proc.wait(10)


def service_samples(admin_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = http_get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5)
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def cpu_total(samples: dict) -> float:
    return sample(samples, "extproc_scrape_cpu_seconds_total") or 0.0


def scrape_count(samples: dict) -> float:
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "extproc_scrapes_total" and dict(labels).get("result") != "models_error"
    )


def hits(port: int) -> dict[int, int]:
    status, body = http_get(f"http://127.0.0.1:{port}/fake-stats", timeout=5)
    assert status == 200
    return {int(p): n for p, n in json.loads(body).items()}


def service(ports: list[int], log_dir: Path, budget: float):
    admin = free_port()
    proc = start_extproc(
        grpc_port=free_port(),
        admin_port=admin,
        backends=[f"http://127.0.0.1:{p}" for p in ports],
        args=["--scrape-interval", str(BASE), "--scrape-budget", str(budget),
              "--stale-after", "5", "--max-metrics-age", "20", "--drain-seconds", "0"],
        log_dir=log_dir,
        name=f"extproc-budget-{budget:g}",
    )  # fmt: skip
    return proc, admin


@pytest.mark.timeout(90)
def test_a_budget_stretches_idle_backends_while_busy_ones_keep_the_base_interval(
    fake_ports, log_dir
):
    # 1. No budget: every backend every 0.2 s; the service measures what one scrape costs, and
    # what its ticker (snapshot rebuilds) takes whatever the scrape rate.
    proc, admin = service(fake_ports, log_dir, budget=0)
    with proc:
        poll_until(
            lambda: (sample(service_samples(admin), "extproc_scrape_cost_seconds") or 0) > 0,
            timeout=15, what="a measured scrape cost", proc=proc,
        )  # fmt: skip
        first, t0 = service_samples(admin), time.monotonic()
        time.sleep(1.5)  # a window of scrapes to measure (measuring, not syncing)
        s, t1 = service_samples(admin), time.monotonic()
        cost = sample(s, "extproc_scrape_cost_seconds")
        assert cost is not None and 1e-6 < cost < 0.01
        assert sample(s, "extproc_scrape_interval_seconds", priority="idle") == BASE
        cores = (cpu_total(s) - cpu_total(first)) / (t1 - t0)
        scrapes_per_s = (scrape_count(s) - scrape_count(first)) / (t1 - t0)
        ticker = max(0.0, cores - scrapes_per_s * cost)

    # 2. A budget for the ticker, the busy ones at the base interval and the idle ones at ~5x.
    idle = BACKENDS - BUSY
    budget = round(ticker + cost * (BUSY / BASE + idle / (IDLE_TARGET * BASE)), 4)
    proc, admin = service(fake_ports, log_dir, budget=budget)
    with proc:

        def stretched() -> bool:
            s = service_samples(admin)
            return (
                sample(s, "extproc_scrape_budget_cores") == budget  # no stall back-off now
                and sample(s, "extproc_scrape_backends", priority="busy") == BUSY
                and sample(s, "extproc_scrape_interval_seconds", priority="busy") == BASE
                and (sample(s, "extproc_scrape_interval_seconds", priority="idle") or 0)
                >= 2.5 * BASE
            )

        poll_until(
            stretched, timeout=30, what="busy at the base interval, idle stretched", proc=proc
        )
        before, t0 = hits(fake_ports[0]), time.monotonic()
        time.sleep(3.0)  # the measurement window
        after, t1 = hits(fake_ports[0]), time.monotonic()

    rate = {p: (after.get(p, 0) - before.get(p, 0)) / (t1 - t0) for p in fake_ports}
    busy_rates = [rate[p] for p in fake_ports[:BUSY]]
    idle_rates = [rate[p] for p in fake_ports[BUSY:]]
    # Busy servers: every 0.2 s (5/s), allowing for a loaded box.
    assert min(busy_rates) >= 0.6 / BASE, busy_rates
    # Idle ones: stretched to >= 2.5x, so at most 2/s each, and well below the busy ones.
    assert statistics.median(idle_rates) <= 1.2 / (2.5 * BASE), statistics.median(idle_rates)
    assert statistics.median(idle_rates) * 2 < min(busy_rates)
    assert max(idle_rates) > 0  # still scraped, not dropped
