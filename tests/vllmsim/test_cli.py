"""The real ``python -m vllmsim`` process: ready line, signals, crash faults, bad flags."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import aiohttp
import pytest

READY_TIMEOUT = 15.0


async def launch(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vllmsim",
        "--port",
        "0",
        "--time-scale",
        "20",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
    except TimeoutError:
        proc.kill()
        raise
    text = line.decode()
    assert text.startswith("vllmsim ready: http://127.0.0.1:"), text
    return proc, text.split()[2]


async def wait_exit(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> int:
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise


async def test_serves_and_stops_on_sigterm() -> None:
    proc, base = await launch("--model", "m1")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/health") as r:
                assert r.status == 200
            async with s.post(
                f"{base}/v1/completions", json={"model": "m1", "prompt": "hi", "max_tokens": 3}
            ) as r:
                assert r.status == 200
            async with s.get(f"{base}/metrics") as r:
                assert 'model_name="m1"' in await r.text()
    finally:
        proc.send_signal(signal.SIGTERM)
    assert await wait_exit(proc) == 0


async def test_crash_after_requests() -> None:
    proc, base = await launch("--crash-after-requests", "2")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/completions", json={"prompt": "a", "max_tokens": 2}) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientError):
            async with s.post(f"{base}/v1/completions", json={"prompt": "b"}) as r:
                await r.read()
    assert await wait_exit(proc) == 3


async def test_crash_after_seconds() -> None:
    t0 = time.monotonic()
    proc, _ = await launch("--crash-after", "0.5")
    assert await wait_exit(proc) == 3
    assert time.monotonic() - t0 >= 0.5


async def test_rejects_kv_cache_smaller_than_max_model_len() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vllmsim",
        "--num-gpu-blocks",
        "4",
        "--max-model-len",
        "1000",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), READY_TIMEOUT)
    assert proc.returncode == 2 and b"larger than the KV cache" in err
