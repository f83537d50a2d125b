"""gRPC with the real clients: tritonclient.grpc (sync, aio, streaming) and its generated stubs against
the real server, compared with tritonclient.http on the same server; every error status provoked."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import helper
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.hardening_util import add_busy, add_digits, add_slow
from tests.kiln_server import DEFAULT_REPO, start_server
from tests.metrics_util import scrape, value
from tests.test_datatypes import TYPES, sample

BODY_LIMIT = 4 * 1024 * 1024
SLOW = 640  # the slow model's [SLOW, SLOW] input: long enough a compute for deadlines and drains
SLOW_DEPTH = 64  # its matmuls: 0.34 s a call on an AVX-512 AMD EPYC core, the fastest seen (24 took 0.26 s on an AVX2 one)


def identity_model(path, types) -> None:
    """One Identity per datatype: in_<type> [-1, 3] -> out_<type>."""
    path.mkdir(parents=True)
    ins = [helper.make_tensor_value_info(f"in_{n.lower()}", TYPES[n][0], [-1, 3]) for n in types]
    outs = [helper.make_tensor_value_info(f"out_{n.lower()}", TYPES[n][0], [-1, 3]) for n in types]
    nodes = [helper.make_node("Identity", [f"in_{n.lower()}"], [f"out_{n.lower()}"]) for n in types]
    model = helper.make_model(helper.make_graph(nodes, "identity", ins, outs), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path / "model.onnx")


def build_repo(repo) -> None:
    add_digits(repo)
    shutil.copytree(DEFAULT_REPO / "digits-cnn-openvino", repo / "digits-cnn-openvino")
    identity_model(repo / "identity" / "1", list(TYPES))
    (repo / "identity" / "config.yaml").write_text("backend: onnxruntime\nmax_batch_size: 8\n")
    # Typed `contents` have no FP16 field: a model without that input.
    identity_model(repo / "typed" / "1", [t for t in TYPES if t != "FP16"])
    (repo / "typed" / "config.yaml").write_text("backend: onnxruntime\nmax_batch_size: 8\n")
    add_busy(repo, "busy", extra="dynamic_batching: {max_queue_size: 1}\n")
    add_slow(repo, "slow", size=SLOW, depth=SLOW_DEPTH)
    (repo / "broken" / "1").mkdir(parents=True)  # no model source: FAILED, never ready
    (repo / "broken" / "config.yaml").write_text("backend: onnxruntime\n")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc")
    build_repo(root / "repo")
    server = start_server(root / "repo", log_dir=root, grpc=True, env={"KILN_MAX_BODY_BYTES": str(BODY_LIMIT)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(srv):
    c = grpcclient.InferenceServerClient(srv.grpc_address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(srv):
    c = httpclient.InferenceServerClient(srv.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(srv):
    channel = grpc.insecure_channel(srv.grpc_address)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def status_of(call) -> tuple[str, str]:
    """(status name, message) of a tritonclient call that must fail."""
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value.status(), err.value.message()


def digits_input(x: np.ndarray):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


# -- health, metadata, config ----------------------------------------------------------------------
def test_health_and_server_metadata(client, http, srv):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta == http.get_server_metadata() | {"version": meta["version"]}
    assert {"statistics", "classification", "model_repository"} <= set(meta["extensions"])
    with grpc.insecure_channel(srv.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "live", "ready", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        first = next(health.Watch(health_pb2.HealthCheckRequest(service="ready")))
        assert first.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("model", ["digits-cnn", "digits-cnn-openvino", "identity"])
def test_model_metadata_and_config_match_http(client, http, model):
    assert client.is_model_ready(model) and client.is_model_ready(model, "1")
    meta = client.get_model_metadata(model, as_json=True)
    want = http.get_model_metadata(model)
    assert meta["name"] == want["name"] and meta["versions"] == want["versions"]
    assert meta["platform"] == want["platform"]
    for key in ("inputs", "outputs"):  # protobuf's JSON writes int64 as strings
        assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in meta[key]] == want[key]
    cfg = client.get_model_config(model, as_json=True)["config"]
    hcfg = http.get_model_config(model)
    assert cfg["name"] == model and int(cfg["max_batch_size"]) == hcfg["max_batch_size"]
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in cfg["input"]] == \
        [(t["name"], t["data_type"], t["dims"]) for t in hcfg["input"]]
    assert [(t["name"], t["data_type"]) for t in cfg["output"]] == [(t["name"], t["data_type"]) for t in hcfg["output"]]
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU" and cfg["instance_group"][0]["count"] == 1
    if model.startswith("digits"):
        assert [int(s) for s in cfg["dynamic_batching"]["preferred_batch_size"]] == \
            hcfg["dynamic_batching"]["preferred_batch_size"]
        assert cfg["parameters"]["parity_passed"]["string_value"] == "True"


def test_grpc_port_setting(monkeypatch):
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.delenv("KILN_GRPC_PORT", raising=False)
    assert Settings().grpc_port == 8001  # Triton's port by default
    monkeypatch.setenv("KILN_GRPC_PORT", "0")
    assert Settings().grpc_port == 0
    monkeypatch.setenv("KILN_GRPC_PORT", "70000")
    with pytest.raises(ValidationError, match="grpc_port"):
        Settings()


def test_unknown_and_not_ready_models(client):
    assert status_of(lambda: client.get_model_metadata("nope"))[0] == "StatusCode.NOT_FOUND"
    assert status_of(lambda: client.is_model_ready("digits-cnn", "7"))[0] == "StatusCode.NOT_FOUND"
    assert not client.is_model_ready("broken")
    x = np.zeros((1, 1, 8, 8), np.float32)
    assert status_of(lambda: client.infer("nope", [digits_input(x)]))[0] == "StatusCode.NOT_FOUND"
    code, message = status_of(lambda: client.infer("broken", [digits_input(x)]))
    assert code == "StatusCode.UNAVAILABLE" and "not ready (FAILED)" in message
    assert client.infer("digits-cnn", [digits_input(x)], model_version="1").get_response().model_version == "1"
    assert status_of(lambda: client.infer("digits-cnn", [digits_input(x)], model_version="2"))[0] == \
        "StatusCode.NOT_FOUND"


# -- inference --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["digits-cnn", "digits-cnn-openvino"])
def test_infer_matches_http(client, http, eval_set, model):
    x = eval_set[0][:96]
    for start in range(0, len(x), 32):
        batch = x[start:start + 32]
        res = client.infer(model, [digits_input(batch)], outputs=[grpcclient.InferRequestedOutput("logits")],
                           request_id=f"g{start}")
        assert res.get_response().id == f"g{start}" and res.get_response().model_version == "1"
        hin = httpclient.InferInput("input", list(batch.shape), "FP32")
        hin.set_data_from_numpy(batch, binary_data=True)
        want = http.infer(model, [hin]).as_numpy("logits")
        np.testing.assert_array_equal(res.as_numpy("logits"), want)
        assert (res.as_numpy("logits").argmax(1) == eval_set[1][start:start + 32]).mean() >= 0.9


def test_classification_matches_http(client, http, eval_set):
    x = eval_set[0][:4]
    res = client.infer("digits-cnn", [digits_input(x)], outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)])
    hin = httpclient.InferInput("input", list(x.shape), "FP32")
    hin.set_data_from_numpy(x)
    want = http.infer("digits-cnn", [hin], outputs=[httpclient.InferRequestedOutput("logits", class_count=3)])
    got = res.as_numpy("logits")
    assert got.shape == (4, 3)
    assert got.tolist() == want.as_numpy("logits").tolist()
    logits = client.infer("digits-cnn", [digits_input(x)]).as_numpy("logits")
    assert [int(c.split(b":")[1]) for c in got[:, 0]] == logits.argmax(1).tolist()


def test_all_13_datatypes_match_http(client, http):
    inputs, hinputs, expected = [], [], {}
    for name, (_, dtype) in TYPES.items():
        arr = sample(name, dtype)
        inp = grpcclient.InferInput(f"in_{name.lower()}", list(arr.shape), name)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
        hin = httpclient.InferInput(f"in_{name.lower()}", list(arr.shape), name)
        hin.set_data_from_numpy(arr, binary_data=True)
        hinputs.append(hin)
        expected[f"out_{name.lower()}"] = arr
    res = client.infer("identity", inputs)
    hres = http.infer("identity", hinputs)
    for out, arr in expected.items():
        got, want = res.as_numpy(out), hres.as_numpy(out)
        assert got.shape == arr.shape == want.shape, out
        if arr.dtype == object:
            assert got.reshape(-1).tolist() == arr.reshape(-1).tolist() == want.reshape(-1).tolist(), out
        else:
            assert got.dtype == arr.dtype == want.dtype, out
            np.testing.assert_array_equal(got, arr, err_msg=out)
            np.testing.assert_array_equal(got, want, err_msg=out)


def _typed_request(model: str = "typed") -> tuple[service_pb2.ModelInferRequest, dict[str, np.ndarray]]:
    """Every input in the typed `contents` fields, built with tritonclient's own protobuf classes."""
    req = service_pb2.ModelInferRequest(model_name=model, id="typed-1")
    expected = {}
    for name, (_, dtype) in TYPES.items():
        if name == "FP16":
            continue
        arr = sample(name, dtype)
        t = req.inputs.add(name=f"in_{name.lower()}", datatype=name, shape=arr.shape)
        field = {"BOOL": "bool_contents", "UINT64": "uint64_contents", "INT64": "int64_contents",
                 "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}.get(name)
        field = field or ("uint_contents" if name.startswith("UINT") else "int_contents")
        getattr(t.contents, field).extend(arr.reshape(-1).tolist())
        expected[f"out_{name.lower()}"] = arr
    return req, expected


def test_typed_contents_in_raw_out(stub):
    req, expected = _typed_request()
    resp = stub.ModelInfer(req)
    assert resp.id == "typed-1" and len(resp.raw_output_contents) == len(resp.outputs) == len(expected)
    result = grpcclient.InferResult(resp)
    for out, arr in expected.items():
        got = result.as_numpy(out)
        if arr.dtype == object:
            assert got.reshape(-1).tolist() == arr.reshape(-1).tolist(), out
        else:
            assert got.dtype == arr.dtype, out
            np.testing.assert_array_equal(got, arr, err_msg=out)


def test_output_selection_and_parameters(stub, client):
    req, expected = _typed_request()
    req.outputs.add(name="out_int32")
    req.outputs.add(name="out_bytes")
    req.parameters["timeout"].int64_param = 5_000_000  # µs: the OIP parameter, under the deadline
    resp = stub.ModelInfer(req, timeout=10)
    assert [o.name for o in resp.outputs] == ["out_int32", "out_bytes"]
    res = grpcclient.InferResult(resp)
    np.testing.assert_array_equal(res.as_numpy("out_int32"), expected["out_int32"])
    req.outputs.add(name="out_nope")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown output 'out_nope'" in err.value.details()


def test_aio_client_concurrent(srv, eval_set, client):
    x = eval_set[0][:64]
    want = client.infer("digits-cnn", [digits_input(x[:32])]).as_numpy("logits")

    async def run():
        async with aioclient.InferenceServerClient(srv.grpc_address) as c:
            assert await c.is_server_ready()
            results = await asyncio.gather(*[
                c.infer("digits-cnn", [_aio_input(x[i:i + 1])], request_id=str(i)) for i in range(32)])
            return [r.as_numpy("logits") for r in results], [r.get_response().id for r in results]

    outs, ids = asyncio.run(run())
    assert ids == [str(i) for i in range(32)]
    np.testing.assert_allclose(np.concatenate(outs), want, atol=1e-5, rtol=1e-5)


def _aio_input(x):
    inp = aioclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_streaming(srv, eval_set, client):
    x = eval_set[0][:16]
    want = client.infer("digits-cnn", [digits_input(x)]).as_numpy("logits")
    results, errors, done = {}, [], threading.Event()

    def callback(result, error):
        if error is not None:
            errors.append(error)
        else:
            results[result.get_response().id] = result.as_numpy("logits")
        if len(results) + len(errors) == 17:
            done.set()

    c = grpcclient.InferenceServerClient(srv.grpc_address)
    c.start_stream(callback=callback)
    for i in range(16):
        c.async_stream_infer("digits-cnn", [digits_input(x[i:i + 1])], request_id=f"s{i}")
    bad = grpcclient.InferInput("nope", [1, 1, 8, 8], "FP32")
    bad.set_data_from_numpy(x[:1])
    c.async_stream_infer("digits-cnn", [bad], request_id="bad")
    assert done.wait(60), (len(results), errors)
    c.stop_stream()
    c.close()
    assert sorted(results) == sorted(f"s{i}" for i in range(16))
    np.testing.assert_allclose(np.concatenate([results[f"s{i}"] for i in range(16)]), want, atol=1e-5, rtol=1e-5)
    assert len(errors) == 1 and "unknown input 'nope'" in str(errors[0])


# -- errors -----------------------------------------------------------------------------------------
def _raw(stub, **fields):
    req = service_pb2.ModelInferRequest(model_name="digits-cnn", **fields)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req)
    return err.value.code(), err.value.details()


