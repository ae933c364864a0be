"""bench/workloads.py: the workload kinds (sharegpt-like, shared-prefix, multi-turn sessions),
their variants (Zipf-popular prefix groups, long-context mixes) and the arrivals."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter

import orjson
import pytest

from bench.workloads import (
    WORDS,
    Workload,
    arrival_offsets,
    generate,
    multi_turn,
    shared_prefix,
    sharegpt_like,
    unit_gaps,
)


# ================================================================================ workloads
@pytest.mark.parametrize("kind", ["sharegpt", "shared-prefix"])
def test_same_seed_same_workload(kind):
    a = generate(kind, 300, seed=7)
    b = generate(kind, 300, seed=7)
    assert a.digest() == b.digest()
    assert a.to_json() == b.to_json()
    assert [a.body(r) for r in a.requests] == [b.body(r) for r in b.requests]


@pytest.mark.parametrize("kind", ["sharegpt", "shared-prefix"])
def test_other_seed_other_workload(kind):
    assert generate(kind, 100, seed=1).digest() != generate(kind, 100, seed=2).digest()


def test_generation_ignores_global_random_state():
    random.seed(1)
    a = sharegpt_like(50, 3)
    random.seed(999)
    assert sharegpt_like(50, 3).digest() == a.digest()


def test_prefix_of_a_larger_workload_is_the_smaller_one():
    """Runs replay a prefix of the file; asking for more requests must not change the first ones."""
    small, big = sharegpt_like(50, 4), sharegpt_like(500, 4)
    assert big.requests[:50] == small.requests
    assert big.unit_gaps[:50] == small.unit_gaps


@pytest.mark.parametrize("kind", ["sharegpt", "shared-prefix"])
def test_save_load_round_trip(tmp_path, kind):
    wl = generate(kind, 120, seed=5, burstiness=0.5)
    loaded = Workload.load(wl.save(tmp_path / "w.json"))
    assert loaded.digest() == wl.digest()
    assert loaded.requests == wl.requests
    assert loaded.unit_gaps == wl.unit_gaps and loaded.burstiness == 0.5


def test_load_rejects_other_format_version(tmp_path):
    d = sharegpt_like(3, 1).to_dict()
    d["version"] = 999
    with pytest.raises(ValueError, match="format"):
        Workload.from_dict(d)


def test_words_are_single_tokens_for_the_simulator():
    from vllmsim.tokenizer import count_tokens

    assert all(1 <= len(w) <= 6 and w.isalpha() and w.islower() for w in WORDS)
    text = " ".join(WORDS)
    assert count_tokens(text) == len(WORDS)


def test_shared_prefix_groups_share_exactly_their_system_prompt():
    wl = shared_prefix(
        400, seed=2, num_groups=8, system_prompt_len=256, question_len=20, output_len=10
    )
    assert len(wl.systems) == 8 and len(set(wl.systems)) == 8
    assert {r.group for r in wl.requests} == set(range(8))  # every group is used
    for r in wl.requests:
        msgs = wl.messages(r)
        assert msgs[0] == {"role": "system", "content": wl.systems[r.group]}
        assert msgs[1]["role"] == "user"
        assert 7 <= r.max_tokens <= 13  # 10 +- 25 %
    assert len({r.user for r in wl.requests}) == len(wl.requests)  # questions are unique
    # the system prompts differ from their first token on (no accidental cross-group prefix)
    firsts = {s.split()[0] for s in wl.systems}
    assert len(firsts) == 8


def test_shared_prefix_system_prompt_length_in_tokens():
    from vllmsim.tokenizer import count_tokens

    wl = shared_prefix(5, seed=1, system_prompt_len=512)
    for s in wl.systems:
        assert abs(count_tokens(s) - 512) <= 3  # "g<k>" may be 2 pieces


def test_sharegpt_like_length_distribution():
    wl = sharegpt_like(4000, seed=11)
    pin = [r.prompt_words for r in wl.requests]
    pout = [r.max_tokens for r in wl.requests]
    assert 90 <= statistics.median(pin) <= 150
    assert statistics.mean(pin) > 1.4 * statistics.median(pin)  # heavy right tail
    assert 90 <= statistics.median(pout) <= 150
    assert min(pin) >= 4 and max(pin) <= 2048 and max(pout) <= 1024
    assert all(r.system is None and r.group is None for r in wl.requests)
    assert len({r.user.split()[0] for r in wl.requests}) == len(wl.requests)  # no shared prefix


def test_sharegpt_output_scale_keeps_the_shape():
    base = sharegpt_like(500, seed=3)
    half = sharegpt_like(500, seed=3, output_scale=0.5)
    for a, b in zip(base.requests, half.requests, strict=True):
        assert b.max_tokens == max(1, round(a.max_tokens * 0.5))
        assert a.user == b.user


def test_unknown_parameters_are_rejected():
    with pytest.raises(TypeError):
        sharegpt_like(5, 1, output_len=3)
    with pytest.raises(TypeError):
        shared_prefix(5, 1, input_median=3)
    with pytest.raises(ValueError):
        generate("nope", 5, 1)


def test_request_body_is_a_streaming_chat_with_fixed_output_length():
    wl = shared_prefix(3, seed=1)
    body = wl.body(wl.requests[0])
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == wl.requests[0].max_tokens
    assert body["messages"][0]["role"] == "system"


# ================================================================================ arrivals
@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_unit_gaps_have_mean_one_and_the_expected_dispersion(burstiness):
    gaps = unit_gaps(random.Random(0), 40_000, burstiness)
    m = statistics.fmean(gaps)
    cv = statistics.pstdev(gaps) / m
    assert m == pytest.approx(1.0, rel=0.03)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)  # Poisson: CV = 1
    assert all(g > 0 for g in gaps)


def test_poisson_counts_per_window_have_variance_equal_to_mean():
    offs = arrival_offsets(unit_gaps(random.Random(1), 50_000, 1.0), rate=10.0)
    counts = [0] * int(offs[-1])
    for t in offs:
        if int(t) < len(counts):
            counts[int(t)] += 1
    mean = statistics.fmean(counts)
    assert mean == pytest.approx(10.0, rel=0.03)
    assert statistics.pvariance(counts) == pytest.approx(mean, rel=0.1)


def test_offsets_scale_inversely_with_rate_and_are_increasing():
    wl = sharegpt_like(200, seed=9)
    o1, o4 = wl.offsets(1.0), wl.offsets(4.0)
    assert all(b > a for a, b in zip(o1, o1[1:], strict=False))
    assert o4 == pytest.approx([x / 4 for x in o1])
    assert wl.offsets(2.0, 10) == pytest.approx([x / 2 for x in o1[:10]])
    with pytest.raises(ValueError):
        wl.offsets(0.0)
    with pytest.raises(ValueError):
        wl.offsets(1.0, 201)


def test_bad_burstiness_is_rejected():
    with pytest.raises(ValueError):
        unit_gaps(random.Random(0), 3, 0.0)


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
