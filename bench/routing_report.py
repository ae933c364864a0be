"""The routing benchmark's report: every run present -> points with intervals, issue 9's
targets, markdown, a plot. ``python bench/bench_routing.py --report-only`` rebuilds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_results
from bench.routing_specs import (
    FLEET_ARGS,
    N_SIMS,
    TARGET_LOAD,
    WORKLOADS,
    contender_order,
    load_calibrations,
    load_runs,
    suspect,
)
from bench.routing_stats import estimate, ratio_estimate, verdict


def _stale_reason(r: dict[str, Any], cals: dict[str, dict[str, Any]]) -> str | None:
    spec = WORKLOADS.get(r["workload"])
    if spec is None:
        return "unknown workload"
    if r.get("spec_digest") != spec.digest():
        return "workload or fleet definition changed since"
    cal = cals.get(r["workload"])
    if cal is None or not math.isclose(r["capacity_rps_sim"], cal["capacity_rps_sim"]):
        return "measured at another calibration's request rate"
    return None


def aggregate(out: Path) -> dict[str, Any]:
    """Every point (workload x load x contender) from the runs present, with intervals."""
    runs, cals = load_runs(out), load_calibrations(out)
    stale = []
    good = []
    for r in runs:
        why = _stale_reason(r, cals)
        if why:
            stale.append({"file": r["_file"], "why": why})
        else:
            good.append(r)
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in good:
        groups.setdefault((r["workload"], r["load"], r["contender"]), []).append(r)
    points = []
    for (wname, load, name), rs in sorted(
        groups.items(), key=lambda kv: (list(WORKLOADS).index(kv[0][0]), kv[0][1],
                                        contender_order(kv[0][2]))
    ):  # fmt: skip
        ok = sorted((r for r in rs if "summary" in r), key=lambda r: r["seed"])
        failed = [r for r in rs if "summary" not in r]
        pt: dict[str, Any] = {
            "workload": wname,
            "load": load,
            "contender": name,
            "family": rs[0]["family"],
            "policy": rs[0]["policy"],
            "rate_sim": rs[0]["rate_sim"],
            "seeds": [r["seed"] for r in ok],
            "failed": [{"seed": r["seed"], "error": r["error"]} for r in failed],
        }
        if ok:
            ttft = [r["samples"]["ttft_ms"] for r in ok]
            e2e = [r["samples"]["e2e_ms"] for r in ok]
            pt.update(
                {
                    "requests": sum(r["summary"]["requests"] for r in ok),
                    "errors": sum(r["summary"]["errors_total"] for r in ok),
                    "duration_wall_s": sorted({r["duration_wall_s"] for r in ok}),
                    "ttft_p50_ms": estimate(ttft, 50).as_dict(),
                    "ttft_p90_ms": estimate(ttft, 90).as_dict(),
                    "e2e_p90_ms": estimate(e2e, 90).as_dict(),
                    "output_tokens_per_s": _mean([r["summary"]["output_tokens_per_s"] for r in ok]),
                    "hit_rate": _mean([r["sim"]["prefix_hit_rate"] for r in ok]),
                    "preemptions": sum(r["sim"]["preemptions"] for r in ok),
                    "share": {
                        f"sim{i}": _mean(
                            [r["summary"]["backend_share"].get(f"sim{i}", 0.0) for r in ok]
                        )
                        for i in range(N_SIMS)
                    },  # fmt: skip
                    "suspect_runs": sum(1 for r in ok if suspect(r)),
                    "kv_events": all(r.get("kv_events", False) for r in ok),
                    "workload_sha256": {str(r["seed"]): r["workload_sha256"] for r in ok},
                }
            )
        points.append(pt)
    commits = sorted({str(r.get("git_commit")) for r in good})
    codes = {k: sorted({r["code"][k] for r in good if k in r.get("code", {})})
             for k in ("extproc", "envoy.yaml", "vllmsim")}  # fmt: skip
    # The service's default as the runs recorded it (the report does not import the service).
    default = max(good, key=lambda r: r.get("started", ""), default={}).get(
        "default_strategy", "weighted"
    )
    doc = {
        "default_strategy": default,
        "workloads": {
            w: {
                "kind": WORKLOADS[w].kind,
                "params": WORKLOADS[w].params,
                "burstiness": WORKLOADS[w].burstiness,
                "slow": list(WORKLOADS[w].slow),
                "models": WORKLOADS[w].models,
                "calibration": cals[w],
            }
            for w in WORKLOADS
            if w in cals
        },
        "points": points,
        "targets": targets(points, good, default),
        "stale_runs": stale,
        "runs": len(good),
        "run_commits": commits,
        "code_versions": codes,
        "sample_mismatch": _sha_mismatch(good),
        "fleet_args": FLEET_ARGS,
    }
    return doc


def _sha_mismatch(runs: Sequence[dict[str, Any]]) -> list[str]:
    """(workload, seed) pairs whose contenders did not replay the same file (should be none)."""
    seen: dict[tuple[str, int], set[str]] = {}
    for r in runs:
        seen.setdefault((r["workload"], r["seed"]), set()).add(r["workload_sha256"])
    return [f"{w} seed {s}" for (w, s), shas in sorted(seen.items()) if len(shas) > 1]


def _mean(xs: Sequence[float | None]) -> float:
    v = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def targets(
    points: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], default: str
) -> list[dict[str, Any]]:
    """Issue 9's targets per workload (TTFT p90 at 85 % load), evaluated with intervals."""
    out = []
    by_key = {(r["workload"], r["load"], r["contender"], r["seed"]): r for r in runs
              if "summary" in r}  # fmt: skip
    for wname, spec in WORKLOADS.items():
        if spec.target is None:
            continue
        pts = [p for p in points if p["workload"] == wname and "ttft_p90_ms" in p]
        loads = sorted({p["load"] for p in pts}, key=lambda x: abs(x - TARGET_LOAD))
        row: dict[str, Any] = {"workload": wname, "ours": f"extproc:{default}",
                               "target": spec.target, "target_rr": spec.target_rr}  # fmt: skip
        if not loads or abs(loads[0] - TARGET_LOAD) > 1e-9:
            row["verdict"] = "not measured"
            out.append(row)
            continue
        at = {p["contender"]: p for p in pts if p["load"] == TARGET_LOAD}
        ours = at.get(row["ours"])
        rust = [p for p in at.values() if p["family"] in ("vllm-router", "sglang-router")]
        row["rust_measured"] = sorted(p["contender"] for p in rust)
        ours_best = min((p for p in at.values() if p["family"] == "extproc"),
                        key=lambda p: p["ttft_p90_ms"]["value"], default=None)  # fmt: skip
        row["best_extproc"] = ours_best["contender"] if ours_best else None

        def compare(
            other: dict[str, Any] | None,
            target: float | None,
            ours: dict[str, Any] | None = ours,
            wname: str = wname,
        ) -> dict[str, Any] | None:
            if ours is None or other is None or target is None:
                return None
            seeds = sorted(set(ours["seeds"]) & set(other["seeds"]))
            num = [by_key[(wname, TARGET_LOAD, ours["contender"], s)]["samples"]["ttft_ms"]
                   for s in seeds]  # fmt: skip
            den = [by_key[(wname, TARGET_LOAD, other["contender"], s)]["samples"]["ttft_ms"]
                   for s in seeds]  # fmt: skip
            if not seeds:
                return None
            ratio, lo, hi = ratio_estimate(num, den, 90)
            return {
                "against": other["contender"],
                "seeds": seeds,
                # over the seeds both ran (the point's own p90 may include other seeds)
                "ours_ms": float(np.percentile(np.concatenate(num), 90)),
                "theirs_ms": float(np.percentile(np.concatenate(den), 90)),
                "ratio": ratio,
                "lo": lo,
                "hi": hi,
                "target": target,
                "verdict": verdict(ratio, lo, hi, target),
            }

        # The best Rust policy is the one our ratio is highest against, each compared on the
        # seeds both ran: a policy measured on fewer (easier) seeds must not look better.
        vs_rust = [c for c in (compare(p, spec.target) for p in rust) if c is not None]
        row["vs_rust"] = max(vs_rust, key=lambda c: c["ratio"], default=None)
        row["vs_rr"] = compare(at.get("envoy:round-robin"), spec.target_rr)
        if ours is None:
            row["verdict"] = f"not measured ({row['ours']} missing)"
        elif row["vs_rust"] is None:
            row["verdict"] = "not measured (no Rust-router run on our seeds)"
        out.append(row)
    return out


