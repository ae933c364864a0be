"""bench/workloads.py: the workload kinds and variants added for issue 9 (multi-turn sessions,
Zipf-popular prefix groups, long-context mixes); the original kinds are in test_loadgen.py."""

from __future__ import annotations

import statistics
from collections import Counter

import orjson
import pytest

from bench.workloads import Workload, generate, multi_turn, shared_prefix, sharegpt_like


# ================================================================================ multi-turn
def test_multi_turn_history_grows_and_the_last_prompt_is_a_prefix_of_the_next():
    wl = multi_turn(1500, seed=3)
    by_session: dict[int, list] = {}
    for r in wl.requests:
        by_session.setdefault(r.session, []).append(r)
    checked = 0
    for reqs in by_session.values():
        reqs.sort(key=lambda r: r.turn)
        for prev, nxt in zip(reqs, reqs[1:], strict=False):
            if nxt.turn != prev.turn + 1:
                continue
            a, b = wl.messages(prev), wl.messages(nxt)
            # the next turn resends everything the previous one sent, then its answer
            assert b[: len(a)] == a
            answer = wl.sessions[prev.session][prev.turn][1]
            assert b[len(a)] == {"role": "assistant", "content": answer}
            assert len(b) == len(a) + 2
            assert nxt.prompt_words > prev.prompt_words
            checked += 1
    assert checked > 300


def test_multi_turn_turns_follow_each_other_in_time_and_sessions_overlap():
    wl = multi_turn(2000, seed=1)
    times = [0.0]
    for g in wl.unit_gaps:
        times.append(times[-1] + g)
    when = {}
    for r, t in zip(wl.requests, times[1:], strict=True):
        when[(r.session, r.turn)] = t
    for (s, turn), t in when.items():
        if (s, turn - 1) in when:
            assert t - when[(s, turn - 1)] >= 20 / 1.1  # think_min, in unit gaps (mean rescaled)
    # Requests of many sessions interleave: the next request is usually another session's.
    pairs = zip(wl.requests, wl.requests[1:], strict=False)
    same = sum(1 for a, b in pairs if a.session == b.session)
    assert same < 0.1 * len(wl.requests)


def test_multi_turn_starts_in_steady_state_with_mean_gap_one():
    wl = multi_turn(3000, seed=2)
    assert statistics.fmean(wl.unit_gaps) == pytest.approx(1.0)
    first, last = wl.unit_gaps[:1000], wl.unit_gaps[-1000:]
    # no ramp-up: the first third is as dense as the last one
    assert statistics.fmean(first) == pytest.approx(statistics.fmean(last), rel=0.2)
    # sessions already under way at time 0 start mid-conversation
    assert any(r.turn > 0 for r in wl.requests[:50])


def test_multi_turn_body_names_the_session_in_user_and_is_deterministic():
    a, b = multi_turn(300, seed=9), multi_turn(300, seed=9)
    assert a.digest() == b.digest()
    r = a.requests[10]
    body = a.body(r)
    assert body["user"] == f"session-{r.session}"
    assert body["messages"][0]["role"] == "system"
    assert body["max_tokens"] == len(a.sessions[r.session][r.turn][1].split())
    assert "user" not in multi_turn(5, seed=9, user_field=False).body(r)
    assert multi_turn(300, seed=10).digest() != a.digest()


def test_multi_turn_save_load_round_trip(tmp_path):
    wl = multi_turn(400, seed=4)
    loaded = Workload.load(wl.save(tmp_path / "mt.json"))
    assert loaded.digest() == wl.digest()
    assert [loaded.messages(r) for r in loaded.requests] == [wl.messages(r) for r in wl.requests]


def test_multi_turn_rejects_bad_parameters():
    with pytest.raises(TypeError):
        multi_turn(5, 1, num_groups=3)
    with pytest.raises(ValueError, match="turns_min"):
        multi_turn(5, 1, turns_min=5, turns_max=2)


def test_version_1_files_still_load():
    d = sharegpt_like(5, 1).to_dict()
    d["version"] = 1
    del d["sessions"]
    wl = Workload.from_dict(orjson.loads(orjson.dumps(d)))
    assert wl.sessions == [] and len(wl.requests) == 5


# ================================================================================ variants
def test_zipf_groups_are_skewed_and_uniform_is_unchanged():
    plain = shared_prefix(3000, seed=5, num_groups=64)
    assert shared_prefix(3000, seed=5, num_groups=64, zipf=0.0).requests == plain.requests
    counts = Counter(r.group for r in shared_prefix(6000, seed=5, num_groups=64, zipf=1.0).requests)
    top = counts.most_common()
    # Zipf(1): group 0 about twice as popular as group 1, ~64x group 63
    assert top[0][0] == 0
    assert 1.5 < counts[0] / counts[1] < 2.7
    assert counts[0] > 10 * max(counts[63], 1)
    u = Counter(r.group for r in plain.requests)
    assert max(u.values()) < 3 * min(u.values())  # uniform: no group dominates


def test_long_fraction_mixes_in_long_prompts_without_changing_the_rest():
    plain = sharegpt_like(4000, seed=6)
    mixed = sharegpt_like(4000, seed=6, long_fraction=0.05, long_min=3000, long_max=6000)
    longs = [r for r in mixed.requests if r.prompt_words >= 3000]
    assert 0.03 < len(longs) / 4000 < 0.07
    assert all(r.prompt_words <= 6000 for r in longs)
    assert max(r.prompt_words for r in plain.requests) <= 2048
    # the other requests keep their lengths (the long draws come from their own stream)
    same = sum(
        1
        for a, b in zip(plain.requests, mixed.requests, strict=True)
        if a.prompt_words == b.prompt_words
    )
    assert same >= 4000 - len(longs)
    assert [r.max_tokens for r in plain.requests] == [r.max_tokens for r in mixed.requests]


def test_generate_knows_every_kind():
    for kind in ("sharegpt", "shared-prefix", "multi-turn"):
        assert generate(kind, 20, 1).kind == kind
