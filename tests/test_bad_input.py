"""Bad requests get a 4xx with a v2 {"error": ...} body, and the server keeps serving."""

from __future__ import annotations

import gzip

import httpx
import numpy as np
import orjson
import pytest

from tests.hardening_util import assert_error_reply

GOOD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64}]}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def _body(**changes):
    inp = {**GOOD["inputs"][0], **changes}
    return orjson.dumps({"inputs": [inp]})


def binary_request(arr: np.ndarray, declared_size: int | None = None, header_extra: int = 0):
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(arr.shape),
                                        "parameters": {"binary_data_size": declared_size or arr.nbytes}}]})
    return header + arr.tobytes(), {"Inference-Header-Content-Length": str(len(header) + header_extra)}


CASES = {
    "wrong shape": ("/v2/models/digits-cnn/infer", _body(shape=[1, 1, 8, 7], data=[0.5] * 56), {}, 400, "shape"),
    "shape/data mismatch": ("/v2/models/digits-cnn/infer", _body(data=[0.5] * 10), {}, 400, "elements"),
    "wrong datatype": ("/v2/models/digits-cnn/infer", _body(datatype="INT32", data=[1] * 64), {}, 400, "datatype"),
    "unknown datatype": ("/v2/models/digits-cnn/infer", _body(datatype="FLOAT", data=[1] * 64), {}, 400, "datatype"),
    "non-numeric data": ("/v2/models/digits-cnn/infer", _body(data=["x"] * 64), {}, 400, "FP32"),
    "unknown input": ("/v2/models/digits-cnn/infer", _body(name="image"), {}, 400, "unknown input"),
    "missing input": ("/v2/models/digits-cnn/infer", orjson.dumps({"inputs": []}), {}, 400, "inputs"),
    "unknown output": ("/v2/models/digits-cnn/infer",
                       orjson.dumps({**GOOD, "outputs": [{"name": "probs"}]}), {}, 400, "unknown output"),
    "batch too large": ("/v2/models/digits-cnn/infer", _body(shape=[33, 1, 8, 8], data=[0.0] * 64 * 33), {}, 400,
                        "max_batch_size"),
    "malformed JSON": ("/v2/models/digits-cnn/infer", b'{"inputs": [', {}, 400, "malformed JSON"),
    "JSON not an object": ("/v2/models/digits-cnn/infer", b"[1, 2]", {}, 400, "JSON object"),
    "binary header longer than body": ("/v2/models/digits-cnn/infer", *binary_request(np.zeros((1, 1, 8, 8), np.float32),
                                       header_extra=10_000), 400, "exceeds the body"),
    "binary size past the end": ("/v2/models/digits-cnn/infer", *binary_request(np.zeros((1, 1, 8, 8), np.float32),
                                 declared_size=4096), 400, "past the end"),
    "header length not a number": ("/v2/models/digits-cnn/infer", _body(), {"Inference-Header-Content-Length": "abc"},
                                   400, "not an integer"),
    "bad gzip": ("/v2/models/digits-cnn/infer", b"not gzip", {"Content-Encoding": "gzip"}, 400, "gzip"),
    "unknown model": ("/v2/models/nope/infer", _body(), {}, 404, "unknown model"),
    "unknown version": ("/v2/models/digits-cnn/versions/7/infer", _body(), {}, 404, "unknown version"),
    "path traversal name": ("/v2/repository/models/..secret/load", b"", {}, 400, "invalid model name"),
    "load of a model not in the repo": ("/v2/repository/models/ghost/load", b"", {}, 404, "not in the repository"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_4xx_with_error_and_server_keeps_serving(http, case):
    assert_error_reply(http, *CASES[case])
    ok = http.post("/v2/models/digits-cnn/infer", content=orjson.dumps(GOOD))
    assert ok.status_code == 200
    assert len(ok.json()["outputs"][0]["data"]) == 10


def test_unknown_model_metadata_and_ready_are_404(http):
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/nope/config",
                 "/v2/models/digits-cnn/versions/9"):
        r = http.get(path)
        assert r.status_code == 404
        assert "error" in r.json()


def test_unknown_route_and_method_use_error_body(http):
    r = http.get("/v3/whatever")
    assert r.status_code == 404 and "error" in r.json()
    r = http.get("/v2/models/digits-cnn/infer")
    assert r.status_code == 405 and "error" in r.json()


def test_oversized_body_is_413(tmp_path):
    from tests.kiln_server import start_server

    srv = start_server(log_dir=tmp_path, args=["--models", "digits-cnn"], env={"KILN_MAX_BODY_BYTES": "4096"})
    try:
        r = httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=b"x" * 10_000, timeout=10)
        assert r.status_code == 413
        assert "exceeds the limit" in r.json()["error"]
        ok = httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=orjson.dumps(GOOD), timeout=10)
        assert ok.status_code == 200
    finally:
        srv.stop()


def test_gzip_body_and_raw_binary_request(http, eval_set):
    x, _ = eval_set
    r = http.post("/v2/models/digits-cnn/infer", content=gzip.compress(orjson.dumps(GOOD)),
                  headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200
    # Raw binary: header length 0, body = the one input, batch 1; outputs come back binary.
    r = http.post("/v2/models/digits-cnn/infer", content=x[0].tobytes(), headers={"Inference-Header-Content-Length": "0"})
    assert r.status_code == 200
    hlen = int(r.headers["inference-header-content-length"])
    header = orjson.loads(r.content[:hlen])
    logits = np.frombuffer(r.content[hlen:], dtype=np.float32)
    assert header["outputs"][0]["shape"] == [1, 10] and logits.shape == (10,)


def test_nested_json_data_and_outputs_selection(http, eval_set):
    x, _ = eval_set
    body = {"id": "nested", "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8],
                                        "data": x[:2].tolist()}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}
    r = http.post("/v2/models/digits-cnn/infer", content=orjson.dumps(body))
    assert r.status_code == 200
    out = r.json()
    assert out["id"] == "nested" and out["model_name"] == "digits-cnn" and out["model_version"] == "1"
    assert out["outputs"][0]["shape"] == [2, 10] and len(out["outputs"][0]["data"]) == 20
