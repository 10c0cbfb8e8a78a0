"""The chart's PrometheusRule, rendered by helm and run by promtool on synthetic series: each alert fires
at the seeds' thresholds and stays silent just below them.

Seeds: more than 100 requests waiting in a queue (summed over priority classes and pods), an average
queue wait above 5 minutes, more than 10 % of requests cancelled (the client left), and rejections
counted without the clients that left. Metric names follow the proxy's contract (outcome label on
signalbox_requests_total; signalbox_queue_wait_seconds_sum/_count).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy_artifacts import REPO, helm, one, run, template

__all__ = ["helm"]  # the fixture, shared with the deployment tests

PROMTOOL = REPO / ".tools" / "bin" / "promtool"
JOB = "rel-signalbox"  # the job the ServiceMonitor gives the Service "rel-signalbox"
BASE = {"namespace": "ns", "job": JOB}


@pytest.fixture(scope="module")
def promtool() -> Path:
    # Never skip: a missing promtool is installed the same way `make tools` does it.
    if not PROMTOOL.exists():
        run(["bash", str(REPO / "scripts" / "install-prometheus.sh")], timeout=600)
    assert PROMTOOL.exists(), "scripts/install-prometheus.sh did not produce .tools/bin/promtool"
    return PROMTOOL


def rule_groups(helm: Path, *args: str) -> list[dict[str, Any]]:
    docs = template(helm, "--set", "prometheusRule.enabled=true", *args)
    groups: list[dict[str, Any]] = one(docs, "PrometheusRule")["spec"]["groups"]
    return groups


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    body = ",".join(f'{k}="{v}"' for k, v in {**BASE, **labels}.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def requests(per_minute: dict[str, int], pods: Iterable[str] = ("a", "b")) -> list[dict[str, str]]:
    """signalbox_requests_total growing by `per_minute[outcome]` a minute, split evenly over pods."""
    out = []
    pods = list(pods)
    for outcome, rate in per_minute.items():
        status = {"ok": "200", "rejected": "429", "cancelled": "499"}.get(outcome, "502")
        for pod in pods:
            out.append(series(
                "signalbox_requests_total", f"0+{rate / len(pods):g}x40", pod=pod, instance=f"{pod}:8080",
                route="default", tenant="t", upstream="openai", status=status, outcome=outcome,
            ))
    return out


def promtool_test(promtool: Path, tmp_path: Path, groups: list[dict[str, Any]], tests: list[dict[str, Any]]) -> str:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    check = subprocess.run([str(promtool), "check", "rules", str(tmp_path / "rules.yaml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    spec = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run([str(promtool), "test", "rules", "tests.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def alert_test(input_series: list[dict[str, str]], alertname: str, expected: list[dict[str, Any]],
               eval_time: str = "30m") -> dict[str, Any]:
    return {"interval": "1m", "input_series": input_series,
            "alert_rule_test": [{"eval_time": eval_time, "alertname": alertname, "exp_alerts": expected}]}


def test_the_rendered_rules_pass_promtool_check(helm: Path, promtool: Path, tmp_path: Path) -> None:
    for args in ([], ["-f", str(REPO / "helm/signalbox/ci/deployment-full-values.yaml")],
                 ["-f", str(REPO / "helm/signalbox/ci/sidecar-native-values.yaml")]):
        groups = rule_groups(helm, *args)
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        proc = subprocess.run([str(promtool), "check", "rules", str(tmp_path / "rules.yaml")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "SUCCESS: 7 rules found" in proc.stdout, proc.stdout + proc.stderr


def backlog(*split: tuple[str, str, int]) -> list[dict[str, str]]:
    return [series("signalbox_queue_length", f"{n}x40", pod=pod, instance=f"{pod}:8080", queue="chat",
                   priority=prio) for pod, prio, n in split]


def test_queue_backlog_sums_classes_and_pods(helm: Path, promtool: Path, tmp_path: Path) -> None:
    # 250 waiting as 60/60/60/60/10 over three classes and two pods: no single series is above 100.
    spread = backlog(("a", "high", 60), ("a", "normal", 60), ("b", "high", 60), ("b", "normal", 60),
                     ("b", "low", 10))
    fired = {"exp_labels": {**BASE, "queue": "chat", "severity": "warning"},
             "exp_annotations": {"summary": "Signalbox queue backlog is high",
                                 "description": "250 requests wait in queue chat across all pods and classes "
                                                "(over 100 for 5m)."}}
    at_threshold = backlog(("a", "high", 60), ("b", "normal", 40))  # 100 is not above 100
    promtool_test(promtool, tmp_path, rule_groups(helm), [
        alert_test(spread, "SignalboxQueueBacklog", [fired]),
        alert_test(at_threshold, "SignalboxQueueBacklog", []),
    ])


def waits(per_pod: dict[str, int]) -> list[dict[str, str]]:
    """One wait ends per minute on each pod, lasting per_pod[pod] seconds."""
    out = []
    for pod, seconds in per_pod.items():
        labels = {"pod": pod, "instance": f"{pod}:8080", "queue": "chat"}
        out.append(series("signalbox_queue_wait_seconds_sum", f"0+{seconds}x40", **labels))
        out.append(series("signalbox_queue_wait_seconds_count", "0+1x40", **labels))
    return out


def test_average_queue_wait_above_five_minutes(helm: Path, promtool: Path, tmp_path: Path) -> None:
    fired = {"exp_labels": {**BASE, "queue": "chat", "severity": "warning"},
             "exp_annotations": {"summary": "Signalbox average queue wait is high",
                                 "description": "Average wait in queue chat is 5m 5s (over 300s for 5m)."}}
    promtool_test(promtool, tmp_path, rule_groups(helm), [
        alert_test(waits({"a": 400, "b": 210}), "SignalboxQueueWaitHigh", [fired]),  # average 305 s
        alert_test(waits({"a": 400, "b": 190}), "SignalboxQueueWaitHigh", []),  # average 295 s
    ])


def ratio_alert(name: str, summary: str, description: str) -> dict[str, Any]:
    return {"exp_labels": {**BASE, "severity": "warning"},
            "exp_annotations": {"summary": summary, "description": description}}


CANCELLED = ratio_alert("SignalboxCancellationsHigh", "Signalbox clients cancel a large share of requests",
                        "11% of requests ended because the client left (over 0.1 for 10m).")
REJECTED = ratio_alert("SignalboxRejectionsHigh", "Signalbox is rejecting a large share of requests",
                       "6% of requests were rejected by limits or queues (over 0.05 for 10m).")


def test_cancellations_above_ten_percent(helm: Path, promtool: Path, tmp_path: Path) -> None:
    above = requests({"ok": 85, "cancelled": 11, "rejected": 4})
    below = requests({"ok": 87, "cancelled": 9, "rejected": 4})
    promtool_test(promtool, tmp_path, rule_groups(helm), [
        alert_test(above, "SignalboxCancellationsHigh", [CANCELLED]),
        alert_test(below, "SignalboxCancellationsHigh", []),
    ])


def test_rejections_do_not_count_clients_that_left(helm: Path, promtool: Path, tmp_path: Path) -> None:
    # Many clients leave (cancelled, and the old rejections counter's client_gone), few are rejected.
    gone = [series("signalbox_rejections_total", "0+30x40", pod="a", instance="a:8080", reason="client_gone"),
            series("signalbox_rejections_total", "0+4x40", pod="a", instance="a:8080", reason="queue_full")]
    leaving = requests({"ok": 66, "cancelled": 30, "rejected": 4}) + gone
    rejecting = requests({"ok": 90, "cancelled": 4, "rejected": 6})
    promtool_test(promtool, tmp_path, rule_groups(helm), [
        alert_test(leaving, "SignalboxRejectionsHigh", []),
        alert_test(rejecting, "SignalboxRejectionsHigh", [REJECTED]),
        alert_test(rejecting, "SignalboxCancellationsHigh", []),
    ])


def test_extra_rules_are_appended_and_evaluated(helm: Path, promtool: Path, tmp_path: Path) -> None:
    extra = ('prometheusRule.extraRules=[{"record":"signalbox:queue_length:sum",'
             '"expr":"sum by (queue) (signalbox_queue_length)"},'
             '{"alert":"SignalboxQueueNotEmpty","expr":"signalbox:queue_length:sum > 0","for":"1m",'
             '"labels":{"severity":"info"},"annotations":{"summary":"{{ $labels.queue }} has {{ $value }}"}}]')
    groups = rule_groups(helm, "--set-json", extra)
    names = [r.get("alert") or r.get("record") for r in groups[0]["rules"]]
    assert names[-2:] == ["signalbox:queue_length:sum", "SignalboxQueueNotEmpty"]
    promtool_test(promtool, tmp_path, groups, [
        {"interval": "1m", "input_series": backlog(("a", "high", 3), ("b", "low", 2)),
         "promql_expr_test": [{"expr": "signalbox:queue_length:sum", "eval_time": "5m",
                               "exp_samples": [{"labels": 'signalbox:queue_length:sum{queue="chat"}', "value": 5}]}],
         "alert_rule_test": [{"eval_time": "5m", "alertname": "SignalboxQueueNotEmpty", "exp_alerts": [
             {"exp_labels": {"queue": "chat", "severity": "info"},
              "exp_annotations": {"summary": "chat has 5"}}]}]},
    ])


def test_extra_rules_are_checked_by_the_schema(helm: Path) -> None:
    proc = template(helm, "--set-json", 'prometheusRule.extraRules=[{"alert":"X"}]', check=False)
    assert proc.returncode != 0 and "expr" in proc.stderr, proc.stderr


def test_install_prometheus_is_idempotent(promtool: Path) -> None:
    before = promtool.stat().st_mtime_ns
    proc = run(["bash", str(REPO / "scripts" / "install-prometheus.sh")], timeout=60)
    assert proc.stdout == "" and proc.stderr == "" and promtool.stat().st_mtime_ns == before
    version = subprocess.run([str(promtool), "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and re.match(r"promtool, version \d+\.\d+", version.stdout)


def test_the_removed_p95_setting_is_refused_rather_than_ignored(helm: Path) -> None:
    proc = template(helm, "--set", "prometheusRule.queueWaitP95.thresholdSeconds=5", check=False)
    assert proc.returncode != 0 and "queueWaitP95" in proc.stderr, proc.stderr
