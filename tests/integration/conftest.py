"""Shared fixtures for integration tests: real processes on loopback, built on devstack."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from devstack import Stack
from devstack.processes import find_envoy

from .e2e import service_workers


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    # Keep each phase's report on the item so fixtures can tell at teardown whether the test
    # failed (and only then dump process logs).
    outcome: Any = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


@pytest.fixture(autouse=True)
def _service_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``EXTPROC_TEST_WORKERS=N`` every service a test starts (devstack, start_extproc,
    in-process ``run``) reads ``EXTPROC_WORKERS=N``: the same tests against N decision worker
    processes (docs/scaling.md). A test's own ``--workers`` still wins."""
    if service_workers() > 1:
        monkeypatch.setenv("EXTPROC_WORKERS", str(service_workers()))


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Per-test directory for process logs (and rendered Envoy configs)."""
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    """The envoy binary, found like devstack finds it. Missing binary = failure, not skip."""
    try:
        return find_envoy()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def stack(log_dir: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Stack]]:
    """Factory: ``stack(n_backends=3, sim_args=[[...], ...], service_args=[...], ...)``.

    Returns a started :class:`devstack.Stack`; every stack is stopped at teardown, and when the
    test failed the tail of each process log is printed (shown in pytest's report).
    """
    started: list[Stack] = []

    def factory(
        *,
        n_backends: int = 3,
        sim_args: Sequence[Sequence[str]] = (),
        common_sim_args: Sequence[str] = (),
        service_args: Sequence[str] = (),
        direct_listener: bool = False,
        **kwargs: Any,
    ) -> Stack:
        s = Stack(
            log_dir=log_dir / f"stack{len(started)}",
            n_backends=n_backends,
            sim_args=sim_args,
            common_sim_args=common_sim_args,
            # Teardown stops the service with SIGTERM. The production drain (5 s by default)
            # would outlast devstack's stop timeout: a SIGKILL, slow teardown and the service's
            # coverage data lost. A test about the drain passes its own --drain-seconds (the
            # later flag wins).
            service_args=["--drain-seconds", "0", *service_args],
            direct_listener=direct_listener,
            **kwargs,
        )
        started.append(s)
        s.start()
        return s

    try:
        yield factory
    finally:
        failed = _failed(request)
        for s in started:
            if failed:
                print(f"\n----- process logs of {s.log_dir} -----\n{s.log_tails(40)}")
            s.stop()
