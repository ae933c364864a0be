"""The service behind the gateways' own Envoy configs, end to end (issue 8, item 2).

Three configs, each through real Envoy, the real service and real simulators on loopback:

* ``envoy/envoy.yaml`` - ours (BUFFERED request body, override_host + lua pick);
* ``envoy/gie-reference.yaml`` - the Gateway API Inference Extension reference style
  (ORIGINAL_DST cluster on x-gateway-destination-endpoint, FULL_DUPLEX_STREAMED both ways, every
  phase SEND, fail closed);
* ``envoy/istio-style.yaml`` - Istio's InferencePool setup (override_host on envoy.lb metadata
  only, selected-host key x-gateway-destination-endpoint-served, FULL_DUPLEX_STREAMED).

The simulators run with ``--debug-echo``: every answer names the body they received (bytes,
sha256) and the x-gateway-destination-endpoint header the service set (the pick first), and
``x-inference-pod`` names the simulator itself, so "routed where the service said" and "the body
arrived intact" are checked at the backend, whatever the gateway config exposes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import string
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from devstack import Stack
from devstack.envoy_config import (
    DEFAULT_TEMPLATE,
    HCM_FILTER,
    render_local_config,
    render_local_config_dict,
)
from devstack.processes import Proc, free_port, http_get, start_envoy, start_extproc

from .e2e import Routed, all_scraped, chat_body, eventually, post

pytestmark = pytest.mark.integration

ENVOY_DIR = DEFAULT_TEMPLATE.parent
GIE = ENVOY_DIR / "gie-reference.yaml"
ISTIO = ENVOY_DIR / "istio-style.yaml"
CONFIGS: dict[str, Path] = {"envoy": DEFAULT_TEMPLATE, "gie-reference": GIE, "istio-style": ISTIO}
DEST = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
# ~65 ms per engine step (one token per step): streams last long enough to time their chunks.
SIM_ARGS = ["--debug-echo", "--time-scale", "0.1"]
# An ORIGINAL_DST cluster takes one address, not the service's ranked list (docs/envoy.md,
# "Gateway configs"): the GIE-style gateway needs --fallback-endpoints 0.
SERVICE_ARGS: dict[str, list[str]] = {"gie-reference": ["--fallback-endpoints", "0"]}
# Round robin and no re-scrape during a test: the service keeps picking a simulator the test
# killed, so what the gateway does with a dead pick shows.
KEEP_PICKING_THE_DEAD = [
    "--strategy",
    "round-robin",
    "--scrape-interval",
    "60",
    "--models-interval",
    "60",
]
# Service answers seen per error case and config: they must be identical across the configs.
ERROR_ANSWERS: dict[str, dict[str, tuple[int, str, bytes]]] = {}


def _start_stack(log_dir: Path, config: str, **kwargs: Any) -> Stack:
    s = Stack(
        log_dir=log_dir,
        n_backends=kwargs.pop("n_backends", 3),
        common_sim_args=SIM_ARGS,
        # --drain-seconds 0: a quick SIGTERM at teardown (see conftest.py's stack fixture).
        service_args=[
            "--drain-seconds",
            "0",
            *SERVICE_ARGS.get(config, []),
            *kwargs.pop("service_args", []),
        ],
        envoy_template=None if config == "envoy" else CONFIGS[config],
        **kwargs,
    )
    return s.start()


@pytest.fixture(scope="module", params=list(CONFIGS))
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Stack]]:
    """One started stack per config, shared by the tests of this module (startup is the cost)."""
    config: str = request.param
    failed_before = request.session.testsfailed
    s = _start_stack(tmp_path_factory.mktemp(f"gw-{config}"), config)
    try:
        yield config, s
    finally:
        if request.session.testsfailed > failed_before:
            print(f"\n----- process logs of {s.log_dir} ({config}) -----\n{s.log_tails(40)}")
        s.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def _listed(r: Routed) -> list[str]:
    """The service's answer as the backend received it: the pick, then the fallbacks."""
    return [e.strip() for e in r.headers.get("x-vllmsim-destination", "").split(",") if e.strip()]


