"""What ``--workers N`` costs per publication and per decision (extproc/shared_state.py).

Run: ``python bench/bench_shared_state.py`` (``--quick`` for a short run). Writes
bench/results/shared_state.{json,md}.

For pools of 16, 128 and 1,000 backends (every one scraped, real vLLM metrics):

- **publish** (the main, once per scrape interval and on transitions): encode the state and
  replace the state file (tmpfs where /dev/shm exists), bump the sequence number;
- **reload** (each worker, when the sequence moved): read + decode + rebuild the snapshot, next
  to ``rebuild`` (what one process spends per interval on the same snapshot: the baseline);
- **decision overhead**: ``snapshot()`` as a decision calls it, the worker's (sequence check +
  in-flight counts of every worker summed) against one process's registry, with 0 and 8
  backends holding requests in flight;
- **pipe alternative**: the same blob sent to each of 2 worker processes through a pipe
  (length-prefixed), the main's CPU per publication and the delivery latency (write to the
  worker's acknowledgement), against the state file's, whose "delivery" is one 8-byte read at the
  worker's next decision.

CPU figures are ``time.process_time`` per operation, medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import markdown_table, write_results  # noqa: E402

from extproc.backends import BackendRegistry  # noqa: E402
from extproc.metrics_parser import parse_vllm_metrics  # noqa: E402
from extproc.shared_state import (  # noqa: E402
    MainRegistry,
    MirrorRegistry,
    SharedCounters,
    StateFile,
    encode_state,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGE = (REPO_ROOT / "tests" / "fixtures" / "vllm-metrics-real.txt").read_text()
SIZES = (16, 128, 1000)

# The pipe reader: length-prefixed blobs on stdin, one byte back per blob.
_CHILD = """
import sys, struct
inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = inp.read(4)
    if len(head) < 4:
        break
    n = struct.unpack("<I", head)[0]
    data = inp.read(n)
    out.write(b"k"); out.flush()
"""


def cpu_us(fn: Callable[[], object], number: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(number):
            fn()
        runs.append((time.process_time() - t0) / number * 1e6)
    return statistics.median(runs)


def urls(n: int) -> list[str]:
    return [f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:8000" for i in range(n)]


def world(n: int, run_dir: Path) -> tuple[MainRegistry, MirrorRegistry, BackendRegistry]:
    counters = SharedCounters.create(run_dir / "counters", 2)
    main = MainRegistry(
        counters, StateFile(run_dir / "state", counters), stale_after=1.0, max_metrics_age=10.0
    )
    single = BackendRegistry(stale_after=1.0, max_metrics_age=10.0)
    for reg in (main, single):
        reg.set_backends(urls(n))
        for rec in reg.records:
            reg.record_success(rec, parse_vllm_metrics(PAGE), reg.begin_scrape(rec))
        reg.rebuild()
    mirror_counters = SharedCounters.attach(run_dir / "counters")
    mirror = MirrorRegistry(
        mirror_counters,
        StateFile(run_dir / "state", mirror_counters),
        1,
        stale_after=1.0,
        max_metrics_age=10.0,
        rebuild_after=3600.0,
    )
    mirror.snapshot()
    return main, mirror, single


def pipe_costs(blob: bytes, number: int, workers: int = 2) -> tuple[float, float]:
    """(main CPU µs per publication to ``workers`` pipes, median delivery latency µs)."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        for _ in range(workers)
    ]
    frame = struct.pack("<I", len(blob)) + blob
    latencies = []
    cpu = 0.0
    try:
        for _ in range(number):
            t0, c0 = time.perf_counter(), time.process_time()
            for child in children:
                assert child.stdin is not None
                child.stdin.write(frame)
                child.stdin.flush()
            cpu += time.process_time() - c0
            for child in children:
                assert child.stdout is not None
                child.stdout.read(1)
            latencies.append((time.perf_counter() - t0) * 1e6)
    finally:
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
            child.wait()
    return cpu / number * 1e6, statistics.median(latencies)


def measure(n: int, quick: bool) -> dict[str, Any]:
    number = max(3, (30 if quick else 200) // max(1, n // 16))
    repeats = 3 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-shared-", dir=_tmpfs()) as tmp:
        main, mirror, single = world(n, Path(tmp))
        blob = encode_state(1, main.records)
        publish = cpu_us(main.publish, number, repeats)

        def reload() -> None:
            mirror.loaded = -1  # as if a new state arrived
            mirror._seen = -1
            mirror.snapshot()

        reload_us = cpu_us(reload, number, repeats)
        rebuild = cpu_us(single.rebuild, number, repeats)
        decisions = 200 if quick else 2000
        idle_worker = cpu_us(mirror.snapshot, decisions, repeats)
        idle_single = cpu_us(single.snapshot, decisions, repeats)
        for i in range(8):
            mirror.on_pick(i)
            single.on_pick(i)
        busy_worker = cpu_us(mirror.snapshot, decisions, repeats)
        busy_single = cpu_us(single.snapshot, decisions, repeats)
        pipe_cpu, pipe_latency = pipe_costs(blob, 10 if quick else 50)
    return {
        "backends": n,
        "blob_bytes": len(blob),
        "publish_us": publish,
        "reload_us": reload_us,
        "rebuild_us": rebuild,
        "snapshot_worker_idle_us": idle_worker,
        "snapshot_single_idle_us": idle_single,
        "snapshot_worker_busy_us": busy_worker,
        "snapshot_single_busy_us": busy_single,
        "pipe_publish_cpu_us": pipe_cpu,
        "pipe_delivery_us": pipe_latency,
    }


def _tmpfs() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--name", default="shared_state", help="bench/results/<name>.json/.md")
    args = parser.parse_args(argv)
    rows = [measure(n, args.quick) for n in SIZES]
    table = markdown_table(
        [
            "backends",
            "state KB",
            "publish µs",
            "reload µs (worker)",
            "rebuild µs (1 process)",
            "snapshot µs worker / 1 process, idle",
            "same, 8 in flight",
            "pipe: main CPU µs (2 workers)",
            "pipe: delivery µs",
        ],
        [
            [
                r["backends"],
                f"{r['blob_bytes'] / 1024:.0f}",
                f"{r['publish_us']:.0f}",
                f"{r['reload_us']:.0f}",
                f"{r['rebuild_us']:.0f}",
                f"{r['snapshot_worker_idle_us']:.1f} / {r['snapshot_single_idle_us']:.1f}",
                f"{r['snapshot_worker_busy_us']:.1f} / {r['snapshot_single_busy_us']:.1f}",
                f"{r['pipe_publish_cpu_us']:.0f}",
                f"{r['pipe_delivery_us']:.0f}",
            ]
            for r in rows
        ],
        "rrrrrrrrr",
    )
    md = (
        "# --workers: cost of the shared state\n\n"
        "`python bench/bench_shared_state.py` (docs/scaling.md). Publish: the main, once per "
        "scrape interval. Reload: each worker, per publication. Snapshot: every decision. "
        "Pipe: the alternative transport, one pipe per worker.\n\n" + table + "\n"
    )
    write_results(args.name, {"rows": rows, "quick": args.quick}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
