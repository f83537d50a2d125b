"""Kiln's HTTP/2 transport for gRPC (service/grpc_wire.py): what the wire layer adds, with the real grpc
client (flow control on large tensors, many streams on one channel, compression, unknown methods),
h2load as a second independent client, and raw sockets for what clients would never send
(bad prefaces, garbage frames, floods, clients that stall or never read), each followed by a
real call that shows the server still serves everyone else."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from hpack import Decoder, Encoder
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service.grpc_wire import (
    CONTINUATION,
    DATA,
    ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PING,
    PREFACE,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from tests.hardening_util import add_digits, add_slow
from tests.kiln_server import start_server
from tests.metrics_util import scrape, value

ROWS, COLS = 512, 1024  # the identity model's FP32 tensor: 2 MiB each way, far past 64 KiB windows
INFER = "/inference.GRPCInferenceService/ModelInfer"
CONNECTIONS = 24  # KILN_MAX_CONNECTIONS of the module's server


def identity_model(path) -> None:
    path.mkdir(parents=True)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, COLS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, COLS])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path / "model.onnx")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("wire")
    repo = root / "repo"
    add_digits(repo)
    identity_model(repo / "big" / "1")
    (repo / "big" / "config.yaml").write_text("backend: onnxruntime\n")
    server = start_server(repo, log_dir=root, grpc=True, env={
        "KILN_HEADER_TIMEOUT_S": "1", "KILN_BODY_TIMEOUT_S": "1.5", "KILN_SEND_TIMEOUT_S": "1",
        "KILN_MAX_CONNECTIONS": str(CONNECTIONS)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(srv):
    channel = grpc.insecure_channel(srv.grpc_address)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def digits_request(x: np.ndarray) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="digits-cnn")
    req.inputs.add(name="input", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req


def big_request(x: np.ndarray) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="big")
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req


def still_serving(stub) -> None:
    """A real call on the shared channel: the server answers others after the abuse."""
    x = np.zeros((1, 1, 8, 8), np.float32)
    resp = stub.ModelInfer(digits_request(x), timeout=10)
    assert resp.outputs[0].name == "logits" and len(resp.raw_output_contents[0]) == 40


# -- a raw HTTP/2 client, for what real clients never send ---------------------------------------------
class Raw:
    def __init__(self, address: str, rcvbuf: int | None = None, tls: ssl.SSLContext | None = None):
        host, port = address.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect((host, int(port)))
        self.sock = tls.wrap_socket(sock, server_hostname=host) if tls else sock
        self.buf = b""
        self.encoder, self.decoder = Encoder(), Decoder()

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def handshake(self, settings: bytes = b"") -> None:
        self.send(PREFACE, frame(SETTINGS, 0, 0, settings))

    def headers_block(self, path: str = INFER, content_type: str = "application/grpc", extra=()) -> bytes:
        return self.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                    (":authority", "kiln"), ("content-type", content_type), ("te", "trailers"),
                                    *extra])

    def request(self, sid: int, message: bytes, compressed: int = 0, **kw) -> None:
        body = struct.pack(">BI", compressed, len(message)) + message
        chunks = [body[i:i + 16384] for i in range(0, len(body), 16384)]  # the default MAX_FRAME_SIZE
        self.send(frame(HEADERS, 0x4, sid, self.headers_block(**kw)),
                  *(frame(DATA, 0x1 if i == len(chunks) - 1 else 0, sid, c) for i, c in enumerate(chunks)))

    def frame(self, timeout: float = 10) -> tuple[int, int, int, bytes] | None:
        """The next frame, or None at EOF / reset."""
        self.sock.settimeout(timeout)
        while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
            try:
                chunk = self.sock.recv(1 << 20)
            except (ConnectionResetError, ssl.SSLError, OSError):
                return None
            if not chunk:
                return None
            self.buf += chunk
        n = int.from_bytes(self.buf[:3], "big")
        ftype, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
        payload, self.buf = self.buf[9:9 + n], self.buf[9 + n:]
        return ftype, flags, sid, payload

    def until_closed(self, timeout: float = 10) -> list[tuple[int, int, int, bytes]]:
        frames, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            f = self.frame(max(0.1, deadline - time.monotonic()))
            if f is None:
                return frames
            frames.append(f)
        raise AssertionError(f"connection still open after {timeout} s: {[(f[0], f[2]) for f in frames][-10:]}")

    def close(self) -> None:
        self.sock.close()


def goaway_code(frames) -> int | None:
    codes = [struct.unpack(">II", p[:8])[1] for t, _f, _s, p in frames if t == GOAWAY]
    return codes[0] if codes else None


# -- the real client ---------------------------------------------------------------------------------
def test_large_tensors_both_directions(srv, stub):
    """2 MiB in and out: past the 64 KiB default windows and 16 KiB frames, both ways, sync and aio."""
    x = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)
    resp = stub.ModelInfer(big_request(x), timeout=30)
    np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(ROWS, COLS), x)

    async def several():
        c = aioclient.InferenceServerClient(srv.grpc_address)
        try:
            inputs = []
            for i in range(4):
                inp = aioclient.InferInput("x", [ROWS, COLS], "FP32")
                inp.set_data_from_numpy(x + i)
                inputs.append(inp)
            results = await asyncio.gather(*(c.infer("big", [inp]) for inp in inputs))
        finally:
            await c.close()
        return [r.as_numpy("y") for r in results]

    for i, y in enumerate(asyncio.run(several())):
        np.testing.assert_array_equal(y, x + i)


def test_server_obeys_the_clients_windows_and_frame_size(srv):
    """A client granting a 1000-byte stream window gets at most that much DATA until it adds more,
    in frames no larger than its MAX_FRAME_SIZE (16 KiB): the 2 MiB response then arrives whole."""
    x = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)
    raw = Raw(srv.grpc_address)
    body, sizes, status = b"", [], None

    def take(f) -> None:
        nonlocal body, status
        ftype, flags, sid, payload = f
        if ftype == DATA and sid == 1:
            body += payload
            sizes.append(len(payload))
        elif ftype == HEADERS:
            block = dict(raw.decoder.decode(payload))
            if sid == 1 and flags & 0x1:
                status = block.get("grpc-status")

    try:
        raw.handshake(struct.pack(">HI", 0x4, 1000))  # INITIAL_WINDOW_SIZE 1000
        raw.request(1, big_request(x).SerializeToString())
        deadline = time.monotonic() + 5
        while len(body) < 1000 and time.monotonic() < deadline:
            f = raw.frame(timeout=max(0.05, deadline - time.monotonic()))
            assert f is not None
            take(f)
        time.sleep(0.5)  # anything past the window would arrive now
        raw.sock.setblocking(False)
        try:
            raw.buf += raw.sock.recv(1 << 22)
        except BlockingIOError:
            pass
        while len(raw.buf) >= 9 and len(raw.buf) >= 9 + int.from_bytes(raw.buf[:3], "big"):
            take(raw.frame())
        assert len(body) == 1000 and status is None, len(body)
        # Now open both windows wide: the rest comes, in frames of at most 16 KiB.
        raw.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30)),
                 frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1 << 30)))
        while status is None:
            f = raw.frame()
            assert f is not None, "connection closed before the trailers"
            take(f)
    finally:
        raw.close()
    assert status == "0" and max(sizes) <= 16384
    compressed, size = struct.unpack(">BI", body[:5])
    assert compressed == 0 and size == len(body) - 5
    msg = service_pb2.ModelInferResponse.FromString(body[5:])
    np.testing.assert_array_equal(np.frombuffer(msg.raw_output_contents[0], np.float32).reshape(ROWS, COLS), x)


def test_a_streaming_client_that_never_reads_gets_no_more_window(srv):
    """ModelStreamInfer with a 1-byte window for the answers: once the first 2 MiB answer waits
    for the client, the stream's receive window is not topped up, so the client (keeping to its
    window) cannot send all five 2 MiB requests; when it opens its window, every answer arrives
    and the rest of the requests go through."""
    x = np.random.default_rng(4).standard_normal((ROWS, COLS)).astype(np.float32)
    messages = [big_request(x + i).SerializeToString() for i in range(5)]
    data = b"".join(struct.pack(">BI", 0, len(m)) + m for m in messages)
    raw = Raw(srv.grpc_address)
    window, sent, answers, status = 4 << 20, 0, b"", None  # the server's SETTINGS_INITIAL_WINDOW_SIZE

    def pump(seconds: float, upto: int = len(data)) -> None:
        """Send what the window allows (of data[:upto]), take the server's frames; until `seconds`
        pass without progress."""
        nonlocal window, sent, answers, status
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < seconds and status is None:
            while sent < upto and window > 0:
                n = min(16384, window, upto - sent)
                raw.send(frame(DATA, 0, 1, data[sent:sent + n]))
                sent, window = sent + n, window - n
                quiet_since = time.monotonic()
            if sent == len(data):
                raw.send(frame(DATA, 0x1, 1))
                sent += 1
            f = raw.frame(timeout=0.2)
            if f is None:
                continue
            ftype, flags, sid, payload = f
            if ftype == WINDOW_UPDATE and sid == 1:
                window += struct.unpack(">I", payload)[0]
            elif ftype == DATA and sid == 1:
                answers += payload
            elif ftype == HEADERS and sid == 1:
                block = dict(raw.decoder.decode(payload))
                status = block.get("grpc-status") if flags & 0x1 else None
            elif ftype == GOAWAY or ftype == RST_STREAM:
                raise AssertionError(f"frame {ftype} from the server: {payload!r}")

    try:
        raw.handshake(struct.pack(">HI", 0x4, 1))
        raw.send(frame(HEADERS, 0x4, 1, raw.headers_block(path="/inference.GRPCInferenceService/ModelStreamInfer")))
        first = 5 + len(messages[0])
        while not answers:  # the first request, until the first byte of its answer: the rest waits
            pump(0.2, first)
        pump(1.5)
        held = sent  # at most the window granted before the answer waited: about two more requests
        assert first < held < first + 2 * (4 << 20) // 2 + 16384 < len(data), (held, len(data))
        raw.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30)), frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1 << 30)))
        deadline = time.monotonic() + 30
        while status is None and time.monotonic() < deadline:
            pump(0.5)
    finally:
        raw.close()
    assert status == "0" and sent == len(data) + 1 > held
    replies, pos = [], 0
    while pos < len(answers):
        size = struct.unpack(">I", answers[pos + 1:pos + 5])[0]
        replies.append(service_pb2.ModelStreamInferResponse.FromString(answers[pos + 5:pos + 5 + size]))
        pos += 5 + size
    assert len(replies) == 5 and not any(r.error_message for r in replies)
    got = sorted(float(np.frombuffer(r.infer_response.raw_output_contents[0], np.float32)[0] - x[0, 0]) for r in replies)
    np.testing.assert_allclose(got, [0, 1, 2, 3, 4], atol=1e-5)


def test_many_concurrent_streams_on_one_channel(srv):
    """300 calls at once on one channel (more than the 256 concurrent streams the server allows:
    the client queues the rest), every answer right and matched to its request."""
    xs = np.random.default_rng(1).random((300, 1, 1, 8, 8), dtype=np.float32)

    async def run():
        async with grpc.aio.insecure_channel(srv.grpc_address) as channel:
            call = channel.unary_unary(INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                       response_deserializer=service_pb2.ModelInferResponse.FromString)
            return await asyncio.gather(*(call(digits_request(x), timeout=60) for x in xs))

    replies = asyncio.run(run())
    c = grpcclient.InferenceServerClient(srv.grpc_address)
    try:
        for i in (0, 123, 299):
            want = c.infer("digits-cnn", [_input(xs[i])]).as_numpy("logits")
            got = np.frombuffer(replies[i].raw_output_contents[0], np.float32).reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    finally:
        c.close()
    assert len({r.raw_output_contents[0] for r in replies}) > 250  # distinct inputs, distinct answers


def _input(x):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_compressed_requests_unknown_methods_and_health_list(srv, stub):
    x = np.random.default_rng(2).random((1, 1, 8, 8), dtype=np.float32)
    plain = stub.ModelInfer(digits_request(x), timeout=10)
    for algo in (grpc.Compression.Gzip, grpc.Compression.Deflate):
        assert stub.ModelInfer(digits_request(x), timeout=10, compression=algo) == plain
    with grpc.insecure_channel(srv.grpc_address) as channel:
        nope = channel.unary_unary("/inference.GRPCInferenceService/NoSuchRpc")
        with pytest.raises(grpc.RpcError) as err:
            nope(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "NoSuchRpc" in err.value.details()
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
        assert listed.statuses["live"].status == health_pb2.HealthCheckResponse.SERVING
        assert set(listed.statuses) == {"live", "", "ready", "inference.GRPCInferenceService"}


def test_content_type_and_deadline_on_the_wire(srv, stub):
    """Not gRPC's content-type: HTTP 415 (as grpc servers answer). A grpc-timeout too short for
    the call: DEADLINE_EXCEEDED from the server; a malformed one: INTERNAL. An encoding the server
    lacks: UNIMPLEMENTED; the compressed flag with no encoding: INTERNAL."""
    raw = Raw(srv.grpc_address)
    try:
        raw.handshake()
        msg = digits_request(np.zeros((1, 1, 8, 8), np.float32)).SerializeToString()
        raw.request(1, msg, content_type="application/json")
        raw.request(3, msg, extra=[("grpc-timeout", "1n")])
        raw.request(5, msg, extra=[("grpc-timeout", "soon")])
        raw.request(7, msg, extra=[("grpc-timeout", "30S")])
        raw.request(9, msg, extra=[("grpc-encoding", "snappy")])
        raw.request(11, msg, compressed=1)  # the compressed flag without a grpc-encoding
        answers: dict[int, dict] = {}
        ended: set[int] = set()
        while len(ended) < 6:
            f = raw.frame()
            assert f is not None
            ftype, flags, sid, payload = f
            if ftype == HEADERS:
                answers.setdefault(sid, {}).update(dict(raw.decoder.decode(payload)))
            if ftype in (HEADERS, DATA) and flags & 0x1:
                ended.add(sid)
        assert answers[1].get(":status") == "415"
        assert answers[3]["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        assert answers[5]["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])
        assert answers[7]["grpc-status"] == "0"
        assert answers[9]["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
        assert "snappy" in answers[9]["grpc-message"]
        assert answers[11]["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])
    finally:
        raw.close()


def test_hpack_dynamic_table_and_the_decode_cache(srv):
    """A client whose encoder indexes every header (hpack's Encoder, as nghttp2 and grpc-core do),
    with request ids that repeat, change and push each other out of the 4 KiB table: every answer
    carries the id its request sent, cached block decodes included."""
    rng = np.random.default_rng(5)
    ids = [f"{k:02d}-" + "x" * 120 for k in range(40)]  # 40 x ~160 bytes: more than the table holds
    # Each id twice in a row: the second block repeats the first's bytes once the table has the id
    # (the cache answers it), and once the table is full every insertion also evicts an entry.
    sent = [ids[i] for i in rng.integers(0, len(ids), 80) for _ in range(2)]
    raw = Raw(srv.grpc_address)
    msg = service_pb2.ModelInferRequest(model_name="nope").SerializeToString()  # NOT_FOUND, id in trailers
    got: dict[int, str] = {}
    try:
        raw.handshake()
        fixed = [(":method", "POST", True), (":scheme", "http", True), (":path", INFER, True),
                 ("content-type", "application/grpc", True), ("te", "trailers", True)]  # never indexed
        body = struct.pack(">BI", 0, len(msg)) + msg
        for i, rid in enumerate(sent):
            # Only the id enters the table: the block of an id's second request is the same bytes
            # (its index 62) for every id, each meaning another entry by then.
            block = raw.encoder.encode([*fixed, ("x-request-id", rid)])
            raw.send(frame(HEADERS, 0x4, 2 * i + 1, block), frame(DATA, 0x1, 2 * i + 1, body))
            while 2 * i + 1 not in got:
                f = raw.frame()
                assert f is not None
                if f[0] == HEADERS:
                    block = dict(raw.decoder.decode(f[3]))
                    if "grpc-status" in block:
                        assert block["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0]), block
                        got[f[2]] = block.get("x-request-id")
    finally:
        raw.close()
    assert [got[2 * i + 1] for i in range(len(sent))] == sent


def test_h2load_many_streams_per_connection(srv, tmp_path):
    """h2load (nghttp2), an independent HTTP/2 client: 4 connections × 16 concurrent streams; every
    call a gRPC success in Kiln's own count."""
    if shutil.which("h2load") is None:
        pytest.fail("h2load not installed (apt-get install nghttp2-client): it is the second, independent client")
    msg = digits_request(np.random.default_rng(3).random((1, 1, 8, 8), dtype=np.float32)).SerializeToString()
    body = tmp_path / "req.grpc"
    body.write_bytes(struct.pack(">BI", 0, len(msg)) + msg)
    before = value(scrape(srv.url), "kiln_inference_requests_total", protocol="grpc", outcome="success")
    out = subprocess.run(["h2load", "-n", "640", "-c", "4", "-m", "16", "-d", str(body), "-H",
                          "content-type: application/grpc", "-H", "te: trailers",
                          f"http://{srv.grpc_address}{INFER}"], capture_output=True, text=True, timeout=120,
                         check=False).stdout
    assert "640 succeeded, 0 failed, 0 errored" in out, out
    after = value(scrape(srv.url), "kiln_inference_requests_total", protocol="grpc", outcome="success")
    assert after - before == 640


# -- protocol abuse --------------------------------------------------------------------------------
def test_bad_preface_and_garbage_frames_close_only_that_connection(srv, stub):
    raw = Raw(srv.grpc_address)
    raw.send(b"GET / HTTP/1.1\r\nhost: kiln\r\n\r\n")
    assert {f[0] for f in raw.until_closed(5)} <= {SETTINGS, WINDOW_UPDATE}  # not HTTP/2: closed, nothing served
    raw.close()
    cases = [
        (frame(HEADERS, 0x4, 0, b"\x82"), PROTOCOL_ERROR),               # HEADERS on stream 0
        (b"\x7f\xff\xff\x00\x00\x00\x00\x00\x01", FRAME_SIZE_ERROR),      # an 8 MiB frame
        (frame(PING, 0, 0, b"123"), FRAME_SIZE_ERROR),                    # a PING of 3 bytes
        (frame(HEADERS, 0x4, 1, b"\xff\xff\xff\xff\x0f"), 0x9),           # HPACK garbage: COMPRESSION_ERROR
        (frame(DATA, 0x1, 9, b"\x00"), PROTOCOL_ERROR),                   # DATA on a stream never opened
        (frame(HEADERS, 0, 1, b"\x82") + frame(PING, 0, 0, b"12345678"), PROTOCOL_ERROR),  # no CONTINUATION
        (frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)), PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, struct.pack(">HI", 0x5, 100)), PROTOCOL_ERROR),  # MAX_FRAME_SIZE below 16 KiB
    ]
    for bad, code in cases:
        raw = Raw(srv.grpc_address)
        try:
            raw.handshake()
            raw.send(bad)
            frames = raw.until_closed(5)
            assert goaway_code(frames) == code, (bad[:12], frames[-3:])
        finally:
            raw.close()
    still_serving(stub)


