"""The chart's alerts (files/prometheus-rules.yaml) through the real promtool, and the Grafana
dashboard: both only name metrics the service exports."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import yaml

from receiver.metrics import Metrics
from tests.e2e.testbin import ROOT, tool

CHART = ROOT / "charts" / "gitea-flux-bridge"
RULES = CHART / "files" / "prometheus-rules.yaml"
RULE_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yaml"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
METRIC = re.compile(r"\b((?:gfb|process|python)_[a-z0-9_]+)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def exported() -> set[str]:
    """Every sample name /metrics can carry (histogram and counter suffixes included)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum", "_created")}
        names |= {sample.name for sample in family.samples}
    return names


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_the_alerts() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_or_simple() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested <= alerts
    assert len(tested) >= 6, tested


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "expr" and isinstance(v, str)] + [
            e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_rules_and_dashboard_name_only_exported_metrics() -> None:
    names = exported()
    exprs = _exprs(yaml.safe_load(RULES.read_text())) + _exprs(json.loads(DASHBOARD.read_text()))
    assert len(exprs) > 20
    for expr in exprs:
        for metric in METRIC.findall(expr):
            assert metric in names, f"{metric} in {expr!r} is not exported"


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "gitea-flux-bridge"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_operations_doc_points_at_the_shipped_rules() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    assert "prometheusRule.enabled" in text
    assert "grafanaDashboard.enabled" in text
