"""Tests for extproc.metrics_parser: real vLLM captures, synthetic pages, and a property test
that the fast parser agrees with prometheus_client's reference parser."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from extproc import metrics_parser
from extproc.metrics_parser import MetricsParseError, VllmMetrics, parse_vllm_metrics

# Real vLLM captures, kept in the repo (provenance: tests/fixtures/README-vllm-metrics.txt).
FIXTURES_DIR = Path(__file__).resolve().parents[1] / "fixtures"


def fixture_text(name: str) -> str:
    # A missing capture is a broken checkout, never a reason to skip.
    return (FIXTURES_DIR / name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Reference implementation on top of prometheus_client: slow but obviously right, used to check
# the fast parser on the fixtures and on generated pages.
# --------------------------------------------------------------------------------------------


def reference_parse(text: str) -> VllmMetrics | None:
    """Same rules as parse_vllm_metrics, computed from prometheus_client's samples.

    Returns None where the fast parser must raise (no usable running/waiting sample)."""
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    by_name: dict[str, list[Any]] = {}
    for s in samples:
        if s.name.startswith("vllm:"):
            by_name.setdefault(s.name[len("vllm:") :], []).append(s)

    wanted = set(metrics_parser._SLOT_OF)
    models = sorted(
        {
            s.labels["model_name"]
            for n, ss in by_name.items()
            if n in wanted
            for s in ss
            if "model_name" in s.labels
        }
    )

    def values(name: str) -> list[float]:
        return [float(s.value) for s in by_name.get(name, []) if not math.isnan(s.value)]

    def plain_sum(vs: list[float]) -> float:
        # Left to right, no compensation (Python 3.12's sum() compensates): same rounding as
        # the fast parser's running total, so results can be compared exactly.
        acc = 0.0
        for v in vs:
            acc += v
        return acc

    def total(name: str, old: str | None = None) -> float | None:
        vs = values(name) or (values(old) if old else [])
        return plain_sum(vs) if vs else None

    running, waiting = values("num_requests_running"), values("num_requests_waiting")
    if not running and not waiting:
        return None
    kv = values("kv_cache_usage_perc") or values("gpu_cache_usage_perc")

    def to_int(v: str | None) -> int | None:
        try:
            f = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        return int(f) if math.isfinite(f) and f.is_integer() else None

    block_size = None
    blocks_by_engine: dict[str, int | None] = {}
    for s in by_name.get("cache_config_info", []):
        if block_size is None:
            block_size = to_int(s.labels.get("block_size"))
        engine = s.labels.get("engine", "")
        if blocks_by_engine.get(engine) is None:
            blocks_by_engine[engine] = to_int(s.labels.get("num_gpu_blocks"))
    known_blocks = [b for b in blocks_by_engine.values() if b is not None]

    lora: dict[str, str] = {}
    latest = -math.inf
    for s in by_name.get("lora_requests_info", []):
        if not math.isnan(s.value) and s.value >= latest:
            latest, lora = s.value, s.labels

    def adapters(v: str | None) -> tuple[str, ...]:
        return tuple(a.strip() for a in (v or "").split(",") if a.strip())

    http = [
        s
        for s in samples
        if s.name == "http_requests_total"
        and s.labels.get("method") == "POST"
        and not math.isnan(s.value)
    ]
    by_class = {c: [s.value for s in http if s.labels.get("status") == c] for c in ("2xx", "5xx")}
    seen = bool(by_class["2xx"] or by_class["5xx"])

    return VllmMetrics(
        running=plain_sum(running),
        waiting=plain_sum(waiting),
        kv_cache_usage=plain_sum(kv) / len(kv) if kv else None,
        prompt_tokens=total("prompt_tokens_total"),
        generation_tokens=total("generation_tokens_total"),
        ttft_sum=total("time_to_first_token_seconds_sum"),
        ttft_count=total("time_to_first_token_seconds_count"),
        prefix_cache_queries=total("prefix_cache_queries_total", "gpu_prefix_cache_queries_total"),
        prefix_cache_hits=total("prefix_cache_hits_total", "gpu_prefix_cache_hits_total"),
        block_size=block_size,
        num_gpu_blocks=sum(known_blocks) if known_blocks else None,
        models=tuple(models),
        lora_running=adapters(lora.get("running_lora_adapters")),
        lora_waiting=adapters(lora.get("waiting_lora_adapters")),
        post_2xx=plain_sum(by_class["2xx"]) if seen else None,
        post_5xx=plain_sum(by_class["5xx"]) if seen else None,
        max_lora=to_int(lora.get("max_lora")),
    )


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True  # e.g. +Inf + -Inf summed: NaN on both sides
    return a == b


def assert_same_metrics(got: VllmMetrics, want: VllmMetrics) -> None:
    diffs = {
        f.name: (getattr(got, f.name), getattr(want, f.name))
        for f in fields(VllmMetrics)
        if not _same(getattr(got, f.name), getattr(want, f.name))
    }
    assert not diffs, f"fast parser vs reference (got, want): {diffs}"


# --------------------------------------------------------------------------------------------
# Real vLLM 0.32 captures
# --------------------------------------------------------------------------------------------

COMMON_FIXTURE_FIELDS = dict(
    prefix_cache_hits=0.0,
    block_size=128,
    num_gpu_blocks=4096,
    models=("tiny-llama",),
    lora_running=(),
    lora_waiting=(),
    max_lora=None,
)

FIXTURE_CASES = [
    pytest.param(
        "vllm-metrics-real.txt",
        dict(
            running=0.0,
            waiting=0.0,
            kv_cache_usage=0.0,
            prompt_tokens=288.0,
            generation_tokens=2077.0,
            ttft_sum=0.29729700088500977,
            ttft_count=20.0,
            prefix_cache_queries=288.0,
            post_2xx=20.0,
            post_5xx=0.0,
        ),
        id="idle",
    ),
    pytest.param(
        "vllm-metrics-real-busy.txt",
        dict(
            running=8.0,
            waiting=0.0,
            kv_cache_usage=0.003907203907203893,
            prompt_tokens=368.0,
            generation_tokens=3454.0,
            ttft_sum=0.408794641494751,
            ttft_count=28.0,
            prefix_cache_queries=368.0,
            post_2xx=20.0,
            post_5xx=0.0,
        ),
        id="busy",
    ),
    pytest.param(
        "vllm-metrics-real-queued.txt",
        dict(
            running=4.0,
            waiting=8.0,
            kv_cache_usage=0.0009768009768009733,
            prompt_tokens=44.0,
            generation_tokens=417.0,
            ttft_sum=0.191756010055542,
            ttft_count=4.0,
            prefix_cache_queries=44.0,
        ),
        id="queued",
    ),
]


@pytest.mark.parametrize(("fixture", "expected"), FIXTURE_CASES)
def test_real_vllm_pages(fixture: str, expected: dict[str, object]) -> None:
    got = parse_vllm_metrics(fixture_text(fixture))
    assert got == VllmMetrics(**expected, **COMMON_FIXTURE_FIELDS)  # type: ignore[arg-type]


@pytest.mark.parametrize("fixture", [p.values[0] for p in FIXTURE_CASES])
def test_real_vllm_pages_agree_with_prometheus_client(fixture: str) -> None:
    text = fixture_text(fixture)
    want = reference_parse(text)
    assert want is not None
    assert_same_metrics(parse_vllm_metrics(text), want)


@pytest.mark.parametrize("fixture", [p.values[0] for p in FIXTURE_CASES])
def test_real_pages_with_cold_label_cache(fixture: str) -> None:
    # The label cache is a speed-up only: a cold parse and a warm parse agree.
    text = fixture_text(fixture)
    warm = parse_vllm_metrics(text)
    metrics_parser._LABEL_CACHE.clear()
    assert parse_vllm_metrics(text) == warm


# --------------------------------------------------------------------------------------------
# Synthetic pages
# --------------------------------------------------------------------------------------------

TWO_ENGINES = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 5.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 100.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 10.0
vllm:prompt_tokens_total{engine="1",model_name="m"} 20.0
vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e+09
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 100.0
vllm:generation_tokens_total{engine="1",model_name="m"} 200.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.5
vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 6.0
vllm:time_to_first_token_seconds_count{engine="1",model_name="m"} 6.0
vllm:time_to_first_token_seconds_sum{engine="1",model_name="m"} 1.5
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 50.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 70.0
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 5.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 7.0
# TYPE vllm:external_prefix_cache_hits_total counter
vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 999.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000",num_cpu_blocks="None"} 1.0
vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="1500",num_cpu_blocks="None"} 1.0
"""

