"""Dynamic batching through the real server: own rows back under concurrency, 503 on a full queue,
batch sizes > 1 in /metrics."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.kiln_server import start_server
from tests.metrics_util import scrape, value
from tests.test_batcher import linear_model

LIN = """\
max_batch_size: 16
dynamic_batching: {{max_queue_delay_ms: 2, preferred_batch_sizes: [8, 16], max_queue_size: 1000}}
instances: {instances}
"""
HEAVY = """\
max_batch_size: 4
dynamic_batching: {max_queue_delay_ms: 1, max_queue_size: 2}
instances: 1
"""


def heavy_model(path, width=256, depth=150):
    """tanh(x @ W) chained `depth` times: ~10 M multiply-adds per row, small file."""
    w = (np.random.default_rng(0).standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, prev = [], "x"
    for i in range(depth):
        nodes += [helper.make_node("MatMul", [prev, "w"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "heavy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    repo = root / "repo"
    for name, cfg in (("lin", LIN.format(instances=1)), ("lin2", LIN.format(instances=2)), ("heavy", HEAVY)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.yaml").write_text(cfg)
    linear_model(repo / "lin" / "1" / "model.onnx")
    linear_model(repo / "lin2" / "1" / "model.onnx")
    heavy_model(repo / "heavy" / "1" / "model.onnx")
    srv = start_server(repo, root / "cache", log_dir=root, timeout=300)
    yield srv, repo
    srv.stop()


def _json(x):
    return orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.reshape(-1).tolist()}]}), {}


def _binary(x):
    header = orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _output(resp: httpx.Response) -> np.ndarray:
    hlen = resp.headers.get("inference-header-content-length")
    if hlen is None:
        out = resp.json()["outputs"][0]
        return np.asarray(out["data"], np.float32).reshape(out["shape"])
    header = orjson.loads(resp.content[:int(hlen)])
    out = header["outputs"][0]
    return np.frombuffer(resp.content[int(hlen):], np.float32).reshape(out["shape"])


@pytest.mark.parametrize("model", ["lin", "lin2"])
def test_concurrent_clients_get_their_own_rows(batch_server, model):
    srv, repo = batch_server
    so = ort.SessionOptions()
    ref = ort.InferenceSession(str(repo / model / "1" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    start = threading.Barrier(24)
    failures = []

    def client(i):
        rng = np.random.default_rng(100 + i)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            start.wait()
            for j in range(15):
                x = rng.standard_normal((int(rng.integers(1, 5)), 16)).astype(np.float32)
                body, headers = (_json if (i + j) % 2 else _binary)(x)
                r = c.post(f"/v2/models/{model}/infer", content=body, headers=headers)
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                    continue
                got = _output(r)
                want = ref.run(None, {"x": x})[0]
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-5):
                    failures.append(("rows", i, j, got.shape, want.shape))

    before = scrape(srv.url)
    with ThreadPoolExecutor(24) as pool:
        list(pool.map(client, range(24)))
    assert not failures, failures[:5]
    after = scrape(srv.url)
    batches = value(after, "kiln_batch_size_count", model=model) - value(before, "kiln_batch_size_count", model=model)
    ones = (value(after, "kiln_batch_size_bucket", model=model, le="1.0")
            - value(before, "kiln_batch_size_bucket", model=model, le="1.0"))
    rows = value(after, "kiln_batch_size_sum", model=model) - value(before, "kiln_batch_size_sum", model=model)
    samples = (value(after, "kiln_inference_samples_total", model=model)
               - value(before, "kiln_inference_samples_total", model=model))
    assert rows == samples  # every row ran exactly once
    assert batches < 24 * 15, "no two requests were ever merged"
    assert batches - ones > 0, "no executed batch had more than one row"
    assert ("kiln_queue_depth", (("model", model), ("version", "1"))) in after


def test_full_queue_answers_503_with_retry_after(batch_server):
    srv, _ = batch_server
    x = np.ones((1, 256), np.float32)
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
    start = threading.Barrier(32)
    before = scrape(srv.url)

    def client(_):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            start.wait()
            return [c.post("/v2/models/heavy/infer", content=body) for _ in range(3)]

    with ThreadPoolExecutor(32) as pool:
        responses = [r for rs in pool.map(client, range(32)) for r in rs]
    codes = {r.status_code for r in responses}
    assert codes <= {200, 503}, codes
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, "a queue of 2 with 32 concurrent clients never filled"
    assert any(r.status_code == 200 for r in responses)
    for r in rejected:
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
        assert set(r.json()) == {"error"} and "max_queue_size 2" in r.json()["error"]
    after = scrape(srv.url)
    assert (value(after, "kiln_inference_requests_total", model="heavy", outcome="rejected")
            - value(before, "kiln_inference_requests_total", model="heavy", outcome="rejected")) == len(rejected)