def test_oversized_headers_and_floods_get_goaway(srv, stub):
    raw = Raw(srv.grpc_address)
    try:
        raw.handshake()
        raw.send(frame(HEADERS, 0, 1, raw.headers_block()),
                 *(frame(CONTINUATION, 0, 1, b"\x00" * 8000) for _ in range(8)))  # 64 KB > KILN_MAX_HEADER_BYTES
        assert goaway_code(raw.until_closed(5)) == ENHANCE_YOUR_CALM
    finally:
        raw.close()
    floods = {
        "ping": [frame(PING, 0, 0, b"12345678")] * 1100,
        "rst": [f for sid in range(1, 2201, 2) for f in (frame(HEADERS, 0x4, sid, Encoder().encode(
            [(":method", "POST"), (":path", INFER), ("content-type", "application/grpc")])),
            frame(RST_STREAM, 0, sid, struct.pack(">I", 8)))],
        "empty data": [frame(HEADERS, 0x4, 1, Encoder().encode([(":method", "POST"), (":path", INFER),
                                                                 ("content-type", "application/grpc")]))]
                      + [frame(DATA, 0, 1)] * 1100,
    }
    for name, frames in floods.items():
        raw = Raw(srv.grpc_address)
        try:
            raw.handshake()
            try:
                raw.send(*frames)
            except OSError:
                pass  # the server may close while we still send
            got = raw.until_closed(10)
            assert goaway_code(got) == ENHANCE_YOUR_CALM, (name, [(f[0], f[2]) for f in got][-5:])
            pongs = sum(1 for f in got if f[0] == PING)
            assert pongs <= 1001, pongs
        finally:
            raw.close()
    still_serving(stub)


