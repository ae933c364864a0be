"""Counters and histograms the engine updates; rendered by ``exposition.py``.

Histogram buckets are copied from the real vLLM 0.32 /metrics capture in
tests/fixtures (tests/vllmsim/test_metrics_fixture.py checks they still match).
"""

from __future__ import annotations

from bisect import bisect_left

_TOKENS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
_REQUEST_TIME = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
_TOKEN_LATENCY = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)

HISTOGRAM_BUCKETS: dict[str, tuple[float, ...]] = {
    "vllm:request_prompt_tokens": _TOKENS,
    "vllm:request_generation_tokens": _TOKENS,
    "vllm:iteration_tokens_total": (
        1.0,
        8.0,
        16.0,
        32.0,
        64.0,
        128.0,
        256.0,
        512.0,
        1024.0,
        2048.0,
        4096.0,
        8192.0,
        16384.0,
    ),
    "vllm:request_max_num_generation_tokens": _TOKENS,
    "vllm:request_params_n": (1.0, 2.0, 5.0, 10.0, 20.0),
    "vllm:request_params_max_tokens": _TOKENS,
    "vllm:time_to_first_token_seconds": (
        0.001,
        0.005,
        0.01,
        0.02,
        0.04,
        0.06,
        0.08,
        0.1,
        0.25,
        0.5,
        0.75,
        1.0,
        2.5,
        5.0,
        7.5,
        10.0,
        20.0,
        40.0,
        80.0,
        160.0,
        640.0,
        2560.0,
    ),
    "vllm:inter_token_latency_seconds": _TOKEN_LATENCY,
    "vllm:request_time_per_output_token_seconds": _TOKEN_LATENCY,
    "vllm:e2e_request_latency_seconds": _REQUEST_TIME,
    "vllm:request_queue_time_seconds": _REQUEST_TIME,
    "vllm:request_inference_time_seconds": _REQUEST_TIME,
    "vllm:request_prefill_time_seconds": _REQUEST_TIME,
    "vllm:request_decode_time_seconds": _REQUEST_TIME,
    "vllm:request_num_preemptions": (1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0),
    "vllm:request_prefill_kv_computed_tokens": _TOKENS,
}

FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot = +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus "le").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def observe_n(self, value: float, n: int) -> None:
        """``n`` observations of the same value (one engine step's inter-token gaps)."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def cumulative(self) -> list[int]:
        out, acc = [], 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return out


class EngineStats:
    """Everything monotonic the engine reports; gauges are read live from the engine."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.prompt_tokens_computed = 0  # by_source local_compute
        self.prompt_tokens_cached = 0  # by_source local_cache_hit (= device tier)
        self.generation_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.success: dict[str, int] = dict.fromkeys(FINISH_REASONS, 0)
        self.hist: dict[str, Histogram] = {k: Histogram(b) for k, b in HISTOGRAM_BUCKETS.items()}
        # hot-path shortcuts (looked up once per token otherwise)
        self.itl = self.hist["vllm:inter_token_latency_seconds"]
        self.ttft = self.hist["vllm:time_to_first_token_seconds"]
        self.iteration_tokens = self.hist["vllm:iteration_tokens_total"]
        # simulator-only (exposed on /sim/stats, never on /metrics)
        self.steps = 0
        self.lora_loads = 0
