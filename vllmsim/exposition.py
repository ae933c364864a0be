"""Prometheus text exposition of the simulator, shaped like vLLM 0.32's /metrics.

Hand-written instead of prometheus_client metric objects because (a) the engine updates
plain ints on its hot path (one observation per token must stay cheap) and (b) the output has
to match the fixture byte-for-byte in shape: family order, HELP texts, sorted label names,
``*_created`` companion gauges, histogram buckets. Process/python families come from
prometheus_client's own collectors, as in vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.utils import floatToGoString as fmt

from .config import KV_BYTES_PER_TOKEN, SimConfig
from .engine import Engine
from .stats import FINISH_REASONS, Histogram

CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"

HELP: dict[str, str] = {
    "python_gc_objects_collected_total": "Objects collected during gc",
    "python_gc_objects_uncollectable_total": "Uncollectable objects found during GC",
    "python_gc_collections_total": "Number of times this generation was collected",
    "python_info": "Python platform information",
    "process_virtual_memory_bytes": "Virtual memory size in bytes.",
    "process_resident_memory_bytes": "Resident memory size in bytes.",
    "process_start_time_seconds": "Start time of the process since unix epoch in seconds.",
    "process_cpu_seconds_total": "Total user and system CPU time spent in seconds.",
    "process_open_fds": "Number of open file descriptors.",
    "process_max_fds": "Maximum number of open file descriptors.",
    "vllm:estimated_flops_per_gpu_total": "Estimated number of floating point operations per GPU (for Model Flops Utilization calculations).",
    "vllm:estimated_read_bytes_per_gpu_total": "Estimated number of bytes read from memory per GPU (for Model Flops Utilization calculations).",
    "vllm:estimated_write_bytes_per_gpu_total": "Estimated number of bytes written to memory per GPU (for Model Flops Utilization calculations).",
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:num_requests_waiting_by_reason": "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
    "vllm:engine_sleep_state": "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "vllm:prefix_cache_queries_total": "Prefix cache queries, in terms of number of queried tokens.",
    "vllm:prefix_cache_hits_total": "Prefix cache hits, in terms of number of cached tokens.",
    "vllm:external_prefix_cache_queries_total": "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",
    "vllm:external_prefix_cache_hits_total": "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",
    "vllm:mm_cache_queries_total": "Multi-modal cache queries, in terms of number of queried items.",
    "vllm:mm_cache_hits_total": "Multi-modal cache hits, in terms of number of cached items.",
    "vllm:num_preemptions_total": "Cumulative number of preemption from the engine.",
    "vllm:prompt_tokens_total": "Number of prefill tokens processed.",
    "vllm:prompt_tokens_by_source_total": "Number of prompt tokens by source.",
    "vllm:prompt_tokens_cached_total": "Number of cached prompt tokens (local + external).",
    "vllm:prompt_tokens_cached_by_source_total": "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits.",
    "vllm:generation_tokens_total": "Number of generation tokens processed.",
    "vllm:request_success_total": "Count of successfully processed requests.",
    "vllm:admission_rejections_total": "Number of admission attempts rejected by a queue limit, by reason.",
    "vllm:request_prompt_tokens": "Number of prefill tokens processed.",
    "vllm:request_generation_tokens": "Number of generation tokens processed.",
    "vllm:iteration_tokens_total": "Histogram of number of tokens per engine_step.",
    "vllm:request_max_num_generation_tokens": "Histogram of maximum number of requested generation tokens.",
    "vllm:request_params_n": "Histogram of the n request parameter.",
    "vllm:request_params_max_tokens": "Histogram of the max_tokens request parameter.",
    "vllm:time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "vllm:inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "vllm:request_time_per_output_token_seconds": "Histogram of time_per_output_token_seconds per request.",
    "vllm:e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
    "vllm:request_queue_time_seconds": "Histogram of time spent in WAITING phase for request.",
    "vllm:request_inference_time_seconds": "Histogram of time spent in RUNNING phase for request.",
    "vllm:request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
    "vllm:request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
    "vllm:request_num_preemptions": "Histogram of the number of times a request was preempted.",
    "vllm:request_prefill_kv_computed_tokens": "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
    "vllm:cache_config_info": "Information of the LLMEngine CacheConfig",
    "http_requests_total": "Total number of requests by method, status and handler.",
    "http_request_size_bytes": "Content length of incoming requests by handler. Only value of header is respected. Otherwise ignored. No percentile calculated. ",
    "http_response_size_bytes": "Content length of outgoing responses by handler. Only value of header is respected. Otherwise ignored. No percentile calculated. ",
    "http_request_duration_highr_seconds": "Latency with many buckets but no API specific labels. Made for more accurate percentile calculations. ",
    "http_request_duration_seconds": "Latency with only few buckets by handler. Made to be only used if aggregation by handler is important. ",
}
HELP["vllm:lora_requests_info"] = "Running stats on lora requests."

HTTP_HIGHR_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    2.5,
    3.0,
    3.5,
    4.0,
    4.5,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
)
HTTP_DURATION_BUCKETS = (0.1, 0.5, 1.0)

# order of the vllm:* histograms in the real output
HISTOGRAM_ORDER = (
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
    "vllm:iteration_tokens_total",
    "vllm:request_max_num_generation_tokens",
    "vllm:request_params_n",
    "vllm:request_params_max_tokens",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_num_preemptions",
    "vllm:request_prefill_kv_computed_tokens",
)


class HttpStats:
    """What prometheus-fastapi-instrumentator records in vLLM (API routes only)."""

    HANDLERS = ("/v1/completions", "/v1/chat/completions", "/v1/models")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], float] = {}  # (handler, method, status) -> n
        self.req_size: dict[str, list[float]] = {}  # handler -> [count, sum]
        self.resp_size: dict[str, list[float]] = {}
        self.highr = Histogram(HTTP_HIGHR_BUCKETS)
        self.duration: dict[tuple[str, str], Histogram] = {}
        self.created: dict[object, float] = {}

    def record(
        self,
        handler: str,
        method: str,
        status: int,
        req_bytes: int,
        resp_bytes: int,
        seconds: float,
    ) -> None:
        now = time.time()
        key = (handler, method, f"{status // 100}xx")
        if key not in self.requests:
            self.created[key] = now
        self.requests[key] = self.requests.get(key, 0) + 1
        for table, value in ((self.req_size, req_bytes), (self.resp_size, resp_bytes)):
            cs = table.get(handler)
            if cs is None:
                cs = table[handler] = [0, 0]
                self.created[(id(table), handler)] = now
            cs[0] += 1
            cs[1] += value
        self.highr.observe(seconds)
        dkey = (handler, method)
        h = self.duration.get(dkey)
        if h is None:
            h = self.duration[dkey] = Histogram(HTTP_DURATION_BUCKETS)
            self.created[dkey] = now
        h.observe(seconds)


class Exposition:
    def __init__(self, cfg: SimConfig, engine: Engine, http: HttpStats) -> None:
        self.cfg = cfg
        self.engine = engine
        self.http = http
        self.created = fmt(time.time())
        self.highr_created = self.created
        self.labels = f'engine="0",model_name="{_esc(cfg.model)}"'
        self._registry = CollectorRegistry(auto_describe=False)
        GCCollector(registry=self._registry)
        PlatformCollector(registry=self._registry)
        ProcessCollector(registry=self._registry)
        self._cache_info = self._cache_config_line()
        self._hist_prefix: dict[str, tuple[str, list[str]]] = {}
        L = self.labels
        for name in HISTOGRAM_ORDER:
            bounds = engine.stats.hist[name].bounds
            bucket_prefixes = [
                f'{name}_bucket{{engine="0",le="{fmt(b)}",model_name="{_esc(cfg.model)}"}} '
                for b in (*bounds, float("inf"))
            ]
            head = f"# HELP {name} {HELP[name]}\n# TYPE {name} histogram\n"
            self._hist_prefix[name] = (head, bucket_prefixes)
        self._hist_tail = {
            name: (
                f"{name}_count{{{L}}} ",
                f"{name}_sum{{{L}}} ",
                f"# HELP {name}_created {HELP[name]}\n# TYPE {name}_created gauge\n"
                f"{name}_created{{{L}}} {self.created}\n",
            )
            for name in HISTOGRAM_ORDER
        }

    def _cache_config_line(self) -> str:
        cfg = self.cfg
        tokens = cfg.num_gpu_blocks * cfg.block_size
        labels = {
            "_block_size_resolved": "True",
            "block_size": str(cfg.block_size),
            "cache_dtype": "auto",
            "cache_hit_alignment_tokens": "None",
            "effective_attention_block_size": str(cfg.block_size),
            "enable_mamba_shared_prefix_checkpoint": "False",
            "enable_prefix_caching": str(cfg.enable_prefix_caching),
            "engine": "0",
            "gpu_memory_utilization": str(cfg.gpu_memory_utilization),
            "hash_block_size": "None",
            "is_attention_free": "False",
            "kv_cache_dtype_skip_layers": "[]",
            "kv_cache_layout": "None",
            "kv_cache_max_concurrency": str(tokens / cfg.max_model_len),
            "kv_cache_memory_bytes": str(tokens * KV_BYTES_PER_TOKEN),
            "kv_cache_size_tokens": str(tokens),
            "kv_offloading_backend": "native",
            "kv_offloading_size": "None",
            "kv_sharing_fast_prefill": "False",
            "mamba_block_size": "None",
            "mamba_cache_dtype": "auto",
            "mamba_cache_mode": "none",
            "mamba_page_size_padded": "None",
            "mamba_ssm_cache_dtype": "float32",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(cfg.num_gpu_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_cache_retention_interval": "0",
            "prefix_caching_hash_algo": "xxhash",
            "prefix_match_unit": "None",
            "replayssm_buffer_len": "16",
            "skip_page_size_padded": "None",
            "sliding_window": "None",
            "swa_bounded_replay": "True",
            "use_kda_recoverssm": "False",
            "use_replayssm": "False",
            "user_specified_block_size": "False",
        }
        body = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(labels.items()))
        name = "vllm:cache_config_info"
        return f"# HELP {name} {HELP[name]}\n# TYPE {name} gauge\n{name}{{{body}}} 1.0\n"

    # ---- building blocks -------------------------------------------------------------------
    def _counter(self, out: list[str], name: str, samples: Iterable[tuple[str, float]]) -> None:
        samples = list(samples)
        base = name[:-6]  # strip "_total"
        out.append(f"# HELP {name} {HELP[name]}\n# TYPE {name} counter\n")
        out.extend(f"{name}{{{lab}}} {fmt(v)}\n" for lab, v in samples)
        out.append(f"# HELP {base}_created {HELP[name]}\n# TYPE {base}_created gauge\n")
        out.extend(f"{base}_created{{{lab}}} {self.created}\n" for lab, _ in samples)

    def _gauge(self, out: list[str], name: str, samples: Iterable[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {HELP[name]}\n# TYPE {name} gauge\n")
        out.extend(f"{name}{{{lab}}} {fmt(v)}\n" for lab, v in samples)

    def _histogram(self, out: list[str], name: str, h: Histogram) -> None:
        head, prefixes = self._hist_prefix[name]
        out.append(head)
        acc = 0
        for prefix, c in zip(prefixes, h.counts):
            acc += c
            out.append(f"{prefix}{acc}.0\n")
        count_p, sum_p, created = self._hist_tail[name]
        out.append(f"{count_p}{h.count}.0\n{sum_p}{fmt(h.sum)}\n{created}")

    def _with(self, label: str, value: str) -> str:
        """Base labels plus one more, in the sorted label order the real output uses."""
        m = f'model_name="{_esc(self.cfg.model)}"'
        if label < "model_name":
            return f'engine="0",{label}="{value}",{m}'
        return f'engine="0",{m},{label}="{value}"'

    # ---- the page ----------------------------------------------------------------------------
    def render(self) -> str:
        eng, st, L = self.engine, self.engine.stats, self.labels
        running, waiting_cap, waiting_def, usage = eng.gauges()
        out: list[str] = [generate_latest(self._registry).decode()]
        for name in (
            "vllm:estimated_flops_per_gpu_total",
            "vllm:estimated_read_bytes_per_gpu_total",
            "vllm:estimated_write_bytes_per_gpu_total",
        ):
            self._counter(out, name, [(L, 0.0)])
        self._gauge(out, "vllm:num_requests_running", [(L, running)])
        self._gauge(out, "vllm:num_requests_waiting", [(L, waiting_cap + waiting_def)])
        self._gauge(
            out,
            "vllm:num_requests_waiting_by_reason",
            [
                (self._with("reason", "capacity"), waiting_cap),
                (self._with("reason", "deferred"), waiting_def),
            ],
        )
        self._gauge(
            out,
            "vllm:engine_sleep_state",
            [
                (self._with("sleep_state", "awake"), 1.0),
                (self._with("sleep_state", "weights_offloaded"), 0.0),
                (self._with("sleep_state", "discard_all"), 0.0),
            ],
        )
        self._gauge(out, "vllm:kv_cache_usage_perc", [(L, usage)])
        self._counter(out, "vllm:prefix_cache_queries_total", [(L, st.prefix_queries)])
        self._counter(out, "vllm:prefix_cache_hits_total", [(L, st.prefix_hits)])
        for name in (
            "vllm:external_prefix_cache_queries_total",
            "vllm:external_prefix_cache_hits_total",
            "vllm:mm_cache_queries_total",
            "vllm:mm_cache_hits_total",
        ):
            self._counter(out, name, [(L, 0.0)])
        self._counter(out, "vllm:num_preemptions_total", [(L, st.preemptions)])
        self._counter(out, "vllm:prompt_tokens_total", [(L, st.prompt_tokens)])
        self._counter(
            out,
            "vllm:prompt_tokens_by_source_total",
            [
                (self._with("source", "local_compute"), st.prompt_tokens_computed),
                (self._with("source", "local_cache_hit"), st.prompt_tokens_cached),
                (self._with("source", "external_kv_transfer"), 0.0),
            ],
        )
        self._counter(out, "vllm:prompt_tokens_cached_total", [(L, st.prompt_tokens_cached)])
        self._counter(
            out,
            "vllm:prompt_tokens_cached_by_source_total",
            [
                (self._with("source", "device"), st.prompt_tokens_cached),
                (self._with("source", "host"), 0.0),
                (self._with("source", "p2p"), 0.0),
                (self._with("source", "disk"), 0.0),
                (self._with("source", "external_unspecified"), 0.0),
            ],
        )
        self._counter(out, "vllm:generation_tokens_total", [(L, st.generation_tokens)])
        self._counter(
            out,
            "vllm:request_success_total",
            [(self._with("finished_reason", r), st.success[r]) for r in FINISH_REASONS],
        )
        m = f'model_name="{_esc(self.cfg.model)}"'
        self._counter(
            out,
            "vllm:admission_rejections_total",
            [
                (f'{m},reason="max_num_queued_reqs"', 0.0),
                (f'{m},reason="max_num_queued_tokens"', 0.0),
            ],
        )
        for name in HISTOGRAM_ORDER:
            self._histogram(out, name, st.hist[name])
        if self.cfg.lora_names:
            self._lora_info(out)
        out.append(self._cache_info)
        self._http(out)
        return "".join(out)

    def _lora_info(self, out: list[str]) -> None:
        name = "vllm:lora_requests_info"
        out.append(f"# HELP {name} {HELP[name]}\n# TYPE {name} gauge\n")
        eng = self.engine
        if not eng.lora_seen:
            eng._record_lora_info()
        max_lora = self.cfg.max_loras
        for (running, waiting), ts in eng.lora_seen.items():
            out.append(
                f'{name}{{max_lora="{max_lora}",running_lora_adapters="{_esc(running)}",'
                f'waiting_lora_adapters="{_esc(waiting)}"}} {fmt(ts)}\n'
            )

    def _http(self, out: list[str]) -> None:
        http = self.http
        c = http.created

        def fam(name: str, typ: str) -> None:
            out.append(f"# HELP {name} {HELP[name]}\n# TYPE {name} {typ}\n")

        def created_fam(name: str) -> None:
            out.append(f"# HELP {name}_created {HELP[name]}\n# TYPE {name}_created gauge\n")

        fam("http_requests_total", "counter")
        for (h, meth, s), v in http.requests.items():
            out.append(
                f'http_requests_total{{handler="{h}",method="{meth}",status="{s}"}} {fmt(v)}\n'
            )
        if http.requests:
            out.append(
                f"# HELP http_requests_created {HELP['http_requests_total']}\n"
                "# TYPE http_requests_created gauge\n"
            )
            for h, meth, s in http.requests:
                out.append(
                    f'http_requests_created{{handler="{h}",method="{meth}",status="{s}"}} '
                    f"{fmt(c[(h, meth, s)])}\n"
                )
        for name, table in (
            ("http_request_size_bytes", http.req_size),
            ("http_response_size_bytes", http.resp_size),
        ):
            fam(name, "summary")
            for h, (cnt, total) in table.items():
                out.append(
                    f'{name}_count{{handler="{h}"}} {fmt(cnt)}\n'
                    f'{name}_sum{{handler="{h}"}} {fmt(total)}\n'
                )
            if table:
                created_fam(name)
                for h in table:
                    out.append(f'{name}_created{{handler="{h}"}} {fmt(c[(id(table), h)])}\n')
        name = "http_request_duration_highr_seconds"
        fam(name, "histogram")
        acc = 0
        for b, n in zip((*HTTP_HIGHR_BUCKETS, float("inf")), http.highr.counts):
            acc += n
            out.append(f'{name}_bucket{{le="{fmt(b)}"}} {acc}.0\n')
        out.append(f"{name}_count {http.highr.count}.0\n{name}_sum {fmt(http.highr.sum)}\n")
        created_fam(name)
        out.append(f"{name}_created {self.highr_created}\n")
        name = "http_request_duration_seconds"
        fam(name, "histogram")
        for (h, meth), hist in http.duration.items():
            acc = 0
            for b, n in zip((*HTTP_DURATION_BUCKETS, float("inf")), hist.counts):
                acc += n
                out.append(
                    f'{name}_bucket{{handler="{h}",le="{fmt(b)}",method="{meth}"}} {acc}.0\n'
                )
            out.append(
                f'{name}_count{{handler="{h}",method="{meth}"}} {hist.count}.0\n'
                f'{name}_sum{{handler="{h}",method="{meth}"}} {fmt(hist.sum)}\n'
            )
        if http.duration:
            created_fam(name)
            for h, meth in http.duration:
                out.append(f'{name}_created{{handler="{h}",method="{meth}"}} {fmt(c[(h, meth)])}\n')


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
