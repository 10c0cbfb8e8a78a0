"""The Grafana dashboard the chart ships: rendered as a labelled ConfigMap, valid JSON, every PromQL
expression parses (promtool checks them as recording rules) and reads only metrics the proxy exports
or the metric contract names."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import yaml
from test_chart_alerts import promtool
from test_deploy_artifacts import KUBE_VERSION, exported_metric_names, helm, one, template

__all__ = ["helm", "promtool"]  # fixtures

# The metric contract being implemented alongside the chart (outcome label, processing time from
# dispatch); names here that the registry does not export yet are allowed, nothing else is.
CONTRACT = {
    "signalbox_requests_total", "signalbox_rejections_total", "signalbox_queue_length",
    "signalbox_queue_wait_seconds_bucket", "signalbox_queue_wait_seconds_sum", "signalbox_queue_wait_seconds_count",
    "signalbox_processing_seconds_bucket", "signalbox_processing_seconds_sum", "signalbox_processing_seconds_count",
    "signalbox_time_to_first_token_seconds_bucket", "signalbox_request_duration_seconds_bucket",
    "signalbox_active_requests", "signalbox_queue_slots", "signalbox_upstream_circuit_open",
}
OUTCOMES = {"ok", "upstream_error", "timeout", "rejected", "cancelled", "proxy_error"}
# Grafana's variables, as a query would see them with "All" selected.
VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*", "$job": ".*", "$queue": ".*"}


def dashboard_configmap(helm: Path, *args: str) -> dict[str, Any]:
    return one(template(helm, "--set", "grafanaDashboard.enabled=true", *args), "ConfigMap", name_suffix="-dashboard")


def exprs(dashboard: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    found += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return found


def concrete(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def test_dashboard_configmap_renders_for_the_grafana_sidecar(helm: Path) -> None:
    cm = dashboard_configmap(helm, "--set", "grafanaDashboard.annotations.grafana_folder=LLM",
                             "--set", "grafanaDashboard.namespace=monitoring")
    kubernetes_validate.validate(cm, KUBE_VERSION, strict=True)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    dashboard = json.loads(cm["data"]["signalbox.json"])
    assert dashboard["uid"] == "signalbox" and dashboard["panels"]
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in ("Queue length", "Queue wait: average", "Queue wait: p95", "Active requests and slots",
                   "Time to first token", "Processing time", "Error, cancellation and rejection rates",
                   "Open circuits", "Retries", "Tokens"):
        assert wanted in titles
    # Off by default, and the label is configurable for a sidecar set up differently.
    assert not [d for d in template(helm) if d["metadata"]["name"].endswith("-dashboard")]
    custom = dashboard_configmap(
        helm, "--set", "grafanaDashboard.label=dash", "--set", "grafanaDashboard.labelValue=yes"
    )
    assert custom["metadata"]["labels"]["dash"] == "yes" and "grafana_dashboard" not in custom["metadata"]["labels"]


def test_every_dashboard_expression_parses(helm: Path, promtool: Path, tmp_path: Path) -> None:
    dashboard = json.loads(dashboard_configmap(helm)["data"]["signalbox.json"])
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(panel_exprs) >= 20
    rules = [{"record": f"signalbox:dashboard_check_{i}", "expr": concrete(e)} for i, e in enumerate(panel_exprs)]
    (tmp_path / "dash.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([str(promtool), "check", "rules", str(tmp_path / "dash.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in proc.stdout, proc.stdout + proc.stderr
    # A broken expression is caught (the check is not vacuous).
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(
        {"groups": [{"name": "d", "rules": [{"record": "x", "expr": "sum by (queue (signalbox_queue_length)"}]}]}))
    bad = subprocess.run([str(promtool), "check", "rules", str(tmp_path / "bad.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


def test_dashboard_reads_only_known_metrics_and_outcomes() -> None:
    dashboard = json.loads((Path(__file__).resolve().parent.parent / "helm/signalbox/dashboards/signalbox.json")
                           .read_text())
    known = exported_metric_names() | CONTRACT
    used = {m for e in exprs(dashboard) for m in re.findall(r"\bsignalbox_\w+", e)}
    assert used and used <= known, sorted(used - known)
    outcomes = {o for e in exprs(dashboard) for m in re.findall(r'outcome=~?"([^"]+)"', e) for o in m.split("|")}
    assert outcomes and outcomes <= OUTCOMES
    # Every panel queries the datasource variable, so the dashboard works with any Prometheus name.
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if p["type"] != "row")
