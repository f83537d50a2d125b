"""Model repositories and helpers shared by tests/test_hardening_*.py (and bench/soak.py)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import onnx
import orjson
from onnx import TensorProto, helper

from tests.kiln_server import DEFAULT_REPO
from tests.test_metrics_and_concurrency import slow_model

DIGITS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64}]}


def infer_request(body: bytes, extra: str = "", path: str = "/v2/models/digits-cnn/infer") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class Conn:
    """A raw HTTP/1.1 client: what we send is exactly what the server parses."""

    def __init__(self, srv, timeout: float = 30):
        self.sock = socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        self.buf += chunk
        return bool(chunk)

    def response(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next response (status, headers, body); `head`: the answer to a HEAD, with no body."""
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed before a response: {self.buf!r}"
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        n = 0 if head else int(headers.get("content-length", 0))
        while len(self.buf) < n:
            assert self._fill(), "connection closed inside a response body"
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def closed_by_server(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def digits_body(**request) -> bytes:
    return orjson.dumps({**DIGITS, **request})


def assert_error_reply(http, path: str, body: bytes, headers: dict, status: int, needle: str) -> None:
    """POST a bad request: it gets `status` and a v2 `{"error"}` body whose message names the problem."""
    r = http.post(path, content=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error"}, err
    assert needle.lower() in err["error"].lower(), err["error"]


def faulty_model(path: Path) -> None:
    """y = Gather(table[10], Cast<int64>(x)): fine for |x| < 10, an ONNX Runtime error at run time
    ("indices element out of data bounds") for larger values. x: FP32 [-1, 4]."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [10], np.linspace(0, 1, 10).astype(np.float32))
    nodes = [helper.make_node("Cast", ["x"], ["idx"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)]
    graph = helper.make_graph(nodes, "faulty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def busy_model(path: Path, size: int = 384, depth: int = 16) -> None:
    """Tiny request, long compute: x FP32 [1] is expanded to [size, size], then `depth` x MatMul+Tanh,
    then summed to y [1, 1]. Thirty-two requests arrive in milliseconds and queue for seconds."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [size, size])
    nodes = [helper.make_node("Expand", ["x", "shape"], ["m"]),
             helper.make_node("Mul", ["m", "scale"], ["t"])]
    prev = "t"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, prev], [f"p{i}"]))
        nodes.append(helper.make_node("Tanh", [f"p{i}"], [f"q{i}"]))
        prev = f"q{i}"
    nodes.append(helper.make_node("ReduceSum", [prev], ["y"], keepdims=1))
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0])  # O(1) values: no denormals
    graph = helper.make_graph(nodes, "busy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], [shape, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def add_busy(repo: Path, name: str = "busy", size: int = 384, depth: int = 16, extra: str = "") -> None:
    (repo / name / "1").mkdir(parents=True)
    busy_model(repo / name / "1" / "model.onnx", size, depth)
    (repo / name / "config.yaml").write_text(
        "backend: onnxruntime\nverify: {atol: 1.0e-3, rtol: 1.0e-3}\n" + extra)


BUSY = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0.5]}]})


def add_digits(repo: Path) -> None:
    shutil.copytree(DEFAULT_REPO / "digits-cnn", repo / "digits-cnn", ignore=shutil.ignore_patterns("*.pt2"))


def add_slow(repo: Path, name: str = "slow", size: int = 512, depth: int = 12, extra: str = "") -> None:
    (repo / name / "1").mkdir(parents=True)
    slow_model(repo / name / "1" / "model.onnx", size, depth)
    (repo / name / "config.yaml").write_text(
        "backend: onnxruntime\nverify: {atol: 1.0e-3, rtol: 1.0e-3}\n" + extra)


def add_faulty(repo: Path, name: str = "faulty") -> None:
    (repo / name / "1").mkdir(parents=True)
    faulty_model(repo / name / "1" / "model.onnx")
    (repo / name / "config.yaml").write_text("backend: onnxruntime\nverify: {atol: 1.0e-5}\n")


def slow_request(size: int = 512, **request) -> tuple[bytes, dict[str, str]]:
    x = (np.random.default_rng(0).standard_normal((size, size)) / size).astype(np.float32)
    header = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [size, size],
                                       "parameters": {"binary_data_size": x.nbytes}}], **request})
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}
