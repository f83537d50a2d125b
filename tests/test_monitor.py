"""Monitoring on the real server: capture under load (bounded, every answer right), CloudEvents to a
real loopback sink, feedback and live accuracy, drift on shifted and unshifted streams, auth, and
`kiln monitor export` → `kiln optimize quantize --calib` → a served int8 model.

One server for the module (tokens on, capture store capped at 128 KiB, server-wide sample rate 0):
  digits-cnn      monitor.sample_rate 1.0 (every request captured, sent as CloudEvents)
  digits-default  no monitor section: the server's rate (0), feedback and drift still on
  digits-drift    the drift tests' own stream
  digits-off      monitor: {enabled: false}
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.monitor.store import CaptureStore
from tests.hardening_util import add_digits
from tests.kiln_server import DEFAULT_REPO, ROOT, start_server
from tests.metrics_util import scrape, value
from tests.monitor_util import drift_history_after, export_labelled

CAP = 128 * 1024
INFER_TOKEN, METRICS_TOKEN, REPO_TOKEN = "mon-infer-token", "mon-metrics-token", "mon-repo-token"
AUTH = {"Authorization": f"Bearer {INFER_TOKEN}"}
EVAL = DEFAULT_REPO / "digits-cnn" / "data" / "eval.npz"
CALIB = DEFAULT_REPO / "digits-cnn" / "data" / "calib.npz"
SINK_FAILURES = 3  # the sink answers 503 to its first POSTs: the server retries


class Sink:
    """A real HTTP server on loopback recording the CloudEvents it receives."""

    def __init__(self):
        self.events: list[tuple[dict[str, str], bytes]] = []
        self.failures_left = SINK_FAILURES
        self.lock = threading.Lock()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                with sink.lock:
                    fail = sink.failures_left > 0
                    sink.failures_left -= fail
                    if not fail:
                        sink.events.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(503 if fail else 202)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/events"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def sink():
    s = Sink()
    yield s
    s.httpd.shutdown()


def _variant(repo: Path, name: str, extra: str) -> None:
    (repo / name).mkdir()
    (repo / name / "config.yaml").write_text(
        "source: ../digits-cnn\nmax_batch_size: 32\n"
        "dynamic_batching: {max_queue_delay_ms: 2, preferred_batch_sizes: [8, 16, 32]}\n"
        "verify: {samples: ../digits-cnn/data/calib.npz}\n"
        "accuracy: {dataset: ../digits-cnn/data/eval.npz, min_accuracy: 0.95}\n" + extra)


@pytest.fixture(scope="module")
def env(tmp_path_factory, sink):
    tmp = tmp_path_factory.mktemp("monitor")
    repo = tmp / "repo"
    add_digits(repo)
    with open(repo / "digits-cnn" / "config.yaml", "a") as f:
        f.write("monitor: {sample_rate: 1.0}\n")
    _variant(repo, "digits-default", "")
    _variant(repo, "digits-drift", "monitor: {drift: {min_interval_s: 0}}\n")  # evaluated every 50 rows
    _variant(repo, "digits-off", "monitor: {enabled: false}\n")
    tokens = tmp / "tokens"
    tokens.write_text(f"{INFER_TOKEN} infer\n{METRICS_TOKEN} metrics\n{REPO_TOKEN} repository\n")
    store = tmp / "store"
    srv = start_server(repo, log_dir=tmp, grpc=True,
                       args=["--auth-tokens-file", str(tokens), "--monitor-sample-rate", "0"],
                       env={"KILN_MONITOR_DIR": str(store), "KILN_MONITOR_MAX_BYTES": str(CAP),
                            "KILN_MONITOR_SINK_URL": sink.url})
    http = httpx.Client(base_url=srv.url, headers=AUTH, timeout=30)
    yield {"srv": srv, "http": http, "store": store, "tmp": tmp, "repo": repo}
    http.close()
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def data():
    with np.load(EVAL) as f:
        return f["input"], f["label"]


def body(x: np.ndarray, rid: str | None = None) -> dict:
    req = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    if rid is not None:
        req["id"] = rid
    return req


def wait_for(srv, predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(srv.url)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting on the server's metrics")
        time.sleep(0.1)


def captured(samples, model: str, result: str) -> float:
    return value(samples, "kiln_capture_samples_total", model=model, result=result)


# -- capture ---------------------------------------------------------------------------------------
def test_capture_under_load_answers_every_request_right_and_stays_under_its_byte_cap(env, data, sink):
    srv = env["srv"]
    x, _ = data
    session = ort.InferenceSession(str(DEFAULT_REPO / "digits-cnn" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    jobs = [(f"load-{i}", rng.choice(len(x), 32, replace=False)) for i in range(140)]  # ~10.4x the cap in tensors

    def send(job):  # the binary tensor extension: cheap for the client on a shared machine
        rid, rows = job
        header = json.dumps({"id": rid, "inputs": [{"name": "input", "datatype": "FP32", "shape": [32, 1, 8, 8],
                                                    "parameters": {"binary_data_size": 32 * 256}}]}).encode()
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            r = c.post("/v2/models/digits-cnn/infer", content=header + x[rows].tobytes(),
                       headers={"Inference-Header-Content-Length": str(len(header))})
        return rid, rows, r

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, jobs))
    for rid, rows, r in results:
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["id"] == rid
        got = np.asarray(out["outputs"][0]["data"], np.float32).reshape(32, -1)
        want = session.run(None, {"input": x[rows]})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    s = wait_for(srv, lambda s: captured(s, "digits-cnn", "stored") >= len(jobs))
    assert captured(s, "digits-cnn", "stored") == len(jobs) and captured(s, "digits-cnn", "dropped") == 0
    evicted = captured(s, "digits-cnn", "evicted")
    assert evicted > 0, "10x the cap must have pushed the oldest samples out"
    store = CaptureStore(env["store"], CAP, readonly=True)
    try:
        assert store.disk_bytes() <= CAP, store.disk_bytes()
        kept = list(store.samples("digits-cnn"))
        assert len(kept) == len(jobs) - evicted > 0
        sent = {rid: rows for rid, rows, _ in results}
        for sample in kept[-5:]:  # what is kept is what was asked and answered
            np.testing.assert_array_equal(sample.inputs["input"], x[sent[sample.request_id]])
            assert sample.outputs["logits"].shape == (32, 10) and sample.latency_s > 0 and sample.time > 0
    finally:
        store.close()
    env["load"] = results


def test_captured_requests_reach_the_sink_as_kserve_cloudevents_after_retries(env, data, sink):
    srv = env["srv"]
    s = wait_for(srv, lambda s: value(s, "kiln_capture_events_total", model="digits-cnn", result="sent")
                 >= 2 * len(env["load"]), timeout=60)
    assert value(s, "kiln_capture_events_total", result="failed") == 0
    assert value(s, "kiln_capture_events_total", result="dropped") == 0
    assert sink.failures_left == 0  # the first POSTs failed and were retried
    by_id: dict[str, dict[str, tuple]] = {}
    for headers, payload in sink.events:
        assert headers["ce-specversion"] == "1.0" and headers["content-type"] == "application/json"
        assert headers["ce-inferenceservicename"] == "digits-cnn" and headers["ce-time"].endswith("Z")
        by_id.setdefault(headers["ce-id"], {})[headers["ce-type"]] = (headers, payload)
    assert len(by_id) == len(env["load"])
    rid, rows, r = env["load"][7]
    events = by_id[rid]
    request = json.loads(events["org.kubeflow.serving.inference.request"][1])
    response = json.loads(events["org.kubeflow.serving.inference.response"][1])
    x, _ = data
    np.testing.assert_array_equal(np.asarray(request["inputs"][0]["data"], np.float32).reshape(32, 1, 8, 8), x[rows])
    assert response["outputs"][0]["data"] == pytest.approx(r.json()["outputs"][0]["data"])
    assert response["id"] == rid and response["model_name"] == "digits-cnn"


# -- feedback --------------------------------------------------------------------------------------
def test_feedback_joins_unsampled_predictions_and_live_accuracy_equals_offline_accuracy(env, data):
    srv, http = env["srv"], env["http"]
    x, y = data
    predictions, labels, feedback = [], [], []
    for i in range(0, 200, 4):
        batch = 1 if i % 8 else 4
        rows = slice(i, i + batch)
        # Half send their own v2 id, half get Kiln's (the x-request-id of the response).
        r = http.post("/v2/models/digits-default/infer", json=body(x[rows], f"fb-{i}" if i % 3 else None))
        assert r.status_code == 200, r.text
        rid = r.json().get("id") or r.headers["x-request-id"]
        logits = np.asarray(r.json()["outputs"][0]["data"]).reshape(batch, -1)
        predictions += logits.argmax(axis=1).tolist()
        labels += y[rows].tolist()
        feedback.append({"id": rid, "label": y[rows].tolist() if batch > 1 else int(y[i])})
    feedback.append({"id": "never-served", "label": 1})
    before = scrape(srv.url)
    r = http.post("/v2/models/digits-default/feedback", json=feedback)
    assert r.status_code == 200, r.text
    out = r.json()
    offline = float(np.mean(np.asarray(predictions) == np.asarray(labels)))
    assert out["joined"] == len(feedback) - 1 and out["unmatched"] == 1 and out["unmatched_ids"] == ["never-served"]
    assert out["live"] == {"metric": "top1", "value": offline, "rows": len(labels), "window": 1000}
    s = scrape(srv.url)
    assert value(s, "kiln_live_accuracy", model="digits-default") == offline
    assert value(s, "kiln_live_labels", model="digits-default") == len(labels)
    assert value(s, "kiln_live_accuracy_min", model="digits-default") == 0.95
    for result, n in (("joined", len(feedback) - 1), ("unmatched", 1), ("late", 0)):
        delta = (value(s, "kiln_feedback_total", model="digits-default", result=result)
                 - value(before, "kiln_feedback_total", model="digits-default", result=result))
        assert delta == n, result
    # The same labels again, one at a time through the version path: duplicates, not counted twice.
    r = http.post("/v2/models/digits-default/versions/1/feedback", json=feedback[0])
    assert r.status_code == 200 and r.json()["duplicate"] == 1 and r.json()["live"]["value"] == offline


def test_a_model_loaded_again_is_observed_again_and_joins_feedback(env, data):
    """A version's batcher gets the monitor's observer on the version's first request
    (service/infer.py): a load builds new versions with new batchers, whose predictions must be
    indexed too, and those of the version it replaced are gone with it."""
    http = env["http"]
    x, y = data
    for i in range(4):
        assert http.post("/v2/models/digits-default/infer", json=body(x[i:i + 1], f"before-{i}")).status_code == 200
    r = http.post("/v2/repository/models/digits-default/load", headers={"Authorization": f"Bearer {REPO_TOKEN}"})
    assert r.status_code == 200, r.text
    predicted = []
    for i in range(8):
        r = http.post("/v2/models/digits-default/infer", json=body(x[i:i + 1], f"again-{i}"))
        assert r.status_code == 200, r.text
        predicted.append(int(np.argmax(r.json()["outputs"][0]["data"])))
    r = http.post("/v2/models/digits-default/feedback",
                  json=[{"id": f"again-{i}", "label": int(y[i])} for i in range(8)] + [{"id": "before-0", "label": 1}])
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["joined"] == 8 and out["unmatched_ids"] == ["before-0"]
    assert out["live"]["value"] == float(np.mean(np.asarray(predicted) == y[:8]))


def test_grpc_requests_are_captured_and_take_feedback_through_the_same_core(env, data):
    import tritonclient.grpc as grpcclient

    srv, http = env["srv"], env["http"]
    x, y = data
    before = scrape(srv.url)
    client = grpcclient.InferenceServerClient(srv.grpc_address)
    for i in range(6):
        inp = grpcclient.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x[i:i + 1])
        res = client.infer("digits-cnn", [inp], request_id=f"grpc-{i}", headers={"authorization": AUTH["Authorization"]})
        assert res.as_numpy("logits").shape == (1, 10)
    client.close()
    s = wait_for(srv, lambda s: captured(s, "digits-cnn", "stored") >= captured(before, "digits-cnn", "stored") + 6)
    r = http.post("/v2/models/digits-cnn/feedback", json=[{"id": f"grpc-{i}", "label": int(y[i])} for i in range(6)])
    assert r.status_code == 200 and r.json()["joined"] == 6, r.text
    assert captured(s, "digits-cnn", "dropped") == 0


def test_bad_feedback_gets_a_4xx_with_an_error_and_needs_the_infer_scope(env):
    srv, http = env["srv"], env["http"]
    r = http.post("/v2/models/digits-default/infer", json=body(np.zeros((2, 1, 8, 8), np.float32), "two-rows"))
    assert r.status_code == 200
    path = "/v2/models/digits-default/feedback"
    for payload, status, needle in [
        (b"{not json", 400, "malformed JSON"),
        (b'{"label": 1}', 400, "'id'"),
        (b'{"id": "two-rows"}', 400, "'label' is missing"),
        (b'{"id": "two-rows", "label": 3}', 400, "1 label(s) for a prediction of 2 row(s)"),
        (b'{"id": "two-rows", "label": [0.5, 2]}', 400, "class index"),
        (b'{"id": "two-rows", "label": ["one", "two"]}', 400, "unknown class name"),
    ]:
        r = http.post(path, content=payload)
        assert r.status_code == status and set(r.json()) == {"error"}, r.text
        assert needle in r.json()["error"], r.json()
    r = http.post("/v2/models/nope/feedback", content=b'{"id": "a", "label": 1}')
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    r = http.post("/v2/models/digits-off/feedback", content=b'{"id": "a", "label": 1}')
    assert r.status_code == 400 and "monitor.enabled: false" in r.json()["error"]
    r = httpx.post(srv.url + path, content=b'{"id": "a", "label": 1}')
    assert r.status_code == 401
    r = httpx.post(srv.url + path, content=b'{"id": "a", "label": 1}', headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 403 and "'infer' scope" in r.json()["error"]
    # Nothing of the bad requests was applied: the prediction still takes its (right-sized) label.
    r = http.post(path, json={"id": "two-rows", "label": [0, 0]})
    assert r.status_code == 200 and r.json()["joined"] == 1


def test_a_model_with_monitoring_off_or_a_zero_rate_captures_nothing(env, data):
    srv, http = env["srv"], env["http"]
    x, _ = data
    for i in range(20):
        assert http.post("/v2/models/digits-off/infer", json=body(x[i:i + 1], f"off-{i}")).status_code == 200
    s = scrape(srv.url)
    assert not [k for k in s if dict(k[1]).get("model") == "digits-off" and k[0].startswith(("kiln_capture", "kiln_drift",
                                                                                                "kiln_feedback"))]
    assert captured(s, "digits-default", "stored") == 0  # the server-wide --monitor-sample-rate 0
    store = CaptureStore(env["store"], CAP, readonly=True)
    try:
        models = {m for m, _, _ in store.models()}
    finally:
        store.close()
    assert models <= {"digits-cnn"}, models


# -- drift -----------------------------------------------------------------------------------------
def _send_and_wait(env, rows: np.ndarray, seen: int) -> list[dict]:
    """Send rows one request each; the drift evaluations once the detector has taken `seen` rows."""
    for i in range(len(rows)):
        r = env["http"].post("/v2/models/digits-drift/infer", json=body(rows[i:i + 1]))
        assert r.status_code == 200, r.text
    return drift_history_after(env["store"], "digits-drift", seen)


def test_an_unshifted_stream_keeps_drift_at_0_and_a_1_std_shift_flips_it_within_the_window(env, data):
    srv = env["srv"]
    x, _ = data
    with np.load(CALIB) as f:
        ref = f["input"].reshape(len(f["input"]), -1)
    rng = np.random.default_rng(5)
    clean = x[rng.permutation(len(x))][:300]  # held-out digits: the reference's distribution
    history = _send_and_wait(env, clean, 300)
    # One evaluation every 50 rows (the store may have trimmed the oldest of its history).
    assert [h["detail"]["seen"] for h in history][-3:] == [200, 250, 300]
    assert [h["detected"] for h in history] == [0] * len(history), [(h["min_p_value"], h["detail"]) for h in history]
    assert value(scrape(srv.url), "kiln_drift_detected", model="digits-drift") == 0

    # A sustained shift of 1 reference std on the 4 features that vary most.
    std = ref.std(axis=0)
    top = np.argsort(-std)[:4]
    shifted = x[rng.permutation(len(x))][:350].reshape(350, -1).copy()
    shifted[:, top] += std[top]
    history = [h for h in _send_and_wait(env, shifted.reshape(350, 1, 8, 8), 650) if h["detail"]["seen"] > 300]
    assert [h["detail"]["seen"] - 300 for h in history] == list(range(50, 351, 50))
    verdicts = [h["detected"] for h in history]
    assert 1 in verdicts, [(h["min_p_value"], h["detail"]["threshold"]) for h in history]
    first = 50 * (verdicts.index(1) + 1)
    assert first <= 250, f"detected only after {first} shifted rows"  # the window: 250 rows
    assert all(verdicts[verdicts.index(1):]), verdicts  # and it stays detected while the shift lasts
    drifted = set(history[-1]["detail"]["drifted"])
    assert drifted and drifted <= {f"input[{i}]" for i in top}, drifted
    s = scrape(srv.url)
    assert value(s, "kiln_drift_detected", model="digits-drift") == 1
    for i in top:
        assert value(s, "kiln_drift_p_value", model="digits-drift", input=f"input[{i}]", test="ks") < 0.05 / 65
        assert value(s, "kiln_drift_statistic", model="digits-drift", input=f"input[{i}]", test="ks") > 0.2
    assert value(s, "kiln_drift_statistic", model="digits-drift", input="predicted_class", test="chi2") >= 0


def test_kiln_monitor_report_prints_the_history_and_writes_a_png(env):
    png = env["tmp"] / "report.png"
    proc = subprocess.run([sys.executable, "-m", "service.cli", "monitor", "report", "digits-drift", "--store",
                           str(env["store"]), "--png", str(png)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "drift" in proc.stdout and "yes" in proc.stdout and "no" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# -- iterate: export → quantize → serve --------------------------------------------------------------
def test_export_feeds_quantize_and_the_int8_model_passes_its_gates(env, data):
    pytest.importorskip("torch")
    from tests.optimize_util import build_served

    x, y = data
    http = env["http"]
    # Three fresh captured requests, so the export does not hang on the load test's samples
    # surviving the 128 KiB store's churn from the tests in between (they are labelled too).
    srv = env["srv"]
    before = captured(scrape(srv.url), "digits-cnn", "stored")
    fresh = []
    for i in range(3):
        rows = np.random.default_rng(100 + i).choice(len(x), 32, replace=False)
        header = json.dumps({"id": f"export-{i}", "inputs": [{"name": "input", "datatype": "FP32",
                             "shape": [32, 1, 8, 8], "parameters": {"binary_data_size": 32 * 256}}]}).encode()
        r = http.post("/v2/models/digits-cnn/infer", content=header + x[rows].tobytes(),
                      headers={"Inference-Header-Content-Length": str(len(header))})
        assert r.status_code == 200, r.text
        fresh.append((f"export-{i}", rows, r))
    # Labels for the captured requests (the eval labels of their rows), sent at once, as a client
    # would: the fresh samples are still waiting for the worker's next write (one a second).
    kept = {rid: rows for rid, rows, _ in env["load"] + fresh}
    r = http.post("/v2/models/digits-cnn/feedback", json=[{"id": rid, "label": y[rows].tolist()}
                                                           for rid, rows in kept.items()])
    assert r.status_code == 200 and r.json()["joined"] == len(kept)
    wait_for(srv, lambda s: captured(s, "digits-cnn", "stored") >= before + 3)
    # The newest request's sample is the last the 128 KiB store evicts (older ones may go to make room).
    fresh_rows = {x[i].tobytes() for i in fresh[-1][1]}
    out = env["tmp"] / "traffic.npz"
    proc, exported = export_labelled(env["store"], "digits-cnn", out,
                                     lambda a: fresh_rows <= {row.tobytes() for row in a["input"]})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The newest request is exported with its label, though its feedback came before its sample was written.
    assert fresh_rows <= {row.tobytes() for row in exported["input"]}
    assert set(exported) == {"input", "output.logits", "label"}
    n = len(exported["input"])
    assert n >= 32 and exported["label"].shape == (n,) and exported["output.logits"].shape == (n, 10)
    index = {x[i].tobytes(): y[i] for i in range(len(x))}
    assert [index[row.tobytes()] for row in exported["input"]] == exported["label"].tolist()

    int8 = env["tmp"] / "digits-int8"
    proc = subprocess.run([sys.executable, "-m", "service.cli", "optimize", "quantize", str(DEFAULT_REPO / "digits-cnn"),
                           "--backend", "onnxruntime", "--calib", str(out), "--runs", "10", "--out", str(int8)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The captured traffic also serves as the gates' verify samples.
    cfg = int8 / "config.yaml"
    cfg.write_text(cfg.read_text().replace("samples: data/calib.npz", f"samples: {out}"))
    assert f"samples: {out}" in cfg.read_text()
    mv = build_served(int8, env["tmp"] / "int8-cache")
    try:
        assert mv.state == "READY", mv.reason
        assert mv.parity.passed and mv.parity.samples == min(n, 64)
        assert mv.accuracy["drop"] <= 0.01 and mv.accuracy["compiled"] >= 0.95, mv.accuracy
        import onnx

        ops = {node.op_type for node in onnx.load(str(int8 / "1" / "model.onnx")).graph.node}
        assert "QuantizeLinear" in ops or "QLinearConv" in ops, ops
    finally:
        mv.close()
