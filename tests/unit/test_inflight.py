"""Gateway-side in-flight accounting: requests sent since the last good scrape."""

from __future__ import annotations

from .helpers import fail, registry, scrape_ok, vm


def test_pick_counts_until_done():
    reg, _ = registry(1)
    t1 = reg.on_pick(0)
    t2 = reg.on_pick(0)
    assert reg.snapshot().pending == (2,)
    reg.on_done(t1)
    assert reg.snapshot().pending == (1,)
    reg.on_done(t2)
    assert reg.snapshot().pending == (0,)
    assert reg.records[0].inflight == 0


def test_scrape_absorbs_requests_picked_before_the_previous_scrape_started():
    reg, _ = registry(1)
    rec = reg.records[0]
    old = reg.on_pick(0)
    gen = reg.begin_scrape(rec)
    during = reg.on_pick(0)  # picked while the scrape was in flight: maybe not in its numbers
    reg.record_success(rec, vm(running=1), gen)
    # One grace interval: "old" may still have been in Envoy when that scrape ran.
    assert reg.snapshot().pending == (2,)
    reg.record_success(rec, vm(running=2), reg.begin_scrape(rec))
    assert reg.snapshot().pending == (1,)  # "old" is now surely in running/waiting
    reg.on_done(old)  # already counted by the scrape: no double decrement
    assert reg.snapshot().pending == (1,)
    assert rec.inflight == 1
    reg.on_done(during)
    assert reg.snapshot().pending == (0,)


def test_failed_scrapes_keep_accumulating():
    reg, _ = registry(1)
    scrape_ok(reg, 0, vm())
    for _ in range(3):
        reg.on_pick(0)
    fail(reg, 0, times=2, timeout=True)
    assert reg.snapshot().pending == (3,)


def test_pick_out_of_range_is_ignored():
    reg, _ = registry(1)
    assert reg.on_pick(5) is None


def test_snapshot_lists_the_backends_with_requests_in_flight():
    reg, _ = registry(3)
    assert reg.snapshot().active == ()
    t1 = reg.on_pick(1)
    reg.on_pick(2)
    snap = reg.snapshot()
    assert sorted(snap.active) == [1, 2] and snap.pending == (0, 1, 1)
    reg.on_done(t1)
    assert sorted(reg.snapshot().active) == [2]
    rec = reg.records[2]
    reg.record_success(rec, vm(), reg.begin_scrape(rec))
    reg.record_success(rec, vm(), reg.begin_scrape(rec))  # absorbed by a later scrape
    assert reg.snapshot().active == ()
    reg.on_pick(0)
    reg.set_backends([r.url for r in reg.records][::-1])  # slots move with their backends
    assert reg.snapshot().active == (2,) and reg.snapshot().pending == (0, 0, 1)