OLD_NAMES = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="old"} 2.0
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="old"} 9.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="old"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="old"} 0.5
# TYPE vllm:gpu_prefix_cache_queries_total counter
vllm:gpu_prefix_cache_queries_total{model_name="old"} 40.0
# TYPE vllm:gpu_prefix_cache_hits_total counter
vllm:gpu_prefix_cache_hits_total{model_name="old"} 4.0
# TYPE vllm:gpu_prefix_cache_hit_rate gauge
vllm:gpu_prefix_cache_hit_rate{model_name="old"} 0.1
"""

# Transitional versions expose both names: the new one wins, they are not added together.
NEW_AND_OLD = """\
vllm:num_requests_running{model_name="m"} 1
vllm:kv_cache_usage_perc{model_name="m"} 0.2
vllm:gpu_cache_usage_perc{model_name="m"} 0.9
vllm:prefix_cache_queries_total{model_name="m"} 10
vllm:gpu_prefix_cache_queries_total{model_name="m"} 99
vllm:gpu_prefix_cache_hits_total{model_name="m"} 3
"""

LORA_TWO_SAMPLES = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 1.0
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora,chat-lora",\
waiting_lora_adapters=""} 1.7200000050e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",\
waiting_lora_adapters="old-lora"} 1.72e+09
"""

