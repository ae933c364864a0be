"""The Gateway API Inference Extension series: pool gauges from the registry, the objective
counters/histograms with bounded model labels, and token usage read from response bodies.

Every exposition is read back with prometheus_client's own text parser, so names, types and
label names are checked as a Prometheus server would see them.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extproc import gie_metrics
from extproc.backends import UNHEALTHY_AFTER_FAILURES, BackendRegistry
from extproc.config import load_settings
from extproc.gie_metrics import (
    INPUT_TOKEN_BUCKETS,
    LATENCY_BUCKETS,
    OUTPUT_TOKEN_BUCKETS,
    ObjectiveMetrics,
    PoolCollector,
    error_code,
    pool_name,
    usage_from_response,
)
from extproc.observability import Metrics

from .helpers import fail, registry, scrape_ok, vm

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def exposition(reg: CollectorRegistry) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value), parsed from the text format."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return types, samples


def value(samples: Samples, sample: str, /, **labels: str) -> float | None:
    return samples.get((sample, frozenset(labels.items())))


def named(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def pool_exposition(reg: BackendRegistry, pool: str = "p") -> tuple[dict[str, str], Samples]:
    prom = CollectorRegistry()
    prom.register(PoolCollector(reg, pool))
    return exposition(prom)


# -- pool gauges -----------------------------------------------------------------------------
def test_pool_gauges_average_ready_backends_with_known_metrics_only() -> None:
    reg, _ = registry(5)
    scrape_ok(reg, 0, vm(running=2, waiting=3, kv=0.5))
    scrape_ok(reg, 1, vm(running=4, waiting=1, kv=None))  # no KV gauge: left out of that average
    # backend 2: never scraped (healthy, eligible: ready, but no numbers to average)
    scrape_ok(reg, 3, vm(running=9, waiting=7, kv=0.9))
    fail(reg, 3, UNHEALTHY_AFTER_FAILURES)  # unhealthy: not ready, its last numbers still known
    scrape_ok(reg, 4, vm(running=5, waiting=5, kv=0.1))
    fail(reg, 4, timeout=True)  # suspect: excluded while others are eligible

    types, samples = pool_exposition(reg, "my-pool")

    assert value(samples, "inference_pool_ready_pods", name="my-pool") == 3
    assert value(samples, "inference_pool_average_queue_size", name="my-pool") == pytest.approx(2.0)
    assert value(
        samples, "inference_pool_average_running_requests", name="my-pool"
    ) == pytest.approx(3.0)
    assert value(
        samples, "inference_pool_average_kv_cache_utilization", name="my-pool"
    ) == pytest.approx(0.5)
    per_pod = named(samples, "inference_pool_per_pod_queue_size")
    # Every backend with known metrics, ready or not; the never-scraped one has none.
    assert per_pod == {
        frozenset({("name", "my-pool"), ("model_server_pod", "10.0.0.1:8000")}): 3.0,
        frozenset({("name", "my-pool"), ("model_server_pod", "10.0.0.2:8000")}): 1.0,
        frozenset({("name", "my-pool"), ("model_server_pod", "10.0.0.4:8000")}): 7.0,
        frozenset({("name", "my-pool"), ("model_server_pod", "10.0.0.5:8000")}): 5.0,
    }
    assert {types[n] for n in types if n.startswith("inference_pool_")} == {"gauge"}
    assert set(types) == {
        "inference_pool_ready_pods",
        "inference_pool_average_queue_size",
        "inference_pool_average_running_requests",
        "inference_pool_average_kv_cache_utilization",
        "inference_pool_per_pod_queue_size",
    }


def test_pool_gauges_without_known_metrics_report_ready_pods_only() -> None:
    reg, _ = registry(2)  # never scraped: ready, nothing measured
    types, samples = pool_exposition(reg)
    assert value(samples, "inference_pool_ready_pods", name="p") == 2
    # No made-up zeros: the averages are absent until some ready server has numbers.
    assert "inference_pool_average_queue_size" not in types
    assert "inference_pool_average_kv_cache_utilization" not in types
    assert named(samples, "inference_pool_per_pod_queue_size") == {}


def test_metrics_older_than_max_age_are_not_known() -> None:
    reg, clock = registry(2, max_age=10.0)
    scrape_ok(reg, 0, vm(waiting=4, kv=0.4))
    scrape_ok(reg, 1, vm(waiting=2, kv=0.2))
    clock.advance(5.0)
    scrape_ok(reg, 1, vm(waiting=2, kv=0.2))
    clock.advance(
        6.0
    )  # backend 0's numbers are 11 s old: unknown; backend 1's 6 s: stale, still used
    _, samples = pool_exposition(reg)
    assert value(samples, "inference_pool_ready_pods", name="p") == 2
    assert value(samples, "inference_pool_average_queue_size", name="p") == 2.0
    assert value(samples, "inference_pool_average_kv_cache_utilization", name="p") == pytest.approx(
        0.2
    )
    assert list(named(samples, "inference_pool_per_pod_queue_size").values()) == [2.0]


@pytest.mark.parametrize("n", [0, 2])
def test_no_ready_pods_when_the_pool_is_empty_or_all_unhealthy(n: int) -> None:
    reg, _ = registry(n)
    for i in range(n):
        scrape_ok(reg, i, vm(waiting=1))
        fail(reg, i, UNHEALTHY_AFTER_FAILURES)
    types, samples = pool_exposition(reg)
    assert value(samples, "inference_pool_ready_pods", name="p") == 0
    assert "inference_pool_average_queue_size" not in types
    assert len(named(samples, "inference_pool_per_pod_queue_size")) == n  # still known numbers


def test_pool_name_setting_then_k8s_pool_then_default() -> None:
    assert pool_name(load_settings({"pool_name": "gpu-pool"})) == "gpu-pool"
    assert pool_name(load_settings({})) == "default"
    assert (
        pool_name(SimpleNamespace(pool_name="", k8s_inference_pool="vllm-llama3")) == "vllm-llama3"
    )
    assert pool_name(SimpleNamespace(pool_name="mine", k8s_inference_pool="vllm-llama3")) == "mine"


def test_registering_the_collector_does_not_collect() -> None:
    class Exploding(BackendRegistry):
        def rebuild_view(self) -> Any:
            raise AssertionError("collect() ran at registration")

    prom = CollectorRegistry()
    prom.register(PoolCollector(Exploding(stale_after=1.0, max_metrics_age=10.0), "p"))
    with pytest.raises(ValueError, match="Duplicated"):  # the names were declared by describe()
        prom.register(PoolCollector(Exploding(stale_after=1.0, max_metrics_age=10.0), "p"))


# -- objective series ---------------------------------------------------------------------
@pytest.fixture
def served() -> tuple[Metrics, BackendRegistry]:
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm(models=("llama",)))
    scrape_ok(reg, 1, vm(models=("llama", "sql-lora")))
    metrics = Metrics()
    metrics.attach_backends(reg)
    return metrics, reg


def test_objective_series_names_types_and_labels(served: tuple[Metrics, BackendRegistry]) -> None:
    metrics, _ = served
    metrics.objective_request("llama", "llama")
    metrics.objective_request("llama", "llama")
    metrics.objective_request("sql-lora", "sql-lora")
    metrics.objective_error("llama", "llama", "ModelServerError")
    metrics.objective_duration("llama", "llama", 0.3)
    metrics.objective_tokens("llama", "llama", 100, 20)
    done = metrics.objective_running("llama")

    types, samples = exposition(metrics.registry)

    assert types["inference_objective_request"] == "counter"  # the parser strips _total
    assert types["inference_objective_request_error"] == "counter"
    assert types["inference_objective_request_duration_seconds"] == "histogram"
    assert types["inference_objective_input_tokens"] == "histogram"
    assert types["inference_objective_output_tokens"] == "histogram"
    assert types["inference_objective_running_requests"] == "gauge"
    pair = {"model_name": "llama", "target_model_name": "llama"}
    assert value(samples, "inference_objective_request_total", **pair, priority="0") == 2
    assert (
        value(
            samples,
            "inference_objective_request_total",
            model_name="sql-lora",
            target_model_name="sql-lora",
            priority="0",
        )
        == 1
    )
    assert (
        value(
            samples,
            "inference_objective_request_error_total",
            **pair,
            error_code="ModelServerError",
        )
        == 1
    )
    assert value(samples, "inference_objective_request_duration_seconds_count", **pair) == 1
    assert (
        value(samples, "inference_objective_request_duration_seconds_bucket", **pair, le="0.4") == 1
    )
    assert (
        value(samples, "inference_objective_request_duration_seconds_bucket", **pair, le="0.2") == 0
    )
    assert value(samples, "inference_objective_input_tokens_sum", **pair) == 100
    assert value(samples, "inference_objective_output_tokens_sum", **pair) == 20
    assert value(samples, "inference_objective_output_tokens_bucket", **pair, le="32.0") == 1
    assert value(samples, "inference_objective_running_requests", model_name="llama") == 1
    done()
    done()  # a second call is harmless
    assert (
        value(
            exposition(metrics.registry)[1],
            "inference_objective_running_requests",
            model_name="llama",
        )
        == 0
    )


def test_histogram_buckets_are_the_reference_epps(served: tuple[Metrics, BackendRegistry]) -> None:
    metrics, _ = served
    metrics.objective_duration("llama", "llama", 1.0)
    metrics.objective_tokens("llama", "llama", 1, 1)
    _, samples = exposition(metrics.registry)

    def les(name: str) -> list[float]:
        return sorted(float(dict(labels)["le"]) for labels in named(samples, name + "_bucket"))

    assert les("inference_objective_request_duration_seconds") == [
        *map(float, LATENCY_BUCKETS),
        math.inf,
    ]
    assert les("inference_objective_input_tokens") == [*map(float, INPUT_TOKEN_BUCKETS), math.inf]
    assert les("inference_objective_output_tokens") == [*map(float, OUTPUT_TOKEN_BUCKETS), math.inf]
    assert (
        LATENCY_BUCKETS[0] == 0.005 and LATENCY_BUCKETS[-1] == 3600 and len(LATENCY_BUCKETS) == 35
    )


def test_client_model_names_are_served_models_or_unknown(
    served: tuple[Metrics, BackendRegistry],
) -> None:
    metrics, _ = served
    for name in ("llama", "no-such-model", "", None, "x" * 500):
        metrics.objective_request(name, name)
    _, samples = exposition(metrics.registry)
    got = {
        dict(labels)["model_name"]: v
        for labels, v in named(samples, "inference_objective_request_total").items()
    }
    assert got == {"llama": 1, "unknown": 4}


def test_without_a_registry_every_model_is_unknown() -> None:
    metrics = Metrics()
    metrics.objective_request("llama", "llama")
    _, samples = exposition(metrics.registry)
    assert (
        value(
            samples,
            "inference_objective_request_total",
            model_name="unknown",
            target_model_name="unknown",
            priority="0",
        )
        == 1
    )


def test_cardinality_cap_puts_later_models_into_other() -> None:
    served_now = {"a", "b", "c"}
    prom = CollectorRegistry()
    objectives = ObjectiveMetrics(prom, max_models=2)
    objectives.known_models = lambda: served_now
    for name in ("a", "b", "c", "a"):
        objectives.request(name, name)
    served_now.clear()  # the models leave the pool: admitted names keep their series
    objectives.request("b", "b")
    objectives.request("c", "c")  # resolved once: stays in "other"
    objectives.request("d", "d")  # never served
    _, samples = exposition(prom)
    got = {
        dict(labels)["model_name"]: v
        for labels, v in named(samples, "inference_objective_request_total").items()
    }
    assert got == {"a": 2, "b": 2, "other": 2, "unknown": 1}


def test_error_codes_are_gies_or_unknown(served: tuple[Metrics, BackendRegistry]) -> None:
    metrics, _ = served
    metrics.objective_error("llama", "llama", "NotFound")
    metrics.objective_error("llama", "llama", "not-a-gie-code")
    metrics.objective_error("nope", "nope", "ResourceExhausted")
    _, samples = exposition(metrics.registry)
    got = {
        (dict(labels)["model_name"], dict(labels)["error_code"]): v
        for labels, v in named(samples, "inference_objective_request_error_total").items()
    }
    assert got == {
        ("llama", "NotFound"): 1,
        ("llama", "Unknown"): 1,
        ("unknown", "ResourceExhausted"): 1,
    }


@pytest.mark.parametrize(
    ("status", "upstream", "code"),
    [
        (200, False, None),
        (302, False, None),
        (400, False, "BadRequest"),
        (413, False, "BadRequest"),
        (404, False, "NotFound"),
        (429, False, "ResourceExhausted"),
        (503, False, "ServiceUnavailable"),
        (500, False, "Internal"),
        (502, False, "Internal"),
        (418, False, "BadRequest"),
        (401, False, "Unauthorized"),
        (403, False, "Forbidden"),
        (200, True, None),
        (500, True, "ModelServerError"),
        (404, True, "ModelServerError"),
    ],
)
def test_error_code_for_status(status: int, upstream: bool, code: str | None) -> None:
    assert error_code(status, upstream=upstream) == code
    assert code is None or code in gie_metrics.ERROR_CODES


def test_nonsense_durations_and_token_counts_are_not_recorded(
    served: tuple[Metrics, BackendRegistry],
) -> None:
    metrics, _ = served
    metrics.objective_duration("llama", "llama", -0.1)
    metrics.objective_duration("llama", "llama", float("nan"))
    metrics.objective_tokens("llama", "llama", None, None)
    metrics.objective_tokens("llama", "llama", 0, 0)
    metrics.objective_tokens("llama", "llama", -3, None)
    metrics.objective_tokens("llama", "llama", None, 7)  # a completion count alone is kept
    _, samples = exposition(metrics.registry)
    assert named(samples, "inference_objective_request_duration_seconds_count") == {}
    assert named(samples, "inference_objective_input_tokens_count") == {}
    assert list(named(samples, "inference_objective_output_tokens_sum").values()) == [7]


def test_running_keeps_the_label_it_started_with() -> None:
    served_now: set[str] = set()
    prom = CollectorRegistry()
    objectives = ObjectiveMetrics(prom)
    objectives.known_models = lambda: served_now
    done = objectives.running("llama")  # not served yet: "unknown"
    served_now.add("llama")  # discovered while the request runs
    done()
    _, samples = exposition(prom)
    assert named(samples, "inference_objective_running_requests") == {
        frozenset({("model_name", "unknown")}): 0
    }


def test_hot_path_reuses_label_children(
    served: tuple[Metrics, BackendRegistry], monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics, _ = served
    metrics.objective_request("llama", "llama")

    def no_lookup() -> Any:
        raise AssertionError("served-model lookup on a cached pair")

    monkeypatch.setattr(metrics.objectives, "known_models", no_lookup)
    metrics.objective_request("llama", "llama")
    metrics.objective_duration("llama", "llama", 0.1)
    assert (
        value(
            exposition(metrics.registry)[1],
            "inference_objective_request_total",
            model_name="llama",
            target_model_name="llama",
            priority="0",
        )
        == 2
    )


def test_pair_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gie_metrics, "_PAIR_CACHE_MAX", 3)
    names = [f"m{i}" for i in range(5)]
    prom = CollectorRegistry()
    objectives = ObjectiveMetrics(prom)
    objectives.known_models = lambda: names
    for a in names:
        objectives.request(a, a)
        assert len(objectives._pairs) <= 3
    objectives.request("m4", "m4")  # after a clear, still counted into its own series
    _, samples = exposition(prom)
    assert (
        value(
            samples,
            "inference_objective_request_total",
            model_name="m4",
            target_model_name="m4",
            priority="0",
        )
        == 2
    )


# -- usage from response bodies ---------------------------------------------------------
def sse(*events: object, done: bool = True) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


CHUNK = {
    "id": "c1",
    "object": "chat.completion.chunk",
    "choices": [{"index": 0, "delta": {"content": "hi"}}],
}
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (orjson.dumps({"id": "x", "choices": [], "usage": USAGE}), (12, 5)),
        (b"  \n" + orjson.dumps({"usage": {"prompt_tokens": 3}}), (3, None)),
        (orjson.dumps({"id": "x", "choices": []}), (None, None)),
        (orjson.dumps({"error": {"message": "boom", "code": 500}}), (None, None)),
        (orjson.dumps({"usage": None}), (None, None)),
        (orjson.dumps({"usage": {"prompt_tokens": True, "completion_tokens": -1}}), (None, None)),
        (orjson.dumps({"usage": {"prompt_tokens": 1.5, "completion_tokens": "7"}}), (None, None)),
        (orjson.dumps([1, 2, 3]), (None, None)),
        # Streaming with stream_options.include_usage: usage null on chunks, then the usage chunk.
        (
            sse(
                {**CHUNK, "usage": None},
                {**CHUNK, "usage": None},
                {"id": "c1", "choices": [], "usage": USAGE},
            ),
            (12, 5),
        ),
        # Without include_usage: no usage anywhere.
        (sse(CHUNK, CHUNK, CHUNK), (None, None)),
        # continuous usage stats: every chunk has usage, the last one wins.
        (
            sse(
                {**CHUNK, "usage": {"prompt_tokens": 12, "completion_tokens": 1}},
                {**CHUNK, "usage": {"prompt_tokens": 12, "completion_tokens": 2}},
            ),
            (12, 2),
        ),
        # A tail that starts mid-event (the caller kept only the last bytes), CRLF line ends.
        (
            b'_tokens": 1}}\r\n\r\ndata: '
            + orjson.dumps({"choices": [], "usage": USAGE})
            + b"\r\n\r\ndata: [DONE]\r\n\r\n",
            (12, 5),
        ),
        (sse({"choices": [], "usage": USAGE}, done=False), (12, 5)),
        (b'{"usage": {"prompt_tokens": 3, "completion', (None, None)),  # truncated JSON body
        (b"data: {not json\n\ndata: [DONE]\n\n", (None, None)),
        (b'data: ["usage", 1]\n\n', (None, None)),
        (
            b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 2\n\n',
            (None, None),
        ),  # truncated event
        (b"", (None, None)),
        (b"\xff\xfe\x00garbage\n\x80", (None, None)),
        (b"<html>502 Bad Gateway</html>", (None, None)),
    ],
)
def test_usage_from_response(body: bytes, expected: tuple[int | None, int | None]) -> None:
    assert usage_from_response(body) == expected


def test_usage_is_looked_for_only_near_the_end_of_a_stream() -> None:
    # A usage chunk followed by many content chunks is not the final usage: not reported.
    body = sse({"choices": [], "usage": USAGE}, *[CHUNK] * 10)
    assert usage_from_response(body) == (None, None)


def test_usage_from_the_wrong_type_does_not_raise() -> None:
    assert usage_from_response("data: {}") == (None, None)  # type: ignore[arg-type]
    assert usage_from_response(None) == (None, None)  # type: ignore[arg-type]


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_usage_like = st.fixed_dictionaries(
    {},
    optional={
        "usage": st.none()
        | st.dictionaries(
            st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens"]),
            _json_values,
            max_size=3,
        )
    },
)


@given(st.binary(max_size=512))
def test_usage_never_raises_on_arbitrary_bytes(body: bytes) -> None:
    p, c = usage_from_response(body)
    assert p is None or (type(p) is int and p >= 0)
    assert c is None or (type(c) is int and c >= 0)


@given(
    st.lists(st.one_of(_usage_like, _json_values), max_size=6), st.booleans(), st.integers(0, 64)
)
def test_usage_never_raises_on_cut_streams(events: list[Any], done: bool, cut: int) -> None:
    body = sse(*events, done=done)
    for piece in (body, body[cut:], body[: len(body) - cut]):
        p, c = usage_from_response(piece)
        assert p is None or (type(p) is int and p >= 0)
        assert c is None or (type(c) is int and c >= 0)
