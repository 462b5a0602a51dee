"""deploy/grafana/capibara-dashboard.json only queries metrics the services really export: every
metric name in every panel's PromQL is checked against the names in prometheus_client's registry
once capibara_grpc.metrics is imported (with the suffixes each type adds: _total for counters,
_bucket/_sum/_count for histograms), plus the process_* and python_* series prometheus_client
exports itself. Renaming a metric breaks this test rather than the dashboard."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client import REGISTRY

import capibara_grpc.api_keys  # noqa: F401 - imported for the metrics it uses (defined in metrics.py)
import capibara_grpc.metrics  # noqa: F401 - registers every metric of the mesh
from tests.support.mesh import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "capibara-dashboard.json"
# PromQL words that look like metric names: functions, aggregations and their modifiers.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def exported_names() -> set[str]:
    """Every series name a mesh process exports, even of labelled metrics not yet observed."""
    names = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, label matchers, grouping labels,
    range and string literals left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b\d[\w.]*", "", expr)  # numbers and durations (offset 5m)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        following = expr[match.end() :].lstrip()
        if following.startswith("(") or match.group() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [(inner["title"], t["expr"]) for t in inner.get("targets", []) if t.get("expr")]
    return found


def unknown_metrics(dashboard: dict) -> list[str]:
    exported = exported_names()
    return [
        f"panel '{title}': {name}"
        for title, expr in dashboard_expressions(dashboard)
        for name in sorted(metric_names(expr))
        if name not in exported
    ]


def test_the_extractor_finds_metric_names_and_nothing_else():
    expr = (
        'histogram_quantile(0.95, sum by (model, le) (rate(capibara_time_to_first_token_seconds_bucket{model=~"a|b"}'
        "[$__rate_interval]))) / on (model) group_left sum without (code) (capibara_queue_depth offset 5m)"
    )
    assert metric_names(expr) == {"capibara_time_to_first_token_seconds_bucket", "capibara_queue_depth"}


def test_every_dashboard_metric_is_exported_by_the_mesh():
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = dashboard_expressions(dashboard)
    assert len(expressions) >= 13
    assert unknown_metrics(dashboard) == []


@pytest.mark.parametrize("made_up", ["capibara_requests_per_minute_total", "capibara_queue_length"])
def test_a_metric_that_does_not_exist_fails_the_check(made_up):
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"][0]["targets"][0]["expr"] = f"sum(rate({made_up}[5m]))"
    assert unknown_metrics(dashboard) == [f"panel '{dashboard['panels'][0]['title']}': {made_up}"]


def test_the_dashboard_has_a_panel_for_each_figure_the_issue_asks_for():
    text = " ".join(expr for _, expr in dashboard_expressions(json.loads(DASHBOARD.read_text())))
    for metric in (
        "capibara_grpc_requests_total",  # requests/min, model-server connection errors
        'method="Route"',  # routing latency
        "capibara_generated_tokens_total",  # tokens/s
        "process_resident_memory_bytes",  # memory
        "capibara_queue_depth",  # queue length
        'method="Generate"',  # generation time
        "capibara_time_to_first_token_seconds_bucket",  # TTFT
        "capibara_cache_requests_total",  # cache hit rate
        "capibara_key_requests_total",  # per-key usage
    ):
        assert metric in text