LORA_EMPTY = """\
vllm:num_requests_waiting{model_name="m"} 0.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7e+09
"""

# Nasty but legal: '}' ',' '"' '\\' '\n' inside label values, blanks, a trailing timestamp,
# CRLF line ends, an exemplar, a sample on the first line, names that share a prefix.
TRICKY = (
    'vllm:num_requests_running{model_name="a,b}c",engine="0"} 2 1700000000000\r\n'
    "# HELP vllm:num_requests_waiting mentions vllm:num_requests_running 99 in text\r\n"
    'vllm:num_requests_waiting { model_name = "q\\"uote\\\\d\\nnl" , engine="0" , } 3.5\r\n'
    'vllm:num_requests_waiting_extra{model_name="zz"} 77\r\n'
    'vllm:kv_cache_usage_perc{model_name="a,b}c"}\t0.5\t1700000000000\r\n'
    'vllm:prompt_tokens_total{model_name="a,b}c"} 12 # {trace_id="x"} 1.0\r\n'
    "vllm:generation_tokens_total 7\r\n"
    "  vllm:time_to_first_token_seconds_count 2\r\n"
    'vllm:lora_requests_info{running_lora_adapters="x, y,",max_lora="1",'
    'waiting_lora_adapters="z"} 5\r\n'
)

MINIMAL = 'vllm:num_requests_running{engine="0",model_name="m"} 1.0\n'


def _m(**overrides: Any) -> VllmMetrics:
    base: dict[str, Any] = dict(
        running=0.0,
        waiting=0.0,
        kv_cache_usage=None,
        prompt_tokens=None,
        generation_tokens=None,
        ttft_sum=None,
        ttft_count=None,
        prefix_cache_queries=None,
        prefix_cache_hits=None,
        block_size=None,
        num_gpu_blocks=None,
        models=(),
        lora_running=(),
        lora_waiting=(),
        max_lora=None,
    )
    base.update(overrides)
    return VllmMetrics(**base)


