"""Limits and bad input on the real server: each breach has its status and a v2 {"error"} body, and
the server keeps serving. Also: request ids, traceparent and JSON logs."""

from __future__ import annotations

import gzip
import struct
import threading
import time

import httpx
import orjson
import pytest

from tests.hardening_util import (BUSY, DIGITS, add_busy, add_digits, add_slow, assert_error_reply, digits_body,
                                   slow_request)
from tests.kiln_server import start_server
from tests.metrics_util import scrape, value

LIMIT = 1 << 20  # KILN_MAX_BODY_BYTES for this server


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    repo = tmp / "repo"
    add_digits(repo)
    (repo / "strict").mkdir()
    (repo / "strict" / "config.yaml").write_text(
        "backend: onnxruntime\nsource: ../digits-cnn\nmax_batch_size: 32\n"
        "verify: {atol: 1.0e-4, rtol: 1.0e-3, samples: ../digits-cnn/data/calib.npz}\n"
        "limits: {max_elements: 256, nonfinite: reject}\n")
    add_busy(repo, "slow", size=384, depth=128, extra="limits: {timeout_ms: 60000}\n")
    server = start_server(repo, log_dir=tmp, args=["--log-format", "json", "--log-level", "debug"],
                          env={"KILN_MAX_BODY_BYTES": str(LIMIT)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c


def _input(**changes) -> bytes:
    return orjson.dumps({"inputs": [{**DIGITS["inputs"][0], **changes}]})


def _binary(header: dict, blob: bytes) -> tuple[bytes, dict[str, str]]:
    h = orjson.dumps(header)
    return h + blob, {"Inference-Header-Content-Length": str(len(h))}


def _bytes_header(shape, size):
    return {"inputs": [{"name": "input", "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": size}}]}


CASES = {
    # limits
    "body over the limit (declared)": ("/v2/models/digits-cnn/infer", b"x" * (LIMIT + 1), {}, 413, "exceeds the limit"),
    "gzip bomb": ("/v2/models/digits-cnn/infer", gzip.compress(b" " * (LIMIT * 8)), {"Content-Encoding": "gzip"}, 413,
                  "inflates past the limit"),
    "batch over max_batch_size": ("/v2/models/digits-cnn/infer", _input(shape=[33, 1, 8, 8], data=[0.0] * 64 * 33), {},
                                  400, "max_batch_size"),
    "elements over limits.max_elements": ("/v2/models/strict/infer", _input(shape=[5, 1, 8, 8], data=[0.0] * 320), {},
                                          400, "max_elements"),
    "NaN rejected by limits.nonfinite (binary)": ("/v2/models/strict/infer", *_binary(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                     "parameters": {"binary_data_size": 256}}]}, struct.pack("<f", float("nan")) * 64), 400, "NaN or Inf"),
    "JSON null is no NaN": ("/v2/models/digits-cnn/infer", _input(data=[None] + [0.0] * 63), {}, 400,
                            "element 0 is null"),
    "Inf rejected (binary)": ("/v2/models/strict/infer", *_binary(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                     "parameters": {"binary_data_size": 256}}]}, struct.pack("<f", float("inf")) * 64), 400, "NaN or Inf"),
    "bad timeout parameter": ("/v2/models/digits-cnn/infer", digits_body(parameters={"timeout": "soon"}), {}, 400,
                              "timeout"),
    # JSON depth and shape
    "JSON nested past orjson's depth limit": ("/v2/models/digits-cnn/infer", b"[" * 5000 + b"]" * 5000, {}, 400,
                                              "malformed JSON"),
    "data nested deeper than numpy allows": ("/v2/models/digits-cnn/infer",
                                             b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,8,8],"data":'
                                             + b"[" * 200 + b"]" * 200 + b"}]}", {}, 400, "data has 0"),
    "too many dimensions": ("/v2/models/digits-cnn/infer", _input(shape=[1] * 70, data=[0.5]), {}, 400, "dimensions"),
    "astronomical shape": ("/v2/models/digits-cnn/infer", _input(shape=[2 ** 62, 4], data=[]), {}, 400, "too large"),
    "shape past 64 bits": ("/v2/models/digits-cnn/infer",
                           b'{"inputs":[{"name":"input","datatype":"FP32","shape":[18446744073709551617],"data":[]}]}',
                           {}, 400, "does not fit in 64 bits"),
    # binary extension lengths are checked against the body before any allocation
    "BYTES count beyond the blob": ("/v2/models/digits-cnn/infer", *_binary(_bytes_header([2 ** 40], 8), b"\0" * 8),
                                    400, "BYTES elements need"),
    "BYTES element longer than the blob": ("/v2/models/digits-cnn/infer",
                                           *_binary(_bytes_header([1], 8), struct.pack("<I", 1 << 30) + b"abcd"),
                                           400, "beyond the tensor data"),
    "FP32 size mismatch": ("/v2/models/digits-cnn/infer", *_binary(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2 ** 62, 4], "parameters": {"binary_data_size": 0}}]},
        b""), 400, "bytes"),
    "header length past the body": ("/v2/models/digits-cnn/infer", b"{}", {"Inference-Header-Content-Length": "9" * 30},
                                    400, "exceeds the body"),
    "negative header length": ("/v2/models/digits-cnn/infer", b"{}", {"Inference-Header-Content-Length": "-5"}, 400,
                               "Inference-Header-Content-Length"),
    "unsupported encoding": ("/v2/models/digits-cnn/infer", digits_body(), {"Content-Encoding": "br"}, 400, "br"),
    # names never become paths
    "traversal in load (encoded ..)": ("/v2/repository/models/%2e%2e/load", b"", {}, 400, "invalid model name"),
    "NUL in model name": ("/v2/repository/models/a%00b/load", b"", {}, 400, "invalid model name"),
    "traversal in unload": ("/v2/repository/models/.hidden/unload", b"", {}, 400, "invalid model name"),
    "slash-encoded traversal": ("/v2/repository/models/..%2f..%2fetc/load", b"", {}, 404, "no such endpoint"),
    "repository index body too big": ("/v2/repository/index", b"[" * 100_000, {}, 413, "exceeds the limit"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_limit_and_bad_input_has_its_status(http, case):
    assert_error_reply(http, *CASES[case])
    ok = http.post("/v2/models/digits-cnn/infer", content=digits_body())
    assert ok.status_code == 200


def test_chunked_body_over_the_limit_is_413(http):
    def chunks():
        for _ in range(LIMIT // 65536 + 2):
            yield b" " * 65536

    r = http.post("/v2/models/digits-cnn/infer", content=chunks())  # no Content-Length: streamed
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]


def test_version_and_model_lookups_never_touch_the_filesystem(http):
    for path in ("/v2/models/%2e%2e", "/v2/models/digits-cnn/versions/%2e%2e", "/v2/models/digits-cnn/versions/..%2f1",
                 "/v2/models/%2e%2e%2fetc/config"):
        r = http.get(path)
        assert r.status_code in (400, 404) and "error" in r.json(), (path, r.text)


def test_nonfinite_passes_where_the_policy_is_pass(http):
    body, headers = _binary({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                         "parameters": {"binary_data_size": 256}}]}, struct.pack("<f", float("nan")) * 64)
    r = http.post("/v2/models/digits-cnn/infer", content=body, headers=headers)
    assert r.status_code == 200  # digits-cnn keeps the default `nonfinite: pass` (JSON has no NaN: binary only)


