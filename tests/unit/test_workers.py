"""The main's side of --workers N without starting processes (extproc/workers.py); the
processes themselves are tested in tests/integration/test_workers.py."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from extproc.config import ConfigError, load_settings
from extproc.workers import (
    SETTINGS_FILE,
    WorkerPool,
    _cpu_seconds,
    _describe_exit,
    make_run_dir,
    reserve_address,
    worker_address,
)


def test_a_listening_port_is_refused_and_port_0_becomes_a_free_one() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on gRPC address 127.0.0.1:{port}"):
            reserve_address(f"127.0.0.1:{port}")
    host, _, free = reserve_address("127.0.0.1:0").rpartition(":")
    assert host == "127.0.0.1" and int(free) > 0
    assert reserve_address("[::1]:0").startswith("[::1]:")
    with pytest.raises(ConfigError, match="expected host:port"):
        reserve_address("unix:/tmp/extproc.sock")


def test_the_pool_is_prepared_and_cleaned_without_a_process(tmp_path: Path) -> None:
    settings = load_settings({"workers": 2, "grpc_address": "127.0.0.1:0", "tls_self_signed": True})
    pool = WorkerPool.create(settings)
    try:
        saved = (pool.run_dir / SETTINGS_FILE).read_text()
        # The workers share one certificate, made by the main.
        assert '"tls_self_signed":false' in saved and "tls-cert.pem" in saved
        assert oct(pool.run_dir.stat().st_mode & 0o777) == "0o700"
        assert pool.up == 0 and pool.open_streams == 0
        assert [w["serving"] for w in pool.describe()] == [False, False]
        families = {f.name: f for f in pool.collector().collect()}
        assert [s.value for s in families["extproc_worker_up"].samples] == [0.0, 0.0]
        assert pool.registry.published == 1  # an empty pool, published before any worker
        pool.set_serving(True)
        assert pool.counters.serving
    finally:
        asyncio.run(pool.close())
    assert not pool.run_dir.exists()


def test_worker_ports_past_the_last_port_are_a_config_error() -> None:
    settings = load_settings({"workers": 4, "grpc_address": "127.0.0.1:0", "worker_ports": 65534})
    with pytest.raises(ConfigError, match="run past 65535"):
        WorkerPool.create(settings)
    assert worker_address(settings, 3) == "127.0.0.1:65537"  # what was refused


def test_bad_tls_files_stop_the_start_before_any_worker(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    settings = load_settings(
        {"workers": 2, "grpc_address": "127.0.0.1:0", "tls_cert": missing, "tls_key": missing}
    )
    with pytest.raises(ConfigError):
        WorkerPool.create(settings)


def test_the_words_for_an_exit() -> None:
    assert _describe_exit(3) == "exited with code 3"
    assert _describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert _describe_exit(-200) == "was killed by signal 200"


def test_cpu_seconds_of_a_process() -> None:
    seconds = _cpu_seconds(os.getpid())
    assert seconds is not None and seconds > 0
    assert _cpu_seconds(2**22 + 12345) is None  # no such process


def test_the_run_dir_is_private() -> None:
    path = make_run_dir()
    try:
        assert path.is_dir() and path.stat().st_mode & 0o077 == 0
    finally:
        path.rmdir()


def test_run_dirs_of_dead_mains_are_removed() -> None:
    dead = 2**22 + 54321  # above pid_max: no such process
    parent = make_run_dir().parent
    left = parent / f"extproc-{dead}-leftover"
    left.mkdir()
    mine = make_run_dir()
    try:
        assert not left.exists()
        assert mine.name.startswith(f"extproc-{os.getpid()}-")
        assert make_run_dir() != mine and mine.exists()  # a live main's is kept
    finally:
        for d in parent.glob(f"extproc-{os.getpid()}-*"):
            d.rmdir()