# -- slow clients ------------------------------------------------------------------------------------
def test_silent_and_stalled_clients_are_dropped(srv, stub):
    """No preface within KILN_HEADER_TIMEOUT_S (1 s here): closed. Half a message, or the headers
    of a unary call and no message, then silence for KILN_BODY_TIMEOUT_S (1.5 s): GOAWAY and closed.
    A bidi stream resting between messages is not timed out. Others are served meanwhile."""
    silent, stalled, headless, resting = (Raw(srv.grpc_address) for _ in range(4))
    try:
        t0 = time.monotonic()
        msg = digits_request(np.zeros((1, 1, 8, 8), np.float32)).SerializeToString()
        stalled.handshake()
        stalled.send(frame(HEADERS, 0x4, 1, stalled.headers_block()),
                     frame(DATA, 0, 1, struct.pack(">BI", 0, len(msg)) + msg[:10]))
        headless.handshake()
        headless.send(frame(HEADERS, 0x4, 1, headless.headers_block()))
        resting.handshake()
        resting.send(frame(HEADERS, 0x4, 1, resting.headers_block(path="/inference.GRPCInferenceService/ModelStreamInfer")))
        still_serving(stub)
        assert {f[0] for f in silent.until_closed(5)} <= {SETTINGS, WINDOW_UPDATE}  # the server's preface only
        assert 0.9 < time.monotonic() - t0 < 4
        for raw in (stalled, headless):
            frames = raw.until_closed(6)
            assert goaway_code(frames) is not None and time.monotonic() - t0 > 1.4
        time.sleep(max(0.0, t0 + 3.5 - time.monotonic()))  # past the body timeout and a tick of its timer
        resting.send(frame(PING, 0, 0, b"stillup?"))
        while True:
            f = resting.frame()
            assert f is not None and f[0] != GOAWAY, f
            if f[0] == PING and f[1] & 0x1:
                assert f[3] == b"stillup?"
                break
    finally:
        for raw in (silent, stalled, headless, resting):
            raw.close()
    still_serving(stub)


