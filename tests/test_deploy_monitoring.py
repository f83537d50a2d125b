"""Prometheus rules and the Grafana dashboard, offline: `promtool check rules`, `promtool test
rules` (alert and recording unit tests), the dashboard regenerated from its source and parsed
by grafana-foundation-sdk, and every metric it names either exported by the server (design
notes) or recorded by the rules. tests/test_deploy_prometheus_live.py runs the queries for real.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops_tools import INSTALL, tool
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASH_DIR = ROOT / "dashboards"
RULES = DASH_DIR / "prometheus-rules.yaml"
RULE_TESTS = DASH_DIR / "prometheus-rules.test.yaml"
DASHBOARD = DASH_DIR / "kiln.json"

# The server's metrics (design notes); histograms expose _bucket/_sum/_count.
COUNTERS = {"kiln_inference_requests_total", "kiln_inference_samples_total", "kiln_compile_cache_total",
            # model monitoring (service/monitor/metrics.py)
            "kiln_capture_samples_total", "kiln_capture_events_total", "kiln_feedback_total",
            # model updates (service/poll.py, service/rollout.py)
            "kiln_repository_polls_total", "kiln_repository_changes_total", "kiln_version_compared_rows_total",
            "kiln_version_disagreeing_rows_total", "kiln_rollout_copies_total", "kiln_rollout_rollbacks_total"}
GAUGES = {"kiln_queue_depth", "kiln_inflight_requests", "kiln_model_state", "kiln_parity_max_abs_error",
          "kiln_capture_bytes", "kiln_live_accuracy", "kiln_live_mae", "kiln_live_labels", "kiln_live_accuracy_min",
          "kiln_drift_statistic", "kiln_drift_p_value", "kiln_drift_detected",
          "kiln_rollout_weight", "kiln_version_disagreement", "kiln_rollout_window_error_rate",
          "kiln_rollout_window_p99_seconds"}
# Server-wide series without a model label.
NO_MODEL = {"kiln_compile_cache_total", "kiln_repository_polls_total", "kiln_repository_changes_total"}

HISTOGRAMS = {"kiln_request_duration_seconds", "kiln_batch_size", "kiln_compile_seconds"}
SERVER_METRICS = COUNTERS | GAUGES | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}




def run(*cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression (kiln_* metrics and level:metric:operation records)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # drop label values
    return set(re.findall(r"\b(?:[a-z_]+:[a-z0-9_]+:[a-z0-9_]+|kiln_[a-z0-9_]+)\b", expr))


def test_promtool_check_rules():
    proc = run(tool("promtool"), "check", "rules", str(RULES))
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout, proc.stdout


def test_promtool_test_rules():
    proc = run(tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in proc.stdout, proc.stdout


def test_alerts_and_rule_tests_cover_each_other():
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert {"KilnHighP99Latency", "KilnHighErrorRatio", "KilnModelNotReady", "KilnModelFailed",
            "KilnQueueSaturated", "KilnRequestsRejected", "KilnDriftDetected", "KilnLiveAccuracyLow",
            "KilnCanaryRolledBack", "KilnVersionDisagreement"} <= alerts
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert alerts == tested, f"alerts without a promtool unit test: {alerts - tested}"
    for r in rules():
        if "alert" in r:
            assert r["labels"]["severity"] in {"warning", "critical"}
            assert r["annotations"]["summary"] and r["annotations"]["description"]
        names = metric_names(r["expr"])
        recorded = {x["record"] for x in rules() if "record" in x}
        assert names <= SERVER_METRICS | recorded, (r, names - SERVER_METRICS - recorded)
        if "record" in r:  # level:metric:operations naming
            assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", r["record"]), r["record"]


def test_dashboard_is_generated_from_its_source():
    try:
        import grafana_foundation_sdk  # noqa: F401
    except ImportError:
        pytest.fail(f"grafana-foundation-sdk missing: run `bash {INSTALL}`", pytrace=False)
    proc = subprocess.run([sys.executable, str(DASH_DIR / "build_dashboard.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_dashboard_structure():
    from grafana_foundation_sdk.models.dashboard import Dashboard

    raw = json.loads(DASHBOARD.read_text())
    parsed = Dashboard.from_json(raw)
    assert parsed.title == "Kiln inference server" and parsed.uid == raw["uid"]
    variables = {v["name"]: v for v in raw["templating"]["list"]}
    assert {"datasource", "namespace", "model", "pod"} <= set(variables)
    for name in ("namespace", "model", "pod"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert variables[name]["query"].startswith("label_values(")
    ids = [p["id"] for p in raw["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in raw["panels"] if p["type"] != "row"]
    for wanted in ("Requests/s by outcome", "Latency p50 by phase", "Latency p95 by phase", "Latency p99 by phase",
                   "Executed batch size", "Queue depth", "In-flight requests by pod", "Model state",
                   "Mean compile time", "Compile cache hit ratio", "Parity: max abs error vs the reference",
                   "Live accuracy (top-1) and MAE from feedback", "Feedback/s by result", "Drift detected",
                   "Smallest KS p-value by model", "Most drifted inputs (KS statistic)", "Captured samples/s by result",
                   "Rollout weight by version", "Disagreement with the stable version", "Error ratio by version",
                   "Latency p50 / p99 by version", "Rollbacks and repository changes"):
        assert wanted in titles, wanted
    exprs = dashboard_exprs(raw)
    assert len(exprs) >= 25
    recorded = {r["record"] for r in rules() if "record" in r}
    used = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, (title, expr)
        assert names <= SERVER_METRICS | recorded, (title, names - SERVER_METRICS - recorded)
        used |= names
        # Templated by model and pod on every panel (the compile cache counter has no model label).
        assert 'pod=~"$pod"' in expr, (title, expr)
        if not names & NO_MODEL:
            assert 'model=~"$model"' in expr, (title, expr)
        # Rates/histograms for traffic: never graph a raw request counter.
        assert "kiln_inference_requests_total" not in expr, (title, expr)
    # Every gauge and histogram the server exports has a panel.
    for metric in GAUGES | {"kiln_compile_cache_total"}:
        assert metric in used, metric
    for panel in raw["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
