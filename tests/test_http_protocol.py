"""Kiln's HTTP protocol (service/http_protocol.py) at the socket level: the infer fast path must
behave like any HTTP/1.1 server — pipelining in order, bodies split across reads and read straight
into their buffer, Expect: 100-continue, chunked bodies, early 413, Connection: close, a client
that vanishes mid-body — and give the same answers as the ASGI route behind another server.

The server runs with KILN_MAX_INFLIGHT=1, so a request the fast path forgot to release would turn
every later request into a 503: `_ok_after` checks that after each case."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import orjson
import pytest

from tests.hardening_util import Conn, add_digits
from tests.hardening_util import infer_request as _request
from tests.kiln_server import ROOT, Server, free_port, start_server
from tests.metrics_util import scrape, value

LIMIT = 1 << 20
ROWS = 400  # a JSON body of ~400 KB: several reads, so the rest is read straight into its buffer


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocol")
    add_digits(tmp / "repo")
    cfg = tmp / "repo" / "digits-cnn" / "config.yaml"  # room for ROWS rows in one request
    cfg.write_text(cfg.read_text().replace("max_batch_size: 32", f"max_batch_size: {ROWS}"))
    return tmp


@pytest.fixture(scope="module")
def srv(repo):
    # KILN_INLINE_MAX_MS=0: digits-cnn on a runner thread, where binary tensors are staged in the
    # batcher's memory (Batcher.staging) as they are received.
    server = start_server(repo / "repo", repo / "cache", log_dir=repo,
                          env={"KILN_MAX_BODY_BYTES": str(LIMIT), "KILN_MAX_INFLIGHT": "1",
                               "KILN_INLINE_MAX_MS": "0"})
    yield server
    server.stop()


def _x(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 1, 8, 8), dtype=np.float32)


def _json_body(x: np.ndarray, rid: str) -> bytes:
    return orjson.dumps({"id": rid, "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                                "data": x.reshape(-1).tolist()}]})


def _logits(body: bytes) -> np.ndarray:
    out = orjson.loads(body)["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


@pytest.fixture(scope="module")
def reference(srv):
    """digits-cnn logits for _x(ROWS), from an ordinary httpx request."""
    r = httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=_json_body(_x(ROWS), "ref"), timeout=30)
    assert r.status_code == 200, r.text
    return _logits(r.content)


def _ok_after(srv: Server) -> None:
    r = httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=_json_body(_x(1), "after"), timeout=30)
    assert r.status_code == 200, f"in-flight slot not released? {r.status_code} {r.text}"


def test_pipelined_requests_are_answered_in_order(srv, reference):
    c = Conn(srv)
    big = _json_body(_x(ROWS), "big")
    small = [_json_body(_x(2, seed=i), f"small-{i}") for i in range(3)]
    # Four infers (one large enough for direct reads) and a GET, all in one write.
    c.send(_request(small[0]) + _request(big) + _request(small[1])
           + b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n" + _request(small[2]))
    ids = []
    for expected in ("small-0", "big", "small-1", None, "small-2"):
        status, headers, body = c.response()
        assert status == 200, (expected, body)
        assert headers["x-request-id"]
        if expected is None:
            assert body == b""
            continue
        ids.append(orjson.loads(body)["id"])
        if expected == "big":
            np.testing.assert_allclose(_logits(body), reference, rtol=1e-5, atol=1e-5)
    assert ids == ["small-0", "big", "small-1", "small-2"]
    c.close()
    _ok_after(srv)


def test_body_trickled_in_pieces_then_a_second_request(srv, reference):
    c = Conn(srv)
    req = _request(_json_body(_x(ROWS), "trickle"))
    second = _request(_json_body(_x(1), "second"))
    pieces = [req[:100], req[100:70_000], req[70_000:250_000], req[250_000:-10]]
    for p in pieces:
        c.send(p)
        time.sleep(0.05)
    c.send(req[-10:] + second)  # the body's last bytes and the next request in one segment
    status, _, body = c.response()
    assert status == 200, body
    np.testing.assert_allclose(_logits(body), reference, rtol=1e-5, atol=1e-5)
    status, _, body = c.response()
    assert status == 200 and orjson.loads(body)["id"] == "second"
    c.close()
    _ok_after(srv)


@pytest.mark.parametrize("form", ["binary", "gzip"])
def test_large_binary_and_gzip_bodies(srv, reference, form):
    x = _x(ROWS)
    if form == "binary":
        header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                           "parameters": {"binary_data_size": x.nbytes}}]})
        body, extra = header + x.tobytes(), f"Inference-Header-Content-Length: {len(header)}\r\n"
    else:
        body, extra = gzip.compress(_json_body(x, "gz")), "Content-Encoding: gzip\r\n"
    assert len(body) > 65536  # far more than one read: the direct path
    c = Conn(srv)
    c.send(_request(body, extra))
    status, _, out = c.response()
    assert status == 200, out
    np.testing.assert_allclose(_logits(out), reference, rtol=1e-5, atol=1e-5)
    c.close()


def test_expect_100_continue(srv):
    c = Conn(srv)
    body = _json_body(_x(3), "expect")
    c.send(_request(body, "Expect: 100-continue\r\n")[:-len(body)])  # the headers only
    status, _, _ = c.response()
    assert status == 100
    c.send(body)
    status, _, out = c.response()
    assert status == 200 and orjson.loads(out)["id"] == "expect"
    c.close()


def test_chunked_body(srv):
    c = Conn(srv)
    body = _json_body(_x(5), "chunked")
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000]) for i in range(0, len(body), 1000))
    c.send(b"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunks + b"0\r\n\r\n")
    status, _, out = c.response()
    assert status == 200, out
    assert orjson.loads(out)["outputs"][0]["shape"] == [5, 10]
    c.close()


def test_declared_body_over_the_limit_is_refused_before_it_is_sent(srv):
    before = scrape(srv.url)
    c = Conn(srv)
    c.send(f"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {LIMIT + 1}\r\n\r\n".encode())
    status, headers, body = c.response()  # answered without a byte of the body
    assert status == 413 and "exceeds the limit" in orjson.loads(body)["error"]
    assert headers.get("connection") == "close" and c.closed_by_server()
    after = scrape(srv.url)
    assert value(after, "kiln_inference_requests_total", model="digits-cnn", outcome="client_error") - \
        value(before, "kiln_inference_requests_total", model="digits-cnn", outcome="client_error") == 1
    _ok_after(srv)


def test_streamed_chunked_body_over_the_limit(srv):
    c = Conn(srv)
    c.send(b"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    try:
        for _ in range(LIMIT // len(piece) + 2):
            c.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while we were still sending
    status, _, body = c.response()
    assert status == 413, body
    _ok_after(srv)


@pytest.mark.parametrize("how", ["http/1.0", "connection: close"])
def test_connection_close(srv, how):
    c = Conn(srv)
    body = _json_body(_x(1), "close")
    req = _request(body, "Connection: close\r\n") if how == "connection: close" else \
        _request(body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    c.send(req)
    status, headers, out = c.response()
    assert status == 200 and orjson.loads(out)["id"] == "close"
    assert headers.get("connection") == "close" and c.closed_by_server()


def test_client_gone_mid_body_releases_its_slot(srv):
    before = scrape(srv.url)
    c = Conn(srv)
    req = _request(_json_body(_x(ROWS), "gone"))
    c.send(req[: len(req) // 2])  # far enough for the direct read to have begun
    time.sleep(0.2)
    c.close()
    deadline = time.monotonic() + 10
    while True:
        after = scrape(srv.url)
        moved = value(after, "kiln_inference_requests_total", model="digits-cnn", outcome="client_error") - \
            value(before, "kiln_inference_requests_total", model="digits-cnn", outcome="client_error")
        if moved == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert moved == 1
    _ok_after(srv)  # KILN_MAX_INFLIGHT=1: would be 503 had the slot leaked


def test_bad_request_line_gets_400_and_the_server_keeps_serving(srv):
    c = Conn(srv)
    c.send(b"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
    status, _, _ = c.response()
    assert status == 400
    _ok_after(srv)


def test_asgi_route_under_another_server_gives_the_same_answers(srv, repo, reference):
    """The same app behind plain uvicorn with h11 (no Kiln protocol): the ASGI infer route."""
    port = free_port()
    env = {**os.environ, "KILN_MODEL_REPO": str(repo / "repo"), "KILN_CACHE_DIR": str(repo / "cache"),
           "KILN_MAX_BODY_BYTES": str(LIMIT)}
    log = open(repo / "h11.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app_from_env",
                             "--http", "h11", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    other = Server(proc, port, repo / "h11.log", repo / "cache", repo / "repo")
    try:
        other.wait_ready(120)
        body = _json_body(_x(ROWS), "h11")
        a = httpx.post(other.url + "/v2/models/digits-cnn/infer", content=body, timeout=30)
        b = httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=body, timeout=30)
        assert a.status_code == b.status_code == 200
        np.testing.assert_allclose(_logits(a.content), reference, rtol=1e-5, atol=1e-5)
        assert orjson.loads(a.content)["outputs"] == orjson.loads(b.content)["outputs"]
        for bad in (b"{", orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3],
                                                    "data": [1, 2, 3]}]})):
            a = httpx.post(other.url + "/v2/models/digits-cnn/infer", content=bad, timeout=30)
            b = httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=bad, timeout=30)
            assert a.status_code == b.status_code == 400
            assert a.json() == b.json()
        big = httpx.post(other.url + "/v2/models/digits-cnn/infer", content=b"x" * (LIMIT + 1), timeout=30)
        assert big.status_code == 413 and "exceeds the limit" in big.json()["error"]
    finally:
        other.stop()
        log.close()


def test_concurrent_staged_binary_requests_each_get_their_own_rows(repo):
    """Binary tensors over one read are received into the batcher's staging memory (split from their
    JSON header). Every client must get exactly its own rows. That back-to-back staged requests are
    batched as one view of that memory is asserted in tests/test_batcher.py, where batches can be
    forced; this cheap model rarely queues over HTTP."""
    import threading

    import onnxruntime as ort

    (repo / "staged").mkdir(exist_ok=True)
    server = start_server(repo / "repo", repo / "cache", log_dir=repo / "staged",
                          env={"KILN_INLINE_MAX_MS": "0"})
    sess = ort.InferenceSession(str(repo / "repo" / "digits-cnn" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    failures: list[str] = []
    before = scrape(server.url)

    def client(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for i in range(6):
                x = rng.random((int(rng.integers(260, ROWS + 1)), 1, 8, 8), dtype=np.float32)  # > 64 KB: direct
                header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                                   "parameters": {"binary_data_size": x.nbytes}}]})
                r = http.post("/v2/models/digits-cnn/infer", content=header + x.tobytes(),
                              headers={"Inference-Header-Content-Length": str(len(header))})
                if r.status_code != 200:
                    failures.append(f"{k}/{i}: {r.status_code} {r.text[:200]}")
                    continue
                want = sess.run(None, {"input": x})[0]
                got = _logits(r.content)
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                    failures.append(f"{k}/{i}: rows differ from in-process ONNX Runtime")

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = scrape(server.url)
    finally:
        server.stop()
    assert not failures, failures
    assert value(after, "kiln_inference_requests_total", model="digits-cnn", outcome="success") - \
        value(before, "kiln_inference_requests_total", model="digits-cnn", outcome="success") == 36
