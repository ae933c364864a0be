"""How the real Envoy (envoy/envoy.yaml, rendered for loopback) behaves when things fail.

Part 1 runs the real Envoy against the in-test ext_proc servicer and in-test backends of
test_envoy_config.py (so the service's answer is scripted per request), plus dead pool members
(closed ports), a backend whose /health fails, a backend answering 500 and a backend in a
subprocess that the test SIGSTOPs. Part 2 runs the real `extproc serve` processes.
See docs/envoy.md "Failure behaviour" for what each test pins down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web

from devstack.envoy_config import DEFAULT_TEMPLATE, render_local_config, render_local_config_dict
from devstack.processes import (
    PortInUseError,
    Proc,
    free_port,
    http_get,
    poll_until,
    start_envoy,
    start_extproc,
    start_vllmsim,
)

from .e2e import envoy_stats as stats
from .test_envoy_config import (
    PORT_KEY,
    FakeBackends,
    FakeExtProc,
    LoopThread,
    _start_grpc,
)

pytestmark = pytest.mark.integration

FAST = ["--time-scale", "10"]
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


# --------------------------------------------------------------------------- the knobs


def test_failure_and_limit_knobs() -> None:
    """The values docs/envoy.md documents (a guard against silent edits)."""
    cfg = yaml.safe_load(DEFAULT_TEMPLATE.read_text(encoding="utf-8"))
    om = cfg["overload_manager"]
    heap = next(m for m in om["resource_monitors"] if m["name"].endswith("fixed_heap"))
    assert heap["typed_config"]["max_heap_size_bytes"] == 1 << 30
    actions = {
        a["name"].rsplit(".", 1)[1]: a["triggers"][0]["threshold"]["value"] for a in om["actions"]
    }
    assert actions == {"shrink_heap": 0.90, "stop_accepting_requests": 0.95}
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["max_request_headers_kb"] == 32
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 128
    assert hcm["stream_idle_timeout"] == "300s" and hcm["request_headers_timeout"] == "10s"
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    retry = routes[0]["route"]["retry_policy"]
    assert retry["retry_on"] == "connect-failure,refused-stream,reset-before-request"
    assert retry["num_retries"] == 3  # the pick + 3 fallback endpoints
    assert routes[-1]["direct_response"]["status"] == 404
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    (hc,) = clusters["vllm"]["health_checks"]
    assert hc["http_health_check"] == {"path": "/health"}
    assert (hc["interval"], hc["timeout"], hc["unhealthy_threshold"]) == ("0.5s", "0.5s", 2)
    od = clusters["vllm"]["outlier_detection"]
    assert od["split_external_local_origin_errors"] is True
    assert (od["consecutive_5xx"], od["consecutive_gateway_failure"]) == (3, 3)
    assert od["successful_active_health_check_uneject_host"] is False
    assert od["consecutive_local_origin_failure"] == 2
    statuses = clusters["vllm"]["common_lb_config"]["override_host_status"]["statuses"]
    assert "UNHEALTHY" not in statuses
    (xhc,) = clusters["extproc"]["health_checks"]
    assert (xhc["interval"], xhc["unhealthy_threshold"]) == ("1s", 1)
    # Several service replicas render into one cluster; the single-address call still works.
    two = render_local_config_dict(
        listener_port=1, admin_port=2, grpc_ports=[3, 4], backends=[("127.0.0.1", 5)]
    )
    eps = {c["name"]: c for c in two["static_resources"]["clusters"]}["extproc"]
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in eps["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == [3, 4]
    with pytest.raises(ValueError):
        render_local_config_dict(listener_port=1, admin_port=2, backends=[("127.0.0.1", 5)])


# --------------------------------------------------------------------------- test doubles


class ScriptedExtProc(FakeExtProc):
    """FakeExtProc plus ``x-test-end: ok|unavailable``: after answering, end the gRPC stream
    0.3 s later with status OK (return) or UNAVAILABLE (abort) instead of waiting for Envoy."""

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        headers = {
            h.key: (h.raw_value.decode() if h.raw_value else h.value)
            for h in first.request_headers.headers.headers
        }
        end = headers.get("x-test-end")
        if end is None:
            # Ordinary streams: the base class's behaviour, fed the message already read.
            await super().Process(request_iterator, _Replay(first, context))
            return
        await context.write(await self._decide(headers))
        await asyncio.sleep(0.3)
        if end == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        # "ok": returning ends the stream with grpc-status OK.


class _Replay:
    """A servicer context whose first read() returns a message that was already read."""

    def __init__(self, first: Any, context: grpc.aio.ServicerContext) -> None:
        self._first: list[Any] = [first]
        self._context = context

    async def read(self) -> Any:
        return self._first.pop() if self._first else await self._context.read()

    async def write(self, message: Any) -> None:
        await self._context.write(message)


class ModalBackends(FakeBackends):
    """FakeBackends whose behaviour can be set per port: ``ok`` (default), ``500`` (every
    request except GET /health answers 500) or ``unhealthy`` (GET /health answers 503)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: dict[int, str] = {}
        self.hits: dict[int, int] = {}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        port = request.app[PORT_KEY]
        mode = self.mode.get(port, "ok")
        if request.path == "/health":
            return web.Response(status=503 if mode == "unhealthy" else 200)
        self.hits[port] = self.hits.get(port, 0) + 1
        if mode == "500":
            return web.json_response({"port": port, "error": "boom"}, status=500)
        return await super()._handle(request)


