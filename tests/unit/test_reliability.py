"""Dead, hung and broken backends; malformed replies; supervised tasks; the handler's last net.

Scrapes run against real aiohttp servers and raw sockets on 127.0.0.1 (no mocks of the
network): a refused port, a listener whose accept queue is full (connect timeout), a server
that accepts and never answers (hung), and servers answering garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from devstack.processes import free_port
from extproc.decide import decide
from extproc.grpc_server import SERVICE_NAME, build_server
from extproc.observability import Metrics
from extproc.processor import Processor
from extproc.scraper import Scraper, parse_models
from extproc.strategies import FALLBACKS, STRATEGIES, RequestFacts
from extproc.supervise import supervised

from .helpers import registry, scrape_ok, vm

FIXTURE_PAGE = (
    __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "vllm-metrics-real.txt"
).read_bytes()


def pick(reg, strategy="least-request", seed=0):
    return decide(
        STRATEGIES[strategy],
        FALLBACKS["random"],
        RequestFacts(),
        reg.snapshot(),
        random.Random(seed),
    )


# -- suspect: hung or failing backends are treated as saturated ---------------------------------
def test_a_timed_out_scrape_makes_the_idle_looking_backend_suspect_and_excluded():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm(running=20))  # busy but answering
    scrape_ok(reg, 1, vm(running=0))  # its last numbers look idle...
    assert pick(reg).backend.endpoint == "10.0.0.2:8000"
    reg.record_failure(reg.records[1], "timeout", timeout=True)  # ...then its /metrics stalls
    view = reg.snapshot().backends[1]
    assert view.suspect and view.healthy and not view.overloaded
    assert {pick(reg, seed=s).backend.endpoint for s in range(30)} == {"10.0.0.1:8000"}
    # Recovery on the first good scrape.
    scrape_ok(reg, 1, vm(running=0))
    assert not reg.snapshot().backends[1].suspect
    assert pick(reg).backend.endpoint == "10.0.0.2:8000"


def test_a_suspect_backend_is_never_valued_below_the_busiest_answering_one():
    reg, _ = registry(3)
    for i, running in enumerate([5, 0, 30]):
        scrape_ok(reg, i, vm(running=running))
    reg.record_failure(reg.records[1], "timeout", timeout=True)  # looked idle, then stalled
    assert [v.running for v in reg.snapshot().backends] == [5.0, 30.0, 30.0]


def test_when_every_backend_is_suspect_their_own_ranking_survives():
    # E.g. the service itself was starved and every scrape timed out at once: still prefer the
    # server that was least loaded, never spread uniformly (or pile onto the busy one).
    reg, _ = registry(3)
    for i, running in enumerate([5, 0, 30]):
        scrape_ok(reg, i, vm(running=running))
    for rec in reg.records:
        reg.record_failure(rec, "timeout", timeout=True)
    snap = reg.snapshot()
    assert all(v.suspect for v in snap.backends) and len(snap.eligible) == 3
    assert [v.running for v in snap.backends] == [5.0, 0.0, 30.0]
    assert {pick(reg, seed=s).backend.endpoint for s in range(20)} == {"10.0.0.2:8000"}


def test_refused_or_unreachable_is_unhealthy_at_once_and_http_errors_after_three():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm())
    scrape_ok(reg, 1, vm())
    reg.record_failure(reg.records[0], "refused", timeout=False, down=True)
    assert not reg.snapshot().backends[0].healthy
    reg.record_failure(reg.records[1], "HTTP 500", timeout=False)
    v = reg.snapshot().backends[1]
    assert v.healthy and v.suspect
    reg.record_failure(reg.records[1], "HTTP 500", timeout=False)
    reg.record_failure(reg.records[1], "HTTP 500", timeout=False)
    assert not reg.snapshot().backends[1].healthy


# -- the scraper against real sockets ------------------------------------------------------------
@contextlib.asynccontextmanager
async def http_server(handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def scrape(
    url: str, *, timeout: float = 0.3, connect_timeout: float = 0.2, max_bytes: int = 1 << 20
):
    reg, _ = registry(0)
    reg.set_backends([url])
    metrics = Metrics()
    scraper = Scraper(
        reg,
        metrics,
        interval=10,
        timeout=timeout,
        connect_timeout=connect_timeout,
        max_bytes=max_bytes,
    )
    scraper._session = __import__("aiohttp").ClientSession()
    try:
        rec = reg.records[0]
        result = await scraper.scrape_once(rec, url + "/metrics")
        models_ok = await scraper.fetch_models(rec, url + "/v1/models")
        return result, rec, models_ok, metrics
    finally:
        await scraper._session.close()


async def test_refused_connection_is_down():
    result, rec, _, _ = await scrape(f"http://127.0.0.1:{free_port()}")
    assert result == "refused" and not rec.healthy


async def test_connect_timeout_is_down_not_slow():
    # A listener whose accept queue is full drops further SYNs: the connect never completes,
    # exactly like a host that silently drops packets.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    try:
        result, rec, _, _ = await scrape(
            f"http://127.0.0.1:{port}", timeout=1.0, connect_timeout=0.2
        )
        assert result == "connect_timeout" and not rec.healthy and rec.timeouts == 0
    finally:
        for s in fillers:
            s.close()
        lsock.close()


async def test_hung_server_times_out_and_is_suspect_not_down():
    release = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="")

    async with http_server(hang) as url:
        try:
            result, rec, _, _ = await scrape(url, timeout=0.2)
        finally:
            release.set()
    assert result == "timeout" and rec.healthy and rec.suspect


async def test_oversized_and_malformed_replies_are_counted_failures():
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/metrics":
            return web.Response(body=b"# junk\n" * 100_000)  # 700 KB > limit below
        return web.Response(body=b'{"data": null}', content_type="application/json")

    async with http_server(handler) as url:
        result, rec, models_ok, metrics = await scrape(url, max_bytes=64 * 1024)
    assert result == "too_large" and rec.suspect
    assert models_ok is False
    assert (
        metrics.registry.get_sample_value(
            "extproc_scrapes_total", {"backend": rec.endpoint, "result": "models_error"}
        )
        == 1
    )


@pytest.mark.parametrize(
    "body", [b'{"data": null}', b"[]", b"not json", b'{"data": [1, {"id": 3}]}', b'{"data": "x"}']
)
def test_parse_models_rejects_or_filters_anything_not_openai_shaped(body):
    try:
        ids, adapters = parse_models(body)
    except ValueError:
        return
    assert ids == frozenset() and adapters == frozenset()


def test_parse_models_reads_ids_and_adapters():
    ids, adapters = parse_models(b'{"data": [{"id": "base"}, {"id": "lora1", "parent": "base"}]}')
    assert ids == {"base", "lora1"} and adapters == {"lora1"}


async def test_scrape_loop_survives_a_bug_and_keeps_scraping(monkeypatch):
    calls = 0

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=FIXTURE_PAGE)

    async with http_server(handler) as url:
        reg, _ = registry(0)
        reg.set_backends([url])
        metrics = Metrics()
        scraper = Scraper(reg, metrics, interval=0.02, timeout=0.5)
        real = scraper.scrape_once

        async def flaky(rec, u):
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug outside the per-scrape guard")
            return await real(rec, u)

        monkeypatch.setattr(scraper, "scrape_once", flaky)
        await scraper.start()
        try:
            async with asyncio.timeout(10):
                while reg.records[0].last_ok is None:
                    await asyncio.sleep(0.02)
        finally:
            await scraper.stop()
    assert metrics.registry.get_sample_value("extproc_task_errors_total", {"task": "scrape"}) == 1


async def test_supervised_restarts_until_the_body_returns():
    runs = []

    async def body():
        runs.append(1)
        if len(runs) < 3:
            raise ValueError("boom")

    errors = []
    await asyncio.wait_for(supervised("t", body, errors.append, backoff=0.001), 5)
    assert len(runs) == 3 and errors == ["t", "t"]


def test_departed_backend_series_are_removed():
    m = Metrics()
    m.scraped("10.0.0.1:8000", "ok")
    m.scraped("10.0.0.1:8000", "timeout")
    m.scraped("10.0.0.2:8000", "ok")
    m.forget_backend("10.0.0.1:8000")
    text = __import__("prometheus_client").generate_latest(m.registry).decode()
    assert "10.0.0.1:8000" not in text and 'backend="10.0.0.2:8000"' in text


# -- the gRPC shell answers CONTINUE when handling raises --------------------------------------
async def test_handler_error_answers_continue_and_is_counted():
    reg, _ = registry(2)
    metrics = Metrics()
    proc = Processor(
        reg, default_strategy="least-request", fallback=FALLBACKS["random"], metrics=metrics
    )

    def broken(req, state=None):
        raise RuntimeError("bug")

    proc.handle = broken  # type: ignore[method-assign]
    port = free_port()
    server, _, _ = build_server(proc, reg, f"127.0.0.1:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.stream_stream(
                f"/{SERVICE_NAME}/Process",
                request_serializer=ep.ProcessingRequest.SerializeToString,
                response_deserializer=ep.ProcessingResponse.FromString,
            )()
            await call.write(ep.ProcessingRequest(request_headers=ep.HttpHeaders()))
            resp = await asyncio.wait_for(call.read(), 5)
            assert resp.WhichOneof("response") == "request_headers"
            assert not resp.request_headers.response.header_mutation.set_headers
            await call.done_writing()
    finally:
        await server.stop(None)
    assert metrics.registry.get_sample_value("extproc_handler_errors_total") == 1


async def test_grpc_accepts_a_message_as_large_as_the_body_limit():
    reg, _ = registry(1)
    scrape_ok(reg, 0, vm())
    proc = Processor(
        reg,
        default_strategy="least-request",
        fallback=FALLBACKS["random"],
        metrics=Metrics(),
        max_body_bytes=6 * 1024 * 1024,
    )
    port = free_port()
    server, _, _ = build_server(proc, reg, f"127.0.0.1:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 16 << 20)]
        ) as ch:
            call = ch.stream_stream(
                f"/{SERVICE_NAME}/Process",
                request_serializer=ep.ProcessingRequest.SerializeToString,
                response_deserializer=ep.ProcessingResponse.FromString,
            )()
            # 5 MiB: above gRPC's 4 MiB default, below --max-body-bytes.
            await call.write(
                ep.ProcessingRequest(
                    request_body=ep.HttpBody(body=b"x" * (5 << 20), end_of_stream=True)
                )
            )
            resp = await asyncio.wait_for(call.read(), 10)
            assert resp.WhichOneof("response") == "request_body"
            await call.done_writing()
    finally:
        await server.stop(None)


async def test_a_timeout_during_the_services_own_stall_blames_no_backend():
    # Our event loop is blocked past the scrape timeout (a CPU-starved host): whatever the
    # backend did, we cannot tell, so the scrape is "service_stalled" and the backend stays as
    # it was. (The server never answers here so that the timeout is certain.)
    release = asyncio.Event()

    async def handler(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=FIXTURE_PAGE)

    async with http_server(handler) as url:
        reg, _ = registry(0)
        reg.set_backends([url])
        metrics = Metrics()
        scraper = Scraper(reg, metrics, interval=10, timeout=0.2)
        scraper._session = __import__("aiohttp").ClientSession()
        watch = asyncio.create_task(scraper.watch.run())
        try:
            await asyncio.sleep(0.1)
            rec = reg.records[0]

            async def stall_soon():
                await asyncio.sleep(0)
                __import__("time").sleep(0.5)  # blocks the loop: nothing else can run

            stall = asyncio.create_task(stall_soon())
            result = await scraper.scrape_once(rec, url + "/metrics")
            await stall
            # Without a stall the same hang is the backend's fault (once the watch saw the stall end).
            async with asyncio.timeout(5):
                while scraper.watch.last_stall_end == float("-inf"):
                    await asyncio.sleep(0.01)
            assert await scraper.scrape_once(rec, url + "/metrics") == "timeout" and rec.suspect
        finally:
            release.set()
            watch.cancel()
            await scraper._session.close()
    assert result == "service_stalled"
    assert (
        metrics.registry.get_sample_value(
            "extproc_scrapes_total", {"backend": rec.endpoint, "result": "service_stalled"}
        )
        == 1
    )


def test_loop_watch_reports_a_stall_and_an_overdue_tick():
    seen = []
    w = __import__("extproc.scraper", fromlist=["LoopWatch"]).LoopWatch(0.05, 0.1, seen.append)

    async def main():
        task = asyncio.create_task(w.run())
        await asyncio.sleep(0.12)
        t0 = asyncio.get_running_loop().time()
        assert not w.stalled_since(t0)
        __import__("time").sleep(0.3)
        assert w.stalled_since(t0)  # overdue right now, before the watch could run
        await asyncio.sleep(0.1)
        assert w.stalled_since(t0) and max(seen) > 0.2  # and recorded once it ran
        task.cancel()

    asyncio.run(main())


# -- a server that fails every request fast looks idle: its 5xx counters give it away ----------
def page(post_2xx: float, post_5xx: float) -> str:
    return (
        'vllm:num_requests_running{engine="0",model_name="m"} 0.0\n'
        f'http_requests_total{{handler="/v1/chat/completions",method="POST",status="2xx"}} {post_2xx}\n'
        f'http_requests_total{{handler="/v1/chat/completions",method="POST",status="5xx"}} {post_5xx}\n'
        'http_requests_total{handler="/metrics",method="GET",status="2xx"} 999.0\n'
        'http_requests_total{handler="/v1/completions",method="POST",status="4xx"} 7.0\n'
    )


def test_parser_reads_post_requests_by_status_class_leniently():
    from extproc.metrics_parser import parse_vllm_metrics

    m = parse_vllm_metrics(page(10, 4))
    assert (m.post_2xx, m.post_5xx) == (10.0, 4.0)  # GET /metrics and 4xx are not counted
    bad = parse_vllm_metrics(page(10, 4).replace("} 4", "} four"))  # skipped, not an error
    assert (bad.post_2xx, bad.post_5xx) == (10.0, 0.0)
    real = parse_vllm_metrics(FIXTURE_PAGE.decode())
    assert (real.post_2xx, real.post_5xx) == (20.0, 0.0)
    none = parse_vllm_metrics('vllm:num_requests_running{engine="0"} 1\n')
    assert (none.post_2xx, none.post_5xx) == (None, None)


def test_a_server_answering_5xx_is_failing_and_excluded_until_its_errors_age_out():
    from extproc.backends import HISTORY_SAMPLES
    from extproc.metrics_parser import parse_vllm_metrics

    reg, clock = registry(2)
    for i in range(2):
        scrape_ok(reg, i, parse_vllm_metrics(page(10, 0)))
    scrape_ok(reg, 0, parse_vllm_metrics(page(10, 2)))  # two errors: not yet
    assert not reg.records[0].failing
    scrape_ok(reg, 0, parse_vllm_metrics(page(11, 4)))  # 4 of 5 answered since the start: failing
    assert reg.records[0].failing and reg.snapshot().backends[0].suspect
    assert {pick(reg, seed=s).backend.endpoint for s in range(20)} == {"10.0.0.2:8000"}
    for _ in range(HISTORY_SAMPLES):  # no new errors: they leave the window
        clock.advance(0.1)
        scrape_ok(reg, 0, parse_vllm_metrics(page(11, 4)))
    assert not reg.records[0].failing and not reg.snapshot().backends[0].suspect


def test_a_few_errors_among_many_successes_are_not_failing():
    from extproc.metrics_parser import parse_vllm_metrics

    reg, _ = registry(1)
    scrape_ok(reg, 0, parse_vllm_metrics(page(0, 0)))
    scrape_ok(reg, 0, parse_vllm_metrics(page(100, 5)))
    assert not reg.records[0].failing
