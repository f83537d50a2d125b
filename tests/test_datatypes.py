"""Every v2 datatype ONNX Runtime supports round-trips through JSON and binary tensors, and JSON
values a v2 server refuses for a datatype get a 400 naming the element (issue 17 item 8)."""

from __future__ import annotations

import httpx
import numpy as np
import onnx
import orjson
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto, helper

from tests.hardening_util import assert_error_reply
from tests.kiln_server import start_server

TYPES = {  # v2 name: (onnx type, numpy dtype)
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, np.object_),
}


@pytest.fixture(scope="module")
def identity_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtypes")
    (root / "repo" / "identity" / "1").mkdir(parents=True)
    inputs = [helper.make_tensor_value_info(f"in_{n.lower()}", t, [-1, 3]) for n, (t, _) in TYPES.items()]
    outputs = [helper.make_tensor_value_info(f"out_{n.lower()}", t, [-1, 3]) for n, (t, _) in TYPES.items()]
    nodes = [helper.make_node("Identity", [f"in_{n.lower()}"], [f"out_{n.lower()}"]) for n in TYPES]
    model = helper.make_model(helper.make_graph(nodes, "identity", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, root / "repo" / "identity" / "1" / "model.onnx")
    (root / "repo" / "identity" / "config.yaml").write_text("backend: onnxruntime\nmax_batch_size: 8\n")
    srv = start_server(root / "repo", log_dir=root)
    yield srv
    srv.stop()


def sample(name: str, dtype) -> np.ndarray:
    if name == "BYTES":
        return np.array([[b"kiln", b"", "\u00e9t\u00e9".encode()], [b"a", b"bc", b"def"]], dtype=object)
    if name == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    info = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.iinfo(dtype)
    return np.array([[info.min, 0, info.max], [1, 2, 3]], dtype=dtype)


@pytest.mark.parametrize("binary", [True, False])
def test_all_datatypes_round_trip(identity_server, binary):
    _round_trip(identity_server, binary)


def _round_trip(identity_server, binary: bool) -> None:
    client = httpclient.InferenceServerClient(identity_server.address)
    meta = client.get_model_metadata("identity")
    assert {i["datatype"] for i in meta["inputs"]} == set(TYPES)
    inputs, outputs, expected = [], [], {}
    for name, (_, dtype) in TYPES.items():
        arr = sample(name, dtype)
        # FP16 has no JSON form in the protocol: it always travels binary.
        as_binary = binary or name == "FP16"
        inp = httpclient.InferInput(f"in_{name.lower()}", list(arr.shape), name)
        inp.set_data_from_numpy(arr, binary_data=as_binary)
        inputs.append(inp)
        outputs.append(httpclient.InferRequestedOutput(f"out_{name.lower()}", binary_data=as_binary))
        expected[f"out_{name.lower()}"] = arr
    res = client.infer("identity", inputs, outputs=outputs)
    for out_name, arr in expected.items():
        got = res.as_numpy(out_name)
        assert got.shape == arr.shape, out_name
        if arr.dtype == object:
            got = np.array([g if isinstance(g, bytes) else g.encode() for g in got.reshape(-1)], dtype=object)
            assert list(got) == list(arr.reshape(-1)), out_name
        else:
            assert got.dtype == arr.dtype, out_name
            np.testing.assert_array_equal(got, arr, err_msg=out_name)
    client.close()


def refused(name: str) -> list:
    """JSON values a v2 server refuses for the datatype: other JSON types, and values it cannot hold."""
    if name == "BOOL":
        return [0, 1, None, "true"]
    if name == "BYTES":
        return [1, None, True]
    dtype = np.dtype(TYPES[name][1])
    if dtype.kind == "f":
        overflow = {"FP16": [1e5, -65520.0], "FP32": [1e39, -3.5e38], "FP64": []}[name]
        return [*overflow, None, True, "1.0"]
    info = np.iinfo(dtype)
    outside = [v for v in (int(info.min) - 1, int(info.max) + 1) if -2**63 <= v < 2**64]
    return [*outside, 1.0, 2.5, None, False, "1"]


@pytest.mark.parametrize("name", list(TYPES))
def test_json_values_outside_each_datatype_are_400s(identity_server, name):
    """Was: null → NaN, 1e39 → inf, "1.0" and true → 1.0, INT8 300 → 44, UINT8 -1 → 255."""
    good = {"BOOL": True, "BYTES": "s"}.get(name, 1)
    http = httpx.Client(base_url=identity_server.url, timeout=30)
    try:
        for bad in refused(name):
            body = orjson.dumps({"inputs": [{"name": f"in_{name.lower()}", "datatype": name, "shape": [1, 3],
                                             "data": [good, good, bad]}]})
            assert_error_reply(http, "/v2/models/identity/infer", body, {}, 400,
                               f"input 'in_{name.lower()}': element 2 is ")
    finally:
        http.close()
    _round_trip(identity_server, binary=False)  # and the server still answers every datatype
