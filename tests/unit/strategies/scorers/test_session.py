"""extproc/strategies/scorers/session.py: sticky sessions by key."""

from __future__ import annotations

from collections import Counter

from extproc.strategies import RequestFacts

from ...helpers import registry, scrape_ok, vm
from ..helpers import run


def test_session_is_sticky_and_moves_only_when_its_server_goes():
    reg, _ = registry(4)
    for i in range(4):
        scrape_ok(reg, i, vm())
    keys = [f"user-{i}" for i in range(200)]
    before = {k: run(reg, "session", RequestFacts(session_key=k)).backend.endpoint for k in keys}
    again = {
        k: run(reg, "session", RequestFacts(session_key=k), seed=9).backend.endpoint for k in keys
    }
    assert before == again
    assert len(Counter(before.values())) == 4  # spread over all servers
    gone = "10.0.0.2:8000"
    reg.set_backends([r.url for r in reg.records if r.endpoint != gone])
    after = {k: run(reg, "session", RequestFacts(session_key=k)).backend.endpoint for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == gone}


def test_session_avoids_unhealthy_server():
    reg, _ = registry(3)
    for i in range(3):
        scrape_ok(reg, i, vm())
    key = "abc"
    home = run(reg, "session", RequestFacts(session_key=key)).backend.index
    rec = reg.records[home]
    for _ in range(3):
        reg.record_failure(rec, "refused", timeout=False)
    moved = run(reg, "session", RequestFacts(session_key=key)).backend.index
    assert moved != home
    scrape_ok(reg, home, vm())
    assert run(reg, "session", RequestFacts(session_key=key)).backend.index == home


def test_the_memo_of_homes_answers_as_hashing_and_stays_bounded(monkeypatch):
    from extproc.strategies.scorers import session

    monkeypatch.setattr(session, "MEMO_LIMIT", 50)
    monkeypatch.setattr(session, "_memo", {})
    reg, _ = registry(6)
    for i in range(6):
        scrape_ok(reg, i, vm())
    endpoints = [r.endpoint.encode() for r in reg.records]
    for round_ in range(3):  # the second and third rounds come from the memo (new snapshots)
        for i in range(120):
            key = f"user-{i}"
            got = run(reg, "session", RequestFacts(session_key=key)).backend.index
            assert got == session.home(key, endpoints), (round_, key)
            assert len(session._memo) <= 50
        scrape_ok(reg, 0, vm(running=round_ + 1))  # a new snapshot, the same candidates
    # a client's huge keys are remembered as their hash, never whole
    long_key = "k" * 100_000
    got = run(reg, "session", RequestFacts(session_key=long_key)).backend.index
    assert got == session.home(long_key, endpoints)
    assert all(isinstance(k, int) for pair in session._memo for k in pair)
    # a narrowed list (one server unhealthy) is another list: its own homes
    for _ in range(3):
        reg.record_failure(reg.records[1], "refused", timeout=False)
    rest = [e for j, e in enumerate(endpoints) if j != 1]
    for i in range(20):
        got = run(reg, "session", RequestFacts(session_key=f"user-{i}")).backend.endpoint
        assert got.encode() == rest[session.home(f"user-{i}", rest)]