# A real process we can SIGSTOP: it accepts TCP connections (kernel backlog) but never answers.
HANGABLE_BACKEND = r"""
import sys
from aiohttp import web
port = int(sys.argv[1])
async def health(request):
    return web.Response(text="ok")
async def anything(request):
    await request.read()
    return web.json_response({"port": port})
app = web.Application()
app.router.add_get("/health", health)
app.router.add_route("*", "/{tail:.*}", anything)
web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
"""


def start_hangable_backend(log_dir: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(
        f"hangable-{port}", [sys.executable, "-c", HANGABLE_BACKEND, str(port)], log_dir=log_dir
    )
    proc.ready_check = lambda: http_get(f"http://127.0.0.1:{port}/health")[0] == 200
    proc.ready_what = f"hangable backend on {port}"
    return proc.wait_ready(), port


@dataclass
class World:
    loop: LoopThread
    servicer: ScriptedExtProc
    backends: ModalBackends
    hangable: Proc
    hangable_port: int
    dead: list[int]
    url: str
    admin_url: str
    grpc_port: int
    named: dict[str, int] = field(default_factory=dict)

    def ep(self, name: str) -> str:
        return f"127.0.0.1:{self.named[name]}"


# Roles of the in-process backends (ports assigned at start). E500 answers 500 only during its
# test, UNHEALTHY fails its health check from the start. Six plain healthy ones keep the
# pool above Envoy's 50% panic threshold while up to five members are down/ejected at once.
HEALTHY = ["A", "B", "C", "F", "G", "K"]
ROLES = [*HEALTHY, "E500", "UNHEALTHY"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, envoy_bin: str) -> Iterator[World]:
    log_dir = tmp_path_factory.mktemp("envoy-failures")
    loop = LoopThread()
    servicer = ScriptedExtProc()
    backends = ModalBackends()
    grpc_port = free_port()
    server = envoy = hangable = None
    try:
        server = loop.run(_start_grpc(servicer, grpc_port))
        loop.run(backends.start(len(ROLES)))
        named = dict(zip(ROLES, backends.ports, strict=True))
        backends.mode[named["UNHEALTHY"]] = "unhealthy"
        hangable, hport = start_hangable_backend(log_dir)
        dead = [free_port(), free_port()]  # pool members where nothing listens
        listener, admin = free_port(), free_port()
        config = render_local_config(
            listener_port=listener,
            admin_port=admin,
            extproc_address=("127.0.0.1", grpc_port),
            backends=[("127.0.0.1", p) for p in [*backends.ports, hport, *dead]],
        )
        envoy = start_envoy(
            config, log_dir=log_dir, admin_port=admin, concurrency=1, log_level="info"
        )
        w = World(
            loop,
            servicer,
            backends,
            hangable,
            hport,
            dead,
            f"http://127.0.0.1:{listener}",
            f"http://127.0.0.1:{admin}",
            grpc_port,
            named,
        )
        w.named["H"] = hport
        w.named["D1"], w.named["D2"] = dead
        yield w
    finally:
        if hangable is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hangable.pid, signal.SIGCONT)
            hangable.stop()
        if envoy is not None:
            envoy.stop()
        if server is not None:
            loop.run(server.stop(grace=None))
        loop.run(backends.stop())
        loop.close()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    test_id: str

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def port(self) -> int:
        return int(self.json()["port"])


