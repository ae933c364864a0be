"""Decision time per strategy at 16 and 1,000 backends.

Run: ``make bench-decision`` (or ``python bench/bench_decision.py``). Writes
bench/results/decision.{json,md}. Two figures per strategy and pool size:
- ``decide``: the pure decision (snapshot -> backend) alone;
- ``handle``: the whole ext_proc message handling (header parse, decision, in-flight
  accounting, cached serialized response), i.e. the service's CPU per request.
Ratios are against ``random`` measured in the same invocation (the machine is noisy).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_results  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep  # noqa: E402

from extproc.backends import BackendRegistry  # noqa: E402
from extproc.decide import decide  # noqa: E402
from extproc.metrics_parser import VllmMetrics  # noqa: E402
from extproc.observability import Metrics  # noqa: E402
from extproc.processor import Processor  # noqa: E402
from extproc.strategies import FALLBACKS, STRATEGIES, RequestFacts  # noqa: E402


def make_registry(n: int, rng: random.Random) -> BackendRegistry:
    clock_t = [0.0]
    reg = BackendRegistry(stale_after=1e9, max_metrics_age=1e9, clock=lambda: clock_t[0])
    reg.set_backends([f"http://10.{i // 250}.{i % 250}.1:8000" for i in range(n)])
    for step in range(2):  # two scrapes so rates and recent TTFT exist
        clock_t[0] += 1.0
        for rec in reg.records:
            m = VllmMetrics(
                running=rng.randint(0, 64), waiting=rng.randint(0, 8), kv_cache_usage=rng.random(),
                prompt_tokens=1000.0 * (step + 1) * rng.random(), generation_tokens=1000.0 * (step + 1),
                ttft_sum=0.1 * (step + 1) * rng.random(), ttft_count=10.0 * (step + 1),
                prefix_cache_queries=None, prefix_cache_hits=None, block_size=16, num_gpu_blocks=1000,
                models=("m",), lora_running=(), lora_waiting=(), max_lora=None,
            )
            reg.record_success(rec, m, reg.begin_scrape(rec))
    reg.rebuild()
    return reg


def per_call_us(fn, min_time: float = 0.2, repeats: int = 5) -> float:
    """Median over repeats of the mean time per call, in microseconds."""
    n = 1
    while True:  # calibrate
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t > min_time / 5:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(samples)


def main() -> None:
    rng = random.Random(42)
    msg = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in [
                    (":method", b"POST"), (":path", b"/v1/chat/completions"), (":authority", b"localhost:10000"),
                    ("content-type", b"application/json"), ("user-agent", b"bench"), ("x-request-id", b"abc"),
                ]]
            )
        )
    )
    rows = []
    for n in (16, 1000):
        reg = make_registry(n, rng)
        fallback = FALLBACKS["random"]
        for name, strategy in STRATEGIES.items():
            facts = RequestFacts(seq=1)
            d_us = per_call_us(lambda: decide(strategy, fallback, facts, reg.snapshot(), rng))
            proc = Processor(reg, default_strategy=name, fallback=fallback, metrics=Metrics(), rng=rng)

            def handle() -> None:
                out = proc.handle(msg)
                if out.token is not None:
                    reg.on_done(out.token)

            h_us = per_call_us(handle)
            rows.append({"backends": n, "strategy": name, "decide_us": d_us, "handle_us": h_us})
    base = {(r["backends"]): r for r in rows if r["strategy"] == "random"}
    for r in rows:
        r["decide_ratio_vs_random"] = r["decide_us"] / base[r["backends"]]["decide_us"]
    lines = ["| backends | strategy | decide µs | handle µs | decide vs random |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['backends']} | {r['strategy']} | {r['decide_us']:.1f} | {r['handle_us']:.1f} | "
            f"{r['decide_ratio_vs_random']:.2f}x |"
        )
    md = "# Decision time per strategy\n\n`make bench-decision`\n\n" + "\n".join(lines) + "\n"
    write_results("decision", {"rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
