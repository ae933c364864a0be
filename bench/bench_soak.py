"""Soak: the real stack under ~70 % load for 10 minutes with a backend fault every minute.

Run: ``make bench-soak`` (10 min + ~30 s set-up) or ``make bench-soak ARGS="--duration 120"``.
Writes ``bench/results/soak.{json,md}`` (``--out NAME`` for another name); per-request records,
resource samples and process logs go to ``run/bench-soak/``.

* Stack, fleet, workload and load as in bench/bench_faults.py: 4 simulators at time scale 0.25,
  the service with default flags, Envoy; open loop at 70 % of the fleet's capacity, half the
  requests streamed.
* Every minute (at 30 s, 90 s, ...) one backend fault for ``FAULT_LEN`` seconds, rotating over
  the kinds (SIGKILL + restart, SIGSTOP + SIGCONT, 500s on/off, /metrics hang on/off) and over
  the backends. A fault's window runs from its start to ``GRACE`` seconds after its repair; a
  request whose life [sent, end] touches no window must not fail (target: 0 such errors).
* Every ``SAMPLE_EVERY`` seconds: the service's VmRSS (/proc/<pid>/status), open file
  descriptors (/proc/<pid>/fd), threads, and asyncio tasks (gauge ``extproc_asyncio_tasks`` of
  the admin /metrics, when the service exposes it). Targets: RSS growth after the first minute
  ≤ 10 %; no growth of descriptors or tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from common import markdown_table, write_results  # noqa: E402

from bench import routers  # noqa: E402
from bench.bench_faults import (  # noqa: E402
    FLAG_FAULTS,
    LOAD,
    N_SIMS,
    TIME_SCALE,
    Rec,
    Timeline,
    backend_fault,
    capacity_from_routing_results,
    code_fingerprint,
    make_stack,
    make_workload,
    percentile,
    run_open_loop,
    runtime_faults_supported,
    sim_name,
    smoke,
)
from devstack.processes import http_get  # noqa: E402

RUN_DIR = ROOT / "run" / "bench-soak"
FAULT_EVERY = 60.0
FAULT_OFFSET = 30.0  # first fault 30 s in, then every minute
FAULT_LEN = 10.0
GRACE = 5.0
SAMPLE_EVERY = 5.0
ROTATION = ("backend-kill", "backend-stop", "backend-500", "metrics-hang")
RSS_TARGET = 0.10


def proc_sample(pid: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    with contextlib.suppress(OSError):
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def asyncio_tasks(admin_url: str) -> float | None:
    with contextlib.suppress(Exception):
        status, body = http_get(f"{admin_url}/metrics", timeout=2.0)
        if status == 200:
            m = re.search(r"^extproc_asyncio_tasks(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", body, re.M)
            if m:
                return float(m.group(1))
    return None


def schedule(duration: float) -> list[dict[str, Any]]:
    out = []
    k = 0
    t = FAULT_OFFSET
    while t + FAULT_LEN < duration:
        out.append(
            {
                "kind": ROTATION[k % len(ROTATION)],
                "victim": k % N_SIMS,
                "at": t,
                "restore": t + FAULT_LEN,
            }
        )
        k += 1
        t += FAULT_EVERY
    return out


def fault_thread(
    plan: list[dict[str, Any]], stack: Any, tl: Timeline, runtime: bool, notes: list[str]
) -> None:
    for f in plan:
        try:
            tl.wait_until(f["at"])
            f["started"] = tl.now()
            backend_fault(f["kind"], stack, f["victim"], True, tl, runtime)
            tl.wait_until(f["restore"])
            backend_fault(f["kind"], stack, f["victim"], False, tl, runtime)
            f["restored"] = tl.now()
        except Exception as exc:  # noqa: BLE001
            tl.mark(f"FAULT SCRIPT ERROR: {exc}")
            notes.append(f"{f['kind']} at {f['at']}: {exc}\n{traceback.format_exc()}")
            f.setdefault("restored", tl.now())


def sampler_thread(
    stack: Any, t0: float, end: float, samples: list[dict[str, Any]], stop: threading.Event
) -> None:
    while not stop.is_set():
        t = time.perf_counter() - t0
        if t > end:
            return
        svc = stack.service
        if svc is not None and svc.alive():
            s = {"t": round(t, 2), **proc_sample(svc.pid), "pid": svc.pid}
            tasks = asyncio_tasks(stack.admin_url)
            if tasks is not None:
                s["asyncio_tasks"] = tasks
            if stack.envoy is not None and stack.envoy.alive():
                s["envoy_rss_kb"] = proc_sample(stack.envoy.pid).get("rss_kb")
            samples.append(s)
        stop.wait(SAMPLE_EVERY)


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def idle_sample(stack: Any) -> dict[str, Any]:
    svc = stack.service
    if svc is None or not svc.alive():
        return {}
    s = {**proc_sample(svc.pid), "pid": svc.pid}
    tasks = asyncio_tasks(stack.admin_url)
    if tasks is not None:
        s["asyncio_tasks"] = tasks
    return s


def wait_idle(stack: Any, before: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
    """After the load: poll until the service is back to its idle task count (streams closed)
    or ``timeout`` passes; return that sample (a leak shows up as a count that stays high)."""
    deadline = time.monotonic() + timeout
    while True:
        s = idle_sample(stack)
        t, b = s.get("asyncio_tasks"), before.get("asyncio_tasks")
        if t is None or b is None or t <= b or time.monotonic() >= deadline:
            return s
        time.sleep(0.5)


def analyse(
    recs: Sequence[Rec],
    plan: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    duration: float,
    idle_before: dict[str, Any],
    idle_after: dict[str, Any],
) -> dict[str, Any]:
    windows = [(f.get("started", f["at"]), f.get("restored", f["restore"]) + GRACE) for f in plan]

    def touches(r: Rec) -> int | None:
        end = r.end if r.end is not None else math.inf
        for i, (a, b) in enumerate(windows):
            if r.sent <= b and end >= a:
                return i
        return None

    outside_bad = []
    per_fault = [0] * len(plan)
    for r in recs:
        w = touches(r)
        if not r.ok:
            if w is None:
                outside_bad.append(r)
            else:
                per_fault[w] += 1
    outside = [r for r in recs if touches(r) is None]
    ttft = [r.ttft for r in outside if r.ok and r.stream and r.ttft is not None]

    def series(key: str) -> list[tuple[float, float]]:
        return [(s["t"], s[key]) for s in samples if key in s]

    def growth(key: str) -> dict[str, Any]:
        pts = series(key)
        base = [v for t, v in pts if 60.0 <= t < 90.0] or [v for t, v in pts if t >= 60.0][:3]
        tail = [v for _, v in pts[-3:]]
        if not base or not tail:
            return {"baseline": None, "end": None, "max_after_60s": None, "growth": None}
        b, e = _median(base), _median(tail)
        mx = max(v for t, v in pts if t >= 60.0)
        return {
            "baseline": b,
            "end": e,
            "max_after_60s": mx,
            "growth": (e - b) / b if b else None,
            "first": pts[0][1],
        }

    pids = sorted({s["pid"] for s in samples})
    out = {
        "requests": len(recs),
        "errors_total": sum(1 for r in recs if not r.ok),
        "errors_outside_windows": len(outside_bad),
        "requests_outside_windows": len(outside),
        "outside_error_examples": [f"{r.sent:.1f}s {r.error}" for r in outside_bad[:10]],
        "errors_per_fault": per_fault,
        "ttft_p90_ms_outside_windows": percentile(ttft, 90) * 1000 if ttft else math.nan,
        "rss_kb": growth("rss_kb"),
        "fds": growth("fds"),
        "threads": growth("threads"),
        "asyncio_tasks": growth("asyncio_tasks") if series("asyncio_tasks") else None,
        "service_pids": pids,
        "idle_before": idle_before,
        "idle_after": idle_after,
    }
    g = out["rss_kb"]["growth"]
    fd = out["fds"]

    def idle_ok(key: str, slack: float) -> bool | None:
        b, a = idle_before.get(key), idle_after.get(key)
        return None if b is None or a is None else a <= b + slack

    # Under load both counts follow the number of open requests (a task and no descriptor per
    # ext_proc stream), so "no growth" is judged at rest: the same service, idle before the
    # load and idle again after it (every stream closed) - a leak keeps the count up. The
    # slack covers the keep-alive connections of the scraper and Envoy coming and going.
    fd_idle = idle_ok("fds", 2)
    out["targets"] = {
        "errors_outside_windows_0": out["errors_outside_windows"] == 0,
        "rss_growth_le_10pct": None if g is None else g <= RSS_TARGET,
        "fds_no_growth": fd_idle
        if fd_idle is not None
        else (None if fd["end"] is None else fd["end"] <= fd["baseline"] + 3),
        "tasks_no_growth": idle_ok("asyncio_tasks", 2),
    }
    return out


def _f(x: Any, fmt: str = "{:.0f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return fmt.format(x)


def _yes(b: bool | None) -> str:
    return "–" if b is None else ("**yes**" if b else "**no**")


def markdown(doc: dict[str, Any]) -> str:
    a = doc["analysis"]
    cfg = doc["config"]
    lines = [
        "# Soak",
        "",
        f"`{doc['command']}`, {doc['started']} UTC, {cfg['duration_s']:.0f} s of load "
        f"({doc['wall_minutes']:.1f} min in all), seed {cfg['seed']}. Code fingerprint: "
        + ", ".join(f"{k} `{v}`" for k, v in doc["code"].items())
        + ".",
        "",
        f"Stack as in `faults.md` (4 simulators at time scale {TIME_SCALE:g}, the service with "
        f"default flags, Envoy). Load: open loop at {cfg['load'] * 100:.0f} % of capacity = "
        f"{cfg['rate_wall']:.1f} req/s wall, half streamed. One backend fault every "
        f"{FAULT_EVERY:.0f} s from {FAULT_OFFSET:.0f} s, {FAULT_LEN:.0f} s long, rotating "
        f"{', '.join(ROTATION)} over the backends; a fault's window ends {GRACE:.0f} s after its "
        f"repair. Service resources sampled every {SAMPLE_EVERY:.0f} s.",
        "",
        "## Targets",
        "",
        markdown_table(
            ["target", "value", "met"],
            [
                [
                    "0 errors outside the fault windows",
                    f"{a['errors_outside_windows']} of {a['requests_outside_windows']} requests",
                    _yes(a["targets"]["errors_outside_windows_0"]),
                ],
                [
                    "service RSS growth after the first minute ≤ 10 %",
                    _f(
                        None if a["rss_kb"]["growth"] is None else a["rss_kb"]["growth"] * 100,
                        "{:+.1f} %",
                    )
                    + f" ({_f(a['rss_kb']['baseline'] and a['rss_kb']['baseline'] / 1024, '{:.1f}')} → "
                    f"{_f(a['rss_kb']['end'] and a['rss_kb']['end'] / 1024, '{:.1f}')} MiB, max "
                    f"{_f(a['rss_kb']['max_after_60s'] and a['rss_kb']['max_after_60s'] / 1024, '{:.1f}')} MiB)",
                    _yes(a["targets"]["rss_growth_le_10pct"]),
                ],
                [
                    "open file descriptors: no growth (idle before → idle after the load; under load "
                    "after 1 min → end)",
                    f"{_f(a['idle_before'].get('fds'))} → {_f(a['idle_after'].get('fds'))}; "
                    f"{_f(a['fds']['baseline'])} → {_f(a['fds']['end'])} (max "
                    f"{_f(a['fds']['max_after_60s'])})",
                    _yes(a["targets"]["fds_no_growth"]),
                ],
                [
                    "asyncio tasks: no growth (same)",
                    "not exposed by the service (gauge `extproc_asyncio_tasks` missing)"
                    if a["asyncio_tasks"] is None
                    else f"{_f(a['idle_before'].get('asyncio_tasks'))} → "
                    f"{_f(a['idle_after'].get('asyncio_tasks'))}; "
                    f"{_f(a['asyncio_tasks']['baseline'])} → {_f(a['asyncio_tasks']['end'])} (max "
                    f"{_f(a['asyncio_tasks']['max_after_60s'])})",
                    _yes(a["targets"]["tasks_no_growth"]),
                ],
            ],
            "llr",
        ),
        f"Requests: {a['requests']}, errors {a['errors_total']} in all; threads "
        f"{_f(a['threads']['baseline'])} → {_f(a['threads']['end'])}; TTFT p90 outside the "
        f"fault windows {_f(a['ttft_p90_ms_outside_windows'])} ms (wall). Service pid(s): "
        f"{a['service_pids']} (one pid = never restarted).",
        "",
    ]
    if a["outside_error_examples"]:
        lines += [
            "Errors outside the windows (first 10): " + "; ".join(a["outside_error_examples"]),
            "",
        ]
    lines += ["## Faults", ""]
    rows = []
    for f, n in zip(doc["faults"], a["errors_per_fault"], strict=True):
        rows.append(
            [
                f"{f['at']:.0f}",
                f["kind"],
                sim_name(f["victim"]),
                _f(f.get("started"), "{:.2f}"),
                _f(f.get("restored"), "{:.2f}"),
                n,
            ]
        )
    lines.append(
        markdown_table(
            ["at s", "fault", "backend", "started", "repaired", "errors in its window"],
            rows,
            "rllrrr",
        )
    )
    for note in doc["notes"]:
        lines.append(f"* note: {note.splitlines()[0]}")
    lines += ["", "## Samples (service)", ""]
    srows = [
        [
            f"{s['t']:.0f}",
            _f(s.get("rss_kb") and s["rss_kb"] / 1024, "{:.1f}"),
            s.get("fds", "–"),
            s.get("threads", "–"),
            _f(s.get("asyncio_tasks")),
            _f(s.get("envoy_rss_kb") and s["envoy_rss_kb"] / 1024, "{:.1f}"),
        ]
        for s in doc["samples"][:: max(1, len(doc["samples"]) // 40)]
    ]
    lines.append(
        markdown_table(
            ["t s", "RSS MiB", "fds", "threads", "asyncio tasks", "Envoy RSS MiB"], srows, "rrrrrr"
        )
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--capacity", type=float, default=None)
    ap.add_argument("--load", type=float, default=LOAD)
    ap.add_argument("--runtime-faults", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--out", default="soak")
    a = ap.parse_args(argv)
    if a.duration < 90:
        ap.error("--duration must be >= 90 (the RSS baseline is taken after the first minute)")
    cap, source = (a.capacity, "--capacity") if a.capacity else capacity_from_routing_results()
    rate = a.load * cap * TIME_SCALE
    started = time.time()
    run_dir = RUN_DIR / time.strftime("%Y%m%d-%H%M%S")
    plan = schedule(a.duration)
    wl, streams = make_workload(a.seed, int(rate * a.duration * 1.3) + 64)
    notes: list[str] = []
    samples: list[dict[str, Any]] = []
    print(
        f"bench-soak: {a.duration:.0f} s at {rate:.1f} req/s wall, {len(plan)} faults; logs in "
        f"{run_dir}",
        flush=True,
    )
    stack = make_stack(run_dir, replicas=1, standby=0)
    stop = threading.Event()
    try:
        stack.start()
        stack.wait_metrics_fresh()
        smoke(stack.url)
        idle_before = wait_idle(stack, {}, timeout=0)
        runtime = {"auto": None, "yes": True, "no": False}[a.runtime_faults]
        if runtime is None:
            runtime = runtime_faults_supported(stack.sim_urls[0])
        if not runtime:
            notes.append(
                "emulated: " + " and ".join(FLAG_FAULTS) + " are switched by restarting "
                "the backend with/without the vllmsim flag (no runtime fault switch)"
            )
        t0 = time.perf_counter() + 0.2
        tl = Timeline(t0)
        ft = threading.Thread(
            target=fault_thread, args=(plan, stack, tl, runtime, notes), daemon=True
        )
        st = threading.Thread(
            target=sampler_thread, args=(stack, t0, a.duration + 5, samples, stop), daemon=True
        )
        ft.start()
        st.start()
        last_print = [0.0]

        def progress(t: float, sent: int, errors: int) -> None:
            if t - last_print[0] >= 30:
                last_print[0] = t
                rss = samples[-1].get("rss_kb", 0) / 1024 if samples else 0
                print(
                    f"  {t:6.0f}s sent {sent} errors {errors} service RSS {rss:.1f} MiB", flush=True
                )

        recs = asyncio.run(
            run_open_loop(
                stack.url, wl, streams, rate=rate, duration=a.duration, t0=t0, progress=progress
            )
        )
        stop.set()
        ft.join(timeout=60)
        st.join(timeout=10)
        idle_after = wait_idle(stack, idle_before)
        if stack.service is None or not stack.service.alive():
            notes.append("the service was not running at the end")
    finally:
        stop.set()
        for i in range(N_SIMS):
            p = stack.sim_proc(i) if stack.sims else None
            if p is not None:
                p.send_signal(signal.SIGCONT)
        stack.stop()
    analysis = analyse(recs, plan, samples, a.duration, idle_before, idle_after)
    doc = {
        "command": " ".join(["python", "bench/bench_soak.py", *(argv or sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "wall_minutes": (time.time() - started) / 60,
        "versions": routers.router_versions(),
        "code": code_fingerprint(),
        "config": {
            "duration_s": a.duration,
            "seed": a.seed,
            "load": a.load,
            "rate_wall": rate,
            "capacity_sim": cap,
            "capacity_source": source,
            "time_scale": TIME_SCALE,
            "fault_every_s": FAULT_EVERY,
            "fault_len_s": FAULT_LEN,
            "grace_s": GRACE,
            "runtime_faults": runtime,
        },
        "faults": plan,
        "events": tl.events,
        "notes": notes,
        "analysis": analysis,
        "samples": samples,
    }
    write_results(a.out, doc, markdown(doc))
    with (run_dir / "requests.jsonl").open("w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(asdict(r)) + "\n")
    print(
        f"wrote bench/results/{a.out}.md and .json: errors outside windows "
        f"{analysis['errors_outside_windows']}, RSS growth "
        f"{analysis['rss_kb']['growth']}, fds {analysis['fds']['baseline']} -> "
        f"{analysis['fds']['end']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