def assert_routed_to_the_pick(config: str, s: Stack, r: Routed) -> None:
    listed = _listed(r)
    assert listed, f"the backend got no {DEST} header: {r.headers}"
    assert r.pod in s.sim_endpoints
    # The simulator that answered is the one the service picked.
    assert r.pod == listed[0], (r.pod, listed)
    if config == "envoy":
        assert r.endpoint == r.pod  # envoy.yaml's x-routed-endpoint (from the extproc metadata)
    if config == "gie-reference":
        assert listed == [r.pod], "ORIGINAL_DST needs exactly one address (--fallback-endpoints 0)"
    if config == "istio-style":
        assert r.headers.get(SERVED) == r.pod  # Envoy's selected-host metadata


# --------------------------------------------------------------------------- the configs


def test_every_gateway_config_loads_through_devstack() -> None:
    """The renderer rewrites addresses only; an ORIGINAL_DST pool keeps its type and has no hosts."""
    kwargs: dict[str, Any] = {
        "listener_port": 20001,
        "admin_port": 20002,
        "extproc_address": ("127.0.0.1", 20003),
        "backends": [("127.0.0.1", 20004), ("127.0.0.1", 20005)],
    }
    gie = render_local_config_dict(**kwargs, template=GIE)
    pool = {c["name"]: c for c in gie["static_resources"]["clusters"]}["vllm"]
    assert pool["type"] == "ORIGINAL_DST" and "load_assignment" not in pool
    assert pool["original_dst_lb_config"] == {"use_http_header": True, "http_header_name": DEST}
    istio = render_local_config_dict(**kwargs, template=ISTIO)
    pool = {c["name"]: c for c in istio["static_resources"]["clusters"]}["vllm"]
    eps = pool["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in eps] == [20004, 20005]
    for cfg in (gie, istio):
        (listener,) = cfg["static_resources"]["listeners"]
        assert listener["address"]["socket_address"] == {
            "address": "127.0.0.1",
            "port_value": 20001,
        }
    assert render_local_config(**kwargs, template=GIE).startswith(
        "# GENERATED by devstack.envoy_config.render_local_config from envoy/gie-reference.yaml."
    )
    with pytest.raises(ValueError, match="ORIGINAL_DST"):
        render_local_config_dict(**kwargs, template=GIE, direct_listener_port=20006)


def test_make_run_refuses_a_missing_envoy_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from devstack.__main__ import main

    assert main(["--envoy-config", str(tmp_path / "nope.yaml")]) == 2
    assert "--envoy-config" in capsys.readouterr().err


def _hcm(cfg: dict[str, Any]) -> dict[str, Any]:
    (listener,) = cfg["static_resources"]["listeners"]
    (f,) = [f for f in listener["filter_chains"][0]["filters"] if f["name"] == HCM_FILTER]
    hcm: dict[str, Any] = f["typed_config"]
    return hcm


ALL_SEND_DUPLEX = {
    "request_header_mode": "SEND",
    "response_header_mode": "SEND",
    "request_body_mode": "FULL_DUPLEX_STREAMED",
    "response_body_mode": "FULL_DUPLEX_STREAMED",
    "request_trailer_mode": "SEND",
    "response_trailer_mode": "SEND",
}


def test_gateway_config_knobs() -> None:
    """What makes each file the style it claims to be (guards against edits)."""
    gie = yaml.safe_load(GIE.read_text(encoding="utf-8"))
    hcm = _hcm(gie)
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    assert hcm["http_filters"][0]["typed_config"]["mutations"]["request_mutations"] == [
        {"remove": DEST}
    ]
    xp = hcm["http_filters"][1]["typed_config"]
    assert xp["processing_mode"] == ALL_SEND_DUPLEX
    assert xp["failure_mode_allow"] is False and xp["allow_mode_override"] is False
    assert xp["grpc_service"]["envoy_grpc"]["cluster_name"] == "extproc"

    istio = yaml.safe_load(ISTIO.read_text(encoding="utf-8"))
    hcm = _hcm(istio)
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    xp = hcm["http_filters"][0]["typed_config"]
    assert xp["metadata_options"] == {
        "receiving_namespaces": {"untyped": ["envoy.lb"]},
        "forwarding_namespaces": {"untyped": ["envoy.lb"]},
    }
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    overrides = route["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["overrides"]
    assert overrides["processing_mode"] == ALL_SEND_DUPLEX
    assert overrides["failure_mode_allow"] is False
    assert overrides["grpc_service"]["envoy_grpc"]["cluster_name"] == "extproc"
    pool = {c["name"]: c for c in istio["static_resources"]["clusters"]}["vllm"]
    (policy,) = pool["load_balancing_policy"]["policies"]
    oh = policy["typed_extension_config"]["typed_config"]
    assert policy["typed_extension_config"]["name"] == "envoy.load_balancing_policies.override_host"
    # Metadata only: no header source a client could write.
    assert oh["override_host_sources"] == [
        {"metadata": {"key": "envoy.lb", "path": [{"key": DEST}]}}
    ]
    assert oh["selected_host_key"] == {"key": "envoy.lb", "path": [{"key": SERVED}]}


# --------------------------------------------------------------------------- same behaviour, three configs


async def test_chat_is_served_by_the_pick(
    gateway: tuple[str, Stack], http: aiohttp.ClientSession
) -> None:
    config, s = gateway
    seen = set()
    for i in range(6):
        r = await post(http, s.url, chat_body(f"hello {i}"))
        assert r.status == 200, r.body
        assert r.json()["choices"][0]["message"]["content"]
        assert_routed_to_the_pick(config, s, r)
        seen.add(r.pod)
    print(f"\n{config}: served by {sorted(seen)}")


async def test_streaming_arrives_chunk_by_chunk(
    gateway: tuple[str, Stack], http: aiohttp.ClientSession
) -> None:
    config, s = gateway
    tokens = 24  # ~24 engine steps of ~65 ms: a ~1.6 s stream
    body = chat_body("count to many", max_tokens=tokens, ignore_eos=True, stream=True)
    started = time.monotonic()
    arrivals: list[float] = []
    lines: list[bytes] = []
    async with http.post(f"{s.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["content-type"].startswith("text/event-stream")
        r = Routed(resp.status, {k.lower(): v for k, v in resp.headers.items()}, b"")
        assert_routed_to_the_pick(config, s, r)
        async for line in resp.content:
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic())
                lines.append(line.strip())
    assert lines[-1] == b"data: [DONE]", lines[-3:]
    text = "".join(
        (orjson.loads(ln[len(b"data: ") :])["choices"][0]["delta"].get("content") or "")
        for ln in lines[:-1]
    )
    assert text, lines[:3]
    first, last = arrivals[0] - started, arrivals[-1] - started
    # Separate arrivals spread over the generation (a buffered response would arrive in one go).
    bursts = 1 + sum(1 for a, b in zip(arrivals, arrivals[1:], strict=False) if b - a > 0.02)
    print(
        f"\n{config}: {len(lines)} data lines, first at {first * 1000:.0f} ms, last at {last * 1000:.0f} ms, "
        f"{bursts} separate arrivals"
    )
    assert last - first > 0.6, f"first chunk at {first:.3f}s, last at {last:.3f}s: not streamed"
    assert bursts >= 8, f"only {bursts} separate arrivals of {len(lines)} chunks"


async def test_a_1mb_body_arrives_intact(
    gateway: tuple[str, Stack], http: aiohttp.ClientSession
) -> None:
    config, s = gateway
    rng = random.Random(8)
    pad = "".join(rng.choices(string.ascii_letters + string.digits, k=1_000_000))
    raw = orjson.dumps({**chat_body("what follows is padding"), "padding": pad})
    assert len(raw) > 1_000_000
    r = await post(http, s.url, raw)
    assert r.status == 200, r.body[:500]
    assert r.headers["x-vllmsim-body-bytes"] == str(len(raw))
    assert r.headers["x-vllmsim-body-sha256"] == hashlib.sha256(raw).hexdigest()
    assert_routed_to_the_pick(config, s, r)


def _same_across_configs(case: str, config: str, r: Routed) -> None:
    seen = ERROR_ANSWERS.setdefault(case, {})
    seen[config] = (r.status, r.headers.get("content-type", ""), r.body)
    assert len(set(seen.values())) == 1, f"{case} differs between configs: {seen}"


async def test_bad_json_is_an_openai_400(
    gateway: tuple[str, Stack], http: aiohttp.ClientSession
) -> None:
    config, s = gateway
    r = await post(http, s.url, b'{"model": "tiny-llama", "messages": [')
    assert r.status == 400, r.body
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json", err
    assert "x-inference-pod" not in r.headers, "a bad request must not reach a backend"
    _same_across_configs("bad-json", config, r)


async def test_unknown_model_is_an_openai_404(
    gateway: tuple[str, Stack], http: aiohttp.ClientSession
) -> None:
    config, s = gateway
    r = await post(http, s.url, chat_body(model="no-such-model"))
    assert r.status == 404, r.body
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model", err
    assert "x-inference-pod" not in r.headers
    _same_across_configs("unknown-model", config, r)


class Decoy:
    """An HTTP server outside the pool that counts what reaches it."""

    def __init__(self) -> None:
        self.hits = 0
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def _any(self, request: web.Request) -> web.Response:
        self.hits += 1
        await request.read()
        return web.json_response({"decoy": True})

    async def __aenter__(self) -> Decoy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


async def test_a_spoofed_destination_never_reaches_a_host_outside_the_pool(
    gateway: tuple[str, Stack], http: aiohttp.ClientSession
) -> None:
    config, s = gateway
    async with Decoy() as decoy:
        for stream in (False, True):
            r = await post(http, s.url, chat_body(stream=stream), headers={DEST: decoy.endpoint})
            assert r.status == 200, r.body
            assert_routed_to_the_pick(config, s, r)
            assert decoy.endpoint not in _listed(r)
        # Sanity: the decoy answers when asked directly (a dead decoy would prove nothing).
        status, _ = await asyncio.to_thread(http_get, f"http://{decoy.endpoint}/probe", 2.0)
        assert status == 200
        assert decoy.hits == 1, "the spoofed destination was obeyed"


# --------------------------------------------------------------------------- the fallback list


async def _served_counts(http: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    """The service's ``extproc_served_total`` by outcome (pick, fallback, other, unrouted)."""
    async with http.get(f"{admin_url}/metrics") as r:
        text = await r.text()
    return {
        sample.labels["outcome"]: sample.value
        for fam in text_string_to_metric_families(text)
        for sample in fam.samples
        if sample.name == "extproc_served_total" and sample.value
    }


async def test_gie_reference_with_a_fallback_list_is_503(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Measured: ORIGINAL_DST cannot parse `ip:port,ip:port,...` -> 503 `no healthy upstream`."""
    # The later flag wins over SERVICE_ARGS' --fallback-endpoints 0: the service's default list.
    s = _start_stack(
        tmp_path / "gie-list",
        "gie-reference",
        n_backends=2,
        service_args=["--fallback-endpoints", "3"],
    )
    try:
        r = await post(http, s.url, chat_body())
        stats = (
            await asyncio.to_thread(
                http_get, f"{s.envoy_admin_url}/stats?filter=original_dst_host_invalid"
            )
        )[1]
    finally:
        s.stop()
    assert r.status == 503, (r.status, r.body)
    assert r.body == b"no healthy upstream"
    assert "x-inference-pod" not in r.headers
    assert "cluster.vllm.original_dst_host_invalid: 1" in stats, stats


async def test_istio_style_retries_reach_the_next_listed_host_when_the_pick_is_dead(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # Round robin and a service that does not re-scrape during the test: it keeps picking the
    # simulator killed below, so Envoy has to walk the list.
    s = _start_stack(
        tmp_path / "istio-dead-pick",
        "istio-style",
        service_args=KEEP_PICKING_THE_DEAD,
    )
    try:
        dead = s.sim_endpoints[0]
        proc = s.sims[0]
        # Every server scraped once, before the kill (else the pool is the few scraped so far).
        await eventually(lambda: all_scraped(http, s.admin_url))
        await asyncio.to_thread(proc.stop)
        assert not proc.alive()
        walked = []
        for i in range(9):
            r = await post(http, s.url, chat_body(f"hi {i}"))
            assert r.status == 200, r.body
            listed = _listed(r)
            assert len(listed) == 3 and r.pod in listed
            assert r.headers.get(SERVED) == r.pod
            if listed[0] == dead:
                # Attempt 1 refused; the retry went to the next listed host.
                assert r.pod == listed[1], (listed, r.pod)
                walked.append(listed)
            else:
                assert r.pod == listed[0]

        # Envoy forwards envoy.lb (with the served host) to the service on the response path;
        # the service counts each response by who served it.
        async def served_counts() -> dict[str, float] | None:
            counts = await _served_counts(http, s.admin_url)
            return counts if counts.get("pick", 0) + counts.get("fallback", 0) == 9 else None

        counts = await eventually(served_counts, timeout=10)
        assert counts == {"pick": 9 - len(walked), "fallback": len(walked)}, counts
    except BaseException:
        print(s.log_tails(40))
        raise
    finally:
        s.stop()
    print(
        f"\nistio-style, pick {dead} dead: {len(walked)} of 9 requests walked to the next listed host"
    )
    assert walked, "the service never picked the dead simulator: the test proved nothing"


async def _gie_envoy(
    tmp_path: Path,
    name: str,
    grpc_port: int,
    *,
    strip: bool = True,
    fail_open: bool = False,
    buffered: bool = False,
) -> tuple[Proc, str]:
    """gie-reference.yaml on loopback; optionally without the header strip, failing open, or with
    the older reference's BUFFERED request body (headers and body only)."""
    listener, admin = free_port(), free_port()
    cfg = render_local_config_dict(
        listener_port=listener,
        admin_port=admin,
        extproc_address=("127.0.0.1", grpc_port),
        backends=[],
        template=GIE,
    )
    hcm = _hcm(cfg)
    if not strip:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if "header_mutation" not in f["name"]]
    if fail_open:  # InferencePool endpointPickerRef.failureMode: FailOpen
        (xp,) = [
            f["typed_config"]
            for f in hcm["http_filters"]
            if f["name"] == "envoy.filters.http.ext_proc"
        ]
        xp["failure_mode_allow"] = True
    if buffered:
        (xp,) = [
            f["typed_config"]
            for f in hcm["http_filters"]
            if f["name"] == "envoy.filters.http.ext_proc"
        ]
        xp["processing_mode"] = {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SKIP",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        }
    envoy = await asyncio.to_thread(
        start_envoy,
        yaml.safe_dump(cfg),
        log_dir=tmp_path,
        name=f"envoy-{name}",
        admin_port=admin,
        concurrency=1,
    )
    return envoy, f"http://127.0.0.1:{listener}"


async def test_gie_reference_never_obeys_a_client_destination(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A client-sent x-gateway-destination-endpoint never steers an ORIGINAL_DST gateway.

    * The service is asked but names no destination (its pool is empty): it removes the header
      itself, so not even the config without the strip obeys it.
    * Fail-open (InferencePool's failureMode FailOpen) with the service down: in
      FULL_DUPLEX_STREAMED mode Envoy 1.40 does not fail open at all (500, measured). With a
      BUFFERED body it does, the service is not asked, and only the header_mutation strip stands
      between the client and the address it names. Control: without the strip the decoy gets
      the request.
    """
    grpc, admin = free_port(), free_port()
    service = await asyncio.to_thread(
        start_extproc,
        grpc_port=grpc,
        admin_port=admin,
        backends=[],
        # An empty pool (a name that does not resolve): the service answers without a destination.
        args=["--backends-dns", "no-such-pool.invalid:8000", "--drain-seconds", "0"],
        log_dir=tmp_path,
    )
    procs: list[Proc] = [service]
    variants = {
        # name: (ext_proc port, strip, fail_open, buffered)
        "empty-pool": (grpc, True, False, False),
        "empty-pool-no-strip": (grpc, False, False, False),
        "service-down-fail-open": (free_port(), True, True, False),
        "service-down-fail-open-buffered": (free_port(), True, True, True),
        "service-down-fail-open-buffered-no-strip": (free_port(), False, True, True),
    }
    results: dict[str, tuple[int, int]] = {}
    try:
        async with Decoy() as decoy:
            for name, (port, strip, fail_open, buffered) in variants.items():
                envoy, url = await _gie_envoy(
                    tmp_path, name, port, strip=strip, fail_open=fail_open, buffered=buffered
                )
                procs.append(envoy)
                before = decoy.hits
                r = await post(http, url, chat_body(), headers={DEST: decoy.endpoint})
                results[name] = (r.status, decoy.hits - before)
    finally:
        for proc in reversed(procs):
            await asyncio.to_thread(proc.stop)
    assert results == {
        "empty-pool": (503, 0),
        "empty-pool-no-strip": (503, 0),
        "service-down-fail-open": (500, 0),  # duplex: failure_mode_allow has no effect
        "service-down-fail-open-buffered": (503, 0),
        "service-down-fail-open-buffered-no-strip": (200, 1),  # the control: the strip protects
    }, results


async def test_gie_reference_has_no_second_chance_for_a_dead_pick(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """ORIGINAL_DST knows one address: a pick that refuses the connection is a 503 for the client
    (the service's health tracking, not Envoy, keeps picks off dead servers there)."""
    s = _start_stack(
        tmp_path / "gie-dead-pick",
        "gie-reference",
        service_args=KEEP_PICKING_THE_DEAD,
    )
    try:
        dead = s.sim_endpoints[0]
        await eventually(lambda: all_scraped(http, s.admin_url))  # then no re-scrape: see above
        await asyncio.to_thread(s.sims[0].stop)
        failed = []
        for i in range(9):
            r = await post(http, s.url, chat_body(f"hi {i}"))
            if r.status == 200:
                assert_routed_to_the_pick("gie-reference", s, r)
                assert r.pod != dead
            else:
                failed.append((r.status, r.body))
    finally:
        s.stop()
    print(f"\ngie-reference, pick {dead} dead: {len(failed)} of 9 requests failed: {failed[:1]}")
    assert failed, "the service never picked the dead simulator: the test proved nothing"
    assert all(status == 503 and b"remote connection failure" in body for status, body in failed), (
        failed
    )


async def _leak_counts(http: aiohttp.ClientSession, admin_url: str) -> tuple[float, float]:
    """(asyncio tasks alive in the service, requests it counts in flight)."""
    async with http.get(admin_url + "/metrics") as r:
        text = await r.text()
    tasks = inflight = 0.0
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "extproc_asyncio_tasks":
                tasks = sample.value
            elif sample.name == "extproc_inflight_requests":
                inflight += sample.value
    return tasks, inflight


async def test_a_client_leaving_mid_body_or_mid_stream_leaks_nothing(
    gateway: tuple[str, Stack], http: aiohttp.ClientSession
) -> None:
    config, s = gateway
    admin = s.service_admin_url()
    r = await post(http, s.url, chat_body())  # warm: the stream machinery exists
    assert r.status == 200
    baseline = await eventually(lambda: _settled(http, admin, None))
    host, port = s.url.removeprefix("http://").split(":")
    # 1. Half a body, then gone: the service was collecting (duplex) or Envoy was buffering.
    body = orjson.dumps(chat_body("x" * 50_000))
    for _ in range(3):
        started = await _ext_proc_streams(http, s.envoy_admin_url)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        await writer.drain()
        # The client leaves only once Envoy has opened the request's ext_proc stream.
        await eventually(functools.partial(_more_streams, http, s.envoy_admin_url, started))
        writer.close()
        await writer.wait_closed()
    # 2. A streaming answer abandoned after its first chunk (routed: a pick was counted).
    async with http.post(
        s.url + "/v1/chat/completions", json=chat_body(max_tokens=30, stream=True)
    ) as resp:
        assert resp.status == 200
        await resp.content.readline()
        assert (await _leak_counts(http, admin))[1] >= 1
    await eventually(lambda: _settled(http, admin, baseline), timeout=15)
    r = await post(http, s.url, chat_body())
    assert r.status == 200 and r.pod in s.sim_endpoints


async def _settled(http: aiohttp.ClientSession, admin: str, baseline: float | None) -> float | None:
    tasks, inflight = await _leak_counts(http, admin)
    if inflight:
        return None
    if baseline is None:
        return tasks or 1.0
    return tasks if tasks <= baseline else None


async def _ext_proc_streams(http: aiohttp.ClientSession, envoy_admin: str) -> int:
    async with http.get(envoy_admin + "/stats?filter=ext_proc.streams_started$&format=json") as r:
        stats = (await r.json(content_type=None))["stats"]
    return sum(int(st.get("value", 0)) for st in stats)


async def _more_streams(http: aiohttp.ClientSession, envoy_admin: str, before: int) -> bool:
    return await _ext_proc_streams(http, envoy_admin) > before
