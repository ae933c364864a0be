"""Shared helpers for the vllmsim tests: a fake clock for the engine, a real server on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from vllmsim.config import SimConfig
from vllmsim.engine import Engine

FIXTURES = str(Path(__file__).resolve().parents[1] / "fixtures")  # real vLLM captures, in the repo

# Small, fast engine shape for unit tests; numbers chosen so expected durations are exact-ish.
UNIT_CFG = SimConfig(
    max_model_len=256,
    max_num_seqs=8,
    max_num_batched_tokens=512,
    block_size=16,
    num_gpu_blocks=65,
    step_time_base=0.01,
    prefill_token_time=0.001,
    decode_seq_time=0.0001,
    decode_ctx_token_time=0.0,
    mean_output_len=8.0,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_engine(**overrides: object) -> Engine:
    return Engine(replace(UNIT_CFG, **overrides), clock=FakeClock())


def run_until(engine: Engine, cond: Callable[[], bool], max_steps: int = 10_000) -> int:
    for i in range(max_steps):
        if cond():
            return i
        engine.step()
    raise AssertionError(f"condition not reached in {max_steps} steps")


async def poll(
    fn: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.01
) -> None:
    """Wait for a condition with a deadline (never a bare sleep standing in for sync)."""
    deadline = time.monotonic() + timeout
    while True:
        if await fn():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(interval)


# Fast server shape for HTTP tests: 20x faster than real time, tiny KV cache.
HTTP_CFG = SimConfig(
    port=0,
    max_model_len=512,
    num_gpu_blocks=257,
    block_size=16,
    time_scale=20.0,
    mean_output_len=8.0,
)


@pytest.fixture
async def sim_factory() -> AsyncIterator[Callable[..., Awaitable[tuple[str, object]]]]:
    """Start in-process simulators on free loopback ports: ``base_url, app = await f(**cfg)``."""
    from vllmsim.server import serve

    stack: list[object] = []

    async def start(**overrides: object) -> tuple[str, object]:
        cfg = replace(HTTP_CFG, **overrides)
        cm = serve(cfg)
        app, port = await cm.__aenter__()
        stack.append(cm)
        return f"http://127.0.0.1:{port}", app

    yield start
    for cm in reversed(stack):
        await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Flat {(sample name, sorted labels): value} view of an exposition page."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(
    page: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    model: str = "tiny-llama",
    **labels: str,
) -> float:
    key = (name, tuple(sorted({"engine": "0", "model_name": model, **labels}.items())))
    return page[key]
