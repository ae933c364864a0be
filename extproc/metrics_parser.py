"""Fast, narrow parser for a vLLM server's Prometheus ``/metrics`` page.

The scraper fetches every backend's page every 100 ms, so this runs on a hot path: a real vLLM
0.32 page is ~52 KB / ~620 lines, of which the router needs about a dozen samples.
``prometheus_client.parser`` builds every family and sample in Python and takes ~12-22 ms per
page on the 2-core reference machine; this parser takes ~0.1 ms (``bench/bench_parse.py``,
results in bench/results/parse.md). The budget is 2 ms.

Approach (alternatives are timed by bench/bench_parse.py): one precompiled regex scans the whole
text once for line starts of the *few* wanted metric names; "\\n" is its literal prefix, so
``re`` hops from line to line in C (a ``^`` + re.MULTILINE version is ~6x slower, one
``str.find`` per name or a ``split("\\n")`` loop ~3x). The same match captures the label block,
value and optional timestamp. Labels are parsed only for the matched lines, and each distinct
label block only once (see _LABEL_CACHE). Every other line (HELP/TYPE comments, histogram
buckets, http_*/python_* families) is never looked at in Python.

Consequences of being narrow, on purpose:
- A malformed line of a *wanted* metric raises :class:`MetricsParseError`; a malformed line of
  any other metric goes unnoticed (a full validation would cost the full parse we avoid).
- ``models`` holds the ``model_name`` values of the wanted lines only; vLLM puts ``model_name``
  on every ``vllm:*`` sample, so this is the served model(s).
- Label names must be unquoted (classic text format); vLLM never emits quoted UTF-8 names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import chain

__all__ = ["MetricsParseError", "VllmMetrics", "parse_vllm_metrics"]


@dataclass(frozen=True, slots=True)
class VllmMetrics:
    running: float  # vllm:num_requests_running, summed over the engine label
    waiting: float  # vllm:num_requests_waiting, summed
    kv_cache_usage: float | None  # vllm:kv_cache_usage_perc (0..1), MEAN over engines
    prompt_tokens: float | None  # vllm:prompt_tokens_total (counter), summed
    generation_tokens: float | None  # vllm:generation_tokens_total, summed
    ttft_sum: float | None  # vllm:time_to_first_token_seconds_sum, summed
    ttft_count: float | None  # vllm:time_to_first_token_seconds_count, summed
    prefix_cache_queries: float | None  # vllm:prefix_cache_queries_total, summed
    prefix_cache_hits: float | None  # vllm:prefix_cache_hits_total, summed
    block_size: int | None  # vllm:cache_config_info{block_size=...}
    num_gpu_blocks: int | None  # vllm:cache_config_info{num_gpu_blocks=...}, summed over engines
    models: tuple[str, ...]  # distinct model_name label values seen, sorted
    lora_running: tuple[str, ...]  # vllm:lora_requests_info{running_lora_adapters} of latest sample
    lora_waiting: tuple[str, ...]  # ... waiting_lora_adapters
    max_lora: int | None  # ... max_lora
    # http_requests_total{method="POST"} by status class (prometheus-fastapi-instrumentator in
    # vLLM's API server): a server that fails every request fast looks idle in vllm:* gauges.
    post_2xx: float | None = None
    post_5xx: float | None = None


class MetricsParseError(ValueError):
    """The body is not a usable vLLM Prometheus page (empty, HTML, garbage, malformed line)."""


# Slots in the accumulator lists. Old (pre-0.10 / V0) names get their own slot so the new name
# wins when a transitional vLLM exposes both, instead of the two being added together.
_RUNNING, _WAITING, _KV, _KV_OLD, _PROMPT, _GEN, _TTFT_SUM, _TTFT_COUNT = range(8)
_PQ, _PQ_OLD, _PH, _PH_OLD, _CACHE_CONFIG, _LORA = range(8, 14)
_NSLOTS = 14

# Metric name (without the "vllm:" prefix) -> slot. vllm:num_requests_swapped is deliberately
# absent: V1 engines no longer swap and the router has no use for it.
_SLOT_OF: dict[str, int] = {
    "num_requests_running": _RUNNING,
    "num_requests_waiting": _WAITING,
    "kv_cache_usage_perc": _KV,
    "gpu_cache_usage_perc": _KV_OLD,
    "prompt_tokens_total": _PROMPT,
    "generation_tokens_total": _GEN,
    "time_to_first_token_seconds_sum": _TTFT_SUM,
    "time_to_first_token_seconds_count": _TTFT_COUNT,
    "prefix_cache_queries_total": _PQ,
    "gpu_prefix_cache_queries_total": _PQ_OLD,
    "prefix_cache_hits_total": _PH,
    "gpu_prefix_cache_hits_total": _PH_OLD,
    "cache_config_info": _CACHE_CONFIG,
    "lora_requests_info": _LORA,
}

# Pieces of the sample-line grammar (Prometheus text format 0.0.4, lines as prometheus_client
# writes them, plus the blanks/timestamps/CRLF other writers may add).
# A quoted label value: any char but quote/backslash/newline, or a backslash escape. This is what
# keeps commas, '}' and escaped quotes inside values from ending the value or the label block.
_QVALUE = r'"(?:[^"\\\r\n]++|\\.)*+"'
_LNAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
# Label block body: unquoted chars other than '}' or quoted values. Possessive quantifiers keep a
# malformed line (e.g. an unclosed quote) linear instead of backtracking.
_BODY = r'(?:[^"}\r\n]++|' + _QVALUE + r")*+"
_NAMES_ALT = "|".join(sorted(_SLOT_OF, key=len, reverse=True))
# After the name: `(?![\w:])` stops vllm:num_requests_waiting from matching the start of
# vllm:num_requests_waiting_by_reason. The tail is optional so that a wanted line which does not
# fit the grammar still matches with group 'value' = None and is reported, not skipped silently.
_SAMPLE_TAIL = (
    r"(?![\w:])"
    r"(?:(?:[ \t]*+\{(?P<labels>" + _BODY + r")\})?"
    r"[ \t]++(?P<value>[^ \t\r\n]++)"
    r"(?:[ \t]++[-+]?[0-9][0-9.eE+-]*+)?"  # optional timestamp (ignored)
    r"(?:[ \t]++#[^\r\n]*+)?"  # optional OpenMetrics exemplar (ignored)
    r"[ \t]*+\r?(?=\n|\Z))?"
)
# http_requests_total lines (not a vllm:* family): read leniently, a line that does not fit is
# skipped, never an error (the page is still a usable vLLM page). Groups 'http' and 'hvalue'.
_HTTP_LINE = r"http_requests_total\{(?P<http>[^}\r\n]*)\}[ \t]+(?P<hvalue>[^ \t\r\n]+)"
# Lines after the first: the literal "\n" prefix lets `re` search in C without entering the
# matcher at every position (a `^` + re.MULTILINE version measured 6-8x slower). Both kinds of
# line in ONE pass over the page (a second pass for http_requests_total cost ~20 % more).
_SAMPLE_RE = re.compile(
    r"\n(?:[ \t]*+vllm:(?P<name>" + _NAMES_ALT + r")" + _SAMPLE_TAIL + "|" + _HTTP_LINE + ")"
)
# The very first line has no "\n" before it; checked once with .match() (vllm:* only).
_FIRST_SAMPLE_RE = re.compile(r"[ \t]*+vllm:(?P<name>" + _NAMES_ALT + r")" + _SAMPLE_TAIL)

_HTTP_STATUS_RE = re.compile(r'status="([1-5])xx"')
# label block -> status class digit of a POST request, or "" for anything else.
_HTTP_CLASS_CACHE: dict[str, str] = {}

_PAIR = _LNAME + r"[ \t]*=[ \t]*" + _QVALUE
_LABELS_VALID_RE = re.compile(
    r"[ \t]*(?:" + _PAIR + r"[ \t]*(?:,[ \t]*" + _PAIR + r"[ \t]*)*(?:,[ \t]*)?)?"
)
_LABEL_PAIR_RE = re.compile(r"(" + _LNAME + r')[ \t]*=[ \t]*"((?:[^"\\\r\n]|\\.)*)"')
_ESCAPE_RE = re.compile(r"\\(.)")
# Same unescaping as prometheus_client: only \\, \n and \" are escapes; others stay verbatim.
_UNESCAPE = {"\\": "\\", "n": "\n", '"': '"'}


def _unescape(match: re.Match[str]) -> str:
    return _UNESCAPE.get(match.group(1), match.group(0))


# Parsed label blocks, shared across calls. A server's label blocks are the same scrape after
# scrape (engine="0",model_name="..."; the 1 KB cache_config_info block costs ~30 us to parse
# and never changes), so steady-state parsing skips label parsing entirely. Bounded by clearing
# when full: only a churn of lora_requests_info label sets or thousands of backends reach it.
# The cached dicts are never handed out or mutated, so sharing them is safe.
_LABEL_CACHE: dict[str, dict[str, str]] = {}
_LABEL_CACHE_MAX = 1024


def _parse_labels(body: str, line: str) -> dict[str, str]:
    if _LABELS_VALID_RE.fullmatch(body) is None:
        raise MetricsParseError(f"malformed label set in sample line: {line[:200]!r}")
    pairs = _LABEL_PAIR_RE.findall(body)
    labels: dict[str, str] = {}
    for key, value in pairs:
        labels[key] = _ESCAPE_RE.sub(_unescape, value) if "\\" in value else value
    if len(labels) != len(pairs):
        raise MetricsParseError(f"duplicate label name in sample line: {line[:200]!r}")
    if len(_LABEL_CACHE) >= _LABEL_CACHE_MAX:
        _LABEL_CACHE.clear()
    _LABEL_CACHE[body] = labels
    return labels


def _to_int(value: str | None) -> int | None:
    """Info-metric label -> int; vLLM writes "None" for unset config values."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        as_float = float(value)
    except ValueError:
        return None
    if math.isfinite(as_float) and as_float.is_integer():
        return int(as_float)
    return None


