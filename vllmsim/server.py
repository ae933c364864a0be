"""aiohttp front end: vLLM's OpenAI routes, /health, /metrics, fault injection.

Everything runs on one event loop: handlers enqueue requests into the engine and wait on a
per-request future the engine resolves after each step (no per-token timers).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import HttpVersion11, web

from . import protocol, tokenizer
from .config import SimConfig, kv_events_settings
from .engine import Engine, Request, Status
from .errors import ApiError, error_response
from .exposition import CONTENT_TYPE, Exposition, HttpStats
from .kv_events import KvEventPublisher

log = logging.getLogger("vllmsim")

VLLM_VERSION = "0.32.0"  # the version whose /metrics the simulator copies
CRASH_EXIT_CODE = 3
_INSTRUMENTED = frozenset(HttpStats.HANDLERS)


class Simulator:
    """State shared by the handlers of one instance."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg)
        self.http = HttpStats()
        self.exposition = Exposition(cfg, self.engine, self.http)
        self.rng = random.Random(cfg.seed)  # fault injection only
        self.started = time.monotonic()
        self.pod = cfg.pod_name
        self.accepted = 0
        self.task: asyncio.Task[None] | None = None
        self.kv_publisher: KvEventPublisher | None = None

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def starting(self) -> bool:
        return self.uptime() < self.cfg.startup_delay


SIM_KEY = web.AppKey("vllmsim", Simulator)


def _crash(reason: str) -> None:
    # Abrupt on purpose: no graceful shutdown, open connections are reset like a dead pod's.
    print(f"vllmsim: crashing ({reason})", file=sys.stderr, flush=True)
    os._exit(CRASH_EXIT_CODE)


