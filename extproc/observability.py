"""Prometheus metrics of the service (served on the admin port at /metrics).

Per-backend gauges are computed when Prometheus scrapes (a custom collector reading the
registry), so the hot path never touches them. Hot-path counters cache their label
children: ``labels()`` takes a lock and a dict lookup we don't need on every request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from extproc.gie_metrics import ObjectiveMetrics

if TYPE_CHECKING:
    from extproc.backends import BackendRegistry

# Decision latency buckets: the step is meant to be far below a millisecond.
_DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1)


class _BackendCollector(Collector):
    def __init__(self, registry: BackendRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        age = GaugeMetricFamily(
            "extproc_backend_metrics_age_seconds",
            "Seconds since the backend's last good /metrics scrape (NaN if never).",
            labels=["backend"],
        )
        healthy = GaugeMetricFamily(
            "extproc_backend_healthy",
            "1 if the backend is eligible (not failing its scrapes), else 0.",
            labels=["backend"],
        )
        suspect = GaugeMetricFamily(
            "extproc_backend_suspect",
            "1 while the backend's last scrape failed or timed out (excluded while others are eligible).",
            labels=["backend"],
        )
        inflight = GaugeMetricFamily(
            "extproc_inflight_requests",
            "Requests routed to the backend whose ext_proc stream is still open.",
            labels=["backend"],
        )
        state = GaugeMetricFamily(
            "extproc_backend_state",
            "1 for the backend's current metrics freshness (fresh, stale, unknown).",
            labels=["backend", "state"],
        )
        snap = self._registry.rebuild_view()
        now = time.monotonic()
        for rec in self._registry.records:
            ep = rec.endpoint
            age.add_metric([ep], now - rec.last_ok if rec.last_ok is not None else float("nan"))
            healthy.add_metric([ep], 1.0 if rec.healthy else 0.0)
            suspect.add_metric([ep], 1.0 if rec.suspect else 0.0)
            inflight.add_metric([ep], float(rec.inflight))
        for view in snap.backends:
            for s in ("fresh", "stale", "unknown"):
                state.add_metric([view.endpoint, s], 1.0 if view.freshness == s else 0.0)
        tasks = GaugeMetricFamily(
            "extproc_asyncio_tasks", "asyncio tasks alive in the service's event loop."
        )
        try:
            tasks.add_metric([], float(len(asyncio.all_tasks())))
        except RuntimeError:  # collected outside the event loop (tests)
            tasks.add_metric([], float("nan"))
        yield from (age, healthy, suspect, inflight, state, tasks)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._decisions = Counter(
            "extproc_decisions_total",
            "Routing decisions by strategy and reason (metrics, cold-cache, all-unhealthy, fallback-error, ...).",
            ["strategy", "reason"],
            registry=self.registry,
        )
        self._decision_seconds = Histogram(
            "extproc_decision_seconds",
            "Time to decide one request (header parse, strategy, response lookup).",
            buckets=_DECISION_BUCKETS,
            registry=self.registry,
        )
        self._rejections = Counter(
            "extproc_rejections_total",
            "Requests answered directly by the service (unknown-strategy 400, no-backends 503).",
            ["reason"],
            registry=self.registry,
        )
        self._scrapes = Counter(
            "extproc_scrapes_total",
            "Backend /metrics scrapes by result (ok, timeout, refused, connect_timeout, http_error, "
            "parse_error, too_large, error; service_stalled when the service's own loop stalled; "
            "models_error for a failed or malformed GET /v1/models).",
            ["backend", "result"],
            registry=self.registry,
        )
        self._task_errors = Counter(
            "extproc_task_errors_total",
            "Unexpected errors in background tasks (each restarts the task).",
            ["task"],
            registry=self.registry,
        )
        self._loop_lag = Histogram(
            "extproc_event_loop_lag_seconds",
            "How late the service's event loop ran a 50 ms timer (CPU starvation, GC pauses).",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self._served = Counter(
            "extproc_served_total",
            "Responses by which endpoint the gateway reports served them (envoy.lb "
            "x-gateway-destination-endpoint-served): pick, fallback (a listed fallback after a "
            "retry), other (an endpoint not in the answer), unrouted (no decision was made).",
            ["outcome"],
            registry=self.registry,
        )
        self._handler_errors = Counter(
            "extproc_handler_errors_total",
            "ext_proc messages whose handling raised; the service answered CONTINUE instead.",
            registry=self.registry,
        )
        self.serving = Gauge(
            "extproc_serving",
            "1 while the gRPC health status is SERVING (0 while draining or with an empty pool).",
            registry=self.registry,
        )
        # What scraping costs and how often it runs (--scrape-budget, extproc/scrape_budget.py).
        self._scrape_interval = Gauge(
            "extproc_scrape_interval_seconds",
            "Seconds between two scrapes of one backend, by priority: busy (requests running or "
            "waiting, KV in use, numbers moving, traffic just routed, failing scrapes) or idle "
            "(steady and empty, or down). Above --scrape-interval only when --scrape-budget needs it.",
            ["priority"],
            registry=self.registry,
        )
        self._scrape_backends = Gauge(
            "extproc_scrape_backends",
            "Backends by scrape priority (busy, idle).",
            ["priority"],
            registry=self.registry,
        )
        self._scrape_cpu = Counter(
            "extproc_scrape_cpu_seconds",
            "CPU seconds the scraper spent on the event loop (measured on one scrape in 4, the "
            "others counted at the moving average; socket reads and select are not included).",
            registry=self.registry,
        )
        self._scrape_budget = Gauge(
            "extproc_scrape_budget_cores",
            "CPU cores scraping may use now: --scrape-budget (0 = no limit), halved after each "
            "stall of the service's event loop and restored over the next ticks.",
            registry=self.registry,
        )
        self._scrape_yielding = Gauge(
            "extproc_scrape_yielding",
            "1 while scraping yields to ext_proc: the process is out of CPU, so every backend is "
            "scraped at 0.9 x the idle cap (min(10 x --scrape-interval, --stale-after)).",
            registry=self.registry,
        )
        self._scrape_cost = Gauge(
            "extproc_scrape_cost_seconds",
            "Moving average of the CPU seconds one scrape costs (what --scrape-budget divides).",
            registry=self.registry,
        )
        self._scrape_cpu_seen = 0.0
        ProcessCollector(registry=self.registry)  # RSS, open fds, CPU: what a soak test watches
        self._decision_children: dict[tuple[str, str], object] = {}
        self._scrape_results: dict[str, dict[str, object]] = {}  # backend -> result -> child
        # The Gateway API Inference Extension's per-request series (extproc/gie_metrics.py).
        self.objectives = ObjectiveMetrics(self.registry)
        # What /metrics serves: this registry, or with --workers N this one merged with the
        # workers' (merge_workers).
        self.exposition: CollectorRegistry = self.registry

    def merge_workers(self, path: str, *extra: Collector) -> None:
        """Serve this registry merged with the workers' multiprocess files in ``path`` (their
        PROMETHEUS_MULTIPROC_DIR) and ``extra`` collectors."""
        exposition = CollectorRegistry(auto_describe=False)
        exposition.register(MergedCollector(self.registry, MultiProcessCollector(None, path)))
        for collector in extra:
            exposition.register(collector)
        self.exposition = exposition

    def attach_backends(self, backends: BackendRegistry, *, collect: bool = True) -> None:
        """``collect``: also export the per-backend gauges (not in a --workers worker, whose
        registry is a copy: the main exports them)."""
        if collect:
            self.registry.register(_BackendCollector(backends))
        # Model label values are restricted to the models some backend serves.
        self.objectives.known_models = lambda: backends.snapshot().model_pools

    def decided(self, strategy: str, reason: str, seconds: float) -> None:
        key = (strategy, reason)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self._decisions.labels(strategy, reason)
        child.inc()  # type: ignore[attr-defined]
        self._decision_seconds.observe(seconds)

    def rejected(self, reason: str) -> None:
        self._rejections.labels(reason).inc()

    def scraped(self, backend: str, result: str) -> None:
        # One call per scrape (thousands per second with a large pool): the label child is
        # cached, as labels() costs a lock and a tuple key every time.
        results = self._scrape_results.get(backend)
        if results is None:
            results = self._scrape_results[backend] = {}
        child = results.get(result)
        if child is None:
            child = results[result] = self._scrapes.labels(backend, result)
        child.inc()  # type: ignore[attr-defined]

    def forget_backend(self, backend: str) -> None:
        """Drop a departed backend's series (pods come and go; series must not pile up)."""
        for result in self._scrape_results.pop(backend, ()):
            try:
                self._scrapes.remove(backend, result)
            except KeyError:
                pass

    def loop_lag(self, seconds: float) -> None:
        self._loop_lag.observe(seconds)

    def scrape_plan(
        self,
        busy_interval: float,
        idle_interval: float,
        busy: int,
        idle: int,
        budget: float,
        yielding: bool = False,
    ) -> None:
        self._scrape_budget.set(budget)
        self._scrape_yielding.set(1 if yielding else 0)
        self._scrape_interval.labels("busy").set(busy_interval)
        self._scrape_interval.labels("idle").set(idle_interval)
        self._scrape_backends.labels("busy").set(busy)
        self._scrape_backends.labels("idle").set(idle)

    def scrape_cost(self, per_scrape: float, total: float) -> None:
        """``total``: the scraper's running CPU total (seconds); the counter follows it."""
        self._scrape_cost.set(per_scrape)
        if total > self._scrape_cpu_seen:
            self._scrape_cpu.inc(total - self._scrape_cpu_seen)
            self._scrape_cpu_seen = total

    def task_error(self, task: str) -> None:
        self._task_errors.labels(task).inc()

    def served(self, outcome: str) -> None:
        self._served.labels(outcome).inc()

    def handler_error(self) -> None:
        self._handler_errors.inc()

    # -- Gateway API Inference Extension series (names and labels: extproc/gie_metrics.py) --
    # model: the request's "model" (None/"" if it has none); target_model: the model it is
    # sent to (the same unless rewritten). Both become a served model name, "unknown" or "other".
    def objective_request(self, model: str | None, target_model: str | None) -> None:
        """A request routed to a backend: inference_objective_request_total."""
        self.objectives.request(model, target_model)

    def objective_error(self, model: str | None, target_model: str | None, error_code: str) -> None:
        """A request that ended in an error (gie_metrics.error_code(status) gives the code)."""
        self.objectives.error(model, target_model, error_code)

    def objective_duration(
        self, model: str | None, target_model: str | None, seconds: float
    ) -> None:
        """Request headers to end of response: inference_objective_request_duration_seconds."""
        self.objectives.duration(model, target_model, seconds)

    def objective_tokens(
        self,
        model: str | None,
        target_model: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        """The response's usage (gie_metrics.usage_from_response): input/output token histograms."""
        self.objectives.tokens(model, target_model, prompt_tokens, completion_tokens)

    def objective_running(self, model: str | None) -> Callable[[], None]:
        """inference_objective_running_requests +1; call the returned function once the request ends."""
        return self.objectives.running(model)


class _Source(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class MergedCollector(Collector):
    """Families of several collectors as one (the main's registry + the workers' files).

    Samples with the same name and labels are summed: counters and histograms add up across
    processes. A worker gauge declared with a multiprocess mode (``livesum``, ...) arrives
    aggregated and adds to the main's; one without (mode ``all``) carries a ``pid`` label and is
    dropped: those gauges (serving, scrape plan) are the main's.
    """

    def __init__(self, *sources: _Source) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for source in self._sources:
            for family in source.collect():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                    values[family.name] = {}
                sums = values[family.name]
                for sample in family.samples:
                    if family.type == "gauge" and "pid" in sample.labels:
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    sums[key] = sums.get(key, 0.0) + sample.value
        for name, family in merged.items():
            for (sample_name, labels), value in values[name].items():
                family.add_sample(sample_name, dict(labels), value)
            yield family