async def send(
    url: str,
    *,
    pick: str | None = None,
    path: str = "/v1/embeddings",
    method: str = "POST",
    headers: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
    timeout: float = 15.0,
) -> Reply:
    test_id = str(uuid.uuid4())
    hdrs = {"x-test-id": test_id, "content-type": "application/json", **(headers or {})}
    if pick:
        hdrs["x-test-pick"] = pick
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.request(method, url + path, json=body or {"model": "m"}, headers=hdrs) as resp,
    ):
        data = await resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, data, test_id)


def health_flags(admin_url: str, cluster: str, endpoint: str) -> str:
    """Envoy's health flags of one host (``healthy``, ``/failed_active_hc``, ...)."""
    _, text = http_get(f"{admin_url}/clusters", timeout=3.0)
    prefix = f"{cluster}::{endpoint}::health_flags::"
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :]
    raise AssertionError(f"{endpoint} not in cluster {cluster}")


async def wait_flags(
    admin_url: str, cluster: str, endpoint: str, want: str, timeout: float
) -> float:
    """Poll until ``want`` is (or, for "healthy", exactly is) in the host's flags; returns when."""
    deadline = time.monotonic() + timeout
    flags = ""
    while time.monotonic() < deadline:
        flags = await asyncio.to_thread(health_flags, admin_url, cluster, endpoint)
        if (flags == "healthy") if want == "healthy" else (want in flags):
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{endpoint}: flags {flags!r}, wanted {want!r} within {timeout}s")


# --------------------------------------------------------------------------- 1. fallback list


async def test_two_dead_listed_hosts_then_the_third_listed_gets_it(world: World) -> None:
    # D1 and D2 are pool members on closed ports; the list must be walked in order, so the
    # request lands on C (the third listed), never on A (fourth) or a random pool host.
    ranked = f"{world.ep('D1')},{world.ep('D2')},{world.ep('C')},{world.ep('A')}"
    for _ in range(5):
        r = await send(world.url, pick=ranked)
        assert r.status == 200, r.body
        assert r.port == world.named["C"]
        # The client sees both: the pick (this fake service reports its whole list) and the
        # host that served after the walk.
        assert r.headers["x-routed-endpoint"].split(",")[0] == world.ep("D1")
        assert r.headers["x-served-endpoint"] == world.ep("C")
    burst = await asyncio.gather(*(send(world.url, pick=ranked) for _ in range(20)))
    assert [r.status for r in burst] == [200] * 20
    assert {r.port for r in burst} == {world.named["C"]}


async def test_a_dead_pick_never_causes_a_client_error(world: World) -> None:
    live = {world.named[n] for n in [*HEALTHY, "E500", "H"]}
    d1, d2 = world.ep("D1"), world.ep("D2")
    picks = [d1, f"{d1},{d2}", f"{d2},{world.ep('B')}"]
    burst = await asyncio.gather(*(send(world.url, pick=p) for p in picks * 10))
    assert all(r.status == 200 for r in burst), [r.body for r in burst if r.status != 200]
    assert {r.port for r in burst} <= live
    # With a live fallback listed, it is that one (not the fallback policy's choice).
    assert {r.port for r in burst[2::3]} == {world.named["B"]}


