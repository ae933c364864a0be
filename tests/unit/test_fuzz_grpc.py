"""Fuzzing the real gRPC shell: ExtProcHandler.process behind a grpc.aio server on 127.0.0.1.

A client opens a few concurrent ext_proc streams with random route metadata and random
message sequences, reads answers in lock step or pipelined, and ends each stream by
half-closing or by cancelling (before or after reading the last answer); the pool may change
mid-stream. Properties:
* every message with a phase gets exactly one valid answer, in order (builders.check_answer),
  and a half-closed stream ends with status OK after exactly those answers;
* destinations name backends that were in the pool during the example;
* once every handler has returned, nothing is in flight on any backend, removed ones included.

The server runs on its own event loop thread for the whole module; each example installs a
fresh registry + processor + handler behind it (the servicer reads the current one per stream).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from extproc.backends import BackendRecord, BackendRegistry
from extproc.grpc_server import SERVICE_NAME, ExtProcHandler
from extproc.observability import Metrics
from extproc.processor import Processor

from . import builders as b
from .helpers import FakeClock

settings.register_profile(
    "fuzz-grpc-quick",
    max_examples=60,
    deadline=None,
    database=None,
    report_multiple_bugs=False,
    # No "explain" phase: its line tracer makes a shrink over real gRPC take minutes.
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
settings.register_profile(
    "fuzz-grpc-deep",
    parent=settings.get_profile("fuzz-grpc-quick"),
    max_examples=600,
)
PROFILE = settings.get_profile(
    {"fuzz-deep": "fuzz-grpc-deep"}.get(
        os.environ.get("EXTPROC_FUZZ_PROFILE", ""), "fuzz-grpc-quick"
    )
)
METHOD = f"/{SERVICE_NAME}/Process"
READ_TIMEOUT = 5.0


def _identity(x: bytes) -> bytes:
    return x


class Server:
    """A grpc.aio server on a private loop thread; ``run`` executes a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-grpc", daemon=True)
        self.thread.start()
        self.handler: ExtProcHandler | None = None
        self.active = 0
        self.handler_errors: list[BaseException] = []
        self.run(self._start)

    def run(
        self, fn: Callable[[], Coroutine[object, object, object]], timeout: float = 30.0
    ) -> object:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    async def _process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        handler = self.handler
        assert handler is not None
        self.active += 1
        try:
            await handler.process(request_iterator, context)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the shell must not fail a stream: recorded, asserted on
            self.handler_errors.append(exc)
            raise
        finally:
            self.active -= 1

    async def _start(self) -> None:
        # As grpc_server.build_server registers it, with a wrapper that counts live handlers.
        rpc = grpc.stream_stream_rpc_method_handler(
            self._process,
            request_deserializer=ep.ProcessingRequest.FromString,
            response_serializer=_identity,
        )
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Process": rpc}),)
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = self.channel.stream_stream(
            METHOD,
            request_serializer=ep.ProcessingRequest.SerializeToString,
            response_deserializer=_identity,
        )

    async def idle(self, timeout: float = 5.0) -> None:
        """Wait until every handler has returned (a cancelled stream ends asynchronously)."""
        deadline = self.loop.time() + timeout
        while self.active:
            assert self.loop.time() < deadline, f"{self.active} handler(s) still running"
            await asyncio.sleep(0.002)

    async def _stop(self) -> None:
        await self.channel.close()
        await self.server.stop(grace=None)

    def close(self) -> None:
        self.run(self._stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@dataclass(frozen=True)
class Script:
    """One client stream: metadata, messages, how it ends, and an optional pool change."""

    metadata: tuple[tuple[str, str], ...]
    messages: tuple[ep.ProcessingRequest, ...]
    lockstep: bool  # read each answer before the next message (Envoy's usual pace)
    end: str  # "half-close" | "cancel" | "cancel-unread"
    cut: int  # cancel after this many messages
    pool_change_at: int | None
    pool_change: tuple[str, ...]


scripts = st.builds(
    Script,
    metadata=b.route_metadata.map(lambda md: tuple((k, v) for k, v in md if k != "user-agent")),
    messages=st.one_of(b.llm_exchange(), b.message_sequences).map(tuple),
    lockstep=st.booleans(),
    end=st.sampled_from(["half-close", "half-close", "cancel", "cancel-unread"]),
    cut=st.integers(0, 8),
    pool_change_at=st.one_of(st.none(), st.integers(0, 6)),
    pool_change=b.pools.map(tuple),
)


@dataclass
class Example:
    reg: BackendRegistry
    seen: dict[int, BackendRecord] = field(default_factory=dict)
    endpoints: set[str] = field(default_factory=set)
    events: set[str] = field(default_factory=set)  # for --hypothesis-show-statistics
    shut_down: bool = False

    def see(self) -> None:
        for r in self.reg.records:
            self.seen.setdefault(id(r), r)
            self.endpoints.add(r.endpoint)


async def run_stream(server: Server, ex: Example, script: Script) -> None:
    call = server.stub(metadata=script.metadata)
    try:
        await _drive(call, ex, script)
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        # Only a server shutdown may end a stream under the client's feet, and with status OK.
        if not ex.shut_down:
            raise
        code = await call.code()
        # A client that writes after the server ended the call with OK fails its own send and
        # reports INTERNAL locally ("execute_batch ... SendMessageOperation"): the server's end
        # was OK (no handler error is checked separately); anything else is a real failure.
        client_side = code == grpc.StatusCode.INTERNAL and "SendMessageOperation" in (
            await call.debug_error_string() or ""
        )
        assert code == grpc.StatusCode.OK or client_side, (code, await call.details())
    finally:
        call.cancel()  # after a failed check: do not leave the handler waiting (no-op once done)


async def _drive(call: grpc.aio.StreamStreamCall, ex: Example, script: Script) -> None:
    expected: list[ep.ProcessingRequest] = []  # messages whose answer is still unread

    async def read_one() -> bool:
        req = expected.pop(0)
        raw = await asyncio.wait_for(call.read(), READ_TIMEOUT)
        if raw is grpc.aio.EOF and ex.shut_down:
            return False
        assert raw is not grpc.aio.EOF, (
            f"stream ended without an answer to a {req.WhichOneof('request')} message"
        )
        answer = b.check_answer(req, raw)
        for e in answer.endpoints:
            assert e in ex.endpoints, f"{e} was never a backend of the pool {sorted(ex.endpoints)}"
        ex.events.add(f"answer {answer.kind}{' routed' if answer.endpoints else ''}")
        return True

    messages = script.messages
    if script.end != "half-close":
        messages = messages[: script.cut]
    for i, msg in enumerate(messages):
        if script.pool_change_at == i:
            ex.reg.set_backends(script.pool_change)
            ex.see()
        await call.write(msg)
        if msg.WhichOneof("request") is not None:
            expected.append(msg)
            if script.lockstep and not await read_one():
                break
    ex.events.add(f"end {script.end}")
    if script.end == "half-close":
        await call.done_writing()
        while expected:
            if not await read_one():
                expected.clear()
        tail = await asyncio.wait_for(call.read(), READ_TIMEOUT)
        assert tail is grpc.aio.EOF, (
            f"unexpected extra answer {ep.ProcessingResponse.FromString(tail)}"
        )
        assert await call.code() == grpc.StatusCode.OK, (await call.code(), await call.details())
    else:
        if script.end == "cancel":
            while expected:
                if not await read_one():
                    expected.clear()
        call.cancel()
        assert await call.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.OK)


