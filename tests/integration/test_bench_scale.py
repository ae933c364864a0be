"""bench/bench_scale.py --quick, part (a) at 8 backends end to end: one Envoy of fake vLLM
servers, the service scraping them, the front Envoy routing through it; the results file must
hold figures that make sense for that pool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_quick_pool_run_writes_sane_figures(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--quick", "--parts", "a",
         "--pools", "8", "--window", "2", "--out-dir", str(tmp_path), "--no-install",
         "--max-minutes", "1.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=140, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    data = json.loads((tmp_path / "scale.json").read_text())
    a = data["a"]
    assert a["notes"] == [] or all("wrk" in n for n in a["notes"]), a["notes"]
    assert a["checks"] == [], a["checks"]
    (point,) = a["points"]
    assert point["backends"] == 8
    idle = point["idle"]
    # 8 servers every 100 ms want 80 scrapes/s; a starved shared box still manages a fraction.
    assert 10 < idle["scrapes_ok_per_s"] <= 90
    assert 0 < idle["service_cores"] < data["host"]["cores_available"]
    assert idle["never_scraped"] == 0
    assert 0 < idle["age_p50_s"] <= idle["age_p90_s"] < 2.0
    assert idle["fake_envoy_cores"] < 0.5
    (routed,) = point["routed"]
    assert routed["requests"] > 0 and routed["errors"] == 0 and routed["non_2xx"] == 0
    # Every routed request went through the service (no fail-open).
    assert routed["ext_proc"]["streams_started"] >= routed["requests"]
    assert routed["ext_proc"]["failure_mode_allowed"] == 0
    assert 0 < point["ratio_routed_direct"] < 1.5
    assert a["measured"]["cores_available"] >= 1 and a["measured"]["command"]
    assert a["targets"]["at_backends"] == 8

    md = (tmp_path / "scale.md").read_text()
    assert "## (a) Pool size" in md and "| 8 |" in md
    assert "_Measured" in md  # the common results footer
