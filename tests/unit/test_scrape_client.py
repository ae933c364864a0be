"""The scraper's keep-alive HTTP/1.1 client against raw loopback servers that answer exactly the
bytes each test scripts (keep-alive, chunked, EOF-delimited, closes, garbage, TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from devstack.processes import free_port
from extproc.scrape_client import (
    ConnectFailed,
    HttpConnection,
    ProtocolError,
    ResponseTooLarge,
)
from extproc.tls import self_signed, write_pair

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        return head.split(b" ")[1]  # the path


@contextlib.asynccontextmanager
async def serve(
    handler: Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[Server, int]]:
    state = Server()
    handlers: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await handler(state, reader, writer)
        writer.close()

    def start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(on_connect(reader, writer))
        handlers.add(task)
        task.add_done_callback(handlers.discard)

    server = await asyncio.start_server(start, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield state, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


def conn(port: int, *, scheme: str = "http", max_bytes: int = 1 << 20, **kw) -> HttpConnection:
    return HttpConnection(
        f"{scheme}://127.0.0.1:{port}", connect_timeout=1.0, max_bytes=max_bytes, **kw
    )


async def get(c: HttpConnection, path: str = "/metrics", timeout: float = 2.0):
    async with asyncio.timeout(timeout):
        return await c.get(path)


async def test_one_connection_serves_every_request_in_turn():
    async def echo_path(state, reader, writer):
        while True:
            path = await state.request(reader)
            writer.write(ok(b"page for " + path))

    async with serve(echo_path) as (state, port):
        c = conn(port)
        assert await get(c, "/metrics") == (200, b"page for /metrics")
        assert await get(c, "/v1/models") == (200, b"page for /v1/models")
        assert await get(c, "/metrics") == (200, b"page for /metrics")
        c.close()
    assert state.connections == 1
    assert state.requests[0].startswith(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_chunked_and_eof_delimited_bodies_and_status_codes():
    async def varied(state, reader, writer):
        path = await state.request(reader)
        if path == b"/chunked":
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            path = await state.request(reader)
        assert path == b"/eof"
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")  # no length: ends with the close
        await writer.drain()

    async with serve(varied) as (state, port):
        c = conn(port)
        assert await get(c, "/chunked") == (503, b"hello world")
        assert await get(c, "/eof") == (200, b"until the end")
        c.close()
    assert state.connections == 1


async def test_connection_close_and_a_closed_idle_connection_reconnect_transparently():
    async def one_then_close(state, reader, writer):
        await state.request(reader)
        if state.connections == 1:
            writer.write(ok(b"first", b"Connection: close\r\n"))
        else:
            writer.write(ok(b"again"))
            await writer.drain()
            # then close while the client keeps the connection idle (a server's idle timeout)

    async with serve(one_then_close) as (state, port):
        c = conn(port)
        assert await get(c) == (200, b"first")
        assert await get(c) == (200, b"again")  # the server said close: a new connection
        await asyncio.sleep(0.05)  # the server closed its side by now
        assert await get(c) == (200, b"again")  # retried once on a new connection
        c.close()
    assert state.connections == 3


async def test_too_large_announced_or_streamed_fails_and_the_next_request_reconnects():
    async def big(state, reader, writer):
        path = await state.request(reader)
        if path == b"/announced":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 999999\r\n\r\n" + b"x" * 1000)
        elif path == b"/streamed":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(20):
                writer.write(b"100\r\n" + b"y" * 256 + b"\r\n")
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(ok(b"small"))
        await writer.drain()
        await reader.read()  # until the client hangs up

    async with serve(big) as (state, port):
        c = conn(port, max_bytes=4096)
        with pytest.raises(ResponseTooLarge, match="999999"):
            await get(c, "/announced")
        with pytest.raises(ResponseTooLarge, match="more than 4096"):
            await get(c, "/streamed")
        assert await get(c, "/fine") == (200, b"small")
        c.close()
    assert state.connections == 3


async def test_not_http_or_cut_short_is_a_protocol_error():
    async def bad(state, reader, writer):
        path = await state.request(reader)
        if path == b"/garbage":
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        else:  # half a body, then the connection dies
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()

    async with serve(bad) as (_, port):
        c = conn(port)
        with pytest.raises(ProtocolError, match="bad HTTP response"):
            await get(c, "/garbage")
        with pytest.raises(ProtocolError, match="closed before a complete response"):
            await get(c, "/cut")
        c.close()


async def test_a_late_answer_after_a_timeout_never_answers_the_next_request():
    release = asyncio.Event()

    async def slow_first(state, reader, writer):
        path = await state.request(reader)
        if state.connections == 1:
            await release.wait()
        writer.write(ok(b"answer to " + path))
        await writer.drain()
        await reader.read()

    async with serve(slow_first) as (state, port):
        c = conn(port)
        with pytest.raises(TimeoutError):
            await get(c, "/first", timeout=0.1)
        release.set()
        assert await get(c, "/second") == (200, b"answer to /second")
        c.close()
    assert state.connections == 2  # the timed-out connection was dropped, not reused


async def test_unsolicited_bytes_drop_the_connection():
    async def chatty(state, reader, writer):
        await state.request(reader)
        writer.write(ok(b"one") + b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await state.request(reader)
            writer.write(ok(b"two"))

    async with serve(chatty) as (state, port):
        c = conn(port)
        assert await get(c) == (200, b"one")
        await asyncio.sleep(0.05)
        assert await get(c) == (200, b"one")  # a fresh connection, a fresh answer
        c.close()
    assert state.connections == 2


async def test_refused_is_connect_failed_with_the_os_error():
    c = conn(free_port())
    with pytest.raises(ConnectFailed) as info:
        await get(c)
    assert isinstance(info.value.os_error, ConnectionRefusedError)


async def test_https_verifies_the_certificate(tmp_path: Path):
    pair = self_signed(["127.0.0.1"])
    write_pair(pair, tmp_path / "cert.pem", tmp_path / "key.pem")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def hello(state, reader, writer):
        await state.request(reader)
        writer.write(ok(b"secret"))
        await writer.drain()

    async with serve(hello, server_ctx) as (_, port):
        untrusted = conn(port, scheme="https")  # system CAs: a self-signed cert is refused
        with pytest.raises(ConnectFailed):
            await get(untrusted)
        trusting = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        c = conn(port, scheme="https", ssl_context=trusting)
        assert await get(c) == (200, b"secret")
        c.close()


def test_request_bytes_and_bad_urls():
    c = HttpConnection("http://[::1]:80/prefix", connect_timeout=None, max_bytes=1)
    assert c.request_bytes("/metrics").startswith(b"GET /metrics HTTP/1.1\r\nHost: [::1]\r\n")
    assert c.request_bytes("/metrics") is c.request_bytes("/metrics")  # built once
    s = HttpConnection("https://example.com", connect_timeout=None, max_bytes=1)
    assert (s.port, s._host_header) == (443, "example.com")
    with pytest.raises(ValueError, match="not an http"):
        HttpConnection("ftp://example.com", connect_timeout=None, max_bytes=1)


async def test_a_reused_connection_closed_under_the_request_is_retried_once():
    async def drop_second(state, reader, writer):
        await state.request(reader)
        writer.write(ok(b"first connection"))
        if state.connections == 1:
            await state.request(reader)  # the next request arrives ... and the server dies
            return
        while True:
            await state.request(reader)
            writer.write(ok(b"second connection"))

    async with serve(drop_second) as (state, port):
        c = conn(port)
        assert await get(c) == (200, b"first connection")
        assert await get(c) == (200, b"first connection")  # retried on a new connection
        c.close()
    assert state.connections == 2


async def test_bytes_arriving_between_requests_drop_the_connection():
    async def late_junk(state, reader, writer):
        await state.request(reader)
        writer.write(ok(b"one"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"junk")  # nobody asked
        await writer.drain()
        await reader.read()

    async with serve(late_junk) as (state, port):
        c = conn(port)
        assert await get(c) == (200, b"one")
        await asyncio.sleep(0.2)
        assert not c.connected
        assert await get(c) == (200, b"one")
        c.close()
    assert state.connections == 2


async def test_the_scraper_counts_a_non_http_answer_as_an_error_and_https_as_tls():
    from extproc.backends import BackendRegistry
    from extproc.observability import Metrics
    from extproc.scraper import Scraper

    async def not_http(state, reader, writer):
        await state.request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    async def plaintext(state, reader, writer):  # answers a TLS hello in clear text
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with serve(not_http) as (_, port), serve(plaintext) as (_, other):
        reg = BackendRegistry(stale_after=1.0, max_metrics_age=10.0)
        reg.set_backends([f"http://127.0.0.1:{port}", f"https://127.0.0.1:{other}"])
        scraper = Scraper(reg, Metrics(), interval=10, timeout=1.0)
        plain, tls = reg.records
        assert await scraper.scrape_once(plain, plain.url + "/metrics") == "error"
        assert plain.suspect and "ProtocolError" in plain.last_error
        # https: the handshake fails against a plaintext server: it cannot connect (down).
        assert await scraper.scrape_once(tls, tls.url + "/metrics") == "refused"
        assert not tls.healthy
        await scraper.stop()