async def test_a_dead_pick_not_yet_known_dead_is_retried_on_the_next_listed(
    world: World, tmp_path: Path
) -> None:
    # Without health checks Envoy believes the dead pick is fine: attempt 1 goes there (the lua
    # override), is refused, and the retry takes the next listed host (override_host), not the
    # pick again (the router drops the upstream override host on retries).
    listener, admin = free_port(), free_port()
    cfg = render_local_config_dict(
        listener_port=listener,
        admin_port=admin,
        extproc_address=("127.0.0.1", world.grpc_port),
        backends=[("127.0.0.1", p) for p in [*world.backends.ports, *world.dead]],
    )
    for cluster in cfg["static_resources"]["clusters"]:
        cluster.pop("health_checks", None)
    envoy = await asyncio.to_thread(
        start_envoy, yaml.safe_dump(cfg), log_dir=tmp_path, admin_port=admin, concurrency=1
    )
    try:
        ranked = f"{world.ep('D1')},{world.ep('B')},{world.ep('C')}"
        for _ in range(4):
            r = await send(f"http://127.0.0.1:{listener}", pick=ranked)
            assert r.status == 200 and r.port == world.named["B"], r.body
        # One refused attempt each, until 2 consecutive local-origin failures eject D1
        # (outlier detection); from then on the ejected pick is skipped without an attempt.
        got = stats(f"http://127.0.0.1:{admin}", "vllm.upstream_rq_retry$")
        assert 2 <= got["cluster.vllm.upstream_rq_retry"] <= 3, got
        flags = health_flags(f"http://127.0.0.1:{admin}", "vllm", world.ep("D1"))
        assert "failed_outlier_check" in flags
    finally:
        await asyncio.to_thread(envoy.stop)


# --------------------------------------------------------------------------- 2. unhealthy hosts


async def test_a_pick_failing_health_checks_is_skipped(world: World) -> None:
    # /health answers 503: unhealthy at the first check (non-200 skips the threshold).
    await wait_flags(world.admin_url, "vllm", world.ep("UNHEALTHY"), "failed_active_hc", 10)
    before = world.backends.hits.get(world.named["UNHEALTHY"], 0)
    for _ in range(5):
        r = await send(world.url, pick=f"{world.ep('UNHEALTHY')},{world.ep('B')}")
        assert r.status == 200 and r.port == world.named["B"]
    assert world.backends.hits.get(world.named["UNHEALTHY"], 0) == before