def fmt_ms(x: float | None) -> str:
    """Seconds as whole milliseconds; – for nothing."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1000:.0f}"


def fmt_pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x * 100:.0f}%"


def fmt_shares(share: dict[str, float]) -> str:
    """Per-server shares as sim0/sim1/sim2/sim3 percentages."""
    return "/".join(f"{share.get(f'sim{i}', 0.0) * 100:.0f}" for i in range(N_SIMS))


def _ci(e: dict[str, Any], scale: float = 1.0, fmt: str = ".0f") -> str:
    if e["value"] is None or math.isnan(e["value"]):
        return "–"
    return (
        f"{e['value'] * scale:{fmt}} [{e['lo'] * scale:{fmt}}–{e['hi'] * scale:{fmt}}]"
        if e.get("lo") is not None and not math.isnan(e["lo"])
        else f"{e['value'] * scale:{fmt}}"
    )


def _cmp_cells(c: dict[str, Any] | None, target: float | None, missing: str) -> list[str]:
    """[target, ratio [CI] (ms vs ms), verdict] of one comparison."""
    if target is None:
        return ["–", "–", "–"]
    if c is None:
        return [f"≤ {target:.1f}", "–", missing]
    return [
        f"≤ {target:.1f}",
        f"{c['ratio']:.2f} [{c['lo']:.2f}–{c['hi']:.2f}] ({c['ours_ms']:.0f} vs "
        f"{c['theirs_ms']:.0f} ms, `{c['against']}`)",
        f"**{c['verdict']}**",
    ]


def markdown(doc: dict[str, Any], quick: bool) -> str:
    d = doc["default_strategy"]
    lines = [
        f"# Routing quality{' (quick smoke, not a measurement)' if quick else ''}",
        "",
        "Built from every run present under `routing-runs/` "
        f"({doc['runs']} runs; commits {', '.join(f'`{c}`' for c in doc['run_commits'])}). "
        f"Fleet: {N_SIMS} × `vllmsim {' '.join(FLEET_ARGS)}` (cost model: simulator defaults, "
        "Llama-3-8B on one H100), fresh for every run. All latencies and rates are "
        "**simulated** time. Each cell is the percentile over all measured requests of all "
        "seeds, with its **95 % interval** in brackets (moving-block bootstrap, stratified by "
        'seed; docs/benchmarks.md "Reading the intervals"); `p90 per seed` shows the spread '
        "between seeds. `hit` = the fleet's prefix-cache hit rate, `share` = % of requests "
        "served by sim0/sim1/sim2/sim3. Default strategy of the service: "
        f"`{d}`. † = runs the shared box may have disturbed (client or simulator > 50 ms late).",
        "",
        f"## Targets (TTFT p90 at {TARGET_LOAD * 100:.0f} % load, ours = `extproc:{d}`)",
        "",
        "Ratio = our TTFT p90 / the other's, with its 95 % interval. `met` = the whole interval "
        "is within the target; `met on the estimate` = the ratio is, the interval is not; "
        "`missed by X` = the ratio exceeds the target by X (relative).",
        "",
        "| workload | target vs best Rust | ratio [95 % CI] | verdict | target vs round-robin "
        "| ratio [95 % CI] | verdict | Rust policies measured | our best profile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in doc["targets"]:
        missing = t.get("verdict", "not measured")
        cells = [
            t["workload"],
            *_cmp_cells(t.get("vs_rust"), t["target"], missing),
            *_cmp_cells(t.get("vs_rr"), t["target_rr"], missing),
            ", ".join(t.get("rust_measured", [])) or "–",
            t.get("best_extproc") or "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for wname, w in doc["workloads"].items():
        pts = [p for p in doc["points"] if p["workload"] == wname]
        if not pts:
            continue
        cal = w["calibration"]
        spec = WORKLOADS[wname]
        shas = sorted({s[:12] for p in pts for s in p.get("workload_sha256", {}).values()})
        lines += [
            f"## {wname}",
            "",
            f"{w['models'][0].upper()}{w['models'][1:]}. Capacity "
            f"{cal['capacity_rps_sim']:.1f} req/s"
            + (
                " (given)"
                if cal.get("given")
                else " (every server in a closed loop, summed: "
                + "/".join(f"{x:.1f}" for x in cal.get("per_server_rps_sim", []))
                + ")"
            )
            + f"; time scale {spec.time_scale:g}. Workload files (sha256): "
            + ", ".join(f"`{s}…`" for s in shas)
            + ".",
            "",
            "| load | contender | seeds | n | TTFT p50 ms | TTFT p90 ms | p90 per seed "
            "| e2e p90 s | out tok/s | errors | hit | share % |",
            "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
        ]
        for load in sorted({p["load"] for p in pts}):
            group = [p for p in pts if p["load"] == load]
            vals = [p["ttft_p90_ms"]["value"] for p in group if "ttft_p90_ms" in p]
            best = min(vals, default=math.nan)
            where = f"{load * 100:.0f} % ({group[0]['rate_sim']:.1f} req/s)"
            for k, p in enumerate(group):
                name = p["contender"] + (" (default)" if p["contender"] == f"extproc:{d}" else "")
                if "ttft_p90_ms" not in p:
                    err = "; ".join(f"seed {f['seed']}: {f['error'][:120]}" for f in p["failed"])
                    lines.append(f"| {where if not k else ''} | {name} | failed: {err} |||||||||")
                    continue
                if p["family"] == "extproc" and p["kv_events"]:
                    name += " (KV events)"
                if p["suspect_runs"]:
                    name += " †"
                p90 = _ci(p["ttft_p90_ms"])
                if p["ttft_p90_ms"]["value"] == best:
                    p90 = f"**{p90}**"
                seeds = ",".join(str(s) for s in p["seeds"])
                if p["failed"]:
                    seeds += f" ({len(p['failed'])} failed)"
                lines.append(
                    f"| {where if not k else ''} | {name} | {seeds} | {p['requests']} | "
                    f"{_ci(p['ttft_p50_ms'])} | {p90} | "
                    + "/".join(f"{x:.0f}" for x in p["ttft_p90_ms"]["per_seed"])
                    + f" | {_ci(p['e2e_p90_ms'], 0.001, '.2f')} | "
                    f"{p['output_tokens_per_s']:.0f} | {p['errors']} | {fmt_pct(p['hit_rate'])} | "
                    f"{fmt_shares(p['share'])} |"
                )
        lines.append("")
    notes = []
    if doc["stale_runs"]:
        notes.append(
            f"{len(doc['stale_runs'])} run files ignored: "
            + "; ".join(f"`{s['file']}` ({s['why']})" for s in doc["stale_runs"][:10])
        )
    if doc["sample_mismatch"]:
        notes.append(
            "**contenders replayed different workload files** for: "
            + ", ".join(doc["sample_mismatch"])
        )
    changed = [k for k, v in doc["code_versions"].items() if len(v) > 1]
    if changed:
        notes.append(
            "the runs were measured on different code (" + ", ".join(changed) + " differ; see "
            "`code` in each run file): compare points measured on the same commit"
        )
    if notes:
        lines += ["## Notes", "", *(f"* {n}" for n in notes), ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """TTFT p90 with its interval per contender at the target load, one panel per workload."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    wls = [w for w in doc["workloads"]
           if any(p["workload"] == w and p["load"] == TARGET_LOAD and "ttft_p90_ms" in p
                  for p in doc["points"])]  # fmt: skip
    if not wls:
        return None
    fig, axes = plt.subplots(len(wls), 1, figsize=(9, 0.5 + 2.2 * len(wls)), squeeze=False)
    colors = {"extproc": "tab:green", "envoy": "black", "vllm-router": "tab:blue",
              "sglang-router": "tab:red"}  # fmt: skip
    for ax, w in zip(axes[:, 0], wls, strict=True):
        pts = [p for p in doc["points"]
               if p["workload"] == w and p["load"] == TARGET_LOAD
               and "ttft_p90_ms" in p]  # fmt: skip
        ys = range(len(pts))
        v = [p["ttft_p90_ms"]["value"] for p in pts]
        err = [[x - p["ttft_p90_ms"]["lo"] for x, p in zip(v, pts, strict=True)],
               [p["ttft_p90_ms"]["hi"] - x for x, p in zip(v, pts, strict=True)]]  # fmt: skip
        for y, x, lo, hi, p in zip(ys, v, err[0], err[1], pts, strict=True):
            ax.errorbar([x], [y], xerr=[[lo], [hi]], fmt="o", capsize=3,
                        color=colors.get(p["family"], "grey"))  # fmt: skip
        ax.set_yticks(list(ys), [p["contender"] for p in pts], fontsize=7)
        ax.set_title(f"{w}: TTFT p90 at {TARGET_LOAD * 100:.0f} % load (simulated ms, 95 % CI)",
                     fontsize=9)  # fmt: skip
        ax.set_xscale("log")  # points, not bars: round-robin on unequal servers is 100x others
        ax.invert_yaxis()  # the table's order, top to bottom
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def report(out: Path, quick: bool) -> dict[str, Any]:
    doc = aggregate(out)
    md = markdown(doc, quick)
    notes = out / "routing-notes.md"  # hand-written analysis of the runs (kept across re-renders)
    if notes.exists():
        md += "\n" + notes.read_text(encoding="utf-8").strip() + "\n"
    png = plot(doc, out / "routing.png")
    if png:
        md += f"\n![TTFT p90 per contender]({png})\n"
    write_results("routing", doc, md, results_dir=out)
    return doc
