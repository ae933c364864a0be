"""CPU time to parse one real vLLM /metrics page: extproc.metrics_parser vs prometheus_client.

Run: ``make bench-parse`` (or ``python bench/bench_parse.py``). Writes
bench/results/parse.{json,md}.

The scraper parses every backend's page every 100 ms, so the figure that matters is CPU per
parse (``time.process_time``); wall time (``time.perf_counter``) is reported next to it. Each
figure is the median over ``--repeats`` runs of ``--number`` parses (GC off while timing, as
timeit does). Our parser and the baseline are measured interleaved, repeat by repeat, in the
same process, so a noisy neighbour hits both; the ratio is baseline / ours.

- ``warm``: steady state, as in the scraper: the parser's label cache already holds this
  server's label blocks (they do not change between scrapes).
- ``cold``: label cache cleared before every parse (first scrape of a backend).
- ``prometheus_client``: ``text_string_to_metric_families`` consumed to the end (the full parse
  that would be needed before picking out the same numbers).

A second table times alternative ways to *locate* the wanted lines (no value/label parsing),
which is how the single-regex scan was chosen.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import markdown_table, write_results  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from extproc import metrics_parser  # noqa: E402
from extproc.metrics_parser import parse_vllm_metrics  # noqa: E402

BUDGET_US = 2000.0  # docs/design.md: <= 2 ms per 52 KB page
REPO_ROOT = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    env = os.environ.get("VLLM_FIXTURES_DIR")
    return Path(env) if env else REPO_ROOT / "tests" / "fixtures"


def time_per_call(fn: Callable[[], object], number: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per call, over ``number`` calls."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(number):
            fn()
        c1, w1 = time.process_time(), time.perf_counter()
    finally:
        if gc_was_enabled:
            gc.enable()
    return (c1 - c0) / number * 1e6, (w1 - w0) / number * 1e6


def summarize(samples: list[tuple[float, float]]) -> dict[str, float]:
    cpu = [s[0] for s in samples]
    wall = [s[1] for s in samples]
    return {
        "cpu_us_median": statistics.median(cpu),
        "cpu_us_min": min(cpu),
        "wall_us_median": statistics.median(wall),
        "wall_us_min": min(wall),
    }


# ---- alternative scan strategies (locate wanted lines only) ---------------------------------

_WANTED = tuple(metrics_parser._SLOT_OF)
_ALT = "|".join(sorted(_WANTED, key=len, reverse=True))
_RE_NEWLINE_PREFIX = re.compile(r"\n[ \t]*+vllm:(" + _ALT + r")(?![\w:])")
_RE_MULTILINE = re.compile(r"^[ \t]*+vllm:(" + _ALT + r")(?![\w:])", re.MULTILINE)
_NEEDLES = tuple("\nvllm:" + n for n in _WANTED)
_WANTED_SET = frozenset(_WANTED)


def scan_regex_newline_prefix(text: str) -> int:
    return sum(1 for _ in _RE_NEWLINE_PREFIX.finditer(text))


def scan_regex_multiline_caret(text: str) -> int:
    return sum(1 for _ in _RE_MULTILINE.finditer(text))


def scan_str_find_per_name(text: str) -> int:
    found = 0
    find = text.find
    for needle in _NEEDLES:
        i = find(needle)
        while i >= 0:
            j = i + len(needle)
            if j == len(text) or text[j] in " \t{":
                found += 1
            i = find(needle, j)
    return found


def scan_split_lines(text: str) -> int:
    found = 0
    for line in text.split("\n"):
        if line.startswith("vllm:"):
            end = line.find("{")
            if end < 0:
                end = line.find(" ")
            if line[5:end] in _WANTED_SET:
                found += 1
    return found


ALTERNATIVES: list[tuple[str, Callable[[str], int]]] = [
    ("regex, literal '\\n' prefix, one pass (chosen)", scan_regex_newline_prefix),
    ("regex, '^' + re.MULTILINE, one pass", scan_regex_multiline_caret),
    ("str.find per wanted name (14 passes)", scan_str_find_per_name),
    ("str.split('\\n') + startswith('vllm:')", scan_split_lines),
]


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=300, help="parses per repeat, our parser")
    ap.add_argument(
        "--baseline-number",
        type=int,
        default=10,
        help="parses per repeat, prometheus_client (~100x slower)",
    )
    ap.add_argument("--repeats", type=int, default=7, help="repeats; the median is reported")
    ap.add_argument(
        "--no-alternatives",
        action="store_true",
        help="skip the table of alternative scan strategies",
    )
    ap.add_argument("--name", default="parse", help="results name: bench/results/<name>.{json,md}")
    args = ap.parse_args(argv)

    paths = sorted(fixtures_dir().glob("vllm-metrics-real*.txt"))
    if not paths:
        print(f"no fixtures in {fixtures_dir()} (set VLLM_FIXTURES_DIR)", file=sys.stderr)
        return 2

    rows: list[dict[str, Any]] = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        # Same numbers from both parsers, or the comparison is meaningless.
        parsed = parse_vllm_metrics(text)
        families = list(text_string_to_metric_families(text))

        def ours_warm(text: str = text) -> object:
            return parse_vllm_metrics(text)

        def ours_cold(text: str = text) -> object:
            metrics_parser._LABEL_CACHE.clear()
            return parse_vllm_metrics(text)

        def baseline(text: str = text) -> object:
            for _ in text_string_to_metric_families(text):
                pass
            return None

        warm, cold, base = [], [], []
        for _ in range(args.repeats):  # interleaved, see module docstring
            ours_warm()
            warm.append(time_per_call(ours_warm, args.number))
            cold.append(time_per_call(ours_cold, args.number))
            base.append(time_per_call(baseline, args.baseline_number))
        row: dict[str, Any] = {
            "fixture": path.name,
            "bytes": len(text.encode("utf-8")),
            "lines": text.count("\n"),
            "families": len(families),
            "running": parsed.running,
            "waiting": parsed.waiting,
            "ours_warm": summarize(warm),
            "ours_cold": summarize(cold),
            "prometheus_client": summarize(base),
        }
        row["ratio_cpu_warm"] = (
            row["prometheus_client"]["cpu_us_median"] / row["ours_warm"]["cpu_us_median"]
        )
        row["ratio_cpu_cold"] = (
            row["prometheus_client"]["cpu_us_median"] / row["ours_cold"]["cpu_us_median"]
        )
        row["within_budget"] = (
            max(row["ours_warm"]["cpu_us_median"], row["ours_cold"]["cpu_us_median"]) <= BUDGET_US
        )
        rows.append(row)
        print(
            f"{path.name}: ours warm {row['ours_warm']['cpu_us_median']:.0f} µs, "
            f"cold {row['ours_cold']['cpu_us_median']:.0f} µs CPU; prometheus_client "
            f"{row['prometheus_client']['cpu_us_median'] / 1000:.2f} ms; "
            f"ratio {row['ratio_cpu_warm']:.0f}x",
            flush=True,
        )

    alternatives: list[dict[str, Any]] = []
    if not args.no_alternatives:
        text = paths[0].read_text(encoding="utf-8")
        expected = scan_regex_newline_prefix(text)
        for label, fn in ALTERNATIVES:
            assert fn(text) == expected, label  # they must find the same lines

            def scan(fn: Callable[[str], int] = fn, text: str = text) -> int:
                return fn(text)

            samples = [time_per_call(scan, max(args.number // 3, 10)) for _ in range(args.repeats)]
            alternatives.append({"strategy": label, "fixture": paths[0].name, **summarize(samples)})

    md = render_markdown(rows, alternatives, args)
    write_results(
        args.name,
        {
            "budget_us": BUDGET_US,
            "settings": {
                "number": args.number,
                "baseline_number": args.baseline_number,
                "repeats": args.repeats,
            },
            "rows": rows,
            "alternatives": alternatives,
        },
        md,
    )
    print()
    print(md)
    return 0 if all(r["within_budget"] for r in rows) else 1


def render_markdown(
    rows: list[dict[str, Any]], alts: list[dict[str, Any]], args: argparse.Namespace
) -> str:
    def cell(stats: dict[str, float], kind: str) -> str:
        # median (min): on a shared machine the min shows the undisturbed cost.
        return f"{stats[kind + '_us_median']:.0f} ({stats[kind + '_us_min']:.0f})"

    table = markdown_table(
        [
            "fixture",
            "size",
            "ours warm CPU µs",
            "ours warm wall µs",
            "ours cold CPU µs",
            "prometheus_client CPU µs",
            "prometheus_client wall µs",
            "ratio CPU warm / cold",
            "≤ 2 ms",
        ],
        [
            [
                f"`{r['fixture']}`",
                f"{r['bytes'] / 1024:.1f} KiB, {r['lines']} lines",
                cell(r["ours_warm"], "cpu"),
                cell(r["ours_warm"], "wall"),
                cell(r["ours_cold"], "cpu"),
                cell(r["prometheus_client"], "cpu"),
                cell(r["prometheus_client"], "wall"),
                f"{r['ratio_cpu_warm']:.0f}x / {r['ratio_cpu_cold']:.0f}x",
                "yes" if r["within_budget"] else "**NO**",
            ]
            for r in rows
        ],
        align="lrrrrrrrc",
    )
    parts = [
        "# vLLM /metrics parse time",
        "",
        (
            "`make bench-parse` (`python bench/bench_parse.py`): per-parse time of "
            "`extproc.metrics_parser.parse_vllm_metrics` against `prometheus_client.parser."
            "text_string_to_metric_families` (consumed fully) on the real vLLM 0.32 captures in "
            "`tests/fixtures/`. Median of "
            f"{args.repeats} repeats of {args.number} parses (prometheus_client: "
            f"{args.baseline_number}), shown as median (min); both measured interleaved in one "
            "process, ratios from the medians. Budget "
            "(docs/design.md): ≤ 2 ms CPU per page. *warm* = steady state (label cache filled by "
            "earlier scrapes of the same server), *cold* = label cache cleared before each parse."
        ),
        "",
        table,
    ]
    if alts:
        parts += [
            "## Alternatives for locating the wanted lines",
            "",
            f"Scan only (no value or label parsing), on `{alts[0]['fixture']}`; median (min).",
            "",
            markdown_table(
                ["strategy", "CPU µs", "wall µs"],
                [[a["strategy"], cell(a, "cpu"), cell(a, "wall")] for a in alts],
                align="lrr",
            ),
        ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
