"""Issue 17, items 6-8, against the real server: a JSON answer that depended on the body's size
(duplicate keys, a UTF-8 BOM), a 500 for shape [2**62, 0], and lenient datatypes. Each bad request
gets a 400 whose v2 error names the problem, and the server then still answers a normal infer with
ONNX Runtime's logits. The decoder's own matrix of cases: tests/test_json_decode.py."""

from __future__ import annotations

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest

from tests.hardening_util import assert_error_reply
from tests.kiln_server import DEFAULT_REPO
from tests.test_http_protocol import Conn, _request

INFER = "/v2/models/digits-cnn/infer"
PAD = "p" * 1200  # puts a body past 1 KiB, where simdjson used to take over from orjson


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def ort_logits():
    sess = ort.InferenceSession(str(DEFAULT_REPO / "digits-cnn" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["logits"], {"input": x})[0]


def _x(seed: int) -> np.ndarray:
    """A digits-cnn input whose JSON is short: pixel values with two decimals."""
    return np.round(np.random.default_rng(seed).random((1, 1, 8, 8)), 2).astype(np.float32)


def _short(x: np.ndarray) -> list[float]:
    """x's values as the shortest decimals that are the same float32s."""
    return np.round(x.astype(np.float64), 2).reshape(-1).tolist()


def _tensor(x: np.ndarray) -> bytes:
    return orjson.dumps({"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": _short(x)})


def _logits(content: bytes) -> np.ndarray:
    out = orjson.loads(content)["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def _assert_serves(http, ort_logits, seed: int = 99) -> None:
    """A normal infer right after: 200 and ONNX Runtime's logits."""
    x = _x(seed)
    r = http.post(INFER, content=b'{"inputs": [%s]}' % _tensor(x))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(_logits(r.content), ort_logits(x), rtol=1e-4, atol=1e-5)


def _sized(members: bytes, large: bool) -> bytes:
    """A request object with these members, with a 1,200-character id in front when `large`."""
    return b"{" + (b'"id": "%s", ' % PAD.encode() if large else b"") + members + b"}"


# -- item 6: one grammar whatever the size -------------------------------------------------------
def test_the_same_request_gets_the_same_answer_below_and_above_1_kib(http, ort_logits):
    x = _x(1)
    small, large = (_sized(b'"inputs": [%s]' % _tensor(x), big) for big in (False, True))
    assert len(small) < 1024 <= len(large)
    got = [http.post(INFER, content=body) for body in (small, large)]
    assert [r.status_code for r in got] == [200, 200]
    assert "id" not in got[0].json() and got[1].json()["id"] == PAD
    np.testing.assert_array_equal(_logits(got[0].content), _logits(got[1].content))
    np.testing.assert_allclose(_logits(got[0].content), ort_logits(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("large", [False, True], ids=["below 1 KiB", "above 1 KiB"])
def test_inputs_twice_is_a_400_at_both_sizes(http, ort_logits, large):
    """Was: the last "inputs" won below 1 KiB, the first above (different logits, both 200)."""
    body = _sized(b'"inputs": [%s], "inputs": [%s]' % (_tensor(_x(2)), _tensor(_x(3))), large)
    assert (len(body) < 1024) != large
    assert_error_reply(http, INFER, body, {}, 400, "duplicate key 'inputs' in the request")
    _assert_serves(http, ort_logits)


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
@pytest.mark.parametrize("members,needle", ids=["name twice", "data twice", "binary_data twice", "timeout twice"],
                         argvalues=[
    (b'"inputs": [{"name": "input", "name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": %s}]',
     "duplicate key 'name' in inputs[0]"),
    (b'"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": %s, "data": []}]',
     "duplicate key 'data' in inputs[0]"),
    ((b'"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": %s}], '
      b'"outputs": [{"name": "logits", "parameters": {"binary_data": true, "binary_data": false}}]'),
     "duplicate key 'binary_data' in output 'logits' parameters"),
    ((b'"parameters": {"timeout": 1, "timeout": 0}, '
      b'"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": %s}]'),
     "duplicate key 'timeout' in the request parameters"),
])
def test_a_key_repeated_at_any_level_kiln_reads_is_a_400(http, ort_logits, members, needle, large):
    data = orjson.dumps(_short(_x(4)))
    assert_error_reply(http, INFER, _sized(members % data, large), {}, 400, needle)
    _assert_serves(http, ort_logits)


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_a_utf8_bom_is_a_400_at_both_sizes(http, ort_logits, large):
    """Was: 400 below 1 KiB (orjson), accepted from 1 KiB (simdjson)."""
    body = b"\xef\xbb\xbf" + _sized(b'"inputs": [%s]' % _tensor(_x(5)), large)
    assert_error_reply(http, INFER, body, {}, 400, "byte order mark")
    _assert_serves(http, ort_logits)


def test_bad_and_good_requests_pipelined_on_one_connection(server, ort_logits):
    """Raw socket: each refusal is answered in order and the connection keeps serving."""
    x = _x(6)
    good = _sized(b'"inputs": [%s]' % _tensor(x), False)
    bad_small = _sized(b'"inputs": [%s], "inputs": []' % _tensor(x), False)
    bad_large = b"\xef\xbb\xbf" + _sized(b'"inputs": [%s]' % _tensor(x), True)
    conn = Conn(server)
    try:
        conn.send(b"".join(_request(b) for b in (bad_small, good, bad_large, good)))
        answers = [conn.response() for _ in range(4)]
    finally:
        conn.close()
    assert [status for status, _, _ in answers] == [400, 200, 400, 200]
    assert "duplicate key 'inputs'" in orjson.loads(answers[0][2])["error"]
    assert "byte order mark" in orjson.loads(answers[2][2])["error"]
    for _, _, body in (answers[1], answers[3]):
        np.testing.assert_allclose(_logits(body), ort_logits(x), rtol=1e-4, atol=1e-5)


# -- item 7: a zero-size shape too large to address ---------------------------------------------
def test_shape_2_62_by_0_is_a_400_in_json_and_binary(http, ort_logits):
    """Was: `500 internal error: ValueError: array is too big`."""
    body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2**62, 0], "data": []}]})
    assert_error_reply(http, INFER, body, {}, 400, "input 'input': shape [4611686018427387904, 0] is too large")
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2**62, 0],
                                       "parameters": {"binary_data_size": 0}}]})
    assert_error_reply(http, INFER, header, {"Inference-Header-Content-Length": str(len(header))}, 400,
                       "input 'input': shape [4611686018427387904, 0] is too large")
    _assert_serves(http, ort_logits)