def _adapters(value: str | None) -> tuple[str, ...]:
    # vLLM joins adapter names with ","; an idle server writes "" (-> no adapters).
    if not value:
        return ()
    return tuple(name for name in (part.strip() for part in value.split(",")) if name)


def _preview(text: str) -> str:
    return repr(text[:80])


def parse_vllm_metrics(text: str) -> VllmMetrics:
    """Extract the routing-relevant numbers from a vLLM ``/metrics`` body.

    Sums every series of a metric (i.e. over the data-parallel ``engine`` label), except KV-cache
    usage which is averaged. NaN samples count as absent (+/-Inf are kept); an optional metric
    with no usable sample is None, and if only one of running/waiting is there the other is 0.0.
    Raises :class:`MetricsParseError` if the body is empty, HTML, has no usable
    ``vllm:num_requests_running`` nor ``vllm:num_requests_waiting`` sample, or if a line of one
    of the wanted metrics is malformed.
    """
    # lstrip returns the same object when there is nothing to strip, so this is O(1) on real pages.
    head = text.lstrip()
    if not head:
        raise MetricsParseError("empty /metrics body")
    if head[0] == "<":
        raise MetricsParseError(f"/metrics body is HTML, not Prometheus text: {_preview(head)}")

    sums = [0.0] * _NSLOTS
    counts = [0] * _NSLOTS
    models: set[str] = set()
    label_cache = _LABEL_CACHE
    # cache_config_info: engine -> num_gpu_blocks, so a duplicated series is not counted twice.
    gpu_blocks_by_engine: dict[str, int | None] = {}
    block_size: int | None = None
    lora_labels: dict[str, str] | None = None
    lora_latest = -math.inf
    http_lines: list[tuple[str, str]] = []

    # The first line has no "\n" before it, so _SAMPLE_RE cannot see it; on a real page (which
    # starts with "# HELP") _FIRST_SAMPLE_RE fails on the first character.
    first = _FIRST_SAMPLE_RE.match(text)
    matches = _SAMPLE_RE.finditer(text)
    for match in matches if first is None else chain((first,), matches):
        name, body, raw_value = match.group(1, 2, 3)  # name, labels, value
        if name is None:  # an http_requests_total line
            http_lines.append((match.group(4), match.group(5)))
            continue
        if raw_value is None:
            end = text.find("\n", match.start() + 1)
            line = text[match.start() : end if end >= 0 else len(text)].strip()
            raise MetricsParseError(f"malformed sample line for vllm:{name}: {line[:200]!r}")
        # prometheus_client rejects '_' in values; Python's float() would accept "1_0".
        if "_" in raw_value:
            raise MetricsParseError(f"invalid value {raw_value!r} for vllm:{name}")
        try:
            value = float(raw_value)
        except ValueError:
            raise MetricsParseError(f"invalid value {raw_value!r} for vllm:{name}") from None

        if body:
            labels = label_cache.get(body)
            if labels is None:
                labels = _parse_labels(body, match.group(0))
            model = labels.get("model_name")
            if model is not None:
                models.add(model)
        else:
            labels = {}

        slot = _SLOT_OF[name]
        if slot == _CACHE_CONFIG:
            # Info metric: the value is always 1; the payload is in the labels.
            if block_size is None:
                block_size = _to_int(labels.get("block_size"))
            engine = labels.get("engine", "")
            if gpu_blocks_by_engine.get(engine) is None:
                gpu_blocks_by_engine[engine] = _to_int(labels.get("num_gpu_blocks"))
            continue
        if value != value:  # noqa: PLR0124 -- NaN (cheaper than math.isnan): absent
            continue
        if slot == _LORA:
            # The value is the time the label set was last current; the newest one is the state
            # now (older label sets linger as stale series). Ties: the later line wins.
            if value >= lora_latest:
                lora_latest = value
                lora_labels = labels
            continue
        sums[slot] += value
        counts[slot] += 1

    if counts[_RUNNING] == 0 and counts[_WAITING] == 0:
        raise MetricsParseError(
            "no vllm:num_requests_running or vllm:num_requests_waiting sample "
            f"(not a vLLM /metrics page?); body starts with {_preview(head)}"
        )

    def total(slot: int, old_slot: int | None = None) -> float | None:
        if counts[slot]:
            return sums[slot]
        if old_slot is not None and counts[old_slot]:
            return sums[old_slot]
        return None

    if counts[_KV]:
        kv_cache_usage: float | None = sums[_KV] / counts[_KV]
    elif counts[_KV_OLD]:
        kv_cache_usage = sums[_KV_OLD] / counts[_KV_OLD]
    else:
        kv_cache_usage = None

    known_blocks = [b for b in gpu_blocks_by_engine.values() if b is not None]
    lora = lora_labels or {}
    post_2xx, post_5xx = _post_requests(http_lines)
    return VllmMetrics(
        running=sums[_RUNNING],
        waiting=sums[_WAITING],
        kv_cache_usage=kv_cache_usage,
        prompt_tokens=total(_PROMPT),
        generation_tokens=total(_GEN),
        ttft_sum=total(_TTFT_SUM),
        ttft_count=total(_TTFT_COUNT),
        prefix_cache_queries=total(_PQ, _PQ_OLD),
        prefix_cache_hits=total(_PH, _PH_OLD),
        block_size=block_size,
        num_gpu_blocks=sum(known_blocks) if known_blocks else None,
        models=tuple(sorted(models)),
        lora_running=_adapters(lora.get("running_lora_adapters")),
        lora_waiting=_adapters(lora.get("waiting_lora_adapters")),
        max_lora=_to_int(lora.get("max_lora")),
        post_2xx=post_2xx,
        post_5xx=post_5xx,
    )


def _post_requests(lines: list[tuple[str, str]]) -> tuple[float | None, float | None]:
    """Sum of http_requests_total{method="POST"} with status 2xx and 5xx (None if absent), from
    the (label block, value) of each line."""
    ok = err = 0.0
    seen = False
    cache = _HTTP_CLASS_CACHE
    for body, raw in lines:
        cls = cache.get(body)
        if cls is None:
            status = _HTTP_STATUS_RE.search(body)
            cls = status.group(1) if status and 'method="POST"' in body else ""
            if len(cache) >= _LABEL_CACHE_MAX:
                cache.clear()
            cache[body] = cls
        if cls not in ("2", "5"):
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if value != value:  # noqa: PLR0124 -- NaN
            continue
        seen = True
        if cls == "2":
            ok += value
        else:
            err += value
    return (ok, err) if seen else (None, None)