# ---- middleware / signals ---------------------------------------------------------------------
@web.middleware
async def instrument(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    path = request.path
    if path not in _INSTRUMENTED:
        return await handler(request)
    sim = request.app[SIM_KEY]
    t0 = time.perf_counter()
    status = 500
    resp: web.StreamResponse | None = None
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    finally:
        size = resp.content_length if isinstance(resp, web.Response) else None
        sim.http.record(
            path,
            request.method,
            status,
            request.content_length or 0,
            size or 0,
            (time.perf_counter() - t0) * sim.cfg.time_scale,
        )


async def _add_pod_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-inference-pod"] = request.app[SIM_KEY].pod


def _echo_headers(request: web.Request, raw: bytes) -> dict[str, str]:
    """--debug-echo: what arrived here, for tests of what a gateway delivers."""
    return {
        "x-vllmsim-body-bytes": str(len(raw)),
        "x-vllmsim-body-sha256": hashlib.sha256(raw).hexdigest(),
        "x-vllmsim-destination": request.headers.get("x-gateway-destination-endpoint", ""),
    }


# ---- handlers -------------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    if request.app[SIM_KEY].starting():
        return web.Response(status=503)
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": VLLM_VERSION})


async def metrics(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    cfg = sim.cfg
    if cfg.metrics_latency > 0:
        await asyncio.sleep(cfg.metrics_latency)
    if sim.uptime() < cfg.metrics_delay:
        return web.Response(status=503, text="metrics not ready\n")
    if cfg.metrics_fail_rate > 0 and sim.rng.random() < cfg.metrics_fail_rate:
        return web.Response(status=500, text="injected /metrics failure\n")
    return web.Response(
        body=sim.exposition.render().encode(), headers={"Content-Type": CONTENT_TYPE}
    )


async def models(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    if sim.starting():
        return error_response(503, "The server is starting up.")
    cfg = sim.cfg
    created = int(time.time())

    def card(name: str, root: str, parent: str | None, max_len: int | None) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": max_len,
            "permission": [
                {
                    "id": f"modelperm-{name}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }

    data = [card(cfg.model, cfg.model, None, cfg.max_model_len)]
    for module in cfg.lora_modules:
        name, _, path = module.partition("=")
        data.append(card(name, path or name, cfg.model, None))
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    cfg = sim.cfg
    sim.accepted += 1
    if cfg.crash_after_requests and sim.accepted >= cfg.crash_after_requests:
        _crash(f"request #{sim.accepted} (--crash-after-requests)")
    if sim.starting():
        return error_response(503, "The server is starting up.")
    raw = await request.read()
    echo = _echo_headers(request, raw) if cfg.debug_echo else {}
    try:
        body = protocol.parse_body(raw, "ChatCompletionRequest" if chat else "CompletionRequest")
        p = protocol.parse_request(body, chat, cfg.model, cfg.lora_names, cfg.max_model_len)
    except ApiError as exc:
        resp = exc.response()
        resp.headers.update(echo)
        return resp
    if cfg.fail_rate > 0 and sim.rng.random() < cfg.fail_rate:
        return error_response(500, "Injected failure (vllmsim --fail-rate).")
    rid = protocol.new_id(chat)
    engine = sim.engine
    req = engine.make_request(rid, p.prompt_ids, p.max_tokens, p.ignore_eos, p.lora)
    engine.add_request(req)
    try:
        if p.stream:
            return await _stream(request, req, p, rid, echo)
        req.sink = _ignore_token  # no wake-up per token: only finish/abort notify
        while not req.done:
            await req.wait_notified()
        n = req.num_output
        text = tokenizer.filler_text(req.filler_offset, 0, n)
        make = protocol.chat_body if chat else protocol.completion_body
        return web.Response(
            body=make(rid, p.model, text, req.finish_reason or "abort", req.num_prompt, n),
            content_type="application/json",
            headers=echo,
        )
    except BaseException:
        engine.abort(req)  # client went away (cancelled) or we failed: free the KV blocks
        raise


def _ignore_token(req: Request) -> None:
    pass


async def _stream(
    request: web.Request, req: Request, p: protocol.ParsedRequest, rid: str, echo: dict[str, str]
) -> web.StreamResponse:
    """SSE like vLLM: one chunk per engine step, finish_reason on the last text chunk, an
    optional usage chunk, then ``data: [DONE]``.

    Non-final tokens are written by the engine itself through ``req.sink`` straight to the
    transport in HTTP/1.1 chunked framing (identical bytes to ``resp.write``); waking one
    handler task per token per stream would cost more CPU than the whole engine step.
    """
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", **echo})
    if request.version >= HttpVersion11:
        resp.enable_chunked_encoding()  # what aiohttp does implicitly; explicit for the sink
    await resp.prepare(request)  # StreamResponse sends its headers right away
    fmt = protocol.StreamFormatter(rid, p.model, p.chat)
    transport = request.transport
    offset = req.filler_offset
    sent = 0

    def sink(r: Request) -> None:
        nonlocal sent
        n = len(r.tokens) - r.num_prompt
        if n <= sent:
            return
        if transport is None or transport.is_closing():
            r.notify()  # let the handler see the disconnect and abort
            return
        data = fmt.text_chunk(tokenizer.filler_text(offset, sent, n - sent), None)
        if sent == 0 and p.chat:
            data = fmt.role_chunk() + data
        sent = n
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    if resp.chunked and transport is not None:
        req.sink = sink
    engine = request.app[SIM_KEY].engine
    try:
        while not req.done:
            if transport is None or transport.is_closing():
                raise ConnectionResetError("client disconnected")
            if req.sink is None and req.num_output > sent:
                sink_data = fmt.text_chunk(
                    tokenizer.filler_text(offset, sent, req.num_output - sent), None
                )
                if sent == 0 and p.chat:
                    sink_data = fmt.role_chunk() + sink_data
                sent = req.num_output
                await resp.write(sink_data)
                continue
            await req.wait_notified()
        req.sink = None
        n = req.num_output
        tail = b""
        if n > sent and req.status is Status.FINISHED:
            tail = fmt.text_chunk(tokenizer.filler_text(offset, sent, n - sent), req.finish_reason)
            if sent == 0 and p.chat:
                tail = fmt.role_chunk() + tail
        if p.include_usage:
            tail += fmt.usage_chunk(req.num_prompt, n)
        await resp.write(tail + fmt.DONE)
        await resp.write_eof()
    except ConnectionError:
        # client went away mid-stream: like vLLM, abort the request (frees its KV blocks)
        engine.abort(req)
    except asyncio.CancelledError:
        engine.abort(req)
        raise
    return resp


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """vLLM's dev-mode route: forget the prefix cache (an AllBlocksCleared event); refused with
    400 while requests hold blocks, as vLLM refuses (it answers 200 there but does nothing)."""
    engine = request.app[SIM_KEY].engine
    if not engine.pool.reset_prefix_cache():
        return web.Response(status=400, text="prefix cache in use; not reset\n")
    engine.flush_kv_events()
    return web.Response(status=200)


async def sim_stats(request: web.Request) -> web.Response:
    """Simulator internals (not a vLLM route): pacing lag for the benchmark, cache state."""
    sim = request.app[SIM_KEY]
    eng = sim.engine
    lags = sorted(eng.lag_samples)
    if request.query.get("reset"):  # start a fresh measurement window (benchmarks)
        eng.lag_samples.clear()
        eng.max_lag = 0.0
        eng.resyncs = 0
        eng.busy_wall = 0.0

    def pct(q: float) -> float:
        return lags[min(len(lags) - 1, int(q * len(lags)))] if lags else 0.0

    running, waiting, deferred, usage = eng.gauges()
    return web.json_response(
        {
            "pod": sim.pod,
            "uptime_s": sim.uptime(),
            "steps": eng.stats.steps,
            "lag_wall_s": {
                "p50": pct(0.5),
                "p99": pct(0.99),
                "max": eng.max_lag,
                "samples": len(lags),
            },
            "resyncs": eng.resyncs,
            "engine_busy_wall_s": eng.busy_wall,
            "running": running,
            "waiting": waiting + deferred,
            "kv_cache_usage": usage,
            "kv_used_blocks": eng.pool.num_used,
            "prefix_cached_blocks": len(eng.pool.cached),
            "evictions": eng.pool.evictions,
            "preemptions": eng.stats.preemptions,
            "lora_loads": eng.stats.lora_loads,
            "loaded_loras": list(eng.loaded_loras),
            "generation_tokens": eng.stats.generation_tokens,
            "kv_events": None
            if sim.kv_publisher is None
            else {
                "endpoint": sim.kv_publisher.settings.endpoint,
                "batches": sim.kv_publisher.batches,
                "events": sim.kv_publisher.events,
                "next_seq": sim.kv_publisher.seq,
            },
        }
    )


_RUNTIME_FAULTS = {
    "metrics_latency": (0.0, 3600.0),
    "metrics_fail_rate": (0.0, 1.0),
    "fail_rate": (0.0, 1.0),
}


async def sim_faults(request: web.Request) -> web.Response:
    """Switch faults on and off at run time (not a vLLM route; benchmarks and tests use it).

    ``POST /sim/faults {"metrics_latency": 3600}`` hangs /metrics from now on;
    ``{"fail_rate": 1}`` answers every inference request 500; ``{...: 0}`` switches off.
    GET returns the current values.
    """
    sim = request.app[SIM_KEY]
    if request.method == "POST":
        try:
            body = await request.json()
            if not isinstance(body, dict) or not body:
                raise ValueError("expected a JSON object")
            changes = {}
            for key, value in body.items():
                if key not in _RUNTIME_FAULTS:
                    raise ValueError(f"unknown fault {key!r}; valid: {', '.join(_RUNTIME_FAULTS)}")
                lo, hi = _RUNTIME_FAULTS[key]
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not lo <= value <= hi
                ):
                    raise ValueError(f"{key} must be a number in [{lo}, {hi}]")
                changes[key] = float(value)
        except ValueError as exc:  # includes JSON decode errors
            return error_response(400, str(exc))
        sim.cfg = replace(sim.cfg, **changes)  # type: ignore[arg-type]  # keys checked against _RUNTIME_FAULTS
        log.warning("faults changed at run time: %s", changes)
    return web.json_response({k: getattr(sim.cfg, k) for k in _RUNTIME_FAULTS})


# ---- app ------------------------------------------------------------------------------------
async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    sim = app[SIM_KEY]
    publisher = None
    settings = kv_events_settings(sim.cfg)
    if settings is not None:  # bound before the API answers: no event is lost to a late bind
        publisher = KvEventPublisher(settings)
        sim.engine.enable_kv_events(publisher.publish)
        sim.kv_publisher = publisher
    sim.task = asyncio.create_task(sim.engine.run(), name="vllmsim-engine")

    def _died(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A broken engine would hang every client; make it loud and fatal instead.
            log.error("engine loop crashed", exc_info=task.exception())
            os._exit(1)

    sim.task.add_done_callback(_died)
    crash = None
    if sim.cfg.crash_after > 0:
        crash = asyncio.get_running_loop().call_later(
            sim.cfg.crash_after, _crash, f"{sim.cfg.crash_after}s (--crash-after)"
        )
    yield
    if crash is not None:
        crash.cancel()
    sim.task.cancel()
    try:
        await sim.task
    except asyncio.CancelledError:
        pass
    if publisher is not None:
        publisher.close()


def build_app(cfg: SimConfig) -> web.Application:
    app = web.Application(middlewares=[instrument], client_max_size=64 * 1024 * 1024)
    app[SIM_KEY] = Simulator(cfg)
    app.on_response_prepare.append(_add_pod_header)
    app.cleanup_ctx.append(_engine_ctx)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/sim/stats", sim_stats)
    app.router.add_route("*", "/sim/faults", sim_faults)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    return app


def _advertised_host() -> str:
    """A wildcard bind address names no one: use this machine's address (in docker compose the
    container IP, i.e. what the router resolves through DNS), else its host name."""
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


@asynccontextmanager
async def serve(cfg: SimConfig) -> AsyncIterator[tuple[web.Application, int]]:
    """Run an instance in the current event loop; yields (app, bound port). For tests/benches."""
    app = build_app(cfg)
    # short shutdown grace: open streams would otherwise hold SIGTERM for aiohttp's 60 s
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1]
    if cfg.instance_name is None:
        host = _advertised_host() if cfg.host in ("", "0.0.0.0", "::") else cfg.host
        app[SIM_KEY].pod = f"{host}:{port}"
    try:
        yield app, port
    finally:
        await runner.cleanup()
