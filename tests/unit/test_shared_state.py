"""--workers N: the counters, the published state and the two registries (extproc/shared_state.py).

Several "processes" are simulated by several attachments to the same files: what crosses a
process boundary in the service crosses a mmap and a file here too.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily

from extproc.backends import BackendRegistry
from extproc.decide import decide
from extproc.observability import MergedCollector
from extproc.shared_state import (
    ColumnTable,
    MainRegistry,
    MirrorRegistry,
    SharedCounters,
    StateFile,
    decode_state,
    encode_state,
)
from extproc.snapshot import Freshness
from extproc.strategies import FALLBACKS, STRATEGIES, RequestFacts

from .helpers import FakeClock, vm

URLS = [f"http://10.0.0.{i + 1}:8000" for i in range(3)]


class World:
    """A main registry and ``workers`` mirrors over one run directory."""

    def __init__(self, run_dir: Path, workers: int = 2, columns: int = 64) -> None:
        self.clock = FakeClock()
        self.counters = SharedCounters.create(run_dir / "counters", workers, columns)
        self.main = MainRegistry(
            self.counters,
            StateFile(run_dir / "state", self.counters),
            stale_after=1.0,
            max_metrics_age=10.0,
            clock=self.clock,
            quarantine=10.0,
        )
        self.attached = [SharedCounters.attach(run_dir / "counters") for _ in range(workers)]
        self.mirrors = [
            MirrorRegistry(
                c,
                StateFile(run_dir / "state", c),
                row,
                stale_after=1.0,
                max_metrics_age=10.0,
                rebuild_after=0.2,
                clock=self.clock,
            )
            for row, c in enumerate(self.attached)
        ]

    def scrape_ok(self, i: int, running: float = 0.0) -> None:
        rec = self.main.records[i]
        gen = self.main.begin_scrape(rec)
        self.main.record_success(rec, vm(running=running), gen)
        self.main.rebuild()

    def close(self) -> None:
        for c in [*self.attached, self.counters]:
            c.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def test_a_pick_in_one_worker_is_seen_by_the_others_and_by_the_main(world: World) -> None:
    world.main.set_backends(URLS)
    w0, w1 = world.mirrors
    for w in (w0, w1):  # a decision reads the snapshot before it picks
        assert [b.endpoint for b in w.snapshot().backends] == [u[7:] for u in URLS]
    t0 = w0.on_pick(1)
    t1 = w1.on_pick(1)
    t2 = w1.on_pick(2)
    assert t0 is not None and t1 is not None and t2 is not None
    for reg in (w0, w1, world.main):
        snap = reg.snapshot()
        assert snap.pending == (0, 2, 1) and sorted(snap.active or ()) == [1, 2]
    assert [r.inflight for r in world.main.records] == [0, 2, 1]
    w0.on_done(t0)
    w1.on_done(t2)
    assert w0.snapshot().pending == (0, 1, 0) and w0.snapshot().active == (1,)
    w1.on_done(t1)
    assert w1.snapshot().pending == (0, 0, 0) and w1.snapshot().active == ()


def test_a_burst_spread_over_two_workers_spreads_over_the_servers_as_in_one_process(
    world: World,
) -> None:
    world.main.set_backends(URLS)
    for i in range(3):
        world.scrape_ok(i)
    single = BackendRegistry(stale_after=1.0, max_metrics_age=10.0, clock=world.clock)
    single.set_backends(URLS)
    for rec in single.records:
        single.record_success(rec, vm(), single.begin_scrape(rec))
    single.rebuild()
    strategy = STRATEGIES["least-request"]

    def burst(registries: list[BackendRegistry]) -> Counter[str]:
        picks: Counter[str] = Counter()
        for n in range(12):  # alternating workers, each pick before the next decision
            reg = registries[n % len(registries)]
            d = decide(
                strategy, FALLBACKS["random"], RequestFacts(seq=n), reg.snapshot(), random.Random(n)
            )
            reg.on_pick(d.backend.index)
            picks[d.backend.endpoint] += 1
        return picks

    one = burst([single])
    two = burst(list(world.mirrors))
    assert sorted(one.values()) == sorted(two.values()) == [4, 4, 4]
    world.main.snapshot()  # what the admin endpoint does: the workers' counts, summed
    assert [r.inflight for r in world.main.records] == [4, 4, 4]


def test_a_pile_up_made_by_one_worker_steers_the_other(world: World) -> None:
    world.main.set_backends(URLS)
    for i in range(3):
        world.scrape_ok(i)
    w0, w1 = world.mirrors
    w0.snapshot()
    for _ in range(5):  # worker 0 sent 5 requests each to the first two servers
        w0.on_pick(0)
        w0.on_pick(1)
    picks = []
    for n in range(5):
        d = decide(
            STRATEGIES["least-request"],
            FALLBACKS["random"],
            RequestFacts(seq=n),
            w1.snapshot(),
            random.Random(n),
        )
        w1.on_pick(d.backend.index)
        picks.append(d.backend.endpoint)
    assert picks == [URLS[2][7:]] * 5  # worker 1 fills the third one up first


def test_pending_follows_the_scrapes_as_in_one_process(world: World) -> None:
    world.main.set_backends(URLS[:1])
    rec, w0 = world.main.records[0], world.mirrors[0]
    w0.snapshot()
    old = w0.on_pick(0)
    gen = world.main.begin_scrape(rec)
    during = w0.on_pick(0)  # picked while the scrape was in flight: maybe not in its numbers
    world.main.record_success(rec, vm(running=1), gen)
    assert w0.snapshot().pending == (2,)  # the first scrape absorbs nothing
    world.main.record_success(rec, vm(running=2), world.main.begin_scrape(rec))
    assert w0.snapshot().pending == (1,)  # "old" is now in running/waiting; "during" not yet
    assert world.main.snapshot().pending == (1,) and rec.inflight == 2
    assert old is not None and during is not None
    w0.on_done(old)
    w0.on_done(during)
    assert w0.snapshot().pending == (0,) and world.main.snapshot().pending == (0,)


def test_a_newcomer_and_a_transition_reach_the_workers_at_once(world: World) -> None:
    world.main.set_backends(URLS[:2])
    w0 = world.mirrors[0]
    assert w0.snapshot().cold
    world.scrape_ok(0)
    snap = w0.snapshot()
    assert not snap.cold and snap.backends[0].freshness is Freshness.FRESH
    world.main.record_failure(world.main.records[0], "timeout", timeout=True)
    assert w0.snapshot().backends[0].suspect


def test_a_worker_ages_its_copy_when_the_main_publishes_nothing(world: World) -> None:
    world.main.set_backends(URLS[:1])
    world.scrape_ok(0)
    w0 = world.mirrors[0]
    assert w0.snapshot().backends[0].freshness is Freshness.FRESH
    world.clock.advance(2.0)  # no publication for longer than stale_after
    assert w0.snapshot().backends[0].freshness is Freshness.STALE
    world.clock.advance(20.0)
    assert w0.snapshot().backends[0].freshness is Freshness.UNKNOWN


def test_a_column_is_reused_only_after_its_quarantine_and_old_releases_are_dropped(
    world: World,
) -> None:
    world.main.set_backends(URLS[:2])
    w0 = world.mirrors[0]
    w0.snapshot()
    leaving = w0.on_pick(1)  # open when its backend leaves the pool
    assert leaving is not None
    old_column = world.main.records[1].shared.index  # type: ignore[union-attr]
    world.main.set_backends(URLS[:1])
    assert w0.snapshot().pending == (0,) and len(w0.snapshot().backends) == 1
    world.main.set_backends([URLS[0], URLS[2]])  # within the quarantine: a fresh column
    newcomer = world.main.records[1]
    assert newcomer.shared is not None and newcomer.shared.index != old_column
    world.clock.advance(11.0)
    world.main.set_backends([URLS[0], URLS[2], "http://10.0.0.9:8000"])  # after it: reused
    reused = world.main.records[2].shared
    assert reused is not None and reused.index == old_column
    assert world.counters.bases[old_column] == 1  # the earlier occupant's open pick
    assert w0.snapshot().pending == (0, 0, 0)
    w0.on_done(leaving)  # the earlier occupant's release must not go below zero for the new one
    t = w0.on_pick(2)
    assert w0.snapshot().pending == (0, 0, 1)
    assert t is not None
    w0.on_done(t)
    assert w0.snapshot().pending == (0, 0, 0)
    assert [r.inflight for r in world.main.records] == [0, 0, 0]


def test_a_pick_from_a_copy_older_than_the_column_is_not_counted(world: World) -> None:
    world.main.set_backends(URLS[:1])
    w0 = world.mirrors[0]
    w0.snapshot()
    world.counters.epochs[world.main.records[0].shared.index] += 1  # type: ignore[union-attr]
    assert w0.on_pick(0) is None
    assert w0.on_pick(7) is None  # no such backend


def test_a_dead_workers_open_picks_are_counted_done(world: World) -> None:
    world.main.set_backends(URLS[:1])
    w1 = world.mirrors[1]
    w1.snapshot()
    w1.on_pick(0)
    w1.on_pick(0)
    world.counters.set_worker(1, pid=1234, streams=2)
    world.counters.reset_row(1)
    assert world.main.snapshot().pending == (0,) and world.main.records[0].inflight == 0
    assert world.counters.worker_pid(1) == 0 and world.counters.worker_streams(1) == 0


def test_the_header_carries_serving_and_the_workers(world: World) -> None:
    c = world.attached[0]
    assert not c.serving
    world.counters.serving = True
    assert c.serving
    world.counters.set_worker(0, pid=42, streams=3)
    assert (c.worker_pid(0), c.worker_streams(0), c.worker_pid(1)) == (42, 3, 0)
    world.counters.serving = False
    assert not c.serving


def test_columns_are_given_compactly_and_run_out_cleanly(tmp_path: Path) -> None:
    clock = FakeClock()
    counters = SharedCounters.create(tmp_path / "c", 1, 3)
    table = ColumnTable(counters, quarantine=5.0, clock=clock)
    assert [table.give().index for _ in range(3)] == [0, 1, 2]
    assert counters.high == 3
    with pytest.raises(RuntimeError, match="more than 3 backends"):
        table.give()
    table.free(2)
    table.free(1)
    assert table.give().index == 2  # all taken: the longest-freed one, quarantine or not
    clock.advance(6.0)
    again = table.give()
    assert again.index == 1 and again.epoch == 2
    counters.close()


def test_a_file_that_is_not_a_counters_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="not an extproc counters file"):
        SharedCounters.attach(path)


def test_the_state_round_trips(world: World) -> None:
    world.main.set_backends(URLS[:2])
    world.scrape_ok(1, running=3)
    rec = world.main.records[1]
    rec.served_models, rec.adapters = frozenset({"m", "lora"}), frozenset({"lora"})
    state = decode_state(encode_state(7, world.main.records))
    assert state.seq == 7 and [b.url for b in state.backends] == URLS[:2]
    row = state.backends[1]
    assert row.metrics is not None and row.metrics[0] == 3.0 and row.metrics[11] == ("m",)
    assert row.served_models == frozenset({"m", "lora"}) and row.adapters == frozenset({"lora"})
    world.main.publish()
    view = world.mirrors[0].snapshot().backends[1]
    assert view.metrics == rec.metrics and view.models == frozenset({"m", "lora"})


def test_a_worker_keeps_its_copy_when_the_state_cannot_be_read(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.main.set_backends(URLS[:1])
    w0 = world.mirrors[0]
    assert len(w0.snapshot().backends) == 1
    world.main.state.path.write_bytes(b"not msgpack")
    world.counters.bump_seq()
    assert len(w0.snapshot().backends) == 1
    assert "cannot read the published backend state" in caplog.text
    assert not w0.refresh()  # nothing new since


def test_the_pool_changes_are_announced_to_the_worker(world: World) -> None:
    w0 = world.mirrors[0]
    seen: list[list[str]] = []
    w0.on_change = lambda: seen.append([r.endpoint for r in w0.records])
    world.main.set_backends(URLS[:1])
    w0.snapshot()
    world.scrape_ok(0)  # same members: no announcement
    w0.snapshot()
    world.main.set_backends(URLS[:2])
    w0.snapshot()
    assert seen == [[URLS[0][7:]], [u[7:] for u in URLS[:2]]]
    with pytest.raises(TypeError):
        w0.set_backends(URLS)


def test_merged_metrics_sum_counters_and_keep_the_mains_gauges() -> None:
    main, worker = CollectorRegistry(), CollectorRegistry()
    PromCounter("x_total", "x", registry=main).inc(2)
    PromCounter("x_total", "x", registry=worker).inc(3)
    Gauge("g", "g", registry=main).set(1)

    class PerPid:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            g = GaugeMetricFamily("g", "g", labels=["pid"])
            g.add_metric(["123"], 0.0)
            yield g

    merged = {
        (s.name, tuple(s.labels.items())): s.value
        for f in MergedCollector(main, worker, PerPid()).collect()
        for s in f.samples
        if not s.name.endswith("_created")
    }
    assert merged == {("x_total", ()): 5.0, ("g", ()): 1.0}