def test_a_client_that_never_reads_is_dropped(srv, stub):
    """Requests for 2 MiB answers, windows wide open, nothing read: the server stops reading from
    it when its write buffer is full and drops it after KILN_SEND_TIMEOUT_S (1 s here)."""
    x = np.ones((ROWS, COLS), np.float32)
    msg = big_request(x).SerializeToString()
    raw = Raw(srv.grpc_address, rcvbuf=16384)
    try:
        raw.handshake(struct.pack(">HI", 0x4, (1 << 31) - 1))
        raw.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 31) - 1 - 65535)))
        try:
            for sid in range(1, 41, 2):
                raw.request(sid, msg)
        except OSError:
            pass  # the server stopped reading from us (its write buffer full) and then dropped us
        time.sleep(3)  # not reading
        still_serving(stub)
        received = 0
        try:
            while True:
                chunk = raw.sock.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
        except OSError:
            pass  # reset: the server aborted the connection
        assert received < 20 * len(msg), received  # far from every answer: the server gave up on it
    finally:
        raw.close()
    assert "client read nothing of its responses" in srv.log()
    still_serving(stub)


def test_connection_bound_evicts_the_longest_idle(srv, stub):
    """At KILN_MAX_CONNECTIONS a new connection makes the longest-idle one go (GOAWAY NO_ERROR);
    a connection with a call open is never the one: its call is answered."""
    busy = Raw(srv.grpc_address)
    busy.handshake()
    msg = digits_request(np.ones((1, 1, 8, 8), np.float32)).SerializeToString()
    body = struct.pack(">BI", 0, len(msg)) + msg
    busy.send(frame(HEADERS, 0x4, 1, busy.headers_block()), frame(DATA, 0, 1, body[:100]))  # half a request
    idle = []
    try:
        for _ in range(CONNECTIONS + 4):
            r = Raw(srv.grpc_address)
            r.handshake()
            idle.append(r)
            time.sleep(0.01)  # a clear order of idleness
        still_serving(stub)
        # The half-sent call (its connection not idle) completes and is answered.
        busy.send(frame(DATA, 0x1, 1, body[100:]))
        status = None
        while status is None:
            f = busy.frame()
            assert f is not None and f[0] != GOAWAY, f
            if f[0] == HEADERS:
                status = dict(busy.decoder.decode(f[3])).get("grpc-status") if f[1] & 0x1 else None
        # 28 more connections past a bound of 24: at least the 4 longest idle of them were closed.
        assert [goaway_code(r.until_closed(5)) for r in idle[:4]] == [NO_ERROR] * 4
        assert status == "0"
    finally:
        busy.close()
        for r in idle:
            r.close()
    still_serving(stub)


