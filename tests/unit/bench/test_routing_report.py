"""bench/routing_report.py: the routing benchmark's report is built from whatever run files are
present (runs of several invocations merge), with intervals and issue 9's targets. No processes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.common import write_json
from bench.routing_report import aggregate, markdown, report
from bench.routing_specs import (
    RUN_FORMAT,
    RUNS_SUBDIR,
    WORKLOADS,
    run_path,
)

WL = "heterogeneous"
CAP = 60.0


def _run(contender: str, seed: int, samples: np.ndarray, **over: object) -> dict:
    family, _, policy = contender.partition(":")
    rec = {
        "format": RUN_FORMAT,
        "workload": WL,
        "spec_digest": WORKLOADS[WL].digest(),
        "workload_sha256": f"sha-seed{seed}",
        "seed": seed,
        "contender": contender,
        "family": family,
        "policy": policy,
        "load": 0.85,
        "capacity_rps_sim": CAP,
        "rate_sim": 0.85 * CAP,
        "duration_wall_s": 30.0,
        "git_commit": "abc1234",
        "default_strategy": "weighted",
        "started": f"2026-01-0{seed} 00:00:00",
        "code": {"extproc": "e1", "envoy.yaml": "y1", "vllmsim": "v1"},
        "sim": {
            "prefix_hit_rate": 0.5,
            "preemptions": 0,
            "sim_lag_p99_wall_s": 0.001,
            "sim_resyncs": 0,
        },
        "client_send_lag_p99_wall_s": 0.002,
        "summary": {
            "requests": len(samples),
            "errors_total": 0,
            "output_tokens_per_s": 1000.0,
            "backend_share": {"sim0": 0.25, "sim1": 0.25, "sim2": 0.25, "sim3": 0.25},
        },
        "samples": {
            "ttft_ms": [float(x) for x in samples],
            "e2e_ms": [float(x) * 10 for x in samples],
        },
    }
    rec.update(over)
    return rec


@pytest.fixture
def out(tmp_path):
    write_json(
        tmp_path / RUNS_SUBDIR / WL / "calibration.json",
        {
            "workload": WL,
            "spec_digest": WORKLOADS[WL].digest(),
            "capacity_rps_sim": CAP,
            "per_server_rps_sim": [20, 20, 10, 10],
        },
    )
    rng = np.random.default_rng(0)
    for seed in (1, 2, 3):
        base = rng.exponential(50.0, 600) + 10
        for name, k in (
            ("extproc:weighted", 0.5),
            ("extproc:random", 3.0),
            ("envoy:round-robin", 2.0),
            ("sglang-router:cache_aware", 1.0),
            ("vllm-router:power_of_two", 1.2),
        ):
            write_json(run_path(tmp_path, WL, name, 0.85, seed), _run(name, seed, base * k))
    return tmp_path


def test_points_pool_every_seed_with_intervals(out):
    doc = aggregate(out)
    pts = {p["contender"]: p for p in doc["points"]}
    assert set(pts) == {
        "extproc:weighted",
        "extproc:random",
        "envoy:round-robin",
        "sglang-router:cache_aware",
        "vllm-router:power_of_two",
    }
    w = pts["extproc:weighted"]
    assert w["seeds"] == [1, 2, 3] and w["requests"] == 1800
    p90 = w["ttft_p90_ms"]
    assert p90["lo"] < p90["value"] < p90["hi"] and len(p90["per_seed"]) == 3
    assert doc["runs"] == 15 and doc["stale_runs"] == [] and doc["sample_mismatch"] == []
    # report order: ours, Envoy, vllm-router, sglang-router
    fams = [p["family"] for p in doc["points"]]
    assert fams == sorted(fams, key=["extproc", "envoy", "vllm-router", "sglang-router"].index)


def test_targets_compare_our_default_with_the_best_rust_policy_and_round_robin(out):
    doc = aggregate(out)
    (t,) = [t for t in doc["targets"] if t["workload"] == WL]
    assert t["vs_rust"]["against"] == "sglang-router:cache_aware"  # the lower of the two
    assert t["vs_rust"]["ratio"] == pytest.approx(0.5, rel=1e-6)
    assert t["vs_rust"]["verdict"] == "met"
    assert t["vs_rr"]["ratio"] == pytest.approx(0.25, rel=1e-6)
    assert t["vs_rr"]["verdict"] == "met"
    assert t["rust_measured"] == ["sglang-router:cache_aware", "vllm-router:power_of_two"]
    assert t["best_extproc"] == "extproc:weighted"
    others = {t["workload"]: t for t in doc["targets"]}
    assert others["shared-prefix"]["verdict"] == "not measured"


def test_a_missed_target_says_by_how_much(tmp_path, out):
    rng = np.random.default_rng(1)
    for seed in (1, 2, 3):
        write_json(
            run_path(out, WL, "extproc:weighted", 0.85, seed),
            _run("extproc:weighted", seed, rng.exponential(50.0, 600) * 1.5 + 15),
        )
    (t,) = [t for t in aggregate(out)["targets"] if t["workload"] == WL]
    assert t["vs_rust"]["verdict"].startswith("missed by")
    md = markdown(aggregate(out), quick=False)
    assert "missed by" in md


def test_stale_and_failed_runs_are_reported_not_pooled(out):
    write_json(
        run_path(out, WL, "extproc:session", 0.85, 1),
        _run("extproc:session", 1, np.ones(10), spec_digest="other"),
    )
    write_json(
        run_path(out, WL, "extproc:session", 0.85, 2),
        _run("extproc:session", 2, np.ones(10), capacity_rps_sim=99.0),
    )
    failed = _run("extproc:least-request", 1, np.ones(10))
    del failed["summary"]
    failed["error"] = "ProcessStartError: boom"
    write_json(run_path(out, WL, "extproc:least-request", 0.85, 1), failed)
    doc = aggregate(out)
    why = sorted(s["why"] for s in doc["stale_runs"])
    assert why == [
        "measured at another calibration's request rate",
        "workload or fleet definition changed since",
    ]
    assert "extproc:session" not in {p["contender"] for p in doc["points"]}
    (lr,) = [p for p in doc["points"] if p["contender"] == "extproc:least-request"]
    assert lr["failed"] == [{"seed": 1, "error": "ProcessStartError: boom"}]
    md = markdown(doc, quick=False)
    assert "failed: seed 1: ProcessStartError: boom" in md
    assert "2 run files ignored" in md


def test_different_workload_files_for_one_seed_are_flagged(out):
    write_json(
        run_path(out, WL, "extproc:random", 0.85, 1),
        _run("extproc:random", 1, np.ones(50), workload_sha256="something-else"),
    )
    doc = aggregate(out)
    assert doc["sample_mismatch"] == [f"{WL} seed 1"]
    assert "replayed different workload files" in markdown(doc, quick=False)


def test_report_writes_markdown_json_with_the_commit(out):
    report(out, quick=False)
    md = (out / "routing.md").read_text()
    assert "## heterogeneous" in md and "`abc1234`" in md and "[" in md
    doc = json.loads((out / "routing.json").read_text())
    assert doc["workloads"][WL]["calibration"]["capacity_rps_sim"] == CAP
    assert doc["machine"]["cpu_count"] >= 1 and doc["runs"] == 15