SYNTHETIC_CASES = [
    pytest.param(
        TWO_ENGINES,
        _m(
            running=8.0,
            waiting=3.0,
            kv_cache_usage=0.5,
            prompt_tokens=30.0,
            generation_tokens=300.0,
            ttft_sum=2.0,
            ttft_count=10.0,
            prefix_cache_queries=120.0,
            prefix_cache_hits=12.0,
            block_size=16,
            num_gpu_blocks=2500,
            models=("m",),
        ),
        id="two-engines-summed-kv-mean",
    ),
    pytest.param(
        OLD_NAMES,
        _m(
            running=2.0,
            waiting=1.0,
            kv_cache_usage=0.5,
            prefix_cache_queries=40.0,
            prefix_cache_hits=4.0,
            models=("old",),
        ),
        id="old-names",
    ),
    pytest.param(
        NEW_AND_OLD,
        _m(
            running=1.0,
            kv_cache_usage=0.2,
            prefix_cache_queries=10.0,
            prefix_cache_hits=3.0,
            models=("m",),
        ),
        id="new-name-wins-over-old",
    ),
    pytest.param(
        LORA_TWO_SAMPLES,
        _m(running=1.0, models=("m",), lora_running=("sql-lora", "chat-lora"), max_lora=4),
        id="lora-latest-sample-wins",
    ),
    pytest.param(
        LORA_TWO_SAMPLES.replace("1.7200000050e+09", "1.71e+09"),
        _m(running=1.0, models=("m",), lora_waiting=("old-lora",), max_lora=4),
        id="lora-latest-sample-wins-other-order",
    ),
    pytest.param(
        LORA_TWO_SAMPLES.replace("1.7200000050e+09", "1.72e+09"),
        _m(running=1.0, models=("m",), lora_waiting=("old-lora",), max_lora=4),
        id="lora-tie-later-line-wins",
    ),
    pytest.param(LORA_EMPTY, _m(models=("m",), max_lora=2), id="lora-empty-adapter-lists"),
    pytest.param(MINIMAL, _m(running=1.0, models=("m",)), id="optional-metrics-missing"),
    pytest.param(
        TRICKY,
        _m(
            running=2.0,
            waiting=3.5,
            kv_cache_usage=0.5,
            prompt_tokens=12.0,
            generation_tokens=7.0,
            ttft_count=2.0,
            models=("a,b}c", 'q"uote\\d\nnl'),
            lora_running=("x", "y"),
            lora_waiting=("z",),
            max_lora=1,
        ),
        id="escapes-commas-braces-timestamps-crlf",
    ),
    pytest.param(
        MINIMAL + 'vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1.0\n',
        _m(running=1.0, models=("m",), block_size=16),
        id="num-gpu-blocks-None",
    ),
    pytest.param(
        MINIMAL
        + 'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="64"} 1\n'
        + 'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="64"} 1\n',
        _m(running=1.0, models=("m",), block_size=16, num_gpu_blocks=64),
        id="cache-config-duplicate-engine-counted-once",
    ),
    pytest.param(
        "vllm:num_requests_running NaN\nvllm:num_requests_waiting 2\n"
        'vllm:kv_cache_usage_perc NaN\nvllm:prompt_tokens_total{engine="0"} NaN\n'
        'vllm:prompt_tokens_total{engine="1"} 5\n',
        _m(waiting=2.0, prompt_tokens=5.0),
        id="nan-is-missing",
    ),
    pytest.param(
        "vllm:num_requests_running +Inf\nvllm:kv_cache_usage_perc -Inf\n",
        _m(running=math.inf, kv_cache_usage=-math.inf),
        id="inf-is-kept",
    ),
]


@pytest.mark.parametrize(("page", "expected"), SYNTHETIC_CASES)
def test_synthetic_pages(page: str, expected: VllmMetrics) -> None:
    got = parse_vllm_metrics(page)
    assert got == expected
    want = reference_parse(page)
    assert want is not None
    assert_same_metrics(got, want)