def test_invalid_argument(stub, client):
    x = np.zeros((2, 1, 8, 8), np.float32)
    t = service_pb2.ModelInferRequest.InferInputTensor
    cases = [
        (dict(inputs=[t(name="input", datatype="FP32", shape=[2, 1, 8, 8])], raw_input_contents=[x.tobytes()[:-4]]),
         "needs 512 bytes, raw_input_contents has 508"),
        (dict(inputs=[t(name="input", datatype="FP32", shape=[2, 1, 8, 8],
                        contents=service_pb2.InferTensorContents(fp32_contents=[0.0]))],
              raw_input_contents=[x.tobytes()]), "'contents' is set while the request uses raw_input_contents"),
        (dict(inputs=[t(name="input", datatype="FP32", shape=[2, 1, 8, 8],
                        contents=service_pb2.InferTensorContents(fp32_contents=[0.0] * 5))]), "needs 128 elements"),
        (dict(inputs=[t(name="input", datatype="FP32", shape=[2, 1, 8, 8],
                        contents=service_pb2.InferTensorContents(int_contents=[0] * 128))]), "takes 'fp32_contents'"),
        (dict(inputs=[t(name="input", datatype="FP16", shape=[2, 1, 8, 8],
                        contents=service_pb2.InferTensorContents(fp32_contents=[0.0] * 128))]),
         "FP16 has no typed contents field"),
        (dict(inputs=[t(name="input", datatype="FP32", shape=[2, 1, 8, 8])]), "neither 'contents' nor raw"),
        (dict(inputs=[t(name="input", datatype="FP32", shape=[2, 1, 4, 16])], raw_input_contents=[x.tobytes()]),
         "does not match the model's"),
        (dict(inputs=[t(name="input", datatype="INT32", shape=[2, 1, 8, 8])], raw_input_contents=[x.tobytes()]),
         "datatype INT32 does not match"),
        (dict(inputs=[t(name="input", datatype="FP32", shape=[2, 1, 8, 8])], raw_input_contents=[b"", b""]),
         "2 entries for 1 inputs"),
        (dict(inputs=[t(name="input", datatype="WAT", shape=[1])], raw_input_contents=[b""]), "unknown datatype"),
    ]
    for fields, needle in cases:
        code, details = _raw(stub, **fields)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, (needle, code, details)
    # The server keeps serving.
    assert client.infer("digits-cnn", [digits_input(x)]).as_numpy("logits").shape == (2, 10)


