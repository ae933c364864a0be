"""Admin HTTP endpoints (/healthz, /backends, /settings, /metrics) through aiohttp's test server.

The registry is driven by hand (a real vLLM capture for the scraped backend) so every value
the endpoints report is known exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from extproc.admin import build_admin_app, split_address
from extproc.backends import UNHEALTHY_AFTER_FAILURES, BackendRegistry
from extproc.config import load_settings
from extproc.metrics_parser import parse_vllm_metrics
from extproc.observability import Metrics

from .helpers import FakeClock

CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-metrics-real-busy.txt"
URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]


@dataclass
class Admin:
    client: TestClient
    registry: BackendRegistry
    metrics: Metrics
    clock: FakeClock


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    clock = FakeClock()
    registry = BackendRegistry(stale_after=1.0, max_metrics_age=10.0, clock=clock)
    registry.set_backends(URLS)
    metrics = Metrics()
    metrics.attach_backends(registry)
    settings = load_settings(
        {"backend": URLS, "strategy": "least-request", "scrape_interval": 0.25}
    )
    client = TestClient(TestServer(build_admin_app(registry, metrics, settings), host="127.0.0.1"))
    await client.start_server()
    try:
        yield Admin(client, registry, metrics, clock)
    finally:
        await client.close()


def scrape(a: Admin, i: int) -> None:
    rec = a.registry.records[i]
    gen = a.registry.begin_scrape(rec)
    a.registry.record_success(rec, parse_vllm_metrics(CAPTURE.read_text()), gen)
    a.metrics.scraped(rec.endpoint, "ok")


def break_(a: Admin, i: int) -> None:
    rec = a.registry.records[i]
    for _ in range(UNHEALTHY_AFTER_FAILURES):
        a.registry.begin_scrape(rec)
        a.registry.record_failure(rec, "HTTP 500", timeout=False)
        a.metrics.scraped(rec.endpoint, "http_error")


async def get_json(a: Admin, path: str) -> object:
    r = await a.client.get(path)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/json")
    return await r.json()


async def test_healthz_answers_with_the_pool_size(admin: Admin) -> None:
    body = await get_json(admin, "/healthz")
    assert body["status"] == "ok" and body["backends"] == 3
    admin.registry.set_backends(URLS[:1])
    assert (await get_json(admin, "/healthz"))["backends"] == 1


async def test_backends_reports_each_backend_state(admin: Admin) -> None:
    expected = parse_vllm_metrics(CAPTURE.read_text())
    scrape(admin, 0)  # fresh, from the real capture
    break_(admin, 2)  # three failed scrapes: excluded
    admin.registry.rebuild()
    token = admin.registry.on_pick(0)  # one request routed to backend 0, still open
    assert token is not None
    data = await get_json(admin, "/backends")
    assert data["cold"] is False and data["all_unhealthy"] is False
    views = {b["endpoint"]: b for b in data["backends"]}
    assert list(views) == ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]  # pool order

    fresh = views["10.0.0.1:8000"]
    assert fresh["url"] == URLS[0]
    assert (fresh["freshness"], fresh["healthy"], fresh["prior"]) == ("fresh", True, False)
    assert fresh["running"] == expected.running and fresh["waiting"] == expected.waiting
    assert fresh["kv_cache_usage"] == pytest.approx(expected.kv_cache_usage)
    assert fresh["models"] == list(expected.models) and fresh["age_seconds"] == 0.0
    assert fresh["inflight"] == 1 and fresh["pending"] == 1

    unknown = views["10.0.0.2:8000"]  # never scraped: priors (median of the fresh one)
    assert (unknown["freshness"], unknown["healthy"], unknown["prior"]) == ("unknown", True, True)
    assert unknown["running"] == expected.running and unknown["age_seconds"] is None
    assert unknown["inflight"] == 0 and unknown["models"] == []

    broken = views["10.0.0.3:8000"]
    assert broken["healthy"] is False
    assert (
        broken["consecutive_failures"] == UNHEALTHY_AFTER_FAILURES
        and broken["last_error"] == "HTTP 500"
    )

    admin.registry.on_done(token)  # the request ended
    views = {b["endpoint"]: b for b in (await get_json(admin, "/backends"))["backends"]}
    assert views["10.0.0.1:8000"]["inflight"] == 0


async def test_backends_shows_staleness_by_the_clock(admin: Admin) -> None:
    scrape(admin, 0)
    admin.clock.advance(5.0)  # past stale_after (1 s), within max_metrics_age (10 s)
    admin.registry.rebuild()
    view = (await get_json(admin, "/backends"))["backends"][0]
    assert view["freshness"] == "stale" and view["age_seconds"] == pytest.approx(5.0)
    admin.clock.advance(10.0)
    admin.registry.rebuild()
    view = (await get_json(admin, "/backends"))["backends"][0]
    assert view["freshness"] == "unknown" and view["prior"] is True


async def test_backends_of_a_cold_pool(admin: Admin) -> None:
    data = await get_json(admin, "/backends")
    assert data["cold"] is True
    assert {b["freshness"] for b in data["backends"]} == {"unknown"}


async def test_settings_are_the_effective_configuration(admin: Admin) -> None:
    data = await get_json(admin, "/settings")
    assert data["strategy"] == "least-request"  # as given
    assert data["scrape_interval"] == 0.25
    assert data["backend"] == URLS
    assert data["fallback"] == "random"  # a default
    assert (
        data
        == load_settings(
            {"backend": URLS, "strategy": "least-request", "scrape_interval": 0.25}
        ).model_dump()
    )


async def test_metrics_is_prometheus_text_with_live_backend_gauges(admin: Admin) -> None:
    scrape(admin, 0)
    break_(admin, 2)
    admin.registry.rebuild()
    token = admin.registry.on_pick(0)
    admin.metrics.decided("least-request", "metrics", 0.0001)
    r = await admin.client.get("/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(await r.text())
        for s in fam.samples
    }
    assert (
        samples[("extproc_decisions_total", (("reason", "metrics"), ("strategy", "least-request")))]
        == 1
    )
    assert samples[("extproc_scrapes_total", (("backend", "10.0.0.1:8000"), ("result", "ok")))] == 1
    assert (
        samples[("extproc_scrapes_total", (("backend", "10.0.0.3:8000"), ("result", "http_error")))]
        == 3
    )
    assert samples[("extproc_backend_healthy", (("backend", "10.0.0.1:8000"),))] == 1
    assert samples[("extproc_backend_healthy", (("backend", "10.0.0.3:8000"),))] == 0
    assert samples[("extproc_inflight_requests", (("backend", "10.0.0.1:8000"),))] == 1
    assert (
        samples[("extproc_backend_state", (("backend", "10.0.0.1:8000"), ("state", "fresh")))] == 1
    )
    assert (
        samples[("extproc_backend_state", (("backend", "10.0.0.2:8000"), ("state", "unknown")))]
        == 1
    )
    assert token is not None
    admin.registry.on_done(token)
    text = await (await admin.client.get("/metrics")).text()
    assert 'extproc_inflight_requests{backend="10.0.0.1:8000"} 0.0' in text


async def test_unknown_path_is_404(admin: Admin) -> None:
    assert (await admin.client.get("/nope")).status == 404


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("[::1]:9090", ("::1", 9090)),
        (":9090", ("0.0.0.0", 9090)),
    ],
)
def test_split_address(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected
