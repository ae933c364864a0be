"""Simulator configuration: one frozen dataclass plus the argparse parser that fills it.

Defaults describe a plausible Llama-3-8B (bf16) on one H100 SXM 80 GB; see docs/vllmsim.md
("Calibration") for where every number comes from.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kv_events import KvEventsSettings

# Llama-3-8B: 2 (K and V) * 32 layers * 8 KV heads * 128 head dim * 2 bytes (bf16).
KV_BYTES_PER_TOKEN = 131_072


@dataclass(frozen=True)
class SimConfig:
    # --- HTTP / identity -------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "tiny-llama"
    instance_name: str | None = None  # x-inference-pod value; defaults to host:port
    # --- engine shape (vLLM flags of the same name) ----------------------------------------
    max_model_len: int = 8192
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    num_gpu_blocks: int = 27_000
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    # --- step cost model (seconds of simulated time) ---------------------------------------
    step_time_base: float = 0.0065
    prefill_token_time: float = 3.5e-5
    decode_seq_time: float = 2.0e-5
    decode_ctx_token_time: float = 5.0e-8
    # --- generation -------------------------------------------------------------------------
    mean_output_len: float = 128.0
    time_scale: float = 1.0
    seed: int = 0
    # --- LoRA --------------------------------------------------------------------------------
    lora_modules: tuple[str, ...] = ()
    max_loras: int = 1
    lora_load_time: float = 0.05
    # --- faults (real wall-clock seconds, not scaled) ----------------------------------------
    startup_delay: float = 0.0
    metrics_delay: float = 0.0
    metrics_fail_rate: float = 0.0
    metrics_latency: float = 0.0
    fail_rate: float = 0.0
    crash_after: float = 0.0
    crash_after_requests: int = 0
    # --- KV events (vllmsim/kv_events.py) ------------------------------------------------------
    kv_events_config: str = ""  # vLLM's --kv-events-config JSON
    kv_events_endpoint: str = ""  # simpler: publish (bind) here
    # --- debugging ----------------------------------------------------------------------------
    debug_echo: bool = False

    @property
    def pod_name(self) -> str:
        return self.instance_name or f"{self.host}:{self.port}"  # refined once bound

    @property
    def lora_names(self) -> tuple[str, ...]:
        # vLLM accepts "name=path"; only the served name matters here.
        return tuple(m.split("=", 1)[0] for m in self.lora_modules)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="vllmsim",
        description="vLLM simulator: OpenAI API + /metrics of a stepped continuous-batching engine",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default=d.host, help="bind address")
    g.add_argument(
        "--port", type=int, default=d.port, help="0 picks a free port (printed on stdout)"
    )
    g.add_argument("--model", default=d.model, help="served model name (label model_name)")
    g.add_argument(
        "--instance-name", default=None, help="x-inference-pod header (default host:port)"
    )

    g = p.add_argument_group("engine")
    g.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=d.max_model_len,
        help="prompt + max_tokens limit; longer requests get HTTP 400",
    )
    g.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=d.max_num_seqs,
        help="max running sequences per step (the rest wait, FCFS)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=d.max_num_batched_tokens,
        help="token budget per step; longer prompts are prefilled in chunks",
    )
    g.add_argument(
        "--block-size",
        type=_positive_int,
        default=d.block_size,
        help="tokens per KV block (prefix-cache granularity)",
    )
    g.add_argument(
        "--num-gpu-blocks",
        type=_positive_int,
        default=d.num_gpu_blocks,
        help="KV cache size in blocks (like vLLM's --num-gpu-blocks-override)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
        help="automatic prefix caching",
    )
    g.add_argument(
        "--step-time-base",
        type=_non_negative,
        default=d.step_time_base,
        help="fixed cost of one engine step (s)",
    )
    g.add_argument(
        "--prefill-token-time",
        type=_non_negative,
        default=d.prefill_token_time,
        help="cost per computed (non-cached) prompt token (s)",
    )
    g.add_argument(
        "--decode-seq-time",
        type=_non_negative,
        default=d.decode_seq_time,
        help="cost per decoding sequence in the batch (s)",
    )
    g.add_argument(
        "--decode-ctx-token-time",
        type=_non_negative,
        default=d.decode_ctx_token_time,
        help="cost per context token read by a decoding sequence (s)",
    )
    g.add_argument(
        "--mean-output-len",
        type=_positive_float,
        default=d.mean_output_len,
        help="mean length of the natural (EOS) stop when ignore_eos is false",
    )
    g.add_argument(
        "--time-scale",
        type=_positive_float,
        default=d.time_scale,
        help="simulated seconds per wall second (10 = ten times faster)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seeds response lengths, filler text and fault injection",
    )

    g = p.add_argument_group("LoRA")
    g.add_argument(
        "--lora-modules",
        nargs="*",
        default=[],
        metavar="NAME[=PATH]",
        help="LoRA adapters served under their own model names",
    )
    g.add_argument(
        "--max-loras",
        type=_positive_int,
        default=d.max_loras,
        help="adapter slots: max distinct adapters in one batch",
    )
    g.add_argument(
        "--lora-load-time",
        type=_non_negative,
        default=d.lora_load_time,
        help="simulated seconds added to a step that loads an adapter",
    )

    g = p.add_argument_group("faults (wall-clock seconds)")
    g.add_argument(
        "--startup-delay",
        type=_non_negative,
        default=0.0,
        help="/health and the API answer 503 this long after start",
    )
    g.add_argument(
        "--metrics-delay",
        type=_non_negative,
        default=0.0,
        help="/metrics answers 503 this long after start (cold cache)",
    )
    g.add_argument(
        "--metrics-fail-rate",
        type=_probability,
        default=0.0,
        help="probability that /metrics answers 500",
    )
    g.add_argument(
        "--metrics-latency",
        type=_non_negative,
        default=0.0,
        help="extra delay before /metrics answers",
    )
    g.add_argument(
        "--fail-rate",
        type=_probability,
        default=0.0,
        help="probability that an inference request answers 500",
    )
    g.add_argument(
        "--crash-after",
        type=_non_negative,
        default=0.0,
        help="exit abruptly (status 3) this many seconds after start (0 = never)",
    )
    g.add_argument(
        "--crash-after-requests",
        type=_non_negative_int,
        default=0,
        help="exit abruptly (status 3) when the Nth inference request arrives, "
        "without answering it (0 = never)",
    )

    g = p.add_argument_group("KV events")
    g.add_argument(
        "--kv-events-config",
        default="",
        metavar="JSON",
        help='as vLLM: e.g. \'{"enable_kv_cache_events": true, "publisher": "zmq", '
        '"endpoint": "tcp://*:5557", "topic": "kv-events"}\' publishes '
        "BlockStored/BlockRemoved/AllBlocksCleared over ZMQ (an endpoint with * or "
        "ipc:// binds, others connect)",
    )
    g.add_argument(
        "--kv-events-endpoint",
        default="",
        metavar="ZMQ_ENDPOINT",
        help="not vLLM: publish KV events bound at this endpoint, e.g. "
        "tcp://127.0.0.1:5557 or ipc:///tmp/kv1 (always binds)",
    )

    g = p.add_argument_group("debugging (not vLLM)")
    g.add_argument(
        "--debug-echo",
        action="store_true",
        help="on inference responses, add x-vllmsim-body-bytes and x-vllmsim-body-sha256 "
        "(of the request body as received) and x-vllmsim-destination (the request's "
        "x-gateway-destination-endpoint header): proves what a gateway delivered",
    )
    return p


def check(cfg: SimConfig) -> None:
    """Reject shapes vLLM itself refuses to start with (raises ValueError)."""
    usable_tokens = (cfg.num_gpu_blocks - 1) * cfg.block_size  # block 0 is vLLM's null block
    if cfg.num_gpu_blocks < 2:
        raise ValueError("--num-gpu-blocks must be >= 2")
    if cfg.max_model_len > usable_tokens:
        # otherwise one long request could never fit and would preempt itself forever
        raise ValueError(
            f"--max-model-len {cfg.max_model_len} is larger than the KV cache "
            f"({cfg.num_gpu_blocks - 1} usable blocks x {cfg.block_size} tokens = "
            f"{usable_tokens}); raise --num-gpu-blocks or lower --max-model-len"
        )
    if len(set(cfg.lora_names)) != len(cfg.lora_names) or cfg.model in cfg.lora_names:
        raise ValueError("--lora-modules names must be unique and differ from --model")
    kv_events_settings(cfg)


def kv_events_settings(cfg: SimConfig) -> KvEventsSettings | None:
    """The KV-event publisher to start, from --kv-events-config or --kv-events-endpoint."""
    from .kv_events import KvEventsSettings, parse_kv_events_config

    if cfg.kv_events_config and cfg.kv_events_endpoint:
        raise ValueError("--kv-events-config and --kv-events-endpoint exclude each other")
    if cfg.kv_events_endpoint:
        if not cfg.kv_events_endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError("--kv-events-endpoint must start with tcp://, ipc:// or inproc://")
        return KvEventsSettings(cfg.kv_events_endpoint)
    if cfg.kv_events_config:
        return parse_kv_events_config(cfg.kv_events_config)
    return None


def parse_args(argv: list[str] | None = None) -> SimConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cfg = _from_namespace(ns)
    try:
        check(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    return cfg


def _from_namespace(ns: argparse.Namespace) -> SimConfig:
    return SimConfig(
        host=ns.host,
        port=ns.port,
        model=ns.model,
        instance_name=ns.instance_name,
        max_model_len=ns.max_model_len,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        block_size=ns.block_size,
        num_gpu_blocks=ns.num_gpu_blocks,
        enable_prefix_caching=ns.enable_prefix_caching,
        step_time_base=ns.step_time_base,
        prefill_token_time=ns.prefill_token_time,
        decode_seq_time=ns.decode_seq_time,
        decode_ctx_token_time=ns.decode_ctx_token_time,
        mean_output_len=ns.mean_output_len,
        time_scale=ns.time_scale,
        seed=ns.seed,
        lora_modules=tuple(ns.lora_modules),
        max_loras=ns.max_loras,
        lora_load_time=ns.lora_load_time,
        startup_delay=ns.startup_delay,
        metrics_delay=ns.metrics_delay,
        metrics_fail_rate=ns.metrics_fail_rate,
        metrics_latency=ns.metrics_latency,
        fail_rate=ns.fail_rate,
        crash_after=ns.crash_after,
        crash_after_requests=ns.crash_after_requests,
        kv_events_config=ns.kv_events_config,
        kv_events_endpoint=ns.kv_events_endpoint,
        debug_echo=ns.debug_echo,
    )