def test_message_over_the_size_cap_is_resource_exhausted(client):
    big = np.zeros((BODY_LIMIT // 12 + 1, 3), np.int32)
    inp = grpcclient.InferInput("in_int32", list(big.shape), "INT32")
    inp.set_data_from_numpy(big)
    code, message = status_of(lambda: client.infer("identity", [inp]))
    assert code == "StatusCode.RESOURCE_EXHAUSTED", message
    assert client.is_server_live()


def test_queue_full_is_resource_exhausted(srv):
    x = np.array([0.5], np.float32)

    async def run():
        async with aioclient.InferenceServerClient(srv.grpc_address) as c:
            inp = aioclient.InferInput("x", [1], "FP32")
            inp.set_data_from_numpy(x)
            return await asyncio.gather(*[c.infer("busy", [inp]) for _ in range(12)], return_exceptions=True)

    results = asyncio.run(run())
    rejected = [r for r in results if isinstance(r, InferenceServerException)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert served and rejected, results
    assert all(r.status() == "StatusCode.RESOURCE_EXHAUSTED" and "max_queue_size 1" in r.message() for r in rejected)
    assert len(served) + len(rejected) == 12


def test_client_deadline_is_honoured(srv, client):
    x = (np.random.default_rng(0).standard_normal((SLOW, SLOW)) / SLOW).astype(np.float32)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    before = scrape(srv.url)
    t0 = time.monotonic()
    code, _ = status_of(lambda: client.infer("slow", [inp], client_timeout=0.15))  # well under one call
    assert code == "StatusCode.DEADLINE_EXCEEDED"
    assert time.monotonic() - t0 < 2.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server side: the request ended as timed out or cancelled
        after = scrape(srv.url)
        gone = sum(value(after, "kiln_inference_requests_total", model="slow", protocol="grpc", outcome=o)
                   - value(before, "kiln_inference_requests_total", model="slow", protocol="grpc", outcome=o)
                   for o in ("timeout", "cancelled"))
        if gone:
            break
        time.sleep(0.2)
    assert gone == 1
    assert value(after, "kiln_inference_requests_total", model="slow", protocol="grpc", outcome="success") == \
        value(before, "kiln_inference_requests_total", model="slow", protocol="grpc", outcome="success")


def test_unimplemented_shared_memory(client):
    for call in (client.get_system_shared_memory_status, client.get_cuda_shared_memory_status,
                 lambda: client.unregister_system_shared_memory("r")):
        code, message = status_of(call)
        assert code == "StatusCode.UNIMPLEMENTED" and "shared memory is not supported" in message


# -- repository, statistics, metrics ------------------------------------------------------------------
def test_repository_index_load_unload(client, http):
    index = client.get_model_repository_index(as_json=True)["models"]
    by_name = {m["name"]: m for m in index}
    assert by_name["digits-cnn"]["state"] == "READY" and by_name["broken"]["state"] == "FAILED"
    assert {m["name"] for m in index} == {m["name"] for m in http.get_model_repository_index()}
    client.unload_model("typed")
    assert status_of(lambda: client.get_model_metadata("typed"))[0] == "StatusCode.NOT_FOUND"
    assert {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}["typed"]["state"] \
        == "UNAVAILABLE"
    client.load_model("typed")
    assert client.is_model_ready("typed")
    code, message = status_of(lambda: client.load_model("typed", config='{"max_batch_size": 2}'))
    assert code == "StatusCode.UNIMPLEMENTED" and "config" in message
    assert status_of(lambda: client.load_model("broken"))[0] == "StatusCode.INVALID_ARGUMENT"
    assert status_of(lambda: client.unload_model("never-there"))[0] == "StatusCode.NOT_FOUND"


def test_statistics_count_grpc_requests(client, http):
    def stats():
        s = client.get_inference_statistics("identity", as_json=True)["model_stats"][0]
        return s, {k: {f: int(v.get(f, 0)) for f in ("count", "ns")} for k, v in s["inference_stats"].items()}

    arr = sample("INT32", np.int32)
    before, b = stats()
    inputs = []
    for name, (_, dtype) in TYPES.items():
        inp = grpcclient.InferInput(f"in_{name.lower()}", [2, 3], name)
        inp.set_data_from_numpy(sample(name, dtype))
        inputs.append(inp)
    for _ in range(5):
        client.infer("identity", inputs)
    bad = grpcclient.InferInput("in_int32", [2, 3], "INT32")
    bad.set_data_from_numpy(arr)
    status_of(lambda: client.infer("identity", [bad]))  # missing inputs: a failure
    after, a = stats()
    assert a["success"]["count"] - b["success"]["count"] == 5
    assert a["fail"]["count"] - b["fail"]["count"] == 1
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert a[phase]["count"] - b[phase]["count"] == 5, phase
        assert a[phase]["ns"] >= b[phase]["ns"], phase
    assert a["success"]["ns"] - b["success"]["ns"] > a["compute_infer"]["ns"] - b["compute_infer"]["ns"] > 0
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 10  # 5 x batch 2
    assert int(after["execution_count"]) - int(before.get("execution_count", 0)) >= 1
    assert int(after["last_inference"]) > 0
    assert sum(int(b_["compute_infer"]["count"]) for b_ in after["batch_stats"]) == int(after["execution_count"])
    # HTTP's statistics extension reports the same tally.
    hs = http.get_inference_statistics("identity")["model_stats"][0]
    assert hs["inference_stats"]["success"]["count"] == a["success"]["count"]
    assert client.get_inference_statistics(as_json=True)["model_stats"]  # every model
    assert status_of(lambda: client.get_inference_statistics("nope"))[0] == "StatusCode.NOT_FOUND"


def test_metrics_count_grpc_requests_under_protocol_label(srv, client, http):
    x = np.zeros((1, 1, 8, 8), np.float32)
    before = scrape(srv.url)
    for _ in range(3):
        client.infer("digits-cnn", [digits_input(x)])
    hin = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
    hin.set_data_from_numpy(x)
    http.infer("digits-cnn", [hin])
    bad = grpcclient.InferInput("input", [1], "FP32")
    bad.set_data_from_numpy(np.zeros(1, np.float32))
    status_of(lambda: client.infer("digits-cnn", [bad]))  # wrong shape: a client error
    after = scrape(srv.url)

    def delta(name, **labels):
        return value(after, name, model="digits-cnn", **labels) - value(before, name, model="digits-cnn", **labels)

    assert delta("kiln_inference_requests_total", protocol="grpc", outcome="success") == 3
    assert delta("kiln_inference_requests_total", protocol="grpc", outcome="client_error") == 1
    assert delta("kiln_inference_requests_total", protocol="http", outcome="success") == 1
    assert delta("kiln_request_duration_seconds_count", protocol="grpc", phase="total") == 3


# -- auth and TLS, drain ------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_auth_scopes_over_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    tokens = tmp_path / "tokens"
    tokens.write_text("infer-token infer\nops-token repository\n")
    repo = tmp_path / "repo"
    add_digits(repo)
    srv = start_server(repo, log_dir=tmp_path, grpc=True, wait=False,
                       args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--auth-tokens-file", str(tokens)])
    try:
        c = grpcclient.InferenceServerClient(srv.grpc_address, ssl=True, root_certificates=str(cert))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if c.is_server_ready():  # health is open without a token, as over HTTP
                    break
            except InferenceServerException:
                pass
            assert srv.proc.poll() is None, srv.log()
            time.sleep(0.2)
        x = np.zeros((1, 1, 8, 8), np.float32)
        code, message = status_of(lambda: c.infer("digits-cnn", [digits_input(x)]))
        assert code == "StatusCode.UNAUTHENTICATED" and "Bearer" in message
        code, _ = status_of(lambda: c.infer("digits-cnn", [digits_input(x)], headers={"authorization": "Bearer wrong"}))
        assert code == "StatusCode.UNAUTHENTICATED"
        ok = c.infer("digits-cnn", [digits_input(x)], headers={"authorization": "Bearer infer-token"})
        assert ok.as_numpy("logits").shape == (1, 10)
        code, message = status_of(lambda: c.get_model_repository_index(headers={"authorization": "Bearer infer-token"}))
        assert code == "StatusCode.PERMISSION_DENIED" and "'repository' scope" in message
        assert c.get_model_repository_index(headers={"authorization": "Bearer ops-token"}).models
        code, _ = status_of(lambda: c.infer("digits-cnn", [digits_input(x)], headers={"authorization": "Bearer ops-token"}))
        assert code == "StatusCode.PERMISSION_DENIED"
        c.close()
        # A stream is admitted per request with the stream's metadata, refusals in error_message.
        for headers, want in ((None, "authentication required"), ({"authorization": "Bearer infer-token"}, None)):
            got, done = [], threading.Event()

            def callback(result, error, got=got, done=done):
                got.append((result, error))
                done.set()

            s = grpcclient.InferenceServerClient(srv.grpc_address, ssl=True, root_certificates=str(cert))
            s.start_stream(callback=callback, headers=headers)
            s.async_stream_infer("digits-cnn", [digits_input(x)])
            assert done.wait(30)
            s.stop_stream()
            s.close()
            ((result, error),) = got
            if want:
                assert result is None and want in str(error), error
            else:
                assert error is None and result.as_numpy("logits").shape == (1, 10)
        # Plain text on the TLS port gets no answer.
        plain = grpcclient.InferenceServerClient(srv.grpc_address)
        assert status_of(lambda: plain.is_server_live(client_timeout=3))[0] in ("StatusCode.UNAVAILABLE",
                                                                                "StatusCode.DEADLINE_EXCEEDED")
        plain.close()
    finally:
        assert srv.stop() == 0


def test_inflight_bound_and_sigterm_drain(tmp_path):
    """KILN_MAX_INFLIGHT=1: a second request while one runs is RESOURCE_EXHAUSTED; after SIGTERM a new
    one is UNAVAILABLE, readiness false, and the request in flight is still answered; exit 0."""
    repo = tmp_path / "repo"
    add_slow(repo, "slow", size=SLOW, depth=SLOW_DEPTH)
    srv = start_server(repo, log_dir=tmp_path, grpc=True, env={"KILN_MAX_INFLIGHT": "1"})
    x = (np.random.default_rng(0).standard_normal((SLOW, SLOW)) / SLOW).astype(np.float32)
    results: list = []
    try:
        c = grpcclient.InferenceServerClient(srv.grpc_address)
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        t0 = time.monotonic()
        c.infer("slow", [inp])  # how long one takes here
        took = time.monotonic() - t0
        # The steps below take about took / 2 of the next call's run (plus a few ms of requests): they
        # are scaled to how long a call takes on this CPU, rather than assuming it is slow enough.
        assert took > 0.2, took
        worker = threading.Thread(target=lambda: results.append(c.infer("slow", [inp]).as_numpy("y")))
        worker.start()
        time.sleep(took / 4)
        late = grpcclient.InferenceServerClient(srv.grpc_address)
        assert worker.is_alive()
        code, message = status_of(lambda: late.infer("slow", [inp]))
        assert code == "StatusCode.RESOURCE_EXHAUSTED" and "KILN_MAX_INFLIGHT 1" in message
        srv.proc.send_signal(15)
        time.sleep(min(0.1, took / 4))
        assert worker.is_alive() and srv.proc.poll() is None
        code, message = status_of(lambda: late.infer("slow", [inp]))
        assert code == "StatusCode.UNAVAILABLE" and "shutting down" in message
        assert not late.is_server_ready()
        worker.join(60)
        late.close()
        c.close()
        assert len(results) == 1 and results[0].shape == (SLOW, SLOW)  # the request in flight was answered
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
