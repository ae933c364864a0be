"""bench/bench_routing.py --quick end to end: calibration, a fresh devstack fleet per run, our
service and Envoy round-robin as contenders, per-run JSON, and a report merged from two
separate invocations (the way long measurements are split up)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _bench(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_routing.py"), "--quick",
         "--out-dir", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip


@pytest.mark.timeout(240)
def test_quick_runs_merge_into_one_report(tmp_path):
    first = _bench(tmp_path, "--contenders", "extproc:weighted")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "calibrating capacity" in first.stdout
    second = _bench(tmp_path, "--contenders", "envoy:round-robin")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "calibrating" not in second.stdout  # the stored calibration is reused

    runs = tmp_path / "routing-runs" / "shared-prefix"
    cal = json.loads((runs / "calibration.json").read_text())
    assert cal["capacity_rps_sim"] > 10 and len(cal["per_server_rps_sim"]) == 4
    ours = json.loads((runs / "extproc_weighted@85-seed1.json").read_text())
    rr = json.loads((runs / "envoy_round-robin@85-seed1.json").read_text())
    for rec in (ours, rr):
        assert "error" not in rec, rec.get("error")
        assert rec["summary"]["errors_total"] == 0
        assert rec["rate_sim"] == pytest.approx(0.85 * cal["capacity_rps_sim"])
        assert len(rec["samples"]["ttft_ms"]) == rec["summary"]["completed"] > 30
    # Same saved workload, same requests: a paired comparison.
    assert ours["workload_sha256"] == rr["workload_sha256"]
    assert ours["n"] == rr["n"]
    # Our service decided (reasons come from it), Envoy alone spread evenly.
    assert ours["summary"]["routing_reasons"]
    assert not rr["summary"]["routing_reasons"]
    assert all(abs(v - 0.25) < 0.05 for v in rr["summary"]["backend_share"].values())

    md = (tmp_path / "routing.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert any(r.startswith("| 85 %") and "extproc:weighted (default)" in r for r in rows)
    assert any("envoy:round-robin" in r and "[" in r for r in rows)
    doc = json.loads((tmp_path / "routing.json").read_text())
    assert doc["runs"] == 2
    assert {p["contender"] for p in doc["points"]} == {"extproc:weighted", "envoy:round-robin"}
