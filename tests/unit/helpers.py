"""Builders for unit tests: metrics values, a fake clock, a registry with scripted scrapes."""

from __future__ import annotations

from dataclasses import dataclass

from extproc.backends import BackendRegistry
from extproc.metrics_parser import VllmMetrics


def vm(
    running: float = 0.0,
    waiting: float = 0.0,
    kv: float | None = 0.0,
    prompt: float | None = 0.0,
    gen: float | None = 0.0,
    ttft_sum: float | None = None,
    ttft_count: float | None = None,
    models: tuple[str, ...] = ("m",),
) -> VllmMetrics:
    return VllmMetrics(
        running=running,
        waiting=waiting,
        kv_cache_usage=kv,
        prompt_tokens=prompt,
        generation_tokens=gen,
        ttft_sum=ttft_sum,
        ttft_count=ttft_count,
        prefix_cache_queries=None,
        prefix_cache_hits=None,
        block_size=16,
        num_gpu_blocks=1000,
        models=models,
        lora_running=(),
        lora_waiting=(),
        max_lora=None,
    )


@dataclass
class FakeClock:
    t: float = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def registry(
    n: int, clock: FakeClock | None = None, *, stale_after: float = 1.0, max_age: float = 10.0
) -> tuple[BackendRegistry, FakeClock]:
    clock = clock or FakeClock()
    reg = BackendRegistry(stale_after=stale_after, max_metrics_age=max_age, clock=clock)
    reg.set_backends([f"http://10.0.0.{i + 1}:8000" for i in range(n)])
    return reg, clock


def scrape_ok(reg: BackendRegistry, i: int, metrics: VllmMetrics) -> None:
    rec = reg.records[i]
    gen = reg.begin_scrape(rec)
    reg.record_success(rec, metrics, gen)
    reg.rebuild()  # what the scraper's ticker does every interval


def fail(reg: BackendRegistry, i: int, times: int = 1, *, timeout: bool = False) -> None:
    rec = reg.records[i]
    for _ in range(times):
        reg.begin_scrape(rec)
        reg.record_failure(rec, "timeout" if timeout else "refused", timeout=timeout)