async def shut_down_later(handler: ExtProcHandler, ex: Example, ticks: int) -> None:
    """The service's shutdown after its grace period: open streams end with status OK."""
    for _ in range(ticks):
        await asyncio.sleep(0)
    ex.shut_down = True
    if ex.events is not None:
        ex.events.add("shutdown")
    handler.close_open_streams()


@settings(PROFILE)
@given(
    kwargs=b.processor_kwargs(),
    pool=b.pool_specs(),
    streams=st.lists(scripts, min_size=1, max_size=4),
    shutdown=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 40)),
    seed=st.integers(0, 2**32),
)
def test_grpc_shell_answers_every_message_and_releases_every_pick(
    server, kwargs, pool, streams, shutdown, seed
):
    async def example() -> None:
        clock = FakeClock()
        reg = BackendRegistry(stale_after=1.0, max_metrics_age=10.0, clock=clock)
        b.build_pool(reg, clock, *pool)
        proc = Processor(reg, metrics=Metrics(), rng=random.Random(seed), **kwargs)
        server.handler = ExtProcHandler(proc, reg)
        server.handler_errors.clear()
        ex = Example(reg)
        ex.see()
        tasks = [run_stream(server, ex, s) for s in streams]
        if shutdown is not None and hasattr(server.handler, "close_open_streams"):
            tasks.append(shut_down_later(server.handler, ex, shutdown))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await server.idle()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        assert not server.handler_errors, server.handler_errors
        ex.see()
        b.check_all_released(ex.seen.values(), reg)
        return ex.events

    for name in sorted(server.run(example)):  # type: ignore[union-attr]
        event(name)


def test_binary_route_metadata_still_gets_answers(server):
    """A ``-bin`` route metadata value that is not UTF-8 must not cost the stream its answers."""

    async def example() -> None:
        clock = FakeClock()
        reg = BackendRegistry(stale_after=1.0, max_metrics_age=10.0, clock=clock)
        reg.set_backends(b.URLS[:2])
        proc = Processor(
            reg, default_strategy="random", fallback=b.FALLBACKS["random"], metrics=Metrics()
        )
        server.handler = ExtProcHandler(proc, reg)
        server.handler_errors.clear()
        ex = Example(reg)
        ex.see()
        msg = ep.ProcessingRequest(request_headers=ep.HttpHeaders(end_of_stream=True))
        script = Script(
            (("x-extproc-strategy-bin", b"\xff"),), (msg,), True, "half-close", 0, None, ()
        )  # type: ignore[arg-type]
        try:
            await run_stream(server, ex, script)
        finally:
            await server.idle()
        assert not server.handler_errors, server.handler_errors
        b.check_all_released(ex.seen.values(), reg)

    server.run(example)
