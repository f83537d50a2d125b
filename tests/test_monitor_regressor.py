"""Monitoring a model that is not the digits classifier: a two-input ONNX regressor fitted on
scikit-learn's diabetes data (inputs `clinical` [N, 6] and `serum` [N, 4], output `risk` [N, 1]),
served by the real server. Feedback as ground-truth tensors gives the live MAE of the same
predictions computed offline; labels sent right after their answers are exported with their
samples; drift is reported per element of each input and flips on a 1-std shift of two of them.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_diabetes

from tests.kiln_server import start_server
from tests.metrics_util import scrape, value
from tests.monitor_util import drift_history, drift_history_after, export_labelled

MODEL = "diabetes"


def _regressor(repo: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A least-squares fit on a random half of the rows; that half is the drift reference and the
    verify samples, the other half is what the test serves."""
    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = ((y - y.mean()) / y.std()).astype(np.float32)
    order = rng.permutation(len(x))
    fit, held = order[:221], order[221:]
    coef, *_ = np.linalg.lstsq(np.c_[x[fit], np.ones(len(fit))], y[fit], rcond=None)
    w = coef[:-1].astype(np.float32).reshape(10, 1)
    nodes = [helper.make_node("MatMul", ["clinical", "w_clinical"], ["c"]),
             helper.make_node("MatMul", ["serum", "w_serum"], ["s"]),
             helper.make_node("Add", ["c", "s"], ["cs"]),
             helper.make_node("Add", ["cs", "bias"], ["risk"])]
    inits = [numpy_helper.from_array(w[:6], "w_clinical"), numpy_helper.from_array(w[6:], "w_serum"),
             numpy_helper.from_array(np.array([coef[-1]], np.float32), "bias")]
    graph = helper.make_graph(nodes, "diabetes", [
        helper.make_tensor_value_info("clinical", TensorProto.FLOAT, ["batch", 6]),
        helper.make_tensor_value_info("serum", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("risk", TensorProto.FLOAT, ["batch", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = repo / MODEL
    (folder / "1").mkdir(parents=True)
    onnx.save(model, folder / "1" / "model.onnx")
    np.savez(folder / "reference.npz", clinical=x[fit, :6], serum=x[fit, 6:])
    (folder / "config.yaml").write_text(
        "backend: onnxruntime\nmax_batch_size: 16\ndynamic_batching: {max_queue_delay_ms: 1}\n"
        "verify: {samples: reference.npz}\n"
        "monitor: {sample_rate: 1.0, reference: reference.npz, drift: {min_interval_s: 0, p_value_interval_s: 0}}\n")
    return {"clinical": x[held, :6], "serum": x[held, 6:], "y": y[held]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor-regressor")
    held = _regressor(tmp / "repo", np.random.default_rng(0))
    store = tmp / "store"
    srv = start_server(tmp / "repo", log_dir=tmp, env={"KILN_MONITOR_DIR": str(store)})
    http = httpx.Client(base_url=srv.url, timeout=30)
    yield {"srv": srv, "http": http, "store": store, "tmp": tmp, "held": held}
    http.close()
    assert srv.stop() == 0


def infer(http: httpx.Client, clinical: np.ndarray, serum: np.ndarray, rid: str | None = None) -> np.ndarray:
    req = {"inputs": [{"name": "clinical", "datatype": "FP32", "shape": list(clinical.shape), "data": clinical.ravel().tolist()},
                      {"name": "serum", "datatype": "FP32", "shape": list(serum.shape), "data": serum.ravel().tolist()}]}
    if rid is not None:
        req["id"] = rid
    r = http.post(f"/v2/models/{MODEL}/infer", json=req)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "risk"
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def test_live_mae_equals_offline_mae_and_prompt_labels_are_exported_with_their_samples(env):
    http, held = env["http"], env["held"]
    n = len(held["y"])
    predictions = np.concatenate([infer(http, held["clinical"][i:i + 1], held["serum"][i:i + 1], f"r-{i}")
                                  for i in range(n)])
    # Labels at once, as ground-truth tensors, before the worker's next write of the samples.
    r = http.post(f"/v2/models/{MODEL}/feedback", json=[
        {"id": f"r-{i}", "label": {"datatype": "FP32", "shape": [1, 1], "data": [float(held["y"][i])]}} for i in range(n)])
    assert r.status_code == 200, r.text
    out = r.json()
    offline = float(np.mean(np.abs(predictions[:, 0].astype(np.float64) - held["y"].astype(np.float64))))
    assert out["joined"] == n and out["unmatched"] == 0
    assert out["live"]["metric"] == "mae" and out["live"]["rows"] == n
    assert out["live"]["value"] == pytest.approx(offline, rel=1e-12, abs=0)
    assert value(scrape(env["srv"].url), "kiln_live_mae", model=MODEL) == pytest.approx(offline, rel=1e-12, abs=0)
    # A class name is no label for a regressor.
    r = http.post(f"/v2/models/{MODEL}/feedback", json={"id": "r-0", "label": "high"})
    assert r.status_code == 400 and "regressor" in r.json()["error"]

    proc, arrays = export_labelled(env["store"], MODEL, env["tmp"] / "labelled.npz",
                                   lambda a: len(a["clinical"]) == n)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(arrays) == {"clinical", "serum", "output.risk", "label"}
    assert len(arrays["clinical"]) == n, "every request was captured and labelled"
    np.testing.assert_array_equal(arrays["clinical"], held["clinical"])  # oldest first: the order sent
    np.testing.assert_array_equal(arrays["serum"], held["serum"])
    np.testing.assert_array_equal(arrays["output.risk"], predictions)
    np.testing.assert_array_equal(arrays["label"].ravel().astype(np.float32), held["y"])


def _send(env, clinical: np.ndarray, serum: np.ndarray, seen: int) -> list[dict]:
    """Rows in batches of 5; the drift evaluations once the detector has taken `seen` rows."""
    for i in range(0, len(clinical), 5):
        infer(env["http"], clinical[i:i + 5], serum[i:i + 5])
    return drift_history_after(env["store"], MODEL, seen)


def test_drift_is_per_input_element_and_a_shift_on_two_clinical_features_is_found(env):
    held = env["held"]
    rng = np.random.default_rng(7)
    before = drift_history(env["store"], MODEL)
    start = before[-1]["detail"]["seen"] if before else 0  # the rows of the test above
    # 250 fresh rows (a whole window) drawn from the held-out half: the reference's distribution.
    pick = rng.integers(len(held["y"]), size=250)
    history = [h for h in _send(env, held["clinical"][pick], held["serum"][pick], start + 250)
               if h["detail"]["seen"] > start + 200]
    assert history and not any(h["detected"] for h in history), [(h["min_p_value"], h["detail"]) for h in history]
    assert value(scrape(env["srv"].url), "kiln_drift_detected", model=MODEL) == 0

    pick = rng.integers(len(held["y"]), size=250)
    clinical = held["clinical"][pick].copy()
    clinical[:, :2] += 1.0  # one std (the inputs are standardized) on age and sex
    history = _send(env, clinical, held["serum"][pick], start + 500)
    last = history[-1]
    assert last["detected"] == 1, (last["min_p_value"], last["detail"])
    assert set(last["detail"]["drifted"]) <= {"clinical[0]", "clinical[1]"} and last["detail"]["drifted"]
    s = scrape(env["srv"].url)
    assert value(s, "kiln_drift_detected", model=MODEL) == 1
    for feature in ("clinical[0]", "clinical[1]"):
        assert value(s, "kiln_drift_p_value", model=MODEL, input=feature, test="ks") < 0.05 / 10
    for feature in ("serum[0]", "serum[3]", "clinical[5]"):  # untouched: present, not drifted
        assert value(s, "kiln_drift_p_value", model=MODEL, input=feature, test="ks") > 0.05 / 10