def test_timeout_gives_504_and_queued_work_never_runs(srv, http):
    t = time.perf_counter()
    assert http.post("/v2/models/slow/infer", content=BUSY).status_code == 200
    one_call = time.perf_counter() - t
    before = scrape(srv.url)
    results = []
    clients = [httpx.Client(base_url=srv.url, timeout=60) for _ in range(9)]

    def call(client, timeout_us=None):
        body = BUSY if timeout_us is None else orjson.dumps({**orjson.loads(BUSY), "parameters": {"timeout": timeout_us}})
        results.append(client.post("/v2/models/slow/infer", content=body))

    blocker = threading.Thread(target=call, args=(clients[0],))  # occupies the only runner
    blocker.start()
    deadline = time.monotonic() + 5  # the blocker must be on the runner before the others arrive
    while time.monotonic() < deadline and blocker.is_alive():
        if 'kiln_inflight_requests{model="slow"} 1.0' in http.get("/metrics").text:
            break
    else:
        pytest.fail("never saw the blocking request in flight")
    quick = [threading.Thread(target=call, args=(c, 2000)) for c in clients[1:]]  # 2 ms; a call is >= 100 ms
    for th in quick:
        th.start()
    for th in [blocker, *quick]:
        th.join(60)
    for c in clients:
        c.close()
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] + [504] * 8, [r.text for r in results]
    assert all("timed out" in r.json()["error"] for r in results if r.status_code == 504)
    time.sleep(one_call * 3)
    after = scrape(srv.url)
    ran = value(after, "kiln_batch_size_count", model="slow") - value(before, "kiln_batch_size_count", model="slow")
    # Without the batcher dropping them, all 9 would run. Under heavy machine load one request has
    # been seen to reach the runner before its 2 ms ran out (legitimate: a running call is not
    # interrupted), so one extra call is tolerated.
    assert ran <= 2, f"{ran} runner calls: timed-out queued requests must not run"
    assert value(after, "kiln_inference_requests_total", model="slow", outcome="timeout") - value(
        before, "kiln_inference_requests_total", model="slow", outcome="timeout") == 8


def test_request_id_traceparent_and_json_logs(srv, http):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = http.post("/v2/models/nope/infer", content=b"{}",
                  headers={"X-Request-ID": "req-42", "traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "req-42"
    ok = http.post("/v2/models/digits-cnn/infer", content=digits_body())
    rid = ok.headers["x-request-id"]
    assert len(rid) == 32
    time.sleep(0.2)
    lines = [orjson.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    assert lines, "no JSON log lines"
    err = [e for e in lines if e.get("request_id") == "req-42"]
    assert err and err[-1]["level"] == "warning" and err[-1]["trace_id"] == trace and err[-1]["status"] == 404
    assert "unknown model" in err[-1]["msg"]
    debug = [e for e in lines if e.get("request_id") == rid]
    assert debug and debug[-1]["level"] == "debug" and debug[-1]["status"] == 200 and "duration_ms" in debug[-1]


def test_inflight_bound_answers_503(tmp_path):
    repo = tmp_path / "repo"
    add_slow(repo, "slow", size=384, depth=24)
    srv = start_server(repo, log_dir=tmp_path, env={"KILN_MAX_INFLIGHT": "2"})
    try:
        body, headers = slow_request(384)
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(srv.url + "/v2/models/slow/infer", content=body, headers=headers, timeout=60)))
            for _ in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and set(codes) <= {200, 503}, codes
        over = [r for r in results if r.status_code == 503]
        assert over and all("overloaded" in r.json()["error"] and r.headers.get("retry-after") for r in over)
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200
    finally:
        srv.stop()