BAD_PAGES = [
    pytest.param("", "empty", id="empty"),
    pytest.param(" \n\t\n", "empty", id="whitespace-only"),
    pytest.param(
        "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>", "HTML", id="html"
    ),
    pytest.param("\n  <html>vllm:num_requests_running 3</html>", "HTML", id="html-with-name"),
    pytest.param('{"detail":"Not Found"}', "no vllm:num_requests_running", id="json-error"),
    pytest.param("\x00\x01garbage \xff\n!!", "no vllm:num_requests_running", id="garbage"),
    pytest.param(
        '# HELP python_info x\npython_info{version="3.11"} 1.0\n',
        "no vllm:num_requests_running",
        id="prometheus-but-not-vllm",
    ),
    pytest.param(
        "vllm:num_requests_running NaN\nvllm:num_requests_waiting NaN\n",
        "no vllm:num_requests_running",
        id="only-nan",
    ),
    pytest.param(
        'vllm:num_requests_running{engine="0 1.0\n', "malformed sample line", id="unclosed-quote"
    ),
    pytest.param("vllm:num_requests_running\n", "malformed sample line", id="no-value"),
    pytest.param("vllm:num_requests_running{} abc\n", "invalid value", id="bad-value"),
    pytest.param("vllm:num_requests_running 1_000\n", "invalid value", id="underscore-value"),
    pytest.param("vllm:num_requests_running 1 2 3\n", "malformed sample line", id="extra-token"),
    pytest.param(
        "vllm:num_requests_running{engine=0} 1\n", "malformed label set", id="unquoted-label"
    ),
    pytest.param(
        'vllm:num_requests_running{a="1" b="2"} 1\n', "malformed label set", id="missing-comma"
    ),
    pytest.param(
        'vllm:num_requests_running{a="1",a="2"} 1\n', "duplicate label", id="duplicate-label"
    ),
]


@pytest.mark.parametrize(("page", "message"), BAD_PAGES)
def test_bad_pages_raise(page: str, message: str) -> None:
    with pytest.raises(MetricsParseError, match=message):
        parse_vllm_metrics(page)


def test_parse_error_is_value_error() -> None:
    assert issubclass(MetricsParseError, ValueError)


def test_only_running_present_defaults_waiting_to_zero() -> None:
    m = parse_vllm_metrics("vllm:num_requests_running 4\n")
    assert (m.running, m.waiting) == (4.0, 0.0)


def test_unwanted_malformed_lines_are_not_looked_at() -> None:
    # Narrow on purpose: lines of metrics we do not read are never parsed (that is the speed-up).
    page = MINIMAL + "vllm:some_other_metric{broken 1 2 3\nhttp_requests_total{{{ x\n"
    assert parse_vllm_metrics(page).running == 1.0


def test_label_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_parser, "_LABEL_CACHE_MAX", 8)
    metrics_parser._LABEL_CACHE.clear()
    for i in range(50):
        m = parse_vllm_metrics(f'vllm:num_requests_running{{model_name="m{i}"}} {i}\n')
        assert m.models == (f"m{i}",) and m.running == float(i)
        assert len(metrics_parser._LABEL_CACHE) <= 8


def test_result_is_frozen() -> None:
    m = parse_vllm_metrics(MINIMAL)
    with pytest.raises(AttributeError):
        m.running = 2.0  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Property test: fast parser == prometheus_client on generated pages
# --------------------------------------------------------------------------------------------

# Every name the fast parser reads, plus look-alikes it must NOT read.
WANTED_GAUGES = [
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage_perc",
    "gpu_cache_usage_perc",
]
WANTED_COUNTERS = [
    "prompt_tokens_total",
    "generation_tokens_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "gpu_prefix_cache_queries_total",
    "gpu_prefix_cache_hits_total",
]
DISTRACTORS = [
    "num_requests_waiting_by_reason",
    "num_requests_swapped",
    "external_prefix_cache_queries_total",
    "prompt_tokens_cached_total",
    "prompt_tokens_total_x",
    "kv_cache_usage_perc2",
    "lora_requests_info_total",
]

# Label values: anything but surrogates and '\r' (prometheus_client reads lines split on '\n'
# only and a raw CR is not a legal unescaped char for the fast parser), biased towards the
# characters that break naive parsers.
# (A one_of() alphabet is not enough: hypothesis then draws a '"' in only ~2% of values.)
label_values = st.one_of(
    st.text(alphabet=',}{"\\\n= #\tab-', max_size=12),
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\r"),  # no surrogates
        max_size=12,
    ),
)
adapter_lists = st.lists(
    st.text(alphabet="abcxyz-_ 0123456789", min_size=0, max_size=6), max_size=3
).map(",".join)

