"""Opt-in tests against a REAL vLLM (``make test-vllm``; docs/real-vllm.md).

Everything here is deselected unless ``REAL_VLLM=1`` is set, so ``make test`` (plain ``pytest``)
never needs the 3.5 GB ``vllm`` extra nor the minute a vLLM takes to boot; it only reports these
tests as deselected. The session starts ONE real vLLM (``real_vllm``: booting it is the cost)
and shares it: test_real_vllm_gateways.py puts one gateway per Envoy config around it, then
test_real_vllm_reliability.py shares ONE gateway (real Envoy + the service + that vLLM + two
simulators), in file order.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .realvllm import RUN_DIR, Gateway, RealVllm, launch_real_vllm, start_gateway, vllm_cpus

HERE = Path(__file__).resolve().parent
ENABLED = os.environ.get("REAL_VLLM") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    mine = [i for i in items if HERE in Path(str(i.path)).resolve().parents]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if i not in mine]


def pytest_report_header(config: pytest.Config) -> str | None:
    if not ENABLED:
        return "tests/real_vllm: deselected (opt-in: make test-vllm, or REAL_VLLM=1)"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome: Any = yield
    rep = outcome.get_result()
    if rep.failed:
        item.session.real_vllm_failed = True  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def run_dir() -> Path:
    """run/real-vllm/<UTC time>/: process logs and figures.json of this session (kept)."""
    path = RUN_DIR / "real-vllm" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def figures(run_dir: Path) -> Iterator[dict[str, Any]]:
    """What the tests measured; printed and written to figures.json at the end."""
    data: dict[str, Any] = {}
    yield data
    (run_dir / "figures.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\n===== real vLLM figures ({run_dir / 'figures.json'}) =====")
    print(json.dumps(data, indent=2, default=str))


@pytest.fixture(scope="session")
def tiny_model(figures: dict[str, Any]) -> Path:
    from devstack.tiny_model import DEFAULT_OUT, build, is_built

    t0 = time.monotonic()
    cached = is_built(DEFAULT_OUT)
    path = build(DEFAULT_OUT)
    figures["model_build_s"] = 0.0 if cached else round(time.monotonic() - t0, 1)
    return path


@pytest.fixture(scope="session")
def real_vllm(tiny_model: Path, run_dir: Path, figures: dict[str, Any]) -> Iterator[RealVllm]:
    """The session's real vLLM, launched, NOT waited for: the first gateway waits (it starts its
    other processes meanwhile). Stopped at the end of the session."""
    vllm = launch_real_vllm(model_dir=tiny_model, log_dir=run_dir / "logs")
    try:
        yield vllm
    finally:
        if vllm.ready_s is not None:
            figures["vllm_start_s"] = round(vllm.ready_s, 1)
        vllm.stop()


@pytest.fixture(scope="session")
def gw(
    tiny_model: Path,
    run_dir: Path,
    figures: dict[str, Any],
    real_vllm: RealVllm,
    request: pytest.FixtureRequest,
) -> Iterator[Gateway]:
    gateway = start_gateway(model_dir=tiny_model, log_dir=run_dir / "logs", vllm=real_vllm)
    # Includes the vLLM's boot unless an earlier module had it booted already.
    figures["stack_start_s"] = round(gateway.timings["start_s"], 1)
    figures["vllm_cpus"] = vllm_cpus() or "unpinned"
    figures["box_cpus"] = os.cpu_count()
    print(
        f"\nreal vLLM gateway up in {gateway.timings['start_s']:.0f} s: Envoy {gateway.url}, "
        f"service {gateway.admin_url}, real vLLM {gateway.real} (CPUs: "
        f"{vllm_cpus() or 'unpinned'}), sims {gateway.sim_endpoints}; "
        f"logs in {run_dir / 'logs'}"
    )
    try:
        yield gateway
    finally:
        if getattr(request.session, "real_vllm_failed", False):
            print(f"\n----- process logs -----\n{gateway.log_tails(40)}")
        gateway.stop()