# -- item 8: strict datatypes and member types ---------------------------------------------------
_UNSET = object()


def _with(data=_UNSET, **members) -> bytes:
    """The digits request, element 3 of its data replaced by `data`, with these request members."""
    x = _short(_x(7))
    if data is not _UNSET:
        x[3] = data
    return orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x}],
                         **members})


STRICT = {
    "null in FP32 data": (_with(None), "element 3 is null: FP32 data must be JSON numbers"),
    "1e39 in FP32 data": (_with(1e39), "element 3 is 1e+39, out of range for FP32"),
    "a string in FP32 data": (_with("1.0"), 'element 3 is the string "1.0": FP32 data must be JSON numbers'),
    "true in FP32 data": (_with(True), "element 3 is true: FP32 data must be JSON numbers"),
    "binary_data a string": (_with(outputs=[{"name": "logits", "parameters": {"binary_data": "false"}}]),
                             "output 'logits': parameters.binary_data must be a boolean"),
    "binary_data_output a string": (_with(parameters={"binary_data_output": "false"}),
                                    "parameters.binary_data_output must be a boolean"),
    "id an object": (_with(id={"a": 1}), "'id' must be a JSON string, not an object"),
    "parameters a list": (_with(parameters=["x"]), "'parameters' must be a JSON object"),
    "INT8 300": (orjson.dumps({"inputs": [{"name": "input", "datatype": "INT8", "shape": [2], "data": [1, 300]}]}),
                 "element 1 is 300, out of range for INT8 [-128, 127]"),
    "UINT8 -1": (orjson.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [2], "data": [-1, 1]}]}),
                 "element 0 is -1, out of range for UINT8 [0, 255]"),
    "BOOL 1": (orjson.dumps({"inputs": [{"name": "input", "datatype": "BOOL", "shape": [2], "data": [True, 1]}]}),
               "element 1 is 1: BOOL data must be true or false"),
}


@pytest.mark.parametrize("case", list(STRICT))
def test_lenient_values_are_400s(http, ort_logits, case):
    """Was: null → NaN (answered as JSON null), 1e39 → inf, "1.0" and true → 1.0, binary_data
    "false" → binary, an object id echoed as its Python repr."""
    body, needle = STRICT[case]
    assert_error_reply(http, INFER, body, {}, 400, needle)
    _assert_serves(http, ort_logits)
