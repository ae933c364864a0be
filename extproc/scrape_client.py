"""One keep-alive HTTP/1.1 connection per backend for the scraper's GETs.

Why not aiohttp here: a scrape is the same small GET to the same server every 100 ms, and
aiohttp's per-request machinery (URL and header objects, cookie jar, timers, the response
stream) cost more CPU than parsing the 52 KB page (``make bench-scrape``,
bench/results/scrape.md). This client keeps one connection per backend (its scraper task sends
one request at a time), writes a request prebuilt once, and parses the response with llhttp
(``httptools``, the parser under uvicorn): a few Python callbacks per response.

Errors (what :mod:`extproc.scraper` tells apart):
* :class:`ConnectTimeout` (a :class:`TimeoutError`): the TCP/TLS connect did not complete in time;
* :class:`ConnectFailed` (an :class:`OSError`): refused, unreachable, name not resolved;
* :class:`TimeoutError`: no complete answer within the total timeout;
* :class:`ResponseTooLarge`: the body exceeds ``max_bytes`` (announced or received);
* :class:`ProtocolError`: not HTTP, or the server closed the connection mid-answer.
After any error the connection is closed; the next request opens a new one.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import time
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = [
    "ConnectFailed",
    "ConnectTimeout",
    "HttpConnection",
    "ProtocolError",
    "ResponseTooLarge",
]


class ResponseTooLarge(Exception):
    pass


class ConnectTimeout(TimeoutError):
    pass


class ConnectFailed(OSError):
    def __init__(self, os_error: OSError) -> None:
        super().__init__(os_error.errno, str(os_error))
        self.os_error = os_error


class ProtocolError(Exception):
    pass


class _Response(asyncio.Protocol):
    """Feeds llhttp and resolves ``waiter`` with (status, body) for each response."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.cpu: list[float] | None = None  # when set: [0] += thread CPU of data_received
        self._chunks: list[bytes] = []
        self._size = 0
        self._length_known = False  # Content-Length or chunked: the end is in the stream
        self._headers_done = False

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            # Bytes nobody asked for (a late answer after a timeout, or garbage): this
            # connection's framing can no longer be trusted.
            self._abort()
            return
        cpu = self.cpu
        t0 = time.thread_time() if cpu is not None else 0.0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"bad HTTP response: {exc}"))
        if cpu is not None:
            cpu[0] += time.thread_time() - t0

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self._headers_done and not self._length_known:
            # No Content-Length, not chunked: the body ends with the connection (HTTP/1.0 style).
            waiter.set_result((self.parser.get_status_code(), b"".join(self._chunks)))
        else:
            waiter.set_exception(ProtocolError("connection closed before a complete response"))

    # -- llhttp callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.waiter is None or self.waiter.done():
            self._abort()  # a second answer to one request (e.g. a 408 before closing)
            return
        self._chunks = []
        self._size = 0
        self._length_known = False
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"content-length":
            self._length_known = True
            try:
                announced = int(value)
            except ValueError:
                return  # llhttp rejects it itself
            if announced > self.max_bytes:
                self._fail(ResponseTooLarge(f"{announced} bytes (limit {self.max_bytes})"))
        elif lname == b"transfer-encoding":
            self._length_known = True

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_bytes:
            self._fail(ResponseTooLarge(f"more than {self.max_bytes} bytes"))
            return
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            chunks = self._chunks
            waiter.set_result(
                (self.parser.get_status_code(), chunks[0] if len(chunks) == 1 else b"".join(chunks))
            )
            self._chunks = []
            if not self.parser.should_keep_alive():
                self._abort()

    # ---------------------------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self._abort()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class HttpConnection:
    """GETs to one server over one persistent connection; one request at a time."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float | None,
        max_bytes: int,
        ssl_context: ssl_module.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl_module.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl_context or ssl_module.create_default_context()
        self.connect_timeout = connect_timeout
        self.max_bytes = max_bytes
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if self.ssl else 80
        self._host_header = host if self.port == default_port else f"{host}:{self.port}"
        self._requests: dict[str, bytes] = {}
        self._proto: _Response | None = None

    @property
    def connected(self) -> bool:
        """An open connection the next request reuses."""
        return self._proto is not None and not self._proto.closed

    def request_bytes(self, path: str) -> bytes:
        """The GET for ``path``, built once per path."""
        req = self._requests.get(path)
        if req is None:
            req = self._requests[path] = (
                f"GET {path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                "User-Agent: envoy-llm-extproc\r\nAccept: */*\r\n\r\n"
            ).encode("latin-1")
        return req

    async def get(self, path: str, cpu: list[float] | None = None) -> tuple[int, bytes]:
        """(status, body) of ``GET path``. Bound it with ``asyncio.timeout`` (the total).

        ``cpu``: if given, ``cpu[0]`` += the thread CPU the response's callbacks took.
        """
        proto = self._proto
        reused = self.connected
        if not reused:
            proto = await self._connect()
        assert proto is not None
        try:
            return await self._exchange(proto, path, cpu)
        except ProtocolError:
            if not reused:
                raise
        # A kept-alive connection the server had closed meanwhile (its idle timeout):
        # nothing of ours was processed, so one retry on a new connection is safe.
        return await self._exchange(await self._connect(), path, cpu)

    async def _exchange(
        self, proto: _Response, path: str, cpu: list[float] | None
    ) -> tuple[int, bytes]:
        waiter = asyncio.get_running_loop().create_future()
        proto.waiter = waiter
        proto.cpu = cpu
        assert proto.transport is not None
        try:
            proto.transport.write(self.request_bytes(path))
            return await waiter
        except BaseException:
            # Timeout or cancel (the task's cancel already cancelled the waiter), or a failed
            # answer: an answer may still come on this connection; never read it as the next.
            proto._abort()
            raise
        finally:
            proto.waiter = None
            proto.cpu = None

    async def _connect(self) -> _Response:
        self.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Response(self.max_bytes),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                )
        except TimeoutError:
            raise ConnectTimeout(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as exc:  # refused, unreachable, DNS (socket.gaierror), TLS handshake
            raise ConnectFailed(exc) from exc
        self._proto = proto
        return proto

    def close(self) -> None:
        if self._proto is not None:
            self._proto._abort()
            self._proto = None
