"""Many cheap fake vLLM servers in one process: each loopback port answers ``GET /metrics`` with a
real vLLM capture and ``GET /v1/models`` with one model. Nothing else (no inference).

For measuring the scraper at pool sizes a real fleet (or vllmsim, ~10x costlier per answer)
could not reach on a small box: ``make bench-scrape`` and tests/integration/test_scrape_budget.py.

    python bench/metrics_fakes.py --count 1000 [--busy 100] [--body FILE] [--busy-body FILE]

prints one JSON line ``{"ports": [...]}`` once every port listens (the first ``--busy`` ports
serve ``--busy-body``), then serves until stdin closes or SIGTERM. ``GET /fake-stats`` on any
port answers ``{"<port>": <GETs of /metrics so far>, ...}`` for all ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import cast

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
IDLE_BODY = FIXTURES / "vllm-metrics-real.txt"  # 0 running, 0 waiting
BUSY_BODY = FIXTURES / "vllm-metrics-real-busy.txt"  # 8 running
MODELS = b'{"object":"list","data":[{"id":"tiny-llama","object":"model","owned_by":"vllm"}]}'


def response(body: bytes, content_type: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class Fakes:
    def __init__(self, idle_body: bytes, busy_body: bytes) -> None:
        text = b"text/plain; version=1.0.0; charset=utf-8"
        self.idle = response(idle_body, text)
        self.busy = response(busy_body, text)
        self.models = response(MODELS, b"application/json")
        self.hits: dict[int, int] = {}
        self.busy_ports: set[int] = set()

    def answer(self, port: int, path: bytes) -> bytes:
        if path.startswith(b"/metrics"):
            self.hits[port] = self.hits.get(port, 0) + 1
            return self.busy if port in self.busy_ports else self.idle
        if path.startswith(b"/v1/models"):
            return self.models
        if path.startswith(b"/fake-stats"):
            stats = json.dumps({str(p): n for p, n in self.hits.items()}).encode()
            return response(stats, b"application/json")
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class FakeConnection(asyncio.Protocol):
    def __init__(self, fakes: Fakes, port: int) -> None:
        self.fakes = fakes
        self.port = port
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head, buffer = buffer[:end], buffer[end + 4 :]
            parts = head.split(b" ", 2)
            path = parts[1] if len(parts) > 1 else b""
            assert self.transport is not None
            self.transport.write(self.fakes.answer(self.port, path))
        self.buffer = buffer


async def serve(count: int, busy: int, idle_body: bytes, busy_body: bytes) -> None:
    loop = asyncio.get_running_loop()
    fakes = Fakes(idle_body, busy_body)
    servers = []
    ports: list[int] = []
    for i in range(count):
        server = await loop.create_server(
            lambda i=i: FakeConnection(fakes, ports[i]), "127.0.0.1", 0, backlog=64
        )
        ports.append(server.sockets[0].getsockname()[1])
        servers.append(server)
    fakes.busy_ports = set(ports[:busy])
    print(json.dumps({"ports": ports}), flush=True)
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    # stdin closing (the parent went away) ends us too: never an orphan serving forever.
    stdin = sys.stdin.fileno()
    loop.add_reader(stdin, lambda: None if os.read(stdin, 4096) else done.set())
    await done.wait()
    for server in servers:
        server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, required=True, help="ports to serve")
    ap.add_argument("--busy", type=int, default=0, help="how many of them serve --busy-body")
    ap.add_argument("--body", type=Path, default=IDLE_BODY, help="the /metrics page (idle)")
    ap.add_argument("--busy-body", type=Path, default=BUSY_BODY, help="the busy ports' page")
    args = ap.parse_args()
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # cheaper fakes when available; the measured side never uses it

        runner = uvloop.run  # type: ignore[assignment]
    runner(serve(args.count, args.busy, args.body.read_bytes(), args.busy_body.read_bytes()))


if __name__ == "__main__":
    main()
