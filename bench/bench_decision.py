"""Decision time per strategy (routing profile) at 16 and 1,000 backends, optionally next to a
baseline version of the service.

Run: ``make bench-decision`` (or ``python bench/bench_decision.py``); to compare with an older
commit: ``make bench-decision ARGS="--baseline-rev <commit>"`` (its ``extproc/`` is exported
with ``git archive`` into a temporary directory) or ``--baseline DIR`` (a directory holding an
``extproc/`` package). Writes bench/results/decision.{json,md}. Two figures per strategy:

- ``decide``: the pure decision (snapshot -> backend) alone;
- ``handle``: the whole ext_proc message handling (header parse, decision, in-flight
  accounting, cached serialized response), i.e. the service's CPU per request.

Besides the plain cases (headers only: no prompt, no session key), three request-aware ones:
``+prompt`` (a prompt whose prefix some servers hold) and ``+key`` (a session key). ``first
after a rebuild``: the first decision on a fresh snapshot, which also computes what the
profile caches per snapshot (load signals are normalised and combined once per scrape
interval); every later decision on that snapshot costs ``decide``.

The machine is noisy (shared cores), so each figure is the median over ``--rounds`` rounds,
and every round measures the current code and the baseline in two fresh subprocesses one right
after the other (each imports its own ``extproc``); the ratio columns are the medians of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SIZES = (16, 1000)
# (row label, strategy, request kind); the kinds are built identically for every version.
EXTRA = (
    ("prefix-cache+prompt", "prefix-cache", "prompt"),
    ("weighted+prompt", "weighted", "prompt"),
    ("session+key", "session", "key"),
)


# -- the worker: runs in a subprocess, against the extproc at $BENCH_DECISION_ROOT -------------
def make_registry(n: int, rng: random.Random) -> Any:
    from extproc.backends import BackendRegistry
    from extproc.metrics_parser import VllmMetrics

    clock_t = [0.0]
    reg = BackendRegistry(stale_after=1e9, max_metrics_age=1e9, clock=lambda: clock_t[0])
    reg.set_backends([f"http://10.{i // 250}.{i % 250}.1:8000" for i in range(n)])
    for step in range(2):  # two scrapes so rates and recent TTFT exist
        clock_t[0] += 1.0
        for rec in reg.records:
            m = VllmMetrics(
                running=rng.randint(0, 64),
                waiting=rng.randint(0, 8),
                kv_cache_usage=rng.random(),
                prompt_tokens=1000.0 * (step + 1) * rng.random(),
                generation_tokens=1000.0 * (step + 1),
                ttft_sum=0.1 * (step + 1) * rng.random(),
                ttft_count=10.0 * (step + 1),
                prefix_cache_queries=None,
                prefix_cache_hits=None,
                block_size=16,
                num_gpu_blocks=1000,
                models=("m",),
                lora_running=(),
                lora_waiting=(),
                max_lora=None,
            )
            reg.record_success(rec, m, reg.begin_scrape(rec))
    reg.rebuild()
    return reg


def per_call_us(fn: Callable[[], object], min_time: float, repeats: int = 3) -> float:
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


def first_us(reg: Any, fn: Callable[[], object], times: int = 15) -> float:
    """Median time of the first decision after a snapshot rebuild (per-snapshot caches empty)."""
    samples = []
    for _ in range(times):
        reg.rebuild()
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e6)
    return statistics.median(samples)


def facts_for(kind: str, RequestFacts: Any) -> Any:
    if kind == "prompt":  # 10.0.8.1 and 10.0.80-89.1 hold half of the prompt (a fixed lookup)
        match = lambda ep: 0.5 if ep.startswith("10.0.8") else 0.0  # noqa: E731
        extra = {}
        if "prefix_holders" in RequestFacts.__dataclass_fields__:  # the index names them
            holders = {f"10.0.{i}.1:8000" for i in (8, *range(80, 90))}
            extra["prefix_holders"] = lambda: holders
        return RequestFacts(seq=1, has_prompt=True, prefix_match=match, **extra)
    if kind == "key":
        return RequestFacts(seq=1, session_key="user-1234")
    return RequestFacts(seq=1)


def worker(min_time: float) -> list[dict[str, Any]]:
    root = os.environ.get("BENCH_DECISION_ROOT", str(REPO))
    sys.path.insert(0, root)
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

    import extproc
    from extproc.decide import decide
    from extproc.observability import Metrics
    from extproc.processor import Processor
    from extproc.strategies import FALLBACKS, STRATEGIES, RequestFacts

    assert extproc.__file__.startswith(root), f"imported {extproc.__file__}, not {root}"
    rng = random.Random(42)
    msg = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v)
                    for k, v in [
                        (":method", b"POST"),
                        (":path", b"/v1/chat/completions"),
                        (":authority", b"localhost:10000"),
                        ("content-type", b"application/json"),
                        ("user-agent", b"bench"),
                        ("x-request-id", b"abc"),
                    ]
                ]
            )
        )
    )
    cases = [(name, name, "plain") for name in STRATEGIES] + [
        c for c in EXTRA if c[1] in STRATEGIES
    ]
    rows = []
    for n in SIZES:
        reg = make_registry(n, random.Random(7))
        fallback = FALLBACKS["random"]
        for label, name, kind in cases:
            strategy, facts = STRATEGIES[name], facts_for(kind, RequestFacts)
            one = lambda s=strategy, f=facts, r=reg, fb=fallback: decide(
                s, fb, f, r.snapshot(), rng
            )
            d_us = per_call_us(one, min_time)
            f_us = first_us(reg, one)
            h_us = None
            if kind == "plain":
                proc = Processor(
                    reg, default_strategy=name, fallback=fallback, metrics=Metrics(), rng=rng
                )

                def handle(proc: Any = proc, reg: Any = reg) -> None:
                    out = proc.handle(msg)
                    if out.token is not None:
                        reg.on_done(out.token)

                h_us = per_call_us(handle, min_time)
            rows.append(
                {
                    "backends": n,
                    "strategy": label,
                    "decide_us": d_us,
                    "first_us": f_us,
                    "handle_us": h_us,
                }
            )
    return rows


# -- the driver ---------------------------------------------------------------------------------
def run_worker(root: Path, min_time: float) -> dict[tuple[int, str], dict[str, Any]]:
    env = dict(os.environ, BENCH_DECISION_ROOT=str(root))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", "--min-time", str(min_time)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return {(r["backends"], r["strategy"]): r for r in json.loads(out.stdout)}


def export_rev(rev: str, into: Path) -> Path:
    """``git archive <rev> extproc`` unpacked under ``into`` (read-only git)."""
    tar_path = into / "extproc.tar"
    with tar_path.open("wb") as f:
        subprocess.run(
            ["git", "-C", str(REPO), "archive", rev, "extproc"], stdout=f, check=True, timeout=120
        )
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    return into


def med(xs: list[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


def fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rounds", type=int, default=5, help="rounds; figures are medians over them (default 5)"
    )
    ap.add_argument(
        "--min-time", type=float, default=0.1, help="seconds per timing sample (default 0.1)"
    )
    ap.add_argument("--baseline", type=Path, help="directory holding a baseline extproc/ package")
    ap.add_argument(
        "--baseline-rev", help="git revision to export as the baseline (instead of --baseline)"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.min_time)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-decision-") as tmp:
        base_dir, base_name = a.baseline, str(a.baseline) if a.baseline else None
        if a.baseline_rev:
            base_dir, base_name = export_rev(a.baseline_rev, Path(tmp)), a.baseline_rev
        cur: list[dict[tuple[int, str], dict[str, Any]]] = []
        old: list[dict[tuple[int, str], dict[str, Any]]] = []
        for i in range(a.rounds):
            cur.append(run_worker(REPO, a.min_time))
            if base_dir is not None:
                old.append(run_worker(base_dir, a.min_time))
            print(f"round {i + 1}/{a.rounds} done", file=sys.stderr)
    rows = []
    for key in cur[0]:
        n, label = key
        r: dict[str, Any] = {
            "backends": n,
            "strategy": label,
            "decide_us": med([c[key]["decide_us"] for c in cur]),
            "first_us": med([c[key]["first_us"] for c in cur]),
            "handle_us": med([c[key]["handle_us"] for c in cur]),
            "decide_ratio_vs_random": med(
                [c[key]["decide_us"] / c[(n, "random")]["decide_us"] for c in cur]
            ),
        }
        if old and all(key in o for o in old):
            r["baseline_decide_us"] = med([o[key]["decide_us"] for o in old])
            r["baseline_first_us"] = med([o[key]["first_us"] for o in old])
            r["baseline_handle_us"] = med([o[key]["handle_us"] for o in old])
            r["decide_vs_baseline"] = med(
                [c[key]["decide_us"] / o[key]["decide_us"] for c, o in zip(cur, old)]
            )
            if r["handle_us"] is not None:
                r["handle_vs_baseline"] = med(
                    [c[key]["handle_us"] / o[key]["handle_us"] for c, o in zip(cur, old)]
                )
        rows.append(r)
    lines = [
        "# Decision time per strategy",
        "",
        f"`make bench-decision`: medians of {a.rounds} rounds. *decide*: one decision on a snapshot "
        "already used; *first after a rebuild*: the first decision on a fresh snapshot, which also "
        "computes what the profile keeps per snapshot (load signals are normalised and combined once "
        "per scrape interval); *handle*: the whole ext_proc message. `+prompt`: a prompt some servers "
        "hold the prefix of; `+key`: a session key.",
    ]
    if old:
        lines += [
            "",
            (
                f"Baseline: `{base_name}`, measured in the same rounds (alternating subprocesses); the "
                "*vs baseline* columns are medians of the per-round ratios (< 1.00x: now faster)."
            ),
            "",
            (
                "| backends | strategy | decide µs | baseline | decide vs baseline | first after a rebuild µs | baseline | "
                "handle µs | baseline | handle vs baseline |"
            ),
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['backends']} | {r['strategy']} | {fmt(r['decide_us'])} | {fmt(r.get('baseline_decide_us'))} | "
                f"{fmt(r.get('decide_vs_baseline'), '.2f', 'x')} | {fmt(r['first_us'], '.0f')} | "
                f"{fmt(r.get('baseline_first_us'), '.0f')} | {fmt(r['handle_us'])} | "
                f"{fmt(r.get('baseline_handle_us'))} | {fmt(r.get('handle_vs_baseline'), '.2f', 'x')} |"
            )
    else:
        lines += [
            "",
            "| backends | strategy | decide µs | first after a rebuild µs | handle µs | decide vs random |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['backends']} | {r['strategy']} | {fmt(r['decide_us'])} | {fmt(r['first_us'], '.0f')} | "
                f"{fmt(r['handle_us'])} | {fmt(r['decide_ratio_vs_random'], '.2f', 'x')} |"
            )
    md = "\n".join(lines) + "\n"
    sys.path.insert(0, str(HERE))
    from common import write_results

    write_results("decision", {"rows": rows, "rounds": a.rounds, "baseline": base_name}, md)
    print(md)


if __name__ == "__main__":
    main()
