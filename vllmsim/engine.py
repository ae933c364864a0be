"""Stepped continuous-batching engine modelled on vLLM v1's scheduler.

One engine step = one scheduling decision + one simulated forward pass. Per step:
1. RUNNING requests first, in order: each gets ``num_tokens - num_computed`` new tokens
   (1 for decoding, a chunk for prefilling), limited by the token budget
   (--max-num-batched-tokens, i.e. chunked prefill). If KV blocks run out, the *last* running
   request is preempted (blocks freed, recomputed later: vLLM's recompute preemption).
2. If nothing was preempted, WAITING requests in FCFS order while there is budget and fewer
   than --max-num-seqs running. A prefix-cache lookup gives the already computed blocks
   (never the whole prompt: the last token is always recomputed, as in vLLM). A request that
   does not fit in the KV cache blocks the queue (FCFS head-of-line), a LoRA request whose
   adapter cannot get a slot is skipped ("deferred").
3. The step takes base + prefill_tokens * t_prefill + decode_seqs * t_seq + context_tokens *
   t_ctx (+ adapter loads) simulated seconds. When it ends, every request whose computed
   tokens reached its length samples one token.

The engine knows nothing about HTTP or wall time: ``step()`` advances its own virtual clock
(used by the unit tests with a fake clock); ``run()`` paces the same steps against the wall
clock for the server.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import xxhash

from . import tokenizer
from .config import SimConfig, check
from .kvcache import BlockPool
from .stats import EngineStats

log = logging.getLogger("vllmsim")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, at the head of the queue
    FINISHED = "finished"
    ABORTED = "aborted"


class Request:
    """One sequence (n=1). Tokens = prompt ids followed by generated ids."""

    __slots__ = (
        "rid",
        "lora",
        "tokens",
        "num_prompt",
        "max_tokens",
        "target_len",
        "natural_stop",
        "num_computed",
        "block_ids",
        "block_hashes",
        "num_registered",
        "status",
        "arrival",
        "scheduled_ts",
        "first_token_ts",
        "last_token_ts",
        "finished_ts",
        "num_preemptions",
        "num_cached_prompt",
        "finish_reason",
        "filler_offset",
        "_waiter",
        "deferred",
        "sink",
    )

    def __init__(
        self,
        rid: str,
        prompt_ids: Sequence[int],
        max_tokens: int,
        target_len: int,
        natural_stop: bool,
        lora: str | None = None,
        filler_offset: int = 0,
    ) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.rid = rid
        self.lora = lora
        self.tokens: list[int] = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.max_tokens = max_tokens
        self.target_len = target_len  # number of tokens this request will generate
        self.natural_stop = natural_stop  # True: ends by "EOS" (stop), else by max_tokens
        self.num_computed = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self.num_registered = 0  # leading full blocks already registered in the prefix cache
        self.status = Status.WAITING
        self.arrival = 0.0
        self.scheduled_ts: float | None = None
        self.first_token_ts: float | None = None
        self.last_token_ts = 0.0
        self.finished_ts: float | None = None
        self.num_preemptions = 0
        self.num_cached_prompt = 0
        self.finish_reason: str | None = None
        self.filler_offset = filler_offset
        self._waiter: asyncio.Future[None] | None = None
        self.deferred = False
        # Optional synchronous consumer of non-final tokens (the SSE writer): saves waking a
        # handler task per token. Final token, finish and abort always go through notify().
        self.sink: Callable[[Request], None] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def done(self) -> bool:
        return self.status is Status.FINISHED or self.status is Status.ABORTED

    # ---- notification of the HTTP handler (single event loop, so no locking) -------------
    def notify(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait_notified(self) -> None:
        """Wait for the next notify() (token, finish, abort, or a sink asking for attention)."""
        if self.done:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def wait_for_update(self, seen_output: int) -> None:
        """Return once more than ``seen_output`` tokens exist or the request ended."""
        while self.num_output <= seen_output and not self.done:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._waiter = None


@dataclass
class StepPlan:
    start: float
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_seqs: int = 0
    decode_ctx_tokens: int = 0
    lora_loads: int = 0
    preempted: list[Request] = field(default_factory=list)
    duration: float = 0.0

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs


class Engine:
    def __init__(self, cfg: SimConfig, clock: Callable[[], float] | None = None) -> None:
        check(cfg)
        self.cfg = cfg
        self.clock = clock or _scaled_monotonic(cfg.time_scale)
        self.pool = BlockPool(cfg.num_gpu_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.stats = EngineStats()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.now = self.clock()  # virtual time of the end of the last step
        self.loaded_loras: OrderedDict[str, None] = OrderedDict()  # LRU of adapter slots
        self.lora_seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._wake = asyncio.Event()
        self._rng_seed = cfg.seed
        self._bs = cfg.block_size
        self._root_cache: dict[str | None, int] = {}
        # pacing diagnostics (wall seconds), see run()
        self.lag_samples: deque[float] = deque(maxlen=20_000)
        self.max_lag = 0.0
        self.resyncs = 0
        self.busy_wall = 0.0
        # KV events (vllmsim/kv_events.py): the pool records, each step hands them to the sink.
        self.kv_event_sink: Callable[[list[tuple[object, ...]]], None] | None = None

    def enable_kv_events(self, sink: Callable[[list[tuple[object, ...]]], None]) -> None:
        self.kv_event_sink = sink
        self.pool.events = []

    def flush_kv_events(self) -> None:
        """Hand this step's stores/evictions/resets to the sink as one batch (vLLM: per step)."""
        events = self.pool.events
        if events and self.kv_event_sink is not None:
            self.pool.events = []
            try:
                self.kv_event_sink(events)
            except Exception:  # noqa: BLE001 - a broken publisher must not stop the engine
                log.exception("publishing KV events failed")

    # ---- request lifecycle -------------------------------------------------------------------
    def make_request(
        self,
        rid: str,
        prompt_ids: Sequence[int],
        max_tokens: int,
        ignore_eos: bool,
        lora: str | None = None,
    ) -> Request:
        """Build a request whose natural length is a deterministic function of prompt + seed."""
        digest = xxhash.xxh3_64_intdigest(
            _ids_bytes(prompt_ids), seed=self._rng_seed & 0xFFFFFFFFFFFFFFFF
        )
        if ignore_eos:
            target, natural = max_tokens, False
        else:
            u = random.Random(digest).random()
            natural_len = 1 + int(-self.cfg.mean_output_len * math.log(1.0 - u))
            if natural_len <= max_tokens:
                target, natural = natural_len, True
            else:
                target, natural = max_tokens, False
        return Request(
            rid,
            prompt_ids,
            max_tokens,
            target,
            natural,
            lora,
            filler_offset=digest % len(tokenizer.FILLER_IDS),
        )

    def add_request(self, req: Request) -> None:
        req.arrival = self.clock()
        req.status = Status.WAITING
        self._extend_hashes(req)
        self.waiting.append(req)
        self._wake.set()

    def abort(self, req: Request) -> None:
        """Client went away: drop the request and its blocks (not counted as success)."""
        if req.done:
            return
        if req.status is Status.RUNNING:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self._free(req)
        req.status = Status.ABORTED
        req.finish_reason = "abort"
        req.notify()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- hashing -----------------------------------------------------------------------------
    def _root(self, lora: str | None) -> int:
        root = self._root_cache.get(lora)
        if root is None:
            # LoRA name is part of the hash (vLLM's extra keys): adapters never share KV.
            root = self._root_cache[lora] = tokenizer.block_root(lora or "")
        return root

    def _extend_hashes(self, req: Request) -> None:
        bs, hashes, tokens = self._bs, req.block_hashes, req.tokens
        n_full = len(tokens) // bs
        parent = hashes[-1] if hashes else self._root(req.lora)
        for i in range(len(hashes), n_full):
            parent = tokenizer.hash_block(parent, tokens[i * bs : (i + 1) * bs])
            hashes.append(parent)

    # ---- scheduling --------------------------------------------------------------------------
    def schedule(self, start: float) -> StepPlan:
        cfg, pool, bs = self.cfg, self.pool, self._bs
        plan = StepPlan(start=start)
        budget = cfg.max_num_batched_tokens
        running = self.running

        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            num_new = len(req.tokens) - req.num_computed
            if num_new > budget:
                num_new = budget
            # fast path (most decode steps): the new tokens fit in already allocated blocks
            if req.num_computed + num_new > len(req.block_ids) * bs:
                while not self._allocate(req, num_new, ()):
                    victim = running.pop()
                    self._preempt(victim)
                    plan.preempted.append(victim)
                    if victim is req:
                        break
                if req.status is not Status.RUNNING:
                    break  # req preempted itself; everything after it is gone too
            self._account(plan, req, num_new)
            budget -= num_new
            i += 1

        if not plan.preempted:
            skipped: list[Request] = []
            waiting = self.waiting
            # adapters pinned by running requests (scheduled this step or not)
            active_loras = {r.lora for r in running if r.lora} if cfg.lora_names else set()
            while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
                req = waiting[0]
                if req.lora and not self._lora_admissible(req.lora, active_loras):
                    req.deferred = True
                    skipped.append(waiting.popleft())
                    continue
                hits: list[int] = []
                if req.num_computed == 0 and pool.enable_caching:
                    # at least one token must be computed to produce logits
                    hits = pool.lookup(req.block_hashes, (req.num_tokens - 1) // bs)
                num_new = min(req.num_tokens - len(hits) * bs, budget)
                if not self._allocate(req, num_new, hits):
                    break  # FCFS: the head does not fit, nobody behind it may jump the queue
                waiting.popleft()
                req.deferred = False
                if pool.enable_caching:
                    self.stats.prefix_queries += req.num_tokens
                    self.stats.prefix_hits += len(hits) * bs
                if req.scheduled_ts is None:
                    req.scheduled_ts = max(start, req.arrival)
                    req.num_cached_prompt = len(hits) * bs
                req.status = Status.RUNNING
                running.append(req)
                if req.lora:
                    self._lora_load(req.lora, active_loras, plan)
                    active_loras.add(req.lora)
                self._account(plan, req, num_new)
                budget -= num_new
            if skipped:
                waiting.extendleft(reversed(skipped))

        plan.duration = (
            cfg.step_time_base
            + plan.prefill_tokens * cfg.prefill_token_time
            + plan.decode_seqs * cfg.decode_seq_time
            + plan.decode_ctx_tokens * cfg.decode_ctx_token_time
            + plan.lora_loads * cfg.lora_load_time
        )
        return plan

    @staticmethod
    def _account(plan: StepPlan, req: Request, num_new: int) -> None:
        plan.scheduled.append((req, num_new))
        ntok = len(req.tokens)
        if num_new == 1 and req.num_computed == ntok - 1 and ntok > req.num_prompt:
            plan.decode_seqs += 1
            plan.decode_ctx_tokens += ntok
        else:
            plan.prefill_tokens += num_new

    def _allocate(self, req: Request, num_new: int, hits: Sequence[int]) -> bool:
        """Give ``req`` KV slots for ``hits`` + ``num_new`` more tokens, or change nothing."""
        pool, bs = self.pool, self._bs
        have = len(req.block_ids) + len(hits)
        need = -(-(req.num_computed + len(hits) * bs + num_new) // bs) - have
        taken_from_free = pool.cost_of_touch(hits) if hits else 0
        if max(need, 0) + taken_from_free > pool.num_free:
            return False
        if hits:
            pool.touch(hits)
            req.block_ids.extend(hits)
            req.num_computed += len(hits) * bs
            req.num_registered = len(req.block_ids)  # hit blocks are already registered
        if need > 0:
            new = pool.allocate(need)
            assert new is not None
            req.block_ids.extend(new)
        return True

    def _lora_admissible(self, lora: str, active: set[str]) -> bool:
        """vLLM's rule: at most --max-loras distinct adapters in the running batch."""
        return lora in active or len(active) < self.cfg.max_loras

    def _lora_load(self, lora: str, active: set[str], plan: StepPlan) -> None:
        """Make ``lora`` resident; a miss evicts the least recently used idle adapter and adds
        --lora-load-time to this step. Admissibility guarantees an idle slot exists."""
        loaded = self.loaded_loras
        if lora in loaded:
            loaded.move_to_end(lora)
            return
        if len(loaded) >= self.cfg.max_loras:
            victim = next(a for a in loaded if a not in active)
            del loaded[victim]
        loaded[lora] = None
        plan.lora_loads += 1
        self.stats.lora_loads += 1

    def _preempt(self, req: Request) -> None:
        self._free(req)
        self._extend_hashes(req)  # so the recompute can hit its own freed (cached) blocks
        req.num_computed = 0
        req.num_registered = 0
        req.status = Status.PREEMPTED
        req.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(req)

    def _free(self, req: Request) -> None:
        if req.block_ids:
            self.pool.release(req.block_ids)
            req.block_ids = []

    # ---- step completion ---------------------------------------------------------------------
    def complete(self, plan: StepPlan, end: float) -> list[Request]:
        """Apply a finished forward pass at virtual time ``end``; returns finished requests.

        This is the per-token hot path (256 sequences per step): plain attribute access,
        and inter-token gaps grouped so the histogram is touched once per distinct gap.
        """
        stats, pool, bs = self.stats, self.pool, self._bs
        filler = tokenizer.FILLER_IDS
        n_filler = len(filler)
        running_status = Status.RUNNING
        finished: list[Request] = []
        gaps: dict[float, int] = {}
        generated = 0
        caching = pool.enable_caching
        for req, num_new in plan.scheduled:
            if req.status is not running_status:
                continue  # aborted while the step ran
            computed = req.num_computed + num_new
            req.num_computed = computed
            if caching and computed // bs > req.num_registered:
                self._register_blocks(req)
            tokens = req.tokens
            if computed < len(tokens):
                continue  # partial prefill chunk: no token yet
            out_idx = len(tokens) - req.num_prompt
            tokens.append(filler[(req.filler_offset + out_idx) % n_filler])
            generated += 1
            if req.first_token_ts is None:
                self._first_token(req, end)
            else:
                gap = end - req.last_token_ts
                gaps[gap] = gaps.get(gap, 0) + 1
            req.last_token_ts = end
            if out_idx + 1 >= req.target_len:
                self._finish(req, end)
                finished.append(req)
            elif req.sink is not None:
                try:
                    req.sink(req)
                except Exception:  # one broken stream must not stop the engine
                    req.sink = None
                    req.notify()
            else:
                req.notify()
        itl = stats.itl
        for gap, n in gaps.items():
            itl.observe_n(gap, n)
        stats.generation_tokens += generated
        stats.iteration_tokens.observe(plan.num_tokens)
        stats.steps += 1
        if finished:
            self.running = [r for r in self.running if r.status is running_status]
        if self.cfg.lora_names:
            self._record_lora_info()
        return finished

    def _register_blocks(self, req: Request) -> None:
        """Newly completed full blocks become prefix-cache entries (prompt and output alike)."""
        n_full = req.num_computed // self._bs
        if n_full > len(req.block_hashes):
            self._extend_hashes(req)
        pool = self.pool
        if pool.events is None:
            for k in range(req.num_registered, n_full):
                pool.register(req.block_ids[k], req.block_hashes[k])
        else:
            # One BlockStored per run of newly cached blocks (a block whose content another
            # block already holds is not new: vLLM's event would name it again, harmlessly).
            run = -1
            for k in range(req.num_registered, n_full):
                if pool.register(req.block_ids[k], req.block_hashes[k]):
                    if run < 0:
                        run = k
                elif run >= 0:
                    self._stored_event(req, run, k)
                    run = -1
            if run >= 0:
                self._stored_event(req, run, n_full)
        req.num_registered = n_full

    def _stored_event(self, req: Request, start: int, end: int) -> None:
        bs = self._bs
        lora_id = (
            self.cfg.lora_names.index(req.lora) + 1 if req.lora in self.cfg.lora_names else None
        )
        assert self.pool.events is not None
        self.pool.events.append(
            (
                "stored",
                req.block_hashes[start:end],
                req.block_hashes[start - 1] if start else None,
                req.tokens[start * bs : end * bs],
                bs,
                req.lora,
                lora_id,
            )
        )

    def _first_token(self, req: Request, end: float) -> None:
        stats = self.stats
        req.first_token_ts = end
        stats.ttft.observe(end - req.arrival)
        stats.prompt_tokens += req.num_prompt
        stats.prompt_tokens_cached += req.num_cached_prompt
        stats.prompt_tokens_computed += req.num_prompt - req.num_cached_prompt

    def _finish(self, req: Request, end: float) -> None:
        reason = "stop" if req.natural_stop else "length"
        req.finish_reason = reason
        req.status = Status.FINISHED
        req.finished_ts = end
        self._free(req)
        s = self.stats
        s.success[reason] += 1
        h = s.hist
        n_out = req.num_output
        first = req.first_token_ts if req.first_token_ts is not None else end
        sched = req.scheduled_ts if req.scheduled_ts is not None else req.arrival
        decode_time = end - first
        h["vllm:e2e_request_latency_seconds"].observe(end - req.arrival)
        h["vllm:request_queue_time_seconds"].observe(sched - req.arrival)
        h["vllm:request_inference_time_seconds"].observe(end - sched)
        h["vllm:request_prefill_time_seconds"].observe(first - sched)
        h["vllm:request_decode_time_seconds"].observe(decode_time)
        h["vllm:request_time_per_output_token_seconds"].observe(
            decode_time / (n_out - 1) if n_out > 1 else 0.0
        )
        h["vllm:request_prompt_tokens"].observe(req.num_prompt)
        h["vllm:request_generation_tokens"].observe(n_out)
        h["vllm:request_max_num_generation_tokens"].observe(req.max_tokens)
        h["vllm:request_params_max_tokens"].observe(req.max_tokens)
        h["vllm:request_params_n"].observe(1)
        h["vllm:request_num_preemptions"].observe(req.num_preemptions)
        h["vllm:request_prefill_kv_computed_tokens"].observe(req.num_prompt - req.num_cached_prompt)
        req.notify()

    def _record_lora_info(self) -> None:
        running = ",".join(sorted({r.lora for r in self.running if r.lora}))
        waiting = ",".join(sorted({r.lora for r in self.waiting if r.lora}))
        key = (running, waiting)
        seen = self.lora_seen
        seen[key] = time.time()  # vLLM: gauge.labels(...).set_to_current_time()
        seen.move_to_end(key)
        if len(seen) > 64:  # real vLLM keeps every combination forever; bound it
            seen.popitem(last=False)

    # ---- driving -----------------------------------------------------------------------------
    def step(self) -> StepPlan:
        """One step on the virtual clock (no sleeping): for tests and offline use."""
        start = max(self.now, self.clock())
        plan = self.schedule(start)
        self.now = start + plan.duration
        self.complete(plan, self.now)
        self.flush_kv_events()
        return plan

    def gauges(self) -> tuple[int, int, int, float]:
        """running, waiting (capacity), waiting (deferred), kv usage."""
        deferred = sum(1 for r in self.waiting if r.deferred) if self.cfg.lora_names else 0
        return len(self.running), len(self.waiting) - deferred, deferred, self.pool.usage()

    async def run(self) -> None:
        """Pace steps against the wall clock: one timer per step.

        Steps are planned back to back on the virtual clock (start = previous end), so sleep
        overshoot is caught up instead of silently slowing the engine down. The difference
        between the wall clock and a step's planned end is the *lag* (reported on /sim/stats);
        if it exceeds 100 ms of wall time the plan is resynchronised to the wall clock.
        """
        scale = self.cfg.time_scale
        clock = self.clock
        resync_after = 0.1 * scale
        while True:
            if not self.has_work:
                self._wake.clear()
                await self._wake.wait()
                self.now = max(self.now, clock())
                continue
            t0 = time.perf_counter()
            now = clock()
            start = self.now
            if now - start > resync_after:
                self.resyncs += 1
                start = now
            plan = self.schedule(start)
            end = start + plan.duration
            self.busy_wall += time.perf_counter() - t0
            delay = (end - clock()) / scale
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # always let the HTTP side breathe
            t1 = time.perf_counter()
            lag = (clock() - end) / scale
            self.lag_samples.append(lag)
            if lag > self.max_lag:
                self.max_lag = lag
            self.now = end
            self.complete(plan, end)
            self.flush_kv_events()
            self.busy_wall += time.perf_counter() - t1


def _scaled_monotonic(scale: float) -> Callable[[], float]:
    base = time.monotonic()

    def clock() -> float:
        return (time.monotonic() - base) * scale

    return clock


def _ids_bytes(ids: Sequence[int]) -> bytes:
    return array("I", ids).tobytes()
