"""``extproc serve --workers 2``: real processes (main + 2 workers, simulators, Envoy).

The rest of the integration suite runs against workers too with ``EXTPROC_TEST_WORKERS=2``
(tests/integration/conftest.py); these tests are about what only several workers have: the
shared port, in-flight counts shared across processes, the merged /metrics, a dead worker
restarted, the drain of every worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from prometheus_client.parser import text_string_to_metric_families

from devstack.processes import free_port, port_is_free, start_extproc

from .e2e import all_fresh, eventually, get_json, post

pytestmark = pytest.mark.integration

FAST = ["--time-scale", "10"]
WORKERS = ["--workers", "2", "--strategy", "least-request"]


class Stream:
    """An ext_proc stream on a connection of its own (the kernel picks its worker), decided and
    held open as Envoy holds it while the HTTP request runs."""

    def __init__(self, address: str) -> None:
        # A private subchannel pool: grpcio would otherwise share one connection between channels.
        self.channel = grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.call: Any = None
        self.endpoint = ""

    async def decide(self) -> str:
        hv = [base_pb2.HeaderValue(key=":path", raw_value=b"/v1/completions")]
        req = ep.ProcessingRequest(
            request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=hv))
        )
        self.call = ep_grpc.ExternalProcessorStub(self.channel).Process()
        await self.call.write(req)
        resp = await asyncio.wait_for(self.call.read(), 10)
        self.endpoint = resp.dynamic_metadata["extproc"]["endpoint"]
        return self.endpoint

    async def end(self) -> None:
        if self.call is not None:
            await self.call.done_writing()
            await asyncio.wait_for(self.call.read(), 10)
        await self.channel.close()


async def metrics_of(http: aiohttp.ClientSession, admin: str) -> dict[tuple[str, tuple], float]:
    async with http.get(admin + "/metrics") as r:
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def workers_of(http: aiohttp.ClientSession, admin: str) -> list[dict[str, Any]]:
    return (await get_json(http, admin + "/healthz"))["workers"]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def test_streams_on_both_workers_spread_over_the_servers_as_in_one_process(
    stack, http
) -> None:
    s = stack(n_backends=3, common_sim_args=FAST, service_args=WORKERS)
    await eventually(lambda: all_fresh(http, s.admin_url))
    streams = [Stream(s.grpc_address) for _ in range(12)]
    try:
        picks = Counter([await st.decide() for st in streams])  # one after the other

        async def both_busy() -> list[int]:
            counts = [w["open_streams"] for w in await workers_of(http, s.admin_url)]
            return counts if sum(counts) == 12 else []

        per_worker = await eventually(both_busy)
        # 12 connections on one of 2 listeners by chance: p = 2^-11.
        assert all(per_worker), per_worker
        # Least-request sees every worker's picks: 4 each, as one process would pick.
        assert sorted(picks.values()) == [4, 4, 4], picks
        view = await get_json(http, s.admin_url + "/backends")
        assert sorted(b["inflight"] for b in view["backends"]) == [4, 4, 4]
        m = await metrics_of(http, s.admin_url)
        decided = (
            "extproc_decisions_total",
            (("reason", "metrics"), ("strategy", "least-request")),
        )
        assert m[decided] == 12  # the workers' counters, summed in the main's /metrics
        assert m[("extproc_worker_up", (("worker", "0"),))] == 1
        assert m[("extproc_worker_up", (("worker", "1"),))] == 1
        assert m[("extproc_scrapes_total", (("backend", s.sim_endpoints[0]), ("result", "ok")))]
    finally:
        for st in streams:
            await st.end()

    async def released() -> bool:
        view = await get_json(http, s.admin_url + "/backends")
        return all(b["inflight"] == 0 for b in view["backends"])

    await eventually(released)


async def test_envoy_balances_streams_over_the_worker_ports(stack, http) -> None:
    s = stack(n_backends=2, common_sim_args=FAST, workers=2, worker_ports=True)
    await eventually(lambda: all_fresh(http, s.admin_url))
    burst = await asyncio.gather(*(post(http, s.url) for _ in range(16)))
    assert all(r.status == 200 and r.reason == "metrics" for r in burst)
    assert all(r.pod == r.endpoint for r in burst)
    m = await metrics_of(http, s.admin_url)
    decided = ("extproc_decisions_total", (("reason", "metrics"), ("strategy", "weighted")))
    assert m[decided] == 16
    # Cluster extproc lists the two worker ports: Envoy sent streams to both.
    async with http.get(s.envoy_admin_url + "/clusters") as r:
        text = await r.text()
    streams = {
        line.split("::")[1]: int(line.rsplit("::", 1)[1])
        for line in text.splitlines()
        if line.startswith("extproc::") and "::rq_total::" in line
    }
    assert len(streams) == 2 and all(n >= 4 for n in streams.values()), streams


async def test_a_killed_worker_is_restarted_and_its_open_picks_released(stack, http) -> None:
    s = stack(n_backends=2, common_sim_args=FAST, service_args=WORKERS)
    await eventually(lambda: all_fresh(http, s.admin_url))
    streams = [Stream(s.grpc_address) for _ in range(8)]
    try:
        for st in streams:
            await st.decide()

        async def spread() -> list[dict[str, Any]]:
            ws = await workers_of(http, s.admin_url)
            return ws if sum(w["open_streams"] for w in ws) == 8 else []

        before = await eventually(spread)
        victim = max(before, key=lambda w: w["open_streams"])  # holds at least 4 of the 8
        os.kill(victim["pid"], signal.SIGKILL)

        async def restarted() -> dict[str, Any] | None:
            w = (await workers_of(http, s.admin_url))[victim["worker"]]
            return w if w["serving"] and w["pid"] != victim["pid"] else None

        now = await eventually(restarted, timeout=30)
        assert now["restarts"] == 1
        # Its streams died with it: their picks no longer count as in flight.
        view = await get_json(http, s.admin_url + "/backends")
        assert sum(b["inflight"] for b in view["backends"]) == 8 - victim["open_streams"]
        m = await metrics_of(http, s.admin_url)
        assert m[("extproc_worker_restarts_total", (("worker", str(victim["worker"])),))] == 1
        assert "restarting it in" in s.service.log_path.read_text()
        fresh = Stream(s.grpc_address)  # the service still decides
        try:
            assert await fresh.decide() in s.sim_endpoints
        finally:
            await fresh.end()
    finally:
        for st in streams:
            if st.endpoint:
                await st.channel.close()


async def test_sigterm_drains_every_worker_and_leaves_no_process(log_dir: Path, http) -> None:
    grpc_port, admin_port = free_port(), free_port()
    proc = start_extproc(
        grpc_port=grpc_port,
        admin_port=admin_port,
        backends=[f"http://127.0.0.1:{free_port()}"],
        args=["--workers", "2", "--drain-seconds", "1", "--stop-grace", "1"],
        log_dir=log_dir,
    )
    try:
        pids = [w["pid"] for w in await workers_of(http, f"http://127.0.0.1:{admin_port}")]
        held = Stream(f"127.0.0.1:{grpc_port}")
        await held.decide()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(held.call.read(), 15) is grpc.aio.EOF
        assert await held.call.code() == grpc.StatusCode.OK  # ended by the grace, not cut
        await held.channel.close()

        async def exited() -> bool:
            return not proc.alive()

        await eventually(exited, timeout=20)
        assert proc.returncode == 0, proc.log_tail()
        log = proc.log_path.read_text()
        assert log.count("SIGTERM: draining") == 3  # the main and each worker
        assert "ended 1 open streams with status OK" in log
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        proc.stop()


async def test_a_taken_port_or_a_worker_that_cannot_start_stops_the_service(
    log_dir: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_extproc(
            grpc_port=port,
            admin_port=free_port(),
            backends=[],
            args=["--workers", "2"],
            log_dir=log_dir,
            name="taken",
            wait=False,
        )
        assert proc.popen.wait(30) == 1
    assert "cannot listen on gRPC address" in proc.log_path.read_text()
    # Workers load the tokenizers: one that does not load stops each of them, then the main.
    proc = start_extproc(
        grpc_port=free_port(),
        admin_port=free_port(),
        backends=[],
        args=["--workers", "2", "--tokenizer", f"m={log_dir}/no-such-tokenizer"],
        log_dir=log_dir,
        name="bad-tokenizer",
        wait=False,
    )
    assert proc.popen.wait(60) == 2
    log = proc.log_path.read_text()
    assert "exited with code 2 before serving" in log and "extproc worker" in log


async def test_workers_die_with_a_killed_main_and_the_next_one_cleans_up(
    log_dir: Path, http
) -> None:
    def start(name: str) -> Any:
        return start_extproc(
            grpc_port=grpc_port,
            admin_port=admin_port,
            backends=[f"http://127.0.0.1:{free_port()}"],
            args=["--workers", "2", "--drain-seconds", "0"],
            log_dir=log_dir,
            name=name,
        )

    grpc_port, admin_port = free_port(), free_port()
    proc = start("first")
    again = None
    try:
        pids = [w["pid"] for w in await workers_of(http, f"http://127.0.0.1:{admin_port}")]
        run_dir = Path(Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")[3].decode())
        assert run_dir.is_dir()
        os.kill(proc.pid, signal.SIGKILL)  # the main alone, as a crash: no cleanup of its own

        async def workers_gone() -> bool:
            return not any(os.path.exists(f"/proc/{pid}") for pid in pids)

        await eventually(workers_gone, timeout=5)  # killed by the kernel with their main
        assert port_is_free(grpc_port)
        again = start("second")  # the same port works at once; the dead main's files go
        assert not run_dir.exists()
    finally:
        for p in (proc, again):
            if p is not None:
                p.stop()
