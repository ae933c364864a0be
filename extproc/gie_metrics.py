"""The Gateway API Inference Extension (GIE) endpoint picker's Prometheus series, for the
dashboards and alerts users already have (GIE's own ``tools/dashboards/inference_gateway.json``).

Names, types, label names and buckets follow the reference EPP of GIE release v1.5.0
(``pkg/epp/metrics``); since v1.1.0 the per-request family is ``inference_objective_*`` (v1.0.0
and older called it ``inference_model_*``). The names carry no extra prefix: the Go code sets
only a Prometheus *subsystem* (``inference_pool``, ``inference_objective``). What differs from
the reference EPP is listed in the README ("Gateway API Inference Extension metrics").

* Pool gauges are computed at scrape time from the backend registry (:class:`PoolCollector`),
  so the hot path never touches them.
* Per-request (objective) series are recorded through :class:`ObjectiveMetrics`, which
  :class:`extproc.observability.Metrics` exposes as ``objective_*`` methods. Model names come
  from clients, so a label value is either a model some backend serves, ``unknown``, or, past
  :data:`MAX_MODEL_LABELS` distinct names, ``other``: clients cannot grow the series count.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from extproc.backends import BackendRegistry

DEFAULT_POOL_NAME = "default"
UNKNOWN_MODEL = "unknown"  # no model in the request, or one no backend serves
OTHER_MODEL = "other"  # a served model past the cap below
# Distinct model label values admitted (models and LoRA adapters some backend serves); later
# ones share "other". Admitted names stay admitted (their counters must keep counting).
MAX_MODEL_LABELS = 64
# Raw (model, target) pairs whose label children are cached; cleared when full.
_PAIR_CACHE_MAX = 4096

# GIE's canonical error codes (pkg/common/error): any other value is reported as "Unknown".
ERROR_CODES = frozenset(
    {
        "Unknown",
        "BadRequest",
        "Unauthorized",
        "Forbidden",
        "NotFound",
        "Internal",
        "ServiceUnavailable",
        "ModelServerError",
        "ResourceExhausted",
    }
)
_CODE_OF_STATUS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    413: "BadRequest",
    429: "ResourceExhausted",
    500: "Internal",
    503: "ServiceUnavailable",
}

# Buckets as the reference EPP declares them, so that series from both aggregate bucket by
# bucket. (32778 in the token buckets is GIE's, kept as is for the same reason.)
LATENCY_BUCKETS = (
    0.005,
    0.025,
    0.05,
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1.0,
    1.25,
    1.5,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    15,
    20,
    30,
    45,
    60,
    120,
    180,
    240,
    300,
    360,
    480,
    600,
    900,
    1200,
    1800,
    2700,
    3600,
)
INPUT_TOKEN_BUCKETS = (
    1,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
    32778,
    65536,
    131072,
    262144,
    524288,
    1048576,
)
OUTPUT_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

_MODEL_LABELS = ("model_name", "target_model_name")


def pool_name(settings: Any) -> str:
    """The ``name`` label of the pool series: --pool-name, else the watched InferencePool's
    name (--k8s-inference-pool), else "default"."""
    return (
        getattr(settings, "pool_name", "")
        or getattr(settings, "k8s_inference_pool", "")
        or DEFAULT_POOL_NAME
    )


def error_code(status: int, *, upstream: bool = False) -> str | None:
    """The ``error_code`` label for an HTTP status, None when it is not an error.

    ``upstream``: the model server answered it. Like the reference EPP, any non-200 answer of a
    model server is ``ModelServerError``; the service's own answers map by status.
    """
    if upstream:
        return None if status == 200 else "ModelServerError"
    if status < 400:
        return None
    return _CODE_OF_STATUS.get(status, "Internal" if status >= 500 else "BadRequest")


_POOL_SERIES = (
    "inference_pool_ready_pods",
    "inference_pool_average_kv_cache_utilization",
    "inference_pool_average_queue_size",
    "inference_pool_average_running_requests",
    "inference_pool_per_pod_queue_size",
)


class PoolCollector(Collector):
    """``inference_pool_*`` gauges, computed from the registry when Prometheus scrapes.

    Ready = healthy and eligible (what a decision may pick). Averages are over the ready
    backends whose metrics are known (fresh or stale, never priors); with none, those series
    are absent rather than a made-up 0. Per-pod queue: every backend with known metrics.
    """

    def __init__(self, registry: BackendRegistry, pool: str) -> None:
        self._registry = registry
        self._pool = pool

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names only: without describe(), registering would run a full collect.
        for name in _POOL_SERIES:
            yield GaugeMetricFamily(name, "", labels=[])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self._registry.rebuild_view()
        ready = [v for v in snap.everyone.eligible if v.healthy]
        known = [v.metrics for v in ready if v.known and v.metrics is not None]
        labels = ["name"]
        ready_pods = GaugeMetricFamily(
            "inference_pool_ready_pods",
            "The number of ready model servers (healthy, eligible) in the pool.",
            labels=labels,
        )
        ready_pods.add_metric([self._pool], float(len(ready)))
        yield ready_pods
        kv_values = [m.kv_cache_usage for m in known if m.kv_cache_usage is not None]
        if kv_values:
            kv = GaugeMetricFamily(
                "inference_pool_average_kv_cache_utilization",
                "The average KV-cache utilization (0..1) of the ready model servers with known metrics.",
                labels=labels,
            )
            kv.add_metric([self._pool], sum(kv_values) / len(kv_values))
            yield kv
        if known:
            queue = GaugeMetricFamily(
                "inference_pool_average_queue_size",
                "The average number of requests waiting in the model server queue (ready servers with known metrics).",
                labels=labels,
            )
            queue.add_metric([self._pool], sum(m.waiting for m in known) / len(known))
            running = GaugeMetricFamily(
                "inference_pool_average_running_requests",
                "The average number of running requests (ready servers with known metrics).",
                labels=labels,
            )
            running.add_metric([self._pool], sum(m.running for m in known) / len(known))
            yield from (queue, running)
        per_pod = GaugeMetricFamily(
            "inference_pool_per_pod_queue_size",
            "Requests waiting in each model server's queue; model_server_pod is the server's ip:port.",
            labels=["name", "model_server_pod"],
        )
        for v in snap.backends:
            if v.known and v.metrics is not None:
                per_pod.add_metric([self._pool, v.endpoint], v.metrics.waiting)
        yield per_pod


class _Pair:
    """Label children of one (model_name, target_model_name) pair, each made on first use."""

    __slots__ = ("labels", "request", "duration", "input_tokens", "output_tokens")

    def __init__(self, labels: tuple[str, str]) -> None:
        self.labels = labels
        self.request: Any = None
        self.duration: Any = None
        self.input_tokens: Any = None
        self.output_tokens: Any = None


class ObjectiveMetrics:
    """``inference_objective_*`` series with a bounded set of model label values."""

    def __init__(self, registry: CollectorRegistry, *, max_models: int = MAX_MODEL_LABELS) -> None:
        # What counts as a served model: set by Metrics.attach_backends to the registry's
        # current model pools. Until then every name is "unknown".
        self.known_models: Callable[[], Container[str]] = lambda: ()
        self._max_models = max_models
        self._admitted: set[str] = set()
        self._pairs: dict[tuple[str | None, str | None], _Pair] = {}
        self._running_children: dict[str, Any] = {}
        self._requests = Counter(
            "inference_objective_request_total",
            "Requests routed, by requested model and target model (priority is always 0: no InferenceObjective).",
            [*_MODEL_LABELS, "priority"],
            registry=registry,
        )
        self._errors = Counter(
            "inference_objective_request_error_total",
            "Requests that ended in an error, by model, target model and GIE error code.",
            [*_MODEL_LABELS, "error_code"],
            registry=registry,
        )
        self._duration = Histogram(
            "inference_objective_request_duration_seconds",
            "Request latency in seconds, from the request headers to the end of the response.",
            _MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._input_tokens = Histogram(
            "inference_objective_input_tokens",
            "Prompt tokens per request (from the response's usage), by model and target model.",
            _MODEL_LABELS,
            buckets=INPUT_TOKEN_BUCKETS,
            registry=registry,
        )
        self._output_tokens = Histogram(
            "inference_objective_output_tokens",
            "Completion tokens per request (from the response's usage), by model and target model.",
            _MODEL_LABELS,
            buckets=OUTPUT_TOKEN_BUCKETS,
            registry=registry,
        )
        self._running = Gauge(
            "inference_objective_running_requests",
            "Requests routed and not finished yet, by requested model.",
            ["model_name"],
            registry=registry,
            multiprocess_mode="livesum",  # --workers N: the sum over the live workers
        )

    # -- label values --------------------------------------------------------------------
    def label(self, name: str | None, known: Container[str] | None = None) -> str:
        """The label value for a client-supplied model name (see the module docstring)."""
        if not name:
            return UNKNOWN_MODEL
        if name in self._admitted:
            return name
        if name not in (known if known is not None else self.known_models()):
            return UNKNOWN_MODEL
        if len(self._admitted) >= self._max_models:
            return OTHER_MODEL
        self._admitted.add(name)
        return name

    def _pair(self, model: str | None, target: str | None) -> _Pair:
        key = (model, target)
        pair = self._pairs.get(key)
        if pair is not None:
            return pair
        known = self.known_models()
        labels = (self.label(model, known), self.label(target, known))
        pair = _Pair(labels)
        # Cache only pairs whose names resolved to served models: their mapping never changes
        # (admitted names stay admitted), and unknown names come from clients (unbounded). No
        # model at all (a request decided on its headers) is one key: cached too.
        if UNKNOWN_MODEL not in labels or key == (None, None):
            if len(self._pairs) >= _PAIR_CACHE_MAX:
                self._pairs.clear()
            self._pairs[key] = pair
        return pair

    # -- recording -------------------------------------------------------------------------
    def request(self, model: str | None, target: str | None) -> None:
        pair = self._pair(model, target)
        if pair.request is None:
            pair.request = self._requests.labels(*pair.labels, "0")
        pair.request.inc()

    def error(self, model: str | None, target: str | None, code: str) -> None:
        labels = self._pair(model, target).labels
        self._errors.labels(*labels, code if code in ERROR_CODES else "Unknown").inc()

    def duration(self, model: str | None, target: str | None, seconds: float) -> None:
        if not seconds >= 0:  # a clock step backwards (or NaN) must not record nonsense
            return
        pair = self._pair(model, target)
        if pair.duration is None:
            pair.duration = self._duration.labels(*pair.labels)
        pair.duration.observe(seconds)

    def tokens(
        self, model: str | None, target: str | None, prompt: int | None, completion: int | None
    ) -> None:
        # Like the reference EPP: only positive counts (0 or absent means "not reported").
        has_prompt, has_completion = (
            prompt is not None and prompt > 0,
            completion is not None and completion > 0,
        )
        if not (has_prompt or has_completion):
            return
        pair = self._pair(model, target)
        if has_prompt:
            if pair.input_tokens is None:
                pair.input_tokens = self._input_tokens.labels(*pair.labels)
            pair.input_tokens.observe(prompt)
        if has_completion:
            if pair.output_tokens is None:
                pair.output_tokens = self._output_tokens.labels(*pair.labels)
            pair.output_tokens.observe(completion)

    def running(self, model: str | None) -> Callable[[], None]:
        """+1 now; returns the matching -1 (safe to call more than once). The label is resolved
        once here, so the pair always hits the same series."""
        label = self.label(model)
        child = self._running_children.get(label)
        if child is None:
            child = self._running_children[label] = self._running.labels(label)
        child.inc()
        done = False

        def finished() -> None:
            nonlocal done
            if not done:
                done = True
                child.dec()

        return finished


# -- usage from a response body ----------------------------------------------------------
# SSE events looked at, from the end: the usage chunk (stream_options.include_usage) is the
# last one before "data: [DONE]"; a few more allow for a trailing empty or error event.
_SSE_EVENTS_FROM_END = 4


def _usage_of(obj: object) -> tuple[int | None, int | None] | None:
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    p = prompt if type(prompt) is int and prompt >= 0 else None  # noqa: E721 (bool is an int)
    c = completion if type(completion) is int and completion >= 0 else None  # noqa: E721
    return None if p is None and c is None else (p, c)


def usage_from_response(body: bytes) -> tuple[int | None, int | None]:
    """``(prompt_tokens, completion_tokens)`` from an OpenAI response: a JSON body, or the tail
    of a Server-Sent Events stream (which has usage only when the client asked for
    ``stream_options.include_usage``). ``(None, None)`` when absent; never raises.

    A tail may start mid-event (the caller keeps only the last bytes): a line that does not
    parse is skipped.
    """
    try:
        stripped = body.lstrip()
        if stripped[:1] == b"{":
            try:
                return _usage_of(orjson.loads(body)) or (None, None)
            except orjson.JSONDecodeError:
                pass  # maybe an SSE stream whose first event is cut
        seen = 0
        for line in reversed(body.splitlines()):
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            seen += 1
            if seen > _SSE_EVENTS_FROM_END:
                break
            if b'"usage"' not in payload:
                continue
            try:
                found = _usage_of(orjson.loads(payload))
            except orjson.JSONDecodeError:
                continue
            if found is not None:
                return found
    except Exception:  # noqa: BLE001 - metrics must never break a response
        pass
    return None, None
