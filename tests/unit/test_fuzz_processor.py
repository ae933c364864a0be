"""Fuzzing the sans-I/O core: arbitrary ext_proc message sequences against arbitrary pools.

Properties, checked after every message (builders.check_answer / check_routing / check_rejection):
* ``Processor.handle`` never raises;
* every message with a phase gets exactly one answer that parses as a ProcessingResponse of the
  same phase, or an immediate_response 4xx/5xx with an OpenAI error body; an empty message gets
  no answer (or a valid one);
* a destination (header and envoy.lb metadata, ``ip:port`` or the ranked list
  ``ip:port,ip:port``) names distinct backends of the current pool, the first being the pick
  (the token), within the requested model's pool, the pick eligible (healthy if possible);
* a request that can be routed is routed (no silent CONTINUE while backends exist);
* in-flight accounting is exact at every step (builders.InflightModel) and drops to zero once
  every stream has ended, across interleaved streams, scrapes and backends removed mid-stream.

Profiles: EXTPROC_FUZZ_PROFILE=fuzz-deep for a longer run (default fuzz-quick, ~10 s).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from extproc.backends import BackendRegistry, PickToken
from extproc.observability import Metrics
from extproc.openai_request import LLM_PATHS, RequestError, parse_request, route_path
from extproc.prefix_index import PrefixIndex
from extproc.processor import Processor, StreamState
from extproc.route_settings import RouteSettingsCache

from . import builders as b
from .helpers import FakeClock

_COMMON = dict(
    deadline=None,
    database=None,
    report_multiple_bugs=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
settings.register_profile("fuzz-quick", max_examples=60, stateful_step_count=30, **_COMMON)
settings.register_profile("fuzz-deep", max_examples=1500, stateful_step_count=80, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("EXTPROC_FUZZ_PROFILE", "fuzz-quick"))


def _note(name: str) -> None:
    """A statistics event (--hypothesis-show-statistics); no-op outside a hypothesis test."""
    try:
        event(name)
    except InvalidArgument:
        pass


def decoded_headers(msg: ep.HttpHeaders) -> dict[str, str]:
    return {
        h.key: (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
        for h in msg.headers.headers
    }


@dataclass
class Stream:
    state: StreamState
    tokens: list[PickToken] = field(default_factory=list)
    body_mode: int = 0
    path: str = ""
    awaiting: bool | None = False  # None: unknown (out-of-order messages), no liveness claim


class Harness:
    """One processor over one registry, and the checks of every exchange."""

    def __init__(self, kwargs: dict[str, object], seed: int) -> None:
        self.clock = FakeClock()
        self.reg = BackendRegistry(stale_after=1.0, max_metrics_age=10.0, clock=self.clock)
        self.index = PrefixIndex()
        self.kwargs = kwargs
        self.proc = Processor(
            self.reg,
            metrics=Metrics(),
            prefix_index=self.index,
            rng=random.Random(seed),
            **kwargs,  # type: ignore[arg-type]
        )
        self.routes = RouteSettingsCache(self.proc.default_route)
        self.model = b.InflightModel()

    def open(self, metadata: list[tuple[str, str]]) -> Stream:
        return Stream(StreamState(route=self.routes.get(metadata)))

    def set_pool(self, urls: list[str]) -> None:
        _, removed = self.reg.set_backends(urls)
        self.index.purge(r.endpoint for r in removed)  # as app.on_backends does
        self.model.see(self.reg.records)

    def send(self, stream: Stream, req: ep.ProcessingRequest) -> b.Answer:
        snap = self.reg.snapshot()
        outcome = self.proc.handle(req, stream.state)
        token = outcome.token
        answer = b.check_answer(req, outcome.response, token)
        if token is not None:
            assert any(token.record is r for r in self.reg.records), (
                "token of a record outside the pool"
            )
            assert stream.state.token is token, "the stream state does not hold its pick"
            for old in stream.tokens:  # a second decision on one stream replaces the first
                self.model.released(old)
            stream.tokens[:] = [token]
            self.model.picked(token)
        kind = req.WhichOneof("request")
        _note(
            f"{kind} -> {answer.kind}{' routed' if answer.endpoints else ''}{' ' + str(answer.status) if answer.status else ''}"
            f"{' list' if len(answer.endpoints) > 1 else ''}"
        )
        model = b.body_model(req.request_body.body) if kind == "request_body" else None
        b.check_routing(answer, snap, model if answer.kind == "request_body" else None, self.reg)
        b.check_rejection(answer, snap, model)
        if kind == "request_headers":
            self._headers_liveness(stream, req, answer, snap)
        elif kind == "request_body":
            self._body_liveness(stream, req, answer, snap, model)
        return answer

    def _headers_liveness(
        self, stream: Stream, req: ep.ProcessingRequest, answer: b.Answer, snap
    ) -> None:
        if req.HasField("protocol_config"):
            stream.body_mode = req.protocol_config.request_body_mode
        stream.path = route_path(decoded_headers(req.request_headers).get(":path", ""))
        deferred = (
            stream.body_mode in b.BUFFERED_MODES
            and not req.request_headers.end_of_stream
            and stream.path in LLM_PATHS
        )
        if answer.kind == "immediate_response":
            assert answer.status in (400, 503), answer
            stream.awaiting = None
        elif deferred:
            assert not answer.endpoints, "decided before the body of a buffered LLM request"
            stream.awaiting = True
        else:
            stream.awaiting = None
            if snap.backends:
                assert answer.endpoints, "a routable request was not routed"

    def _body_liveness(
        self, stream: Stream, req: ep.ProcessingRequest, answer: b.Answer, snap, model
    ) -> None:
        awaiting, stream.awaiting = stream.awaiting, None
        if awaiting is not True or not req.request_body.end_of_stream or not snap.backends:
            return
        try:
            parse_request(stream.path, req.request_body.body, max_bytes=self.proc.max_body_bytes)
        except RequestError as err:
            assert answer.status == err.status, (
                f"bad body answered {answer}, expected HTTP {err.status}"
            )
            return
        servable = not snap.model_pools or model in snap.model_pools or snap.models_unknown.eligible
        if servable:
            assert answer.endpoints, "a valid LLM request was not routed"
        else:
            assert answer.status == 404, answer

    def close(self, stream: Stream) -> None:
        """What ExtProcHandler.process does when the stream ends."""
        self.proc.finish(stream.state)
        for token in stream.tokens:
            self.model.released(token)
        stream.tokens.clear()


# -- one stream, any pool ------------------------------------------------------------------
@settings(PROFILE, max_examples=PROFILE.max_examples * 2)
@given(
    kwargs=b.processor_kwargs(),
    pool=b.pool_specs(),
    route=b.route_metadata,
    messages=b.message_sequences,
    seed=st.integers(0, 2**32),
)
def test_any_message_sequence_on_any_pool(kwargs, pool, route, messages, seed):
    h = Harness(kwargs, seed)
    b.build_pool(h.reg, h.clock, *pool)
    h.model.see(h.reg.records)
    stream = h.open(route)
    for msg in messages:
        h.send(stream, msg)
        h.model.check(h.reg)
    h.close(stream)
    b.check_all_released(h.model.records.values(), h.reg)


# -- interleaved streams, scrapes and pool changes ------------------------------------------
class ProcessorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h: Harness | None = None
        self.streams: list[Stream] = []
        self.scrapes: dict[int, list[int]] = {}  # record id -> generations begun, not finished

    @initialize(kwargs=b.processor_kwargs(), urls=b.pools, seed=st.integers(0, 2**32))
    def setup(self, kwargs, urls, seed):
        self.h = Harness(kwargs, seed)
        self.h.set_pool(urls)

    def _record(self, i: int):
        records = self.h.reg.records
        return records[i % len(records)]

    def has_backends(self) -> bool:
        return self.h is not None and bool(self.h.reg.records)

    # pool and scrapes
    @rule(urls=b.pools)
    def set_pool(self, urls):
        self.h.set_pool(urls)

    @precondition(lambda self: self.h is not None and any(r.inflight for r in self.h.reg.records))
    @rule(i=st.integers(0, 99), readd=st.booleans())
    def remove_busy_backend(self, i, readd):
        """A backend with open picks leaves the pool (DNS change), maybe to come back as new."""
        busy = [r for r in self.h.reg.records if r.inflight]
        gone = busy[i % len(busy)]
        urls = [r.url for r in self.h.reg.records if r is not gone]
        self.h.set_pool(urls)
        if readd:
            self.h.set_pool([*urls, gone.url])

    @precondition(has_backends)
    @rule(i=st.integers(0, 99))
    def begin_scrape(self, i):
        rec = self._record(i)
        self.scrapes.setdefault(id(rec), []).append(self.h.reg.begin_scrape(rec))

    @precondition(has_backends)
    @rule(i=st.integers(0, 99), metrics=b.vllm_metrics(), which=st.integers(0, 3))
    def scrape_ok(self, i, metrics, which):
        rec = self._record(i)
        begun = self.scrapes.get(id(rec)) or [self.h.reg.begin_scrape(rec)]
        gen = begun.pop(-1 - which % len(begun))  # usually the latest; sometimes one that overtook
        self.h.reg.record_success(rec, metrics, gen)
        self.h.model.scraped(rec, gen)

    @precondition(has_backends)
    @rule(i=st.integers(0, 99), kind=st.sampled_from(b.FAILURE_KINDS))
    def scrape_fails(self, i, kind):
        rec = self._record(i)
        begun = self.scrapes.get(id(rec))
        if begun:
            begun.pop()
        else:
            self.h.reg.begin_scrape(rec)
        b.record_failure(self.h.reg, rec, kind)

    @precondition(has_backends)
    @rule(i=st.integers(0, 99), models=b.served_models)
    def list_models(self, i, models):
        self.h.reg.record_models(self._record(i), *models)

    @precondition(lambda self: self.h is not None)
    @rule(dt=st.sampled_from([0.0, 0.3, 1.5, 20.0]), rebuild=st.booleans())
    def tick(self, dt, rebuild):
        self.h.clock.advance(dt)
        if rebuild:
            self.h.reg.rebuild()  # the scraper's ticker

    # streams
    @precondition(lambda self: self.h is not None and len(self.streams) < 5)
    @rule(route=b.route_metadata)
    def open_stream(self, route):
        self.streams.append(self.h.open(route))

    @precondition(lambda self: bool(self.streams))
    @rule(s=st.integers(0, 99), msg=b.any_message)
    def send(self, s, msg):
        self.h.send(self.streams[s % len(self.streams)], msg)

    @precondition(lambda self: bool(self.streams))
    @rule(s=st.integers(0, 99), msgs=b.llm_exchange())
    def send_llm_request(self, s, msgs):
        stream = self.streams[s % len(self.streams)]
        for msg in msgs:
            self.h.send(stream, msg)

    @precondition(lambda self: bool(self.streams))
    @rule(s=st.integers(0, 99))
    def close_stream(self, s):
        self.h.close(self.streams.pop(s % len(self.streams)))

    @invariant()
    def accounting_is_exact(self):
        if self.h is None:
            return
        self.h.model.check(self.h.reg)
        if not self.streams:
            b.check_all_released(self.h.model.records.values(), self.h.reg)

    def teardown(self):
        if self.h is None:
            return
        while self.streams:
            self.h.close(self.streams.pop())
        b.check_all_released(self.h.model.records.values(), self.h.reg)


TestProcessorMachine = ProcessorMachine.TestCase
TestProcessorMachine.settings = PROFILE


# -- targeted cases that random generation reaches rarely -----------------------------------
@settings(PROFILE, max_examples=max(10, PROFILE.max_examples // 3))
@given(
    value=st.binary(min_size=1, max_size=16).map(lambda v: v + b"\xff"),
    key=st.sampled_from(
        ["x-extproc-strategy-bin", "x-extproc-weights-bin", "x-extproc-allow-client-strategy-bin"]
    ),
)
def test_binary_route_metadata_does_not_break_the_stream(value, key):
    """gRPC hands ``-bin`` metadata over as bytes; a non-UTF-8 value must be ignored, not raise."""
    cache = RouteSettingsCache()
    route = cache.get([(key, value)])
    assert route is not None