number_texts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.sampled_from(["NaN", "+Inf", "-Inf", "0", "1e+09", "0.5", "-0.0"]),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@st.composite
def sample_lines(
    draw: st.DrawFn,
    name: str,
    engines: list[str],
    model: str,
    extra: dict[str, str] | None = None,
    value: st.SearchStrategy[str] = number_texts,
) -> list[str]:
    lines = []
    for engine in engines:
        labels = {"engine": engine, "model_name": model, **(extra or {})}
        items = list(labels.items())
        if draw(st.booleans()):
            items.reverse()
        body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
        sep = draw(st.sampled_from([" ", "\t"]))  # one separator kind per line
        ts = draw(st.one_of(st.none(), st.integers(0, 2**41).map(str)))
        lines.append(f"vllm:{name}{{{body}}}{sep}{draw(value)}" + (f"{sep}{ts}" if ts else ""))
    return lines


@st.composite
def vllm_pages(draw: st.DrawFn) -> str:
    n_engines = draw(st.integers(1, 3))
    engines = [str(i) for i in range(n_engines)]
    model = draw(st.one_of(st.just("tiny-llama"), label_values))
    families: list[list[str]] = []

    def family(name: str, typ: str, lines: list[str]) -> None:
        families.append(
            [
                f"# HELP vllm:{name} help mentioning vllm:num_requests_running",
                f"# TYPE vllm:{name} {typ}",
                *lines,
            ]
        )

    for name in WANTED_GAUGES + DISTRACTORS:
        if draw(st.booleans()):
            family(name, "gauge", draw(sample_lines(name, engines, model)))
    for name in WANTED_COUNTERS:
        if draw(st.booleans()):
            family(name, "counter", draw(sample_lines(name, engines, model)))
    if draw(st.booleans()):
        lines = []
        for suffix in ("_bucket", "_count", "_sum"):
            extra = {"le": "+Inf"} if suffix == "_bucket" else None
            name = "time_to_first_token_seconds" + suffix
            lines += draw(sample_lines(name, engines, model, extra))
        family("time_to_first_token_seconds", "histogram", lines)
    if draw(st.booleans()):
        nums = st.one_of(st.integers(1, 4096).map(str), st.just("None"), st.just("16.0"))
        lines = []
        # Sometimes a repeated engine: only its first usable num_gpu_blocks may count.
        for engine in draw(st.lists(st.sampled_from(engines), min_size=1, max_size=4)):
            extra = {
                "block_size": draw(nums),
                "num_gpu_blocks": draw(nums),
                "junk": draw(label_values),
            }
            lines += draw(
                sample_lines("cache_config_info", [engine], model, extra, value=st.just("1.0"))
            )
        family("cache_config_info", "gauge", lines)
    if draw(st.booleans()):
        lines = []
        for _ in range(draw(st.integers(1, 3))):
            extra = {
                "running_lora_adapters": draw(adapter_lists),
                "waiting_lora_adapters": draw(adapter_lists),
                "max_lora": draw(st.sampled_from(["1", "4", "None"])),
            }
            # Few distinct timestamps, so that ties (the later line wins) do happen.
            stamps = st.one_of(st.sampled_from(["1.7e+09", "1.8e+09", "NaN"]), number_texts)
            lines += draw(sample_lines("lora_requests_info", engines[:1], model, extra, stamps))
        family("lora_requests_info", "gauge", lines)
    families.append(
        [
            "# HELP process_open_fds Number of open file descriptors.",
            "# TYPE process_open_fds gauge",
            "process_open_fds 42.0",
        ]
    )

    order = draw(st.permutations(range(len(families))))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(line for i in order for line in families[i]) + newline


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(page=vllm_pages())
def test_agrees_with_prometheus_client(page: str) -> None:
    want = reference_parse(page)
    if want is None:
        with pytest.raises(MetricsParseError):
            parse_vllm_metrics(page)
        return
    assert_same_metrics(parse_vllm_metrics(page), want)
