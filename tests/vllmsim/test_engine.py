"""Engine unit tests on a fake clock: scheduling, batching, KV cache, prefix caching."""

from __future__ import annotations

import pytest

from vllmsim import tokenizer
from vllmsim.engine import Engine, Request, Status

from .conftest import make_engine, run_until


def ids(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def add(
    engine: Engine, rid: str, prompt: list[int], max_tokens: int = 4, lora: str | None = None
) -> Request:
    req = engine.make_request(rid, prompt, max_tokens, ignore_eos=True, lora=lora)
    engine.add_request(req)
    return req


def test_fcfs_order_and_max_num_seqs() -> None:
    eng = make_engine(max_num_seqs=2)
    reqs = [add(eng, f"r{i}", ids(8, 1000 * i), max_tokens=3 + i) for i in range(4)]
    eng.step()
    assert [r.rid for r in eng.running] == ["r0", "r1"]
    assert [r.rid for r in eng.waiting] == ["r2", "r3"]
    # r0 (3 tokens) finishes first; r2 must start before r3 although both are waiting
    run_until(eng, lambda: reqs[0].done)
    eng.step()
    assert reqs[2].status is Status.RUNNING and reqs[3].status is Status.WAITING
    run_until(eng, lambda: all(r.done for r in reqs))
    assert [r.num_output for r in reqs] == [3, 4, 5, 6]
    assert eng.pool.num_used == 0


def test_every_step_respects_token_budget_and_seq_limit() -> None:
    eng = make_engine(max_num_seqs=3, max_num_batched_tokens=50)
    reqs = [add(eng, f"r{i}", ids(40, 100 * i), max_tokens=5) for i in range(5)]
    first = eng.step()
    # 40 tokens for r0, a 10-token chunk of r1, nothing for r2 (budget exhausted)
    assert [(r.rid, n) for r, n in first.scheduled] == [("r0", 40), ("r1", 10)]
    while not all(r.done for r in reqs):
        plan = eng.step()
        assert sum(n for _, n in plan.scheduled) <= 50
        assert len(plan.scheduled) <= 3 and len(eng.running) <= 3


def test_chunked_prefill_and_ttft() -> None:
    eng = make_engine(max_num_batched_tokens=32)
    req = add(eng, "long", ids(100), max_tokens=3)
    chunks = [eng.step().scheduled[0][1] for _ in range(4)]
    assert chunks == [32, 32, 32, 4]
    assert req.num_output == 1  # the first token is sampled by the step finishing the prompt
    # 4 steps of base 10 ms + 100 prompt tokens x 1 ms
    assert req.first_token_ts == pytest.approx(4 * 0.01 + 100 * 0.001)
    assert eng.stats.ttft.count == 1


def test_decode_and_prefill_share_a_step() -> None:
    eng = make_engine(max_num_batched_tokens=20)
    a = add(eng, "a", ids(10), max_tokens=10)
    eng.step()
    assert a.num_output == 1
    add(eng, "b", ids(30, 500), max_tokens=2)
    plan = eng.step()
    assert [(r.rid, n) for r, n in plan.scheduled] == [("a", 1), ("b", 19)]
    assert plan.decode_seqs == 1 and plan.prefill_tokens == 19
    assert plan.duration == pytest.approx(0.01 + 19 * 0.001 + 1 * 0.0001)


def test_step_time_includes_context_cost() -> None:
    eng = make_engine(decode_ctx_token_time=0.00001)
    add(eng, "a", ids(50), max_tokens=5)
    eng.step()  # prefill
    plan = eng.step()  # decode with 51 tokens of context
    assert plan.duration == pytest.approx(0.01 + 0.0001 + 51 * 0.00001)


def test_prefix_cache_hit_skips_prefill() -> None:
    eng = make_engine()
    prompt = ids(64)  # exactly 4 blocks of 16
    a = add(eng, "a", prompt, max_tokens=1)
    cold = eng.step()
    assert a.done and cold.prefill_tokens == 64
    b = add(eng, "b", prompt, max_tokens=1)
    warm = eng.step()
    # the last block is recomputed: vLLM never serves the final prompt token from cache
    assert warm.prefill_tokens == 16
    assert warm.duration == pytest.approx(cold.duration - 48 * 0.001)
    assert b.num_cached_prompt == 48
    assert eng.stats.prefix_queries == 128 and eng.stats.prefix_hits == 48
    assert eng.stats.prompt_tokens == 128 and eng.stats.prompt_tokens_cached == 48


def test_partial_prefix_and_lora_isolation() -> None:
    eng = make_engine(lora_modules=("ad1",), max_loras=1, lora_load_time=0.0)
    add(eng, "a", ids(48), max_tokens=1)
    eng.step()
    b = add(eng, "b", ids(32) + ids(16, 9000), max_tokens=1)  # shares the first two blocks
    eng.step()
    assert b.num_cached_prompt == 32
    c = add(eng, "c", ids(48), max_tokens=1, lora="ad1")  # same tokens, other adapter
    eng.step()
    assert c.num_cached_prompt == 0


def test_generated_blocks_are_cached_for_the_next_turn() -> None:
    eng = make_engine()
    prompt = ids(32)
    a = add(eng, "a", prompt, max_tokens=20)
    run_until(eng, lambda: a.done)
    # next turn = prompt + answer + new user text; the answer's full block is already cached
    b = add(eng, "b", a.tokens + ids(20, 7000), max_tokens=1)
    eng.step()
    assert b.num_cached_prompt == 48


def test_lru_eviction_of_free_blocks() -> None:
    # Fully deterministic (fake clock, fixed free-queue order): exactly one outcome is LRU.
    eng = make_engine(num_gpu_blocks=9, max_model_len=64)  # 8 usable blocks
    A, B, C, D = ids(32, 0), ids(32, 100), ids(64, 200), ids(32, 300)
    for name, prompt in (("A", A), ("B", B), ("C", C)):
        add(eng, name, prompt, max_tokens=1)
        eng.step()
    assert eng.pool.evictions == 0 and eng.pool.num_used == 0
    assert len(eng.pool.cached) == 8  # everything is cached and free
    add(eng, "D", D, max_tokens=1)
    eng.step()
    assert eng.pool.evictions == 2  # A was freed first, so A's two blocks go
    a2 = add(eng, "A2", A, max_tokens=1)
    eng.step()
    assert a2.num_cached_prompt == 0  # A is gone ...
    assert eng.pool.evictions == 4  # ... and re-computing it evicts the next LRU: B (both blocks)
    b2 = add(eng, "B2", B, max_tokens=1)
    plan = eng.step()
    assert b2.num_cached_prompt == 0, "B was the least recently used: A2 must have evicted it"
    assert plan.prefill_tokens == 32
    assert eng.pool.evictions == 6  # B2's two blocks come from C's tail (C was freed before D)
    # D was freed after B and C: it survived all three allocations. A 32-token prompt can hit at
    # most its first block (vLLM always recomputes the last prompt token).
    d2 = add(eng, "D2", D, max_tokens=1)
    eng.step()
    assert d2.num_cached_prompt == 16, "D (more recently used than B) should still be cached"


def test_lru_keeps_recently_used_prefix() -> None:
    eng = make_engine(num_gpu_blocks=9, max_model_len=128)  # 8 usable blocks
    A, B = ids(33, 0), ids(33, 100)  # 2 full blocks + 1 partial each
    add(eng, "A", A, max_tokens=1)
    eng.step()
    add(eng, "B", B, max_tokens=1)
    eng.step()
    a2 = add(eng, "A2", A, max_tokens=1)  # touches A again: now B is least recently used
    eng.step()
    assert a2.num_cached_prompt == 32
    add(eng, "big", ids(80, 500), max_tokens=1)  # 5 of the 8 blocks -> evicts the LRU ones
    eng.step()
    assert eng.pool.evictions == 2
    a3 = add(eng, "A3", A, max_tokens=1)
    eng.step()
    b3 = add(eng, "B3", B, max_tokens=1)
    eng.step()
    assert a3.num_cached_prompt == 32, "recently used prefix was evicted"
    assert b3.num_cached_prompt == 0, "least recently used prefix should have been evicted"


def test_kv_exhaustion_preempts_the_newest_running_request() -> None:
    eng = make_engine(num_gpu_blocks=5, max_model_len=64)  # 4 usable blocks = 64 tokens
    a = add(eng, "a", ids(16, 0), max_tokens=40)
    b = add(eng, "b", ids(16, 100), max_tokens=40)
    saw_preempted = False
    for _ in range(500):
        if a.done and b.done:
            break
        eng.step()
        assert eng.pool.usage() <= 1.0
        if b.status is Status.PREEMPTED:
            saw_preempted = True
            assert eng.waiting[0] is b  # back at the head of the queue
            assert a.status in (Status.RUNNING, Status.FINISHED)
    assert a.done and b.done and saw_preempted
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert a.finished_ts < b.finished_ts
    assert a.num_output == 40 and b.num_output == 40
    assert eng.stats.preemptions == b.num_preemptions
    assert eng.stats.hist["vllm:request_num_preemptions"].sum == b.num_preemptions
    assert eng.pool.num_used == 0


def test_head_of_line_blocking_when_kv_is_short() -> None:
    eng = make_engine(num_gpu_blocks=9, max_model_len=128)
    a = add(eng, "a", ids(64), max_tokens=30)
    eng.step()
    big = add(eng, "big", ids(100, 1000), max_tokens=1)  # 7 blocks: does not fit next to a
    small = add(eng, "small", ids(8, 5000), max_tokens=1)
    for _ in range(5):
        eng.step()
        assert small.status is Status.WAITING, "FCFS: small must not overtake big"
    run_until(eng, lambda: big.done and small.done)
    assert a.done and a.finished_ts <= big.finished_ts <= small.finished_ts


def test_lora_adapters_are_limited_per_batch_and_cost_a_load() -> None:
    eng = make_engine(lora_modules=("x", "y"), max_loras=1, lora_load_time=0.5)
    rx = add(eng, "rx", ids(8), max_tokens=5, lora="x")
    ry = add(eng, "ry", ids(8, 50), max_tokens=5, lora="y")
    first = eng.step()
    assert first.lora_loads == 1 and first.duration >= 0.5
    assert rx.status is Status.RUNNING and ry.deferred and ry.status is Status.WAITING
    assert eng.gauges()[2] == 1  # one request waiting for a LoRA slot ("deferred")
    run_until(eng, lambda: rx.done)
    plan = eng.step()
    assert ry.status is Status.RUNNING and plan.lora_loads == 1
    assert list(eng.loaded_loras) == ["y"]
    run_until(eng, lambda: ry.done)
    r2 = add(eng, "ry2", ids(8, 80), max_tokens=1, lora="y")
    plan = eng.step()
    assert r2.done and plan.lora_loads == 0  # already resident: no swap


def test_abort_frees_blocks() -> None:
    eng = make_engine()
    a = add(eng, "a", ids(40), max_tokens=50)
    eng.step()
    assert eng.pool.num_used == 3
    eng.abort(a)
    assert eng.pool.num_used == 0 and not eng.running and a.status is Status.ABORTED
    assert sum(eng.stats.success.values()) == 0  # vLLM does not count client aborts


def test_natural_stop_is_deterministic_and_ignore_eos_is_exact() -> None:
    e1, e2 = make_engine(seed=7), make_engine(seed=7)
    prompt = tokenizer.encode_completion_prompt("The same prompt on two instances")
    r1 = e1.make_request("1", prompt, 1000, ignore_eos=False)
    r2 = e2.make_request("2", prompt, 1000, ignore_eos=False)
    assert r1.target_len == r2.target_len and r1.natural_stop
    lengths = {
        make_engine(seed=s).make_request("x", prompt, 1000, False).target_len for s in range(20)
    }
    assert len(lengths) > 5  # the seed matters
    capped = e1.make_request("3", prompt, 1, ignore_eos=False)
    assert capped.target_len == 1
    exact = e1.make_request("4", prompt, 77, ignore_eos=True)
    assert exact.target_len == 77 and not exact.natural_stop


def test_finish_metrics_are_consistent() -> None:
    eng = make_engine(max_num_seqs=1)
    a = add(eng, "a", ids(20), max_tokens=4)
    b = add(eng, "b", ids(20, 100), max_tokens=4)
    run_until(eng, lambda: a.done and b.done)
    h = eng.stats.hist
    assert eng.stats.success["length"] == 2
    assert h["vllm:request_queue_time_seconds"].sum == pytest.approx(b.scheduled_ts - b.arrival)
    assert b.scheduled_ts >= a.finished_ts  # b queued behind a (max_num_seqs=1)
    assert h["vllm:e2e_request_latency_seconds"].sum == pytest.approx(
        (a.finished_ts - a.arrival) + (b.finished_ts - b.arrival)
    )
    assert eng.stats.generation_tokens == 8
    assert eng.stats.itl.count == 6  # 3 inter-token gaps per request
    assert h["vllm:request_prompt_tokens"].sum == 40