# -- TLS and shutdown -----------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_alpn_and_goaway_on_sigterm(tmp_path):
    """Over TLS the server picks ALPN h2; on SIGTERM a call in flight finishes, a new one is refused
    (UNAVAILABLE), and at shutdown every connection gets GOAWAY NO_ERROR before it closes; exit 0."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    repo = tmp_path / "repo"
    add_slow(repo, "slow", size=512, depth=24)
    srv = start_server(repo, log_dir=tmp_path, grpc=True, wait=False,
                       args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)])
    try:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        channel = grpc.secure_channel(srv.grpc_address, creds)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + 120
        while not _ready(stub) and time.monotonic() < deadline:
            assert srv.proc.poll() is None, srv.log()
            time.sleep(0.2)
        tls = ssl.create_default_context(cafile=str(cert))
        tls.set_alpn_protocols(["h2"])
        raw = Raw(srv.grpc_address, tls=tls)
        assert raw.sock.selected_alpn_protocol() == "h2"
        raw.handshake()
        x = (np.random.default_rng(0).standard_normal((512, 512)) / 512).astype(np.float32)
        req = service_pb2.ModelInferRequest(model_name="slow")
        req.inputs.add(name="x", datatype="FP32", shape=x.shape)
        req.raw_input_contents.append(x.tobytes())
        t0 = time.monotonic()
        stub.ModelInfer(req, timeout=60)
        took = time.monotonic() - t0
        results: list = []
        worker = threading.Thread(target=lambda: results.append(stub.ModelInfer(req, timeout=60)))
        worker.start()
        time.sleep(min(0.3, took / 3))
        srv.proc.send_signal(15)
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        worker.join(60)
        assert len(results) == 1 and len(results[0].raw_output_contents[0]) == x.nbytes
        frames = raw.until_closed(30)
        assert goaway_code(frames) == NO_ERROR
        raw.close()
        channel.close()
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()


def _ready(stub) -> bool:
    try:
        return stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2).ready
    except grpc.RpcError:
        return False
