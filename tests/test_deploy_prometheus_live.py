"""Debian's real Prometheus scraping the real Kiln server under load, on loopback.

Prometheus runs on a free port in a temp dir (scrape_interval 1 s, evaluation_interval 1 s,
dashboards/prometheus-rules.yaml loaded), with the `namespace`/`pod` labels a ServiceMonitor
would add. While a background client sends JSON infer requests, the test runs through the
HTTP API:
  * every PromQL expression of dashboards/kiln.json, template variables substituted by the
    "All" regex `.*` and then by real values found by the variables' own label_values queries;
  * every recording rule's output, and every rule's health (no evaluation errors);
  * the prometheus-adapter rules the chart ships, with their <<.Series>> / <<.LabelMatchers>> /
    <<.GroupBy>> templates filled in the way prometheus-adapter does;
and asserts that each one returns data (polling: the first scrape comes after a few seconds).
`promtool check metrics` lints the server's /metrics exposition on the way.

The server runs in poll mode on a copy of the bundled repository in which digits-cnn has a second
version taking a canary share (with a guard), so the rollout row has live series too.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.kiln_server import DEFAULT_REPO, free_port, start_server
from tests.ops_tools import tool
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "dashboards" / "prometheus-rules.yaml"
DASHBOARD = ROOT / "dashboards" / "kiln.json"
ADAPTER_RULES = ROOT / "helm" / "kiln" / "files" / "prometheus-adapter-rules.yaml"
NAMESPACE, POD = "kiln-test", "kiln-test-0"
MODELS = ("digits-cnn", "digits-cnn-openvino")
POLL_S = 60.0          # the first scrape lands after ~6 s; rate() needs two
LOAD_MAX_S = 120.0     # the load thread stops by itself after this, whatever happens
# Grafana's built-in interval variables, as Grafana would expand them for a 1 h dashboard.
BUILTINS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}




class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        try:
            return self.get("/api/v1/query", query=expr)["result"]
        except urllib.error.HTTPError as err:  # a PromQL syntax error is a test failure, not "no data yet"
            pytest.fail(f"Prometheus rejected {expr!r}: {err.read().decode(errors='replace')}")

    def label_values(self, label: str, match: str) -> list[str]:
        return self.get(f"/api/v1/label/{label}/values", **{"match[]": match})


def has_data(result: list[dict]) -> bool:
    """At least one series with a real (not NaN) value: 0 counts, "no data" and NaN do not."""
    for series in result:
        value = float(series["value"][1])
        if not math.isnan(value):
            return True
    return False


def poll(prom: Prometheus, exprs: dict[str, str], timeout: float = POLL_S) -> dict[str, list]:
    """Query every expression until each returns data; return the ones that never did."""
    pending, last = dict(exprs), {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, expr in list(pending.items()):
            last[key] = prom.query(expr)
            if has_data(last[key]):
                del pending[key]
        if pending:
            time.sleep(1.0)
    return {key: (pending[key], last.get(key)) for key in pending}


# digits-cnn v2 (the same weights: no disagreement, so no alert fires) as a canary beside v1.
ROLLOUT = """
version_policy: {latest: 2}
rollout: {canary: {version: 2, weight: 0.3}, guard: {max_error_rate: 0.5, max_disagreement: 0.05, window: 30}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kiln-live")
    repo = tmp / "repo"
    shutil.copytree(DEFAULT_REPO, repo)
    shutil.copytree(repo / "digits-cnn" / "1", repo / "digits-cnn" / "2")
    (repo / "digits-cnn" / "2" / "model.pt2").unlink(missing_ok=True)
    config = repo / "digits-cnn" / "config.yaml"
    config.write_text(config.read_text() + ROLLOUT)
    srv = start_server(repo, log_dir=tmp, args=["--model-control-mode", "poll", "--repository-poll-secs", "1"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def load(server, eval_set):
    """JSON infer requests to both models for the module's lifetime (bounded), plus a few bad ones.
    digits-cnn gets held-out digits and their labels as feedback (live accuracy, no drift);
    digits-cnn-openvino gets uniform noise, far from its calibration digits (drift: its alert goes pending)."""
    rng = np.random.default_rng(0)
    x_eval, y_eval = eval_set
    stop = threading.Event()
    counts = {"ok": 0, "client_error": 0, "other": 0, "feedback": 0}

    def post(model: str, body: dict, route: str = "infer") -> int:
        req = urllib.request.Request(f"{server.url}/v2/models/{model}/{route}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
                return r.status
        except urllib.error.HTTPError as err:
            return err.code

    def run() -> None:
        deadline = time.monotonic() + LOAD_MAX_S
        i = 0
        labels = []
        while not stop.is_set() and time.monotonic() < deadline:
            batch = (1, 4)[i % 2]
            model = MODELS[i % len(MODELS)]
            if model == MODELS[0]:
                rows = rng.choice(len(x_eval), batch, replace=False)
                data = x_eval[rows]
            else:
                data = rng.uniform(0, 16, size=(batch, 1, 8, 8)).astype(np.float32)
            body = {"id": f"live-{i}", "inputs": [{"name": "input", "datatype": "FP32", "shape": list(data.shape),
                                                   "data": data.ravel().tolist()}]}
            if i % 25 == 7:  # a wrong shape: outcome=client_error
                body["inputs"][0]["shape"] = [1, 1, 4, 4]
            try:
                status = post(model, body)
            except OSError:
                status = -1
            counts["ok" if status == 200 else "client_error" if 400 <= status < 500 else "other"] += 1
            if status == 200 and model == MODELS[0]:
                labels.append({"id": f"live-{i}", "label": y_eval[rows].tolist()})
            if len(labels) >= 10:  # ground truth arrives in batches, a little after the predictions
                try:
                    counts["feedback"] += post(MODELS[0], labels, "feedback") == 200
                except OSError:
                    pass
                labels = []
            i += 1
            stop.wait(0.01)  # ~50-80 req/s: enough for every rate, gentle on 2 cores

    thread = threading.Thread(target=run, name="kiln-load", daemon=True)
    thread.start()
    yield counts
    stop.set()
    thread.join(15)


@pytest.fixture(scope="module")
def prometheus(server, load, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    target = urllib.parse.urlsplit(server.url).netloc
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "kiln",
            "metrics_path": "/metrics",
            # The labels a ServiceMonitor / kubernetes_sd relabelling would attach.
            "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE, "pod": POD}}],
        }],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited {proc.returncode}:\n{(tmp / 'prometheus.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("prometheus not ready after 30 s")
            time.sleep(0.1)
        missing = poll(prom, {"up": f'up{{job="kiln"}} == 1'}, timeout=30)
        assert not missing, f"Prometheus never scraped {server.url}/metrics: {missing}"
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> dict[str, str]:
    out = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            out[f"{panel['title']} [{target['refId']}]"] = target["expr"]
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """Expand Grafana variables ($name / ${name}) the way Grafana would."""
    for token, value in BUILTINS.items():
        expr = expr.replace(token, value)
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def test_server_metrics_pass_promtool_check_metrics(server):
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as r:
        exposition = r.read()
    proc = subprocess.run([tool("promtool"), "check", "metrics"], input=exposition, capture_output=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()


def test_every_dashboard_query_returns_data_all_values(prometheus, load):
    exprs = {k: substitute(e, {"namespace": ".*", "model": ".*", "pod": ".*"}) for k, e in dashboard_exprs().items()}
    missing = poll(prometheus, exprs)
    assert not missing, "dashboard queries without data ('All' selected):\n" + "\n".join(
        f"  {k}: {e}\n    last result: {r}" for k, (e, r) in missing.items()) + f"\nload: {load}"
    assert load["ok"] > 0 and load["client_error"] > 0, load


def test_template_variables_and_queries_with_real_values(prometheus):
    variables = {v["name"]: v for v in dashboard()["templating"]["list"] if v["type"] == "query"}
    chosen: dict[str, str] = {}
    # Resolve in dashboard order (namespace -> model -> pod), each query seeing the previous choices.
    for name, var in variables.items():
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"])
        assert m, var["query"]
        selector, label = substitute(m.group(1), chosen), m.group(2)
        values = prometheus.label_values(label, selector)
        assert values, f"variable {name}: label_values({selector}, {label}) is empty"
        chosen[name] = MODELS[0] if name == "model" else values[0]
    assert chosen == {"namespace": NAMESPACE, "model": MODELS[0], "pod": POD}
    exprs = {k: substitute(e, chosen) for k, e in dashboard_exprs().items()}
    missing = poll(prometheus, exprs)
    assert not missing, f"dashboard queries without data ({chosen}):\n" + "\n".join(
        f"  {k}: {e}\n    last result: {r}" for k, (e, r) in missing.items())


def test_recording_rules_produce_series_and_no_rule_errors(prometheus):
    groups = yaml.safe_load(RULES.read_text())["groups"]
    records = {r["record"]: r["record"] for g in groups for r in g["rules"] if "record" in r}
    # The error and rejection ratios are 0 (not NaN) with traffic; every other record has data.
    missing = poll(prometheus, records)
    assert not missing, f"recording rules without output: {sorted(missing)}"
    loaded = prometheus.get("/api/v1/rules")["groups"]
    assert {g["name"] for g in loaded} == {g["name"] for g in groups}
    for group in loaded:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
            if rule["type"] == "alerting" and rule["name"] == "KilnDriftDetected":  # see the test below
                assert {a["labels"]["model"] for a in rule["alerts"]} <= {MODELS[1]}, rule["alerts"]
            elif rule["type"] == "alerting":  # a healthy server under light load pages nobody
                assert rule["state"] == "inactive", (rule["name"], rule["alerts"])


def test_drift_alert_goes_pending_for_the_drifted_model_only(prometheus, load):
    """digits-cnn-openvino gets noise, digits-cnn held-out digits: only the first drifts (its alert
    waits out `for: 10m` as pending), and digits-cnn's live accuracy from feedback stays above min_accuracy."""
    missing = poll(prometheus, {
        "pending": f'ALERTS{{alertname="KilnDriftDetected", alertstate="pending", model="{MODELS[1]}"}}',
        "detected": f'namespace_model_version:kiln_drift_detected:max{{model="{MODELS[1]}"}} == 1',
        "accuracy": f'namespace_model_version:kiln_live_accuracy:min{{model="{MODELS[0]}"}} >= 0.95',
    })
    assert not missing, missing
    assert not has_data(prometheus.query(f'kiln_drift_detected{{model="{MODELS[0]}"}} == 1'))
    assert not has_data(prometheus.query('ALERTS{alertname="KilnLiveAccuracyLow"}'))
    assert load["feedback"] > 0, load


def test_prometheus_adapter_rules_return_per_pod_values(prometheus):
    """The HPA's custom metrics, queried the way prometheus-adapter builds the queries."""
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    exprs = {}
    for rule in rules:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        expr = (rule["metricsQuery"].replace("<<.Series>>", series)
                .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"')
                .replace("<<.GroupBy>>", "pod"))
        exprs[rule["name"]["as"]] = expr
    missing = poll(prometheus, exprs)
    assert not missing, f"adapter metrics without data: {missing}"
    for name, expr in exprs.items():
        result = prometheus.query(expr)
        assert [s["metric"].get("pod") for s in result] == [POD], (name, result)
