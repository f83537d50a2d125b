"""/metrics parses with prometheus-client and moves with traffic; inference never blocks the event loop."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import onnx
import orjson
from onnx import TensorProto, helper

from tests.kiln_server import start_server
from tests.metrics_util import scrape, value

GOOD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8], "data": [0.25] * 128}]}


def test_metrics_move_after_requests(server):
    before = scrape(server.url)
    for _ in range(5):
        assert httpx.post(server.url + "/v2/models/digits-cnn/infer", content=orjson.dumps(GOOD)).status_code == 200
    assert httpx.post(server.url + "/v2/models/digits-cnn/infer", content=b"{").status_code == 400
    after = scrape(server.url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kiln_inference_requests_total", model="digits-cnn", outcome="success") == 5
    assert delta("kiln_inference_requests_total", model="digits-cnn", outcome="client_error") == 1
    assert delta("kiln_inference_samples_total", model="digits-cnn") == 10
    for phase in ("decode", "queue", "compute", "encode", "total"):
        assert delta("kiln_request_duration_seconds_count", model="digits-cnn", phase=phase) == 5
    assert delta("kiln_request_duration_seconds_sum", model="digits-cnn", phase="total") > 0
    assert delta("kiln_batch_size_count", model="digits-cnn") >= 1
    assert value(after, "kiln_model_state", model="digits-cnn", backend="onnxruntime", state="READY") == 1
    assert value(after, "kiln_parity_max_abs_error", model="digits-cnn-openvino", output="logits") >= 0
    assert ("kiln_queue_depth", (("model", "digits-cnn"), ("version", "1"))) in after
    assert ("kiln_inflight_requests", (("model", "digits-cnn"),)) in after


def slow_model(path, size=768, depth=24):
    """Chained MatMul+Tanh on a [size, size] input: seconds of compute, no weights."""
    nodes, prev = [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "x"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_slow_inference_does_not_block_health_or_metrics(tmp_path):
    size = 768
    (tmp_path / "repo" / "slow" / "1").mkdir(parents=True)
    slow_model(tmp_path / "repo" / "slow" / "1" / "model.onnx", size)
    (tmp_path / "repo" / "slow" / "config.yaml").write_text("backend: onnxruntime\nverify: {atol: 1.0e-3, rtol: 1.0e-3}\n")
    srv = start_server(tmp_path / "repo", log_dir=tmp_path)
    try:
        x = (np.random.default_rng(0).standard_normal((size, size)) / size).astype(np.float32)
        header = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [size, size],
                                           "parameters": {"binary_data_size": x.nbytes}}]})
        results = []

        def call():
            r = httpx.post(srv.url + "/v2/models/slow/infer", content=header + x.tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(header))}, timeout=120)
            results.append(r.status_code)

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        # Wait until the server reports requests in flight, then ask for health while they run.
        seen_inflight = False
        for _ in range(2000):
            m = scrape(srv.url)
            if value(m, "kiln_inflight_requests", model="slow") >= 1:
                seen_inflight = True
                break
        assert seen_inflight
        assert httpx.get(srv.url + "/v2/health/live", timeout=10).status_code == 200
        assert httpx.get(srv.url + "/v2/health/ready", timeout=10).status_code == 200
        still_running = sum(t.is_alive() for t in threads)
        assert still_running >= 1, "health answered only after every slow request had finished"
        for t in threads:
            t.join(120)
        assert results == [200, 200, 200]
    finally:
        srv.stop()
