"""One ZMQ SUB socket per server that publishes KV events; subscriptions follow discovery.

vLLM's publisher binds when its endpoint has ``*`` (or is ``ipc://``/``inproc://``) and
connects out otherwise; a bound publisher is the form that delivers (docs/design.md), so the
service *connects* to each server's publisher: ``--kv-events-port PORT`` means
``tcp://<server ip>:PORT`` for every discovered server (Kubernetes: every pod publishes on the
same port), ``--kv-events-endpoint IP:PORT=ZMQ_ENDPOINT`` names one server's publisher
(``ipc://`` on one host, or several servers per IP). ZMQ reconnects by itself, so a server that
publishes nothing (events off, an old version) simply never fills its index and is routed on the
approximate one.

Each subscription is a supervised task (restarted on an unexpected error); messages are decoded
and applied on the event loop (a few microseconds per block), yielding between messages so a
flood of events cannot starve the routing. Memory per server is bounded by the index's cap,
per message by ``MAX_MESSAGE_BYTES``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import zmq
import zmq.asyncio

from extproc.kv_events import TOPIC_ALL, FrameError, decode_message
from extproc.kv_index import BatchOutcome, KvIndex
from extproc.kv_metrics import KvMetrics
from extproc.supervise import spawn

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # one engine step's events; larger is not vLLM
RECEIVE_HWM = 100_000  # messages queued in ZMQ before it drops (a drop shows as a gap)
_YIELD_EVERY = 64  # messages handled before giving the loop to other work


def parse_endpoint_map(entries: Iterable[str]) -> dict[str, str]:
    """``IP:PORT=ZMQ_ENDPOINT`` entries -> {"ip:port": endpoint}; ValueError when malformed."""
    out: dict[str, str] = {}
    for entry in entries:
        server, sep, address = entry.partition("=")
        server, address = server.strip(), address.strip()
        host, colon, port = server.rpartition(":")
        if not sep or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"--kv-events-endpoint {entry!r}: expected IP:PORT=ZMQ_ENDPOINT, "
                "e.g. 10.0.0.7:8000=tcp://10.0.0.7:5557 or 127.0.0.1:8001=ipc:///tmp/kv1"
            )
        if not address.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(
                f"--kv-events-endpoint {entry!r}: the ZMQ endpoint must start with "
                "tcp://, ipc:// or inproc://"
            )
        out[server] = address
    return out


class KvEventSubscriptions:
    def __init__(
        self,
        index: KvIndex,
        metrics: KvMetrics,
        *,
        port: int = 0,
        endpoints: Mapping[str, str] | None = None,
        on_error: Callable[[str], None] = lambda task: None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.index = index
        self.metrics = metrics
        self.port = port
        self.explicit = dict(endpoints or {})
        self.on_error = on_error
        self._ctx = context or zmq.asyncio.Context()
        self._own_ctx = context is None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.addresses: dict[str, str] = {}

    def address_of(self, endpoint: str) -> str | None:
        """The ZMQ endpoint of the server at ``ip:port`` (None: it has none configured)."""
        explicit = self.explicit.get(endpoint)
        if explicit is not None:
            return explicit
        if not self.port:
            return None
        host = endpoint.rpartition(":")[0]
        return f"tcp://{host}:{self.port}"

    def sync(self, endpoints: Iterable[str]) -> None:
        """Subscribe to the publisher of every server in ``endpoints``, drop the others."""
        wanted = {ep: addr for ep in endpoints if (addr := self.address_of(ep)) is not None}
        for ep in [e for e in self._tasks if e not in wanted or wanted[e] != self.addresses.get(e)]:
            self._drop(ep)
        for ep, addr in wanted.items():
            if ep not in self._tasks:
                self.index.add(ep)
                self.addresses[ep] = addr
                self._tasks[ep] = spawn(
                    f"kv-events {ep}", partial(self._run, ep, addr), self.on_error
                )
                log.info("kv events: subscribing to %s for %s", addr, ep)

    def _drop(self, endpoint: str) -> None:
        task = self._tasks.pop(endpoint, None)
        if task is not None:
            task.cancel()
        self.addresses.pop(endpoint, None)
        self.index.remove(endpoint)
        self.metrics.forget_backend(endpoint)
        log.info("kv events: unsubscribed from %s", endpoint)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for ep in list(self._tasks):
            self._drop(ep)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_ctx:
            self._ctx.term()

    async def _run(self, endpoint: str, address: str) -> None:
        sock = self._ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            if address.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            sock.setsockopt(zmq.SUBSCRIBE, TOPIC_ALL)
            sock.connect(address)
            n = 0
            while True:
                frames = await sock.recv_multipart()
                self.handle(endpoint, frames)
                n += 1
                if n % _YIELD_EVERY == 0:  # queued messages return at once: let others run
                    await asyncio.sleep(0)
        finally:
            sock.close(linger=0)

    def handle(self, endpoint: str, frames: list[bytes]) -> None:
        """Apply one message to the endpoint's index (public for tests and replay)."""
        server = self.index.servers.get(endpoint)
        if server is None:
            return
        try:
            batch = decode_message(frames)
        except FrameError as exc:
            self.metrics.undecodable(endpoint, batch=True)
            log.debug("kv events from %s: %s", endpoint, exc)
            return
        applied = server.on_batch(batch)
        if batch.undecodable:
            self.metrics.undecodable(endpoint, events=batch.undecodable)
        self.metrics.applied(endpoint, applied)
        if applied.outcome is not BatchOutcome.OK:
            log.warning(
                "kv events from %s: %s at seq %d; its index was dropped and is rebuilt from new events",
                endpoint,
                applied.outcome.value,
                batch.seq,
            )
