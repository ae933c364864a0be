"""deploy/grafana/extproc-dashboard.json: loads, is wired to a datasource variable, and every
series its PromQL names exists - in the service's real /metrics exposition, or in the Gateway API
Inference Extension's documented list - with the labels the queries group by."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extproc.backends import BackendRegistry
from extproc.observability import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "extproc-dashboard.json"

# The GIE endpoint picker's series (site-src/guides/metrics-and-observability.md of release
# v1.5.0) with their label names; extproc/gie_metrics.py exports them under the same names.
GIE_SERIES: dict[str, set[str]] = {
    "inference_pool_average_kv_cache_utilization": {"name"},
    "inference_pool_average_queue_size": {"name"},
    "inference_pool_average_running_requests": {"name"},
    "inference_pool_ready_pods": {"name"},
    "inference_pool_per_pod_queue_size": {"name", "model_server_pod"},
    "inference_objective_request_total": {"model_name", "target_model_name"},
    "inference_objective_request_error_total": {"model_name", "target_model_name", "error_code"},
    "inference_objective_running_requests": {"model_name"},
}
GIE_HISTOGRAMS: dict[str, set[str]] = {
    "inference_objective_request_duration_seconds": {"model_name", "target_model_name"},
    "inference_objective_input_tokens": {"model_name", "target_model_name"},
    "inference_objective_output_tokens": {"model_name", "target_model_name"},
    "inference_objective_request_sizes": {"model_name", "target_model_name"},
    "inference_objective_response_sizes": {"model_name", "target_model_name"},
}
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
SCRAPE_LABELS = {"job", "instance", "le"}

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def _series(family_name: str, kind: str, labels: set[str]) -> dict[str, set[str]]:
    names = {family_name + s: set(labels) for s in _SUFFIXES.get(kind, ("",))}
    if kind == "histogram":
        names[family_name + "_bucket"].add("le")
    return names


def exposed_series() -> dict[str, set[str]]:
    """Series name -> label names, from the service's real exposition (metrics exercised once)."""
    metrics = Metrics()
    backends = BackendRegistry(stale_after=1.0, max_metrics_age=5.0)
    backends.set_backends(["http://10.0.0.1:8000"])
    metrics.attach_backends(backends)
    # One of each labelled event, so that the families show their label names.
    metrics.decided("weighted", "metrics", 1e-4)
    metrics.rejected("no-backends")
    metrics.scraped("10.0.0.1:8000", "ok")
    metrics.task_error("scraper")
    metrics.handler_error()
    metrics.loop_lag(0.01)
    metrics.serving.set(1)
    metrics.served("pick")
    text = generate_latest(metrics.registry).decode()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        labels = {k for s in family.samples for k in s.labels}
        out.update(_series(family.name, family.type, labels))
        for sample in family.samples:  # exact sample names too (e.g. the *_total of counters)
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def known_series() -> dict[str, set[str]]:
    known = dict(GIE_SERIES)
    for name, labels in GIE_HISTOGRAMS.items():
        known.update(_series(name, "histogram", labels))
    for name, labels in exposed_series().items():
        known[name] = known.get(name, set()) | labels
    return known


# --------------------------------------------------------------------------- PromQL

_WORDS = {
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "topk",
    "bottomk",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords and labels left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", s):
        word, rest = m.group(0), s[m.end() :].lstrip()
        if rest.startswith("(") or word in _WORDS:
            continue  # a function or an aggregation
        names.add(word)
    return names


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in group.split(",")
        if label.strip()
    }


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) "
        '(rate(extproc_decisionz_seconds_bucket{job=~"$job"}[$__rate_interval])))'
    )
    assert metric_names(expr) == {"extproc_decisionz_seconds_bucket"}
    assert grouping_labels(expr) == {"le"}
    assert metric_names("sum(a_total) / sum(b_total) and on(x) c") == {"a_total", "b_total", "c"}
    # A typo is not a known series: the check below would catch it.
    assert "extproc_decisionz_seconds_bucket" not in known_series()


# --------------------------------------------------------------------------- the dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows keep their panels inside
    return out


def _queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert m, f"variable {var['name']}: {query!r}"
            exprs.append(f"count by ({m.group(2)}) ({m.group(1)})")
    return exprs


def test_dashboard_has_a_prometheus_datasource_variable(dashboard: dict[str, Any]) -> None:
    (ds,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": f"${{{ds['name']}}}"}
    for p in _panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"] == ref, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t.get("datasource", ref) == ref and t["refId"] and t["expr"], p["title"]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"] == ref, v["name"]


def test_panels_have_unique_ids_and_fit_the_grid(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36


def test_every_series_exists_with_the_grouped_labels(dashboard: dict[str, Any]) -> None:
    known = known_series()
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    problems, seen = [], set()
    for expr in _queries(dashboard):
        names = metric_names(expr)
        assert names, expr
        seen |= names
        unknown = names - set(known)
        if unknown:
            problems.append(f"unknown series {sorted(unknown)} in {expr}")
            continue
        labels = set().union(*(known[n] for n in names)) | SCRAPE_LABELS
        missing = grouping_labels(expr) - labels
        if missing:
            problems.append(f"labels {sorted(missing)} not on {sorted(names)} in {expr}")
        for var in re.findall(r"\$(\w+)", expr):
            if not var.startswith("__"):
                assert var in variables, f"${var} is not a dashboard variable: {expr}"
    assert not problems, "\n".join(problems)
    # Our own metrics are covered, not just the GIE ones.
    for core in (
        "extproc_decisions_total",
        "extproc_decision_seconds_bucket",
        "extproc_rejections_total",
        "extproc_scrapes_total",
        "extproc_inflight_requests",
        "extproc_serving",
        "extproc_event_loop_lag_seconds_bucket",
        "extproc_backend_healthy",
        "extproc_backend_metrics_age_seconds",
        "inference_pool_ready_pods",
        "inference_objective_request_total",
    ):
        assert core in seen, core
