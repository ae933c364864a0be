"""Service CPU per scrape: the scraper before (aiohttp) and now, and what --scrape-budget does.

Run: ``make bench-scrape`` (or ``python bench/bench_scrape.py [--profile]``). Writes
bench/results/scrape.{json,md}.

Backends are cheap fakes in ONE separate process (bench/metrics_fakes.py) that answer every
``GET /metrics`` with the real vLLM 0.32 capture (tests/fixtures, 52 KB), so this process runs
the scraper and nothing else: its CPU time (``time.process_time``) over a run divided by the
scrapes it made is the service's CPU per scrape, event loop, syscalls and snapshot ticker
included.

1. *CPU per scrape*: the same pool at ``--scrape-interval`` 0.1 s, no budget, with the scraper
   of commit ``--baseline-commit`` (aiohttp + the parser of that commit, loaded from git) and
   the current one, interleaved run by run; ratio = baseline / current (medians). The current
   scraper's own cost estimate (``extproc_scrape_cost_seconds``, what the budget divides) is
   shown next to the truth.
2. *Budget*: larger pools (10 % of the fakes serve the busy capture: 8 running) with and
   without ``--scrape-budget``: cores used, scrape rate, the busy/idle intervals the scraper
   chose, and metrics age p50/p90 (sampled every 100 ms over all backends, and over the busy
   ones).
3. ``--profile``: cProfile of one run of each scraper, top functions by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO_ROOT, markdown_table, write_results  # noqa: E402

from extproc.backends import BackendRegistry  # noqa: E402
from extproc.observability import Metrics  # noqa: E402
from extproc.scraper import Scraper  # noqa: E402

BASELINE_COMMIT = "128484a"  # the last commit with the aiohttp scraper
INTERVAL = 0.1


class CountingMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.scrapes = 0

    def scraped(self, backend: str, result: str) -> None:
        if result != "models_error":
            self.scrapes += 1
        super().scraped(backend, result)


def load_baseline(commit: str) -> type:
    """The Scraper class of ``commit`` with the metrics parser of the same commit."""

    def module(name: str, path: str, replace: tuple[str, str] | None = None) -> types.ModuleType:
        src = subprocess.run(
            ["git", "show", f"{commit}:{path}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if replace:
            src = src.replace(*replace)
        mod = types.ModuleType(name)
        mod.__file__ = f"{commit}:{path}"
        sys.modules[name] = mod  # dataclasses look their module up
        exec(compile(src, mod.__file__, "exec"), mod.__dict__)
        return mod

    module("baseline_metrics_parser", "extproc/metrics_parser.py")
    scraper = module(
        "baseline_scraper",
        "extproc/scraper.py",
        ("from extproc.metrics_parser import", "from baseline_metrics_parser import"),
    )
    return scraper.Scraper  # type: ignore[no-any-return]


@dataclass
class Fakes:
    proc: subprocess.Popen[str]
    ports: list[int]

    @classmethod
    def start(cls, count: int, busy: int) -> Fakes:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("metrics_fakes.py")), "--count",
             str(count), "--busy", str(busy)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("bench/metrics_fakes.py did not start")
        return cls(proc, json.loads(line)["ports"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run_once(
    scraper_cls: type,
    ports: list[int],
    *,
    seconds: float,
    warmup: float,
    budget: float | None,
    busy_ports: int = 0,
    profile: cProfile.Profile | None = None,
) -> dict[str, Any]:
    """One scraper over the pool for ``seconds`` after ``warmup``; CPU, scrapes, ages."""
    registry = BackendRegistry(stale_after=1.0, max_metrics_age=10.0)
    registry.set_backends([f"http://127.0.0.1:{p}" for p in ports])
    metrics = CountingMetrics()
    kwargs: dict[str, Any] = {"interval": INTERVAL, "timeout": 0.5, "connect_timeout": 0.25}
    if budget is not None:
        kwargs["budget"] = budget
    scraper = scraper_cls(registry, metrics, **kwargs)
    await scraper.start()
    records = registry.records
    busy_endpoints = {f"127.0.0.1:{p}" for p in ports[:busy_ports]}
    ages: list[float] = []
    busy_ages: list[float] = []
    try:
        await asyncio.sleep(warmup)
        if profile is not None:
            profile.enable()
        meter = getattr(scraper, "meter", None)
        e0 = meter.total if meter is not None else 0.0
        c0, w0, n0 = time.process_time(), time.perf_counter(), metrics.scrapes
        while time.perf_counter() - w0 < seconds:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for r in records:
                if r.last_ok is not None:
                    age = now - r.last_ok
                    ages.append(age)
                    if r.endpoint in busy_endpoints:
                        busy_ages.append(age)
        c1, w1, n1 = time.process_time(), time.perf_counter(), metrics.scrapes
        e1 = meter.total if meter is not None else 0.0
        if profile is not None:
            profile.disable()
    finally:
        await scraper.stop()
    scrapes = n1 - n0
    out: dict[str, Any] = {
        "backends": len(ports),
        "seconds": w1 - w0,
        "scrapes": scrapes,
        "scrapes_per_s": scrapes / (w1 - w0),
        "cores": (c1 - c0) / (w1 - w0),
        "cpu_us_per_scrape": (c1 - c0) / scrapes * 1e6 if scrapes else float("nan"),
        "age_p50": percentile(ages, 0.5),
        "age_p90": percentile(ages, 0.9),
        "busy_age_p90": percentile(busy_ages, 0.9),
    }
    if meter is not None:  # the scraper's own estimate (what the budget is compared with)
        out["estimate_us_per_scrape"] = (e1 - e0) / scrapes * 1e6 if scrapes else float("nan")
        out["estimate_cores"] = (e1 - e0) / (w1 - w0)
        out["interval_busy"] = scraper.intervals.busy
        out["interval_idle"] = scraper.intervals.idle
    return out


CATEGORIES = (  # (name, test on (file, function)), first match wins
    ("page parse", lambda f, fn: "metrics_parser" in f or fn in ("<method 'findall' of 're.Pattern' objects>", "<method 'group' of 're.Match' objects>")),
    ("HTTP client (aiohttp / scrape_client + llhttp)", lambda f, fn: "aiohttp/" in f or "yarl/" in f or "multidict" in f or "scrape_client" in f or "httptools" in fn),
    ("socket syscalls", lambda f, fn: fn.startswith(("<method 'send' of '_socket", "<method 'recv' of '_socket", "<method 'poll' of 'select"))),
    ("event loop, tasks, timers", lambda f, fn: "asyncio/" in f or "selectors.py" in f or fn.startswith(("<built-in method _heapq", "<method 'run' of '_contextvars", "<built-in method _asyncio"))),
    ("registry, snapshot, metrics", lambda f, fn: "extproc/backends.py" in f or "prometheus_client" in f or "observability" in f or "snapshot.py" in f),
    ("scraper loop", lambda f, fn: "scraper.py" in f or "scrape_budget" in f),
)  # fmt: skip


def categories(profile: cProfile.Profile) -> list[list[Any]]:
    """Share of own CPU time by part of the scrape path."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    shares: dict[str, float] = {}
    total = 0.0
    for (file, _line, func), (_cc, _calls, tottime, _cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        name = next((n for n, test in CATEGORIES if test(file, func)), "other")
        shares[name] = shares.get(name, 0.0) + tottime
    order = [n for n, _ in CATEGORIES] + ["other"]
    return [[n, f"{100 * shares.get(n, 0.0) / total:.0f} %"] for n in order if total]


def top_functions(profile: cProfile.Profile, n: int) -> list[list[Any]]:
    stats = pstats.Stats(profile, stream=io.StringIO())
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]  # type: ignore[attr-defined]
    out = []
    for (file, line, func), (_cc, calls, tottime, _cum, _callers) in rows:
        where = file.split("site-packages/")[-1].replace(str(REPO_ROOT) + "/", "")
        out.append([f"`{func}` ({where}:{line})", calls, f"{100 * tottime / total:.1f} %"])
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    baseline_cls = load_baseline(args.baseline_commit)
    contenders = {f"baseline ({args.baseline_commit}, aiohttp)": baseline_cls, "current": Scraper}
    results: dict[str, Any] = {
        "per_scrape": {}, "budget": [], "profile": {}, "profile_categories": {},
        "loadavg_start": os.getloadavg(),
    }  # fmt: skip

    fakes = Fakes.start(args.backends, 0)
    try:
        for name in contenders:
            results["per_scrape"][name] = []
        for rep in range(args.repeats):
            for name, cls in contenders.items():
                budget = 0.0 if cls is Scraper else None
                r = await run_once(
                    cls, fakes.ports, seconds=args.seconds, warmup=1.0, budget=budget
                )
                results["per_scrape"][name].append(r)
                print(f"[{rep + 1}/{args.repeats}] {name}: {r['cpu_us_per_scrape']:.0f} us/scrape, "
                      f"{r['scrapes_per_s']:.0f} scrapes/s, {r['cores']:.2f} cores", flush=True)  # fmt: skip
        if args.profile:
            for name, cls in contenders.items():
                prof = cProfile.Profile(time.process_time)  # CPU, not idle waits
                budget = 0.0 if cls is Scraper else None
                await run_once(
                    cls, fakes.ports, seconds=3.0, warmup=1.0, budget=budget, profile=prof
                )
                results["profile"][name] = top_functions(prof, args.profile_top)
                results["profile_categories"][name] = categories(prof)
    finally:
        fakes.stop()

    for pool in args.budget_pools:
        busy = max(1, pool // 10)
        fakes = Fakes.start(pool, busy)
        try:
            for budget in (0.0, *args.budgets):
                if budget == 0.0 and pool > args.unbounded_max:
                    continue  # would saturate the box (that is the point of the budget)
                r = await run_once(
                    Scraper, fakes.ports, seconds=args.seconds, warmup=3.0, budget=budget,
                    busy_ports=busy,
                )  # fmt: skip
                r["budget"] = budget
                r["busy_backends"] = busy
                results["budget"].append(r)
                print(f"pool {pool} budget {budget}: {r['cores']:.2f} cores, "
                      f"{r['scrapes_per_s']:.0f}/s, intervals {r['interval_busy']:.2f}/"
                      f"{r['interval_idle']:.2f} s, age p90 {r['age_p90']:.2f} s", flush=True)  # fmt: skip
        finally:
            fakes.stop()
    results["loadavg_end"] = os.getloadavg()
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    md = ["# Scrape cost\n"]
    md.append(
        "`make bench-scrape` (`python bench/bench_scrape.py`): CPU of the process that runs the "
        "scraper (`time.process_time`: event loop, syscalls, snapshot ticker included) divided "
        "by the scrapes it made, against cheap fake servers in a separate process that answer "
        "with the real vLLM 0.32 capture (52 KB). Baseline = the scraper and parser of commit "
        f"`{args.baseline_commit}` (one aiohttp session, keep-alive) loaded from git; current = "
        "this tree. Runs interleaved; median (min) over "
        f"{args.repeats} runs of {args.seconds:.0f} s; {args.backends} backends every "
        f"{INTERVAL} s, no budget.\n"
    )
    rows = []
    per = results["per_scrape"]
    names = list(per)
    med = {n: statistics.median(r["cpu_us_per_scrape"] for r in per[n]) for n in names}
    for n in names:
        runs = per[n]
        est = [r["estimate_us_per_scrape"] for r in runs if "estimate_us_per_scrape" in r]
        rows.append([
            n,
            f"{statistics.median(r['scrapes_per_s'] for r in runs):.0f}",
            f"{statistics.median(r['cores'] for r in runs):.3f}",
            f"{med[n]:.0f} ({min(r['cpu_us_per_scrape'] for r in runs):.0f})",
            f"{statistics.median(est):.0f}" if est else "–",
        ])  # fmt: skip
    md.append(markdown_table(
        ["scraper", "scrapes/s", "cores", "CPU µs / scrape", "own estimate µs"], rows, "lrrrr"
    ))  # fmt: skip
    base, cur = med[names[0]], med[names[1]]
    low = {n: min(r["cpu_us_per_scrape"] for r in per[n]) for n in names}
    md.append(
        f"\n**Ratio baseline / current: {base / cur:.2f}x** less CPU per scrape (medians; "
        f"{low[names[0]] / low[names[1]]:.2f}x between the minima: interference from other "
        "work only ever adds CPU time).\n"
    )
    md.append(
        "\n*Own estimate*: the CPU the current scraper attributes to itself per scrape (its "
        "meter: timed steps x the event-loop factor, plus the ticker), what `--scrape-budget` "
        "is compared with; it should match the measured column.\n"
    )
    if results["budget"]:
        md.append(
            "\n## Budget\n\nCurrent scraper; 10 % of the backends serve the busy capture "
            "(8 running), the rest the idle one. *Intervals* are the ones the scraper chose "
            "(busy / idle); ages sampled every 100 ms over all backends (and over the busy "
            "ones). Budget 0 = none; pools above "
            f"{args.unbounded_max} are not run without one (they would take the whole box).\n\n"
        )
        rows = [[
            r["backends"], r["budget"] or "none", f"{r['interval_busy']:.2f} / {r['interval_idle']:.2f}",
            f"{r['scrapes_per_s']:.0f}", f"{r['cores']:.2f}", f"{r['estimate_cores']:.2f}",
            f"{r['cpu_us_per_scrape']:.0f}", f"{r['age_p50']:.2f}", f"{r['age_p90']:.2f}",
            f"{r['busy_age_p90']:.2f}",
        ] for r in results["budget"]]  # fmt: skip
        md.append(markdown_table(
            ["backends", "budget (cores)", "interval busy / idle s", "scrapes/s", "cores used",
             "own estimate cores", "CPU µs / scrape", "age p50 s", "age p90 s", "busy age p90 s"],
            rows, "rrrrrrrrrr",
        ))  # fmt: skip
    md.append(
        f"\nLoad average (1/5/15 min) at start {fmt_load(results['loadavg_start'])}, at end "
        f"{fmt_load(results['loadavg_end'])} (other work on the box shows here).\n"
    )
    if results["profile_categories"]:
        names = list(results["profile_categories"])
        cats = {n: dict(map(tuple, results["profile_categories"][n])) for n in names}
        md.append(
            "\n## Where the CPU goes\n\ncProfile with a CPU clock (process_time) over 3 s of "
            "each scraper, own time by part of the scrape path (the profiler's own overhead "
            "inflates the many small calls of the event loop and the HTTP client).\n\n"
        )
        md.append(markdown_table(
            ["part", *names], [[c, *(cats[n].get(c, "–") for n in names)] for c in cats[names[0]]],
            "l" + "r" * len(names),
        ))  # fmt: skip
    for name, top in results["profile"].items():
        md.append(
            f"\n## Profile: {name}\n\ncProfile with a CPU clock (process_time), 3 s, top functions by own CPU time (the profiler itself inflates small functions).\n\n"
        )
        md.append(markdown_table(["function", "calls", "own time"], top, "lrr"))
    return "".join(md)


def fmt_load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.1f}" for x in load)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", type=int, default=64, help="pool for the per-scrape runs")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--budgets", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.5, 1.0],
        help="--scrape-budget values of part 2 (0.5 = the default)",
    )  # fmt: skip
    ap.add_argument(
        "--budget-pools", type=lambda s: [int(x) for x in s.split(",") if x], default=[256, 1000]
    )
    ap.add_argument("--unbounded-max", type=int, default=256, help="largest pool run unbudgeted")
    ap.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    ap.add_argument("--profile", action="store_true", help="add a cProfile of each scraper")
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--out-dir", type=Path, default=None, help="results folder (bench/results)")
    args = ap.parse_args()
    results = asyncio.run(main_async(args))
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_results("scrape", results, report(results, args), args.out_dir)


if __name__ == "__main__":
    main()