async def test_a_hung_pick_stops_getting_requests_within_seconds(world: World) -> None:
    hung, alt = world.ep("H"), world.ep("F")
    ranked = f"{hung},{alt}"
    # Healthy and answering: it gets its requests.
    await wait_flags(world.admin_url, "vllm", hung, "healthy", 10)
    assert (await send(world.url, pick=ranked)).port == world.hangable_port
    os.kill(world.hangable.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        marked = await wait_flags(world.admin_url, "vllm", hung, "failed_active_hc", 10)
        print(f"\nSIGSTOPped backend marked unhealthy after {marked - stopped:.2f} s")
        # 0.5 s timeout x 2 + 0.5 s interval: ~1.5-2 s; generous bound for a loaded machine.
        assert marked - stopped < 5.0
        for _ in range(5):
            r = await send(world.url, pick=ranked, timeout=5)
            assert r.status == 200 and r.port == world.named["F"]
    finally:
        os.kill(world.hangable.pid, signal.SIGCONT)
    # One good check brings it back.
    await wait_flags(world.admin_url, "vllm", hung, "healthy", 10)
    assert (await send(world.url, pick=ranked)).port == world.hangable_port


async def test_a_backend_answering_500_is_ejected(world: World) -> None:
    bad, alt = world.ep("E500"), world.ep("G")
    before = stats(world.admin_url, "outlier_detection")
    statuses = []
    # Failing only during this test, so that the fallback policy of other tests never meets it.
    world.backends.mode[world.named["E500"]] = "500"
    for _ in range(15):
        r = await send(world.url, pick=f"{bad},{alt}")
        statuses.append(r.status)
        if r.status == 200:
            assert r.port == world.named["G"]
            break
        # The backend's own 500 reaches the client unchanged: a 5xx is never retried.
        assert r.status == 500 and r.port == world.named["E500"]
    # consecutive_5xx: 3. The ejection is made on Envoy's main thread and then reaches the
    # worker, so a few more back-to-back requests may still get there (measured: 0-2).
    assert statuses[-1] == 200 and 3 <= statuses.count(500) <= 7, statuses
    assert "failed_outlier_check" in health_flags(world.admin_url, "vllm", bad)
    after = stats(world.admin_url, "outlier_detection")
    key = "cluster.vllm.outlier_detection.ejections_enforced_consecutive_5xx"
    assert after[key] - before.get(key, 0) == 1
    # It answers /health, but a passing active check must not lift the ejection (Envoy's
    # default would, within one check interval): still skipped after several checks.
    checks = "cluster.vllm.health_check.success"
    seen = stats(world.admin_url, "health_check.success")[checks]
    deadline = time.monotonic() + 10
    while stats(world.admin_url, "health_check.success")[checks] < seen + 3 * len(
        world.backends.ports
    ):
        assert time.monotonic() < deadline, "health checks stopped"
        r = await send(world.url, pick=f"{bad},{alt}")
        assert r.status == 200 and r.port == world.named["G"]
    assert "failed_outlier_check" in health_flags(world.admin_url, "vllm", bad)


# --------------------------------------------------------------------------- 5. routes


NOT_PUBLIC = [
    ("GET", "/metrics"),
    ("GET", "/health"),
    ("GET", "/ping"),
    ("GET", "/version"),
    ("GET", "/server_info"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/collective_rpc"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/start_profile"),
    ("POST", "/stop_profile"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/"),
    ("GET", "/v1/embeddings"),
    ("POST", "/v1/models"),
    ("DELETE", "/v1/models"),
    ("POST", "/v1/embeddings/x"),
    ("POST", "/v1/chat"),
]
PUBLIC = [
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/audio/translations"),
    ("POST", "/v1/rerank"),
    ("POST", "/v2/rerank"),
    ("POST", "/rerank"),
    ("POST", "/v1/score"),
    ("POST", "/score"),
    ("POST", "/pooling"),
    ("POST", "/classify"),
    ("GET", "/v1/models"),
]


async def test_only_the_inference_api_is_exposed(world: World) -> None:
    key = "cluster.vllm.upstream_rq_total"
    before = stats(world.admin_url, "vllm.upstream_rq_total")[key]
    for method, path in NOT_PUBLIC:
        r = await send(world.url, pick=world.ep("A"), path=path, method=method)
        assert r.status == 404, (method, path, r.status, r.body)
        assert r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == "unknown_url" and err["type"] == "invalid_request_error"
        assert r.test_id not in world.servicer.streams, "the service was asked about a 404"
    assert stats(world.admin_url, "vllm.upstream_rq_total")[key] == before, "reached a backend"
    for method, path in PUBLIC:
        r = await send(world.url, pick=world.ep("A"), path=path, method=method)
        assert r.status == 200 and r.port == world.named["A"], (method, path, r.status)
    assert stats(world.admin_url, "vllm.upstream_rq_total")[key] == before + len(PUBLIC)


# --------------------------------------------------------------------------- 4. stream end


@pytest.mark.parametrize(("end", "counted"), [("ok", 0), ("unavailable", 1)])
async def test_service_ending_its_stream_mid_response(world: World, end: str, counted: int) -> None:
    """FINDING for the service's shutdown (docs/envoy.md): a server that ends an open ext_proc
    stream with status OK after its answer is harmless; ending it with an error status is
    counted as a failure (failure_mode_allowed; in fail-closed mode it would cut the response).
    Either way the routed, streaming response itself completes."""
    key = "http.ingress_http.ext_proc.failure_mode_allowed"
    before = stats(world.admin_url, "ext_proc")
    body = {"stream": True, "chunks": 6, "interval": 0.15}  # ~0.9 s, the end comes at 0.3 s
    r = await send(world.url, pick=world.ep("K"), headers={"x-test-end": end}, body=body)
    assert r.status == 200
    assert r.body.count(b"data: ") == 7 and r.body.rstrip().endswith(b"[DONE]")
    assert r.headers["x-routed-endpoint"] == world.ep("K")
    after = stats(world.admin_url, "ext_proc")
    assert after[key] - before.get(key, 0) == counted
    half = "http.ingress_http.ext_proc.server_half_closed"
    assert after[half] > before.get(half, 0)


# --------------------------------------------------------------------------- Envoy's own 503


async def test_envoy_own_503_is_openai_json(tmp_path: Path, envoy_bin: str) -> None:
    """The whole pool dead and the service down: Envoy's own reply is OpenAI-shaped."""
    listener, admin = free_port(), free_port()
    config = render_local_config(
        listener_port=listener,
        admin_port=admin,
        extproc_address=("127.0.0.1", free_port()),
        backends=[("127.0.0.1", free_port()), ("127.0.0.1", free_port())],
    )
    envoy = await asyncio.to_thread(
        start_envoy, config, log_dir=tmp_path, admin_port=admin, concurrency=1
    )
    try:
        for path in ("/v1/chat/completions", "/v1/embeddings"):
            r = await send(f"http://127.0.0.1:{listener}", path=path, body=CHAT)
            assert r.status == 503, r.body
            assert r.headers["content-type"] == "application/json"
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "service_unavailable" and err["message"]
    finally:
        await asyncio.to_thread(envoy.stop)


# --------------------------------------------------------------------------- part 2: real service


@dataclass
class Load:
    """A bounded load of short chat requests: `workers` loops, each until stop(), the deadline
    or `max_requests` in total. Records (start time, status, routed?, body) per request."""

    url: str
    workers: int = 3
    max_requests: int = 3000
    max_seconds: float = 40.0
    results: list[tuple[float, int, bool, str]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            if len(self.results) >= self.max_requests:
                return
            start = time.monotonic()
            try:
                async with session.post(f"{self.url}/v1/chat/completions", json=CHAT) as resp:
                    text = await resp.text()
                    routed = "x-routing-strategy" in resp.headers
                    self.results.append((start, resp.status, routed, text[:200]))
            except aiohttp.ClientError as exc:
                self.results.append((start, -1, False, repr(exc)))
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        self._tasks = [
            asyncio.create_task(self._worker(self._session)) for _ in range(self.workers)
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()

    def errors(self) -> list[tuple[float, int, bool, str]]:
        return [r for r in self.results if r[1] != 200]

    async def until(self, cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _kill(proc: Proc) -> None:
    """SIGKILL + reap: for teardown, where a graceful stop would wait out the drain period."""
    with contextlib.suppress(ProcessLookupError):
        proc.popen.kill()
    proc.stop()


def _port(addr_or_url: str) -> int:
    return int(addr_or_url.rsplit(":", 1)[1])


async def test_fail_open_service_killed_under_load_then_restarted(stack: Any) -> None:
    s = stack(n_backends=2, common_sim_args=FAST)
    grpc_port, admin_port = _port(s.grpc_address), _port(s.admin_url)
    async with Load(s.url) as load:
        await load.until(lambda: sum(r[2] for r in load.results) >= 10, 15, "routed traffic")
        s.service.popen.send_signal(signal.SIGKILL)
        await asyncio.to_thread(s.service.popen.wait, 10)
        await asyncio.to_thread(s.service.stop)  # reap, close its log
        killed = time.monotonic()
        n0 = len(load.results)
        await load.until(lambda: len(load.results) >= n0 + 20, 15, "traffic without the service")
        after_kill = [r for r in load.results if r[0] > killed]
        assert after_kill and not any(r[2] for r in after_kill), "routed with the service dead?"
        s.service = await asyncio.to_thread(
            start_extproc,
            grpc_port=grpc_port,
            admin_port=admin_port,
            backends=s.sim_urls,
            log_dir=s.log_dir,
            name="extproc-restarted",
        )
        ready = time.monotonic()
        await load.until(
            lambda: any(r[2] and r[0] > ready for r in load.results),
            10,
            "routing by the restarted service",
        )
        resumed = min(r[0] for r in load.results if r[2] and r[0] > ready)
    await asyncio.to_thread(_kill, s.service)  # no drain period at teardown
    print(
        f"\nfail-open: {len(load.results)} requests, routing resumed "
        f"{1000 * (resumed - ready):.0f} ms after the restarted service was ready"
    )
    assert load.errors() == []
    assert resumed - ready < 1.0


def _wait_routed(url: str, timeout: float = 10.0) -> None:
    def routed() -> bool:
        async def one() -> bool:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.post(f"{url}/v1/chat/completions", json=CHAT) as resp,
            ):
                await resp.read()
                return resp.status == 200 and "x-routing-strategy" in resp.headers

        return asyncio.run(one())

    poll_until(routed, timeout=timeout, what="a request routed by the service")


async def test_fail_closed_service_down_is_an_openai_503(log_dir: Path, envoy_bin: str) -> None:
    sim_port, grpc_port, admin_port = free_port(), free_port(), free_port()
    listener, envoy_admin = free_port(), free_port()
    procs: list[Proc] = []
    try:
        procs.append(await asyncio.to_thread(start_vllmsim, sim_port, args=FAST, log_dir=log_dir))
        service_args = dict(
            grpc_port=grpc_port,
            admin_port=admin_port,
            backends=[f"http://127.0.0.1:{sim_port}"],
            log_dir=log_dir,
        )
        procs.append(await asyncio.to_thread(start_extproc, **service_args))
        config = render_local_config(
            listener_port=listener,
            admin_port=envoy_admin,
            extproc_address=("127.0.0.1", grpc_port),
            backends=[("127.0.0.1", sim_port)],
            fail_closed=True,
        )
        procs.append(
            await asyncio.to_thread(
                start_envoy, config, log_dir=log_dir, admin_port=envoy_admin, concurrency=1
            )
        )
        url = f"http://127.0.0.1:{listener}"
        await asyncio.to_thread(_wait_routed, url)
        procs[1].popen.send_signal(signal.SIGKILL)
        await asyncio.to_thread(procs[1].popen.wait, 10)
        for path in ("/v1/chat/completions", "/v1/models"):
            method = "GET" if path == "/v1/models" else "POST"
            r = await send(url, path=path, method=method, body=CHAT)
            assert r.status == 503, r.body
            assert r.headers["content-type"] == "application/json"
            assert r.json() == {
                "error": {
                    "message": "The routing service is unavailable; retry later.",
                    "type": "service_unavailable",
                    "param": None,
                    "code": "routing_unavailable",
                }
            }
        procs.append(await asyncio.to_thread(start_extproc, **service_args, name="extproc-2"))
        await asyncio.to_thread(_wait_routed, url)
    finally:
        for p in reversed(procs):
            _kill(p)


def _drain_supported() -> bool:
    from extproc.config import Settings  # noqa: PLC0415 - only to probe the flag

    return "drain_seconds" in Settings.model_fields


async def test_rolling_restart_of_two_service_replicas(log_dir: Path, envoy_bin: str) -> None:
    if not _drain_supported():
        pytest.fail("extproc has no --drain-seconds yet (SIGTERM drain is required here)")
    sims = [free_port(), free_port()]
    grpc_ports, admin_ports = [free_port(), free_port()], [free_port(), free_port()]
    listener, envoy_admin = free_port(), free_port()
    procs: dict[str, Proc] = {}
    drain = 2.0
    admin_url = f"http://127.0.0.1:{envoy_admin}"

    def replica(i: int, gen: int, wait: bool = True) -> Proc:
        return start_extproc(
            grpc_port=grpc_ports[i],
            admin_port=admin_ports[i],
            backends=[f"http://127.0.0.1:{p}" for p in sims],
            log_dir=log_dir,
            name=f"extproc{i}-{gen}",
            args=["--drain-seconds", str(drain)],
            wait=wait,
        )

    try:
        # Everything boots in parallel (the service only needs the simulators to scrape them).
        for p in sims:
            procs[f"sim{p}"] = start_vllmsim(p, args=FAST, log_dir=log_dir, wait=False)
        for i in (0, 1):
            procs[f"r{i}"] = replica(i, 0, wait=False)
        for proc in list(procs.values()):
            await asyncio.to_thread(proc.wait_ready)
        for attempt in range(3):  # another process may take a chosen port before Envoy binds it
            config = render_local_config(
                listener_port=listener,
                admin_port=envoy_admin,
                grpc_ports=grpc_ports,
                backends=[("127.0.0.1", p) for p in sims],
            )
            try:
                procs["envoy"] = await asyncio.to_thread(
                    start_envoy, config, log_dir=log_dir, admin_port=envoy_admin, concurrency=1
                )
                break
            except PortInUseError:
                if attempt == 2:
                    raise
                listener, envoy_admin = free_port(), free_port()
                admin_url = f"http://127.0.0.1:{envoy_admin}"
        for i in (0, 1):
            await wait_flags(admin_url, "extproc", f"127.0.0.1:{grpc_ports[i]}", "healthy", 10)
        url = f"http://127.0.0.1:{listener}"
        key = "http.ingress_http.ext_proc.failure_mode_allowed"
        async with Load(url) as load:
            await load.until(lambda: len(load.results) >= 10, 15, "traffic")
            for i in (0, 1):
                old = procs[f"r{i}"]
                old.popen.send_signal(signal.SIGTERM)  # NOT_SERVING at once, drains `drain` s
                t0 = time.monotonic()
                gone = await wait_flags(
                    admin_url, "extproc", f"127.0.0.1:{grpc_ports[i]}", "failed_active_hc", 10
                )
                print(f"\nreplica {i}: out of Envoy's LB {1000 * (gone - t0):.0f} ms after SIGTERM")
                assert gone - t0 < drain, "Envoy still sends new streams when it stops accepting"
                code = await asyncio.to_thread(old.popen.wait, drain + 15)
                took = time.monotonic() - t0
                print(f"replica {i}: exited with {code} {took:.1f} s after SIGTERM")
                old.stop()
                procs[f"r{i}"] = await asyncio.to_thread(replica, i, 1)
                await wait_flags(admin_url, "extproc", f"127.0.0.1:{grpc_ports[i]}", "healthy", 10)
                n0 = len(load.results)
                await load.until(lambda n0=n0: len(load.results) >= n0 + 10, 15, "traffic")
        failed_open = stats(admin_url, "ext_proc")[key]
        print(f"rolling restart: {len(load.results)} requests, failure_mode_allowed={failed_open}")
        assert load.errors() == []
        assert all(r[2] for r in load.results), "some requests were not routed by the service"
        assert failed_open == 0
    finally:
        for name in reversed(list(procs)):
            _kill(procs[name])
