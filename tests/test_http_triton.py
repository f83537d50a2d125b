"""The real tritonclient.http client against the real server on the default repository."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from tests.kiln_server import DEFAULT_REPO

MODELS = ["digits-cnn", "digits-cnn-openvino"]


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(eval_set):
    sess = ort.InferenceSession(str(DEFAULT_REPO / "digits-cnn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": eval_set[0]})[0]


def test_server_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "kiln"
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("model", MODELS)
def test_model_metadata_and_config(client, model):
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, "1")
    meta = client.get_model_metadata(model)
    assert meta["name"] == model
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    params = meta["parameters"]
    assert params["state"] == "READY"
    assert params["parity_passed"] is True
    assert params["parity_max_abs_error"] < 1e-4
    cfg = client.get_model_config(model)
    assert cfg["max_batch_size"] == 32
    assert cfg["input"][0] == {"name": "input", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}
    assert cfg["output"][0]["dims"] == [10]
    assert cfg["kiln"]["backend"] == ("openvino" if model.endswith("openvino") else "onnxruntime")
    assert cfg["kiln"]["precision"] == "fp32"


def _infer_all(client, model, x, binary_in, binary_out):
    preds, logits = [], []
    for start in range(0, len(x), 32):
        batch = x[start:start + 32]
        inp = httpclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch, binary_data=binary_in)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary_out)
        res = client.infer(model, [inp], outputs=[out], request_id=f"r{start}")
        assert res.get_response()["id"] == f"r{start}"
        arr = res.as_numpy("logits")
        assert arr.shape == (len(batch), 10)
        logits.append(arr)
    out = np.concatenate(logits)
    return out, out.argmax(1)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("binary_in,binary_out", [(False, False), (True, True), (True, False), (False, True)])
def test_infer_matches_in_process_onnxruntime(client, model, eval_set, reference, binary_in, binary_out):
    x, y = eval_set
    logits, preds = _infer_all(client, model, x, binary_in, binary_out)
    np.testing.assert_array_equal(preds, reference.argmax(1))
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-3)
    assert float(np.mean(preds == y)) >= 0.95


def test_infer_without_requested_outputs_returns_all_binary(client, eval_set):
    x, _ = eval_set
    inp = httpclient.InferInput("input", [4, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x[:4], binary_data=True)
    res = client.infer("digits-cnn", [inp])  # the client asks binary_data_output
    assert res.as_numpy("logits").shape == (4, 10)
    assert res.get_output("logits")["parameters"]["binary_data_size"] == 4 * 10 * 4


def test_classification_extension(client, eval_set, reference):
    x, _ = eval_set
    inp = httpclient.InferInput("input", [3, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x[:3])
    out = httpclient.InferRequestedOutput("logits", binary_data=False, class_count=2)
    res = client.infer("digits-cnn", [inp], outputs=[out])
    top = res.as_numpy("logits")
    assert top.shape == (3, 2)
    for row, ref in zip(top, reference[:3]):
        text = row[0].decode() if isinstance(row[0], bytes) else row[0]
        score, index = text.split(":")[:2]
        assert int(index) == int(ref.argmax())
        assert abs(float(score) - float(ref.max())) < 1e-3


def test_repository_index_unload_load(client):
    index = client.get_model_repository_index()
    names = {m["name"]: m for m in index}
    assert names["digits-cnn"]["state"] == "READY"
    client.unload_model("digits-cnn-openvino")
    assert not client.is_model_ready("digits-cnn-openvino")
    states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert states["digits-cnn-openvino"] == "UNAVAILABLE"
    # the other model keeps serving
    assert client.is_model_ready("digits-cnn")
    client.load_model("digits-cnn-openvino")
    assert client.is_model_ready("digits-cnn-openvino")
