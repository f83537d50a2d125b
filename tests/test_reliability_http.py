"""Issue 17, the HTTP front: one regression test per item, over raw sockets against the real server.

Each test asserts the status and the v2 `{"error"}` body (or the bytes on the wire), then that the
server still answers a normal infer with the logits ONNX Runtime gives for the same input. The
server runs with KILN_MAX_INFLIGHT=1, so a request that kept its in-flight slot turns the next
normal infer into a 503, and with timeouts of about a second so the timeout cases stay fast.

Items: 3 (head and URL size), 4 (read timeouts, in-flight admission, the connection bound),
5 (write backpressure), 9 (log injection), 10 (responses in order before a refusal), 12 (RFC 9112
conformance), and the infer fast path found as an explicit object (issue 14's build list)."""

from __future__ import annotations

import gzip
import logging
import socket
import threading
import time

import httpx
import numpy as np
import orjson
import psutil
import pytest

from tests.hardening_util import (
    DIGITS,
    Conn,
    add_digits,
    add_slow,
    digits_body,
    infer_request,
)
from tests.kiln_server import DEFAULT_REPO, start_server

HEADER_LIMIT, URL_LIMIT = 8192, 2048
ECHO = 256  # the "echo" model: x FP32 [256, 256] -> y [256, 256], one MatMul: 256 KiB in, 256 KiB out
ENV = {"KILN_MAX_INFLIGHT": "1", "KILN_MAX_HEADER_BYTES": str(HEADER_LIMIT), "KILN_MAX_URL_BYTES": str(URL_LIMIT),
       "KILN_HEADER_TIMEOUT_S": "1", "KILN_BODY_TIMEOUT_S": "1", "KILN_KEEP_ALIVE_TIMEOUT_S": "3",
       "KILN_SEND_TIMEOUT_S": "2", "KILN_MAX_CONNECTIONS": "48"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    add_digits(tmp / "repo")
    add_slow(tmp / "repo", "echo", size=ECHO, depth=1)
    server = start_server(tmp / "repo", log_dir=tmp, env=ENV)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def expected():
    """digits-cnn's logits for DIGITS, from ONNX Runtime on the source model."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(DEFAULT_REPO / "digits-cnn" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    x = np.asarray(DIGITS["inputs"][0]["data"], np.float32).reshape(1, 1, 8, 8)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _logits(body: bytes) -> np.ndarray:
    out = orjson.loads(body)["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def _assert_logits(body: bytes, expected: np.ndarray) -> None:
    np.testing.assert_allclose(_logits(body), expected, rtol=1e-3, atol=1e-4)


def _still_serving(srv, expected) -> None:
    """A normal infer on a fresh connection: 200 with the right logits (503 had a slot leaked)."""
    r = httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=digits_body(), timeout=30)
    assert r.status_code == 200, r.text
    _assert_logits(r.content, expected)


def _error(status_body: tuple[int, dict, bytes], status: int, needle: str) -> None:
    got, headers, body = status_body
    assert got == status, body
    assert headers.get("content-type") == "application/json"
    err = orjson.loads(body)
    assert set(err) == {"error"} and needle.lower() in err["error"].lower(), err


def _send_quietly(conn: Conn, data: bytes) -> None:
    """Send what the server may refuse half-way (it answers and closes: the rest may not go out)."""
    try:
        conn.send(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


# -- item 3: head and URL size ----------------------------------------------------------------------
def test_header_over_the_limit_is_431_even_when_trickled(srv, expected):
    c = Conn(srv)
    c.send(b"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nHost: t\r\nX-Big: ")
    for _ in range(2 * HEADER_LIMIT // 1024):  # one header value, 1 KiB per send
        _send_quietly(c, b"a" * 1024)
        time.sleep(0.005)
    _error(c.response(), 431, "KILN_MAX_HEADER_BYTES")
    assert c.closed_by_server()
    # Just under the limit is fine, on the fast path and through ASGI.
    c = Conn(srv)
    c.send(infer_request(digits_body(), extra=f"X-Big: {'a' * (HEADER_LIMIT - 1024)}\r\n"))
    status, _, body = c.response()
    assert status == 200
    _assert_logits(body, expected)
    _still_serving(srv, expected)


def test_url_over_the_limit_is_414(srv, expected):
    c = Conn(srv)
    _send_quietly(c, f"GET /v2/models/{'m' * (URL_LIMIT + 10)} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    _error(c.response(), 414, "KILN_MAX_URL_BYTES")
    assert c.closed_by_server()
    c = Conn(srv)
    c.send(f"GET /v2/models/{'m' * (URL_LIMIT - 100)} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert c.response()[0] == 404  # under the limit: an ordinary unknown model
    _still_serving(srv, expected)


# -- item 4: timeouts, admission once the body is in, the connection bound -----------------------------
def test_silent_half_header_and_half_body_connections_time_out(srv, expected):
    silent, half_head, half_body = Conn(srv), Conn(srv), Conn(srv)
    half_head.send(b"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nHost: t\r\n")
    half_body.send(infer_request(digits_body())[:-20])
    t0 = time.monotonic()
    _error(half_head.response(), 408, "KILN_HEADER_TIMEOUT_S")
    _error(half_body.response(), 408, "KILN_BODY_TIMEOUT_S")
    assert half_head.closed_by_server() and half_body.closed_by_server()
    assert silent.closed_by_server() and silent.buf == b""  # KILN_KEEP_ALIVE_TIMEOUT_S: closed, no answer
    assert time.monotonic() - t0 < 8
    _still_serving(srv, expected)


def test_half_sent_bodies_do_not_hold_in_flight_slots(srv, expected):
    """KILN_MAX_INFLIGHT=1: before, the first half body held the only slot and every other client got 503."""
    halves = [Conn(srv) for _ in range(8)]
    for c in halves:
        c.send(infer_request(digits_body())[:-10])
    time.sleep(0.2)
    for _ in range(5):
        _still_serving(srv, expected)
    for c in halves:  # then they time out, releasing nothing they did not hold
        _error(c.response(), 408, "body")
    _still_serving(srv, expected)


def test_connection_bound_closes_the_longest_idle(srv, expected):
    """KILN_MAX_CONNECTIONS=48: 60 silent sockets; the oldest give way, a new client is served."""
    silent = []
    for _ in range(60):
        silent.append(Conn(srv))
        time.sleep(0.002)
    c = Conn(srv)
    c.send(infer_request(digits_body()))
    status, _, body = c.response()
    assert status == 200
    _assert_logits(body, expected)
    closed = []
    for s in silent:
        s.sock.settimeout(0.05)
        try:
            closed.append(s.sock.recv(1) == b"")
        except TimeoutError:
            closed.append(False)
        except ConnectionResetError:
            closed.append(True)
    assert sum(closed) >= 60 + 1 - 48 and all(closed[:10]), closed  # the oldest first
    assert not closed[-1]  # the newest silent one is still open (its keep-alive timeout is 3 s)
    for s in silent:
        s.close()
    _still_serving(srv, expected)


def test_silent_sockets_past_the_descriptor_limit_do_not_lock_clients_out(srv, tmp_path, expected):
    """`ulimit -n 256` and no KILN_MAX_CONNECTIONS: the bound comes from RLIMIT_NOFILE. Before,
    400 silent sockets took every descriptor and each new client's connection was reset."""
    add_digits(tmp_path / "repo")
    server = start_server(tmp_path / "repo", srv.cache_dir, log_dir=tmp_path, nofile=256,  # srv's cache: no compile
                          env={"KILN_KEEP_ALIVE_TIMEOUT_S": "30"})
    try:
        silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(400)]
        time.sleep(0.3)
        for _ in range(5):
            _still_serving(server, expected)
        for s in silent:
            s.close()
    finally:
        server.stop()


# -- item 5: backpressure ----------------------------------------------------------------------------------
def _echo_request() -> bytes:
    x = np.full((ECHO, ECHO), 1.0 / ECHO, np.float32)
    header = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [ECHO, ECHO],
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    body = header + x.tobytes()
    return (f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\n\r\n").encode() + body


@pytest.mark.parametrize("kind", ["large answers", "small requests"])
def test_pipeliner_that_never_reads_is_held_back_and_dropped(srv, expected, kind):
    """Large answers: the write buffer fills and reading stops. Small requests: a single read holds
    dozens of them; the queue of parsed requests must not grow past it."""
    proc = psutil.Process(srv.proc.pid)
    req = _echo_request() if kind == "large answers" else infer_request(digits_body()) * 100
    c = Conn(srv)
    for _ in range(3):  # warm the model and the allocator
        c.send(req)
        for _ in range(1 if kind == "large answers" else 100):
            assert c.response()[0] == 200
    c.close()
    rss_start = proc.memory_info().rss
    pipeliner = Conn(srv, timeout=10)
    sent = [0]

    def flood() -> None:  # pipelined; not one response is read
        try:
            for _ in range(300):
                pipeliner.sock.sendall(req)
                sent[0] += 1
        except OSError:
            pass

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    peak, t0 = rss_start, time.monotonic()
    while sender.is_alive() and time.monotonic() - t0 < 15:
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.05)
    assert not sender.is_alive(), "the server never dropped the connection (KILN_SEND_TIMEOUT_S=2)"
    assert sent[0] < 300, "the server read every request although none of its answers was read"
    assert (peak - rss_start) / 2**20 < 48, f"RSS grew {(peak - rss_start) / 2**20:.0f} MiB"
    pipeliner.close()
    time.sleep(0.3)
    assert (proc.memory_info().rss - rss_start) / 2**20 < 48
    _still_serving(srv, expected)


# -- item 9: log injection -----------------------------------------------------------------------------
def test_path_cannot_forge_a_log_line(srv, expected):
    forged = "2030-01-01 00:00:00,000 CRITICAL kiln: forged"
    path = "/v2/models/x%0a" + forged.replace(" ", "%20") + "%0d/infer"
    r = httpx.post(srv.url + path, content=digits_body(), timeout=30)
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    time.sleep(0.2)
    lines = srv.log().splitlines()
    assert not any(line.startswith("2030-01-01") for line in lines)
    assert any("/v2/models/x%0A2030-01-01%2000:00:00,000%20CRITICAL%20kiln:%20forged%0D/infer" in line
               for line in lines)
    _still_serving(srv, expected)


# -- item 10: responses in order, then the refusal, then close -------------------------------------------
@pytest.mark.parametrize("infers", [1, 2])
def test_valid_infers_then_a_malformed_request_in_one_send(srv, expected, infers):
    c = Conn(srv)
    c.send(infer_request(digits_body()) * infers + b"NONSENSE\r\n\r\n")
    for _ in range(infers):
        status, _, body = c.response()
        assert status == 200
        _assert_logits(body, expected)
    _error(c.response(), 400, "invalid HTTP request")
    assert c.closed_by_server()
    time.sleep(0.2)
    log = srv.log()
    assert "Task exception was never retrieved" not in log and "handler is closed" not in log
    _still_serving(srv, expected)


@pytest.mark.parametrize("path", ["/v2/models/digits-cnn/infer", "/v2/repository/index"], ids=["infer", "ASGI"])
def test_broken_chunk_framing_mid_body_is_400_then_close(srv, expected, path):
    c = Conn(srv)
    c.send(f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{{\"in\r\nZZ\r\n".encode())
    _error(c.response(), 400, "invalid HTTP request")
    assert c.closed_by_server()
    _still_serving(srv, expected)


def test_refused_request_whose_body_never_comes_is_closed(srv, expected):
    """Refused at its headers (two Authorization headers), the rest of its body never sent."""
    c = Conn(srv)
    c.send(infer_request(digits_body(), extra="Authorization: Bearer a\r\nAuthorization: Bearer b\r\n")[:-20])
    _error(c.response(), 400, "more than one Authorization")
    assert c.closed_by_server()  # within KILN_BODY_TIMEOUT_S, not never
    _still_serving(srv, expected)


# -- item 12: RFC 9112 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("request_bytes,status,needle", [
    (b"GET /v2/health/live HTTP/1.1\r\n\r\n", 400, "Host"),
    (infer_request(digits_body()).replace(b"Host: t\r\n", b""), 400, "Host"),
    (b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host"),
    (b"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
     + b"%x\r\n" % len(gzip.compress(digits_body())) + gzip.compress(digits_body()) + b"\r\n0\r\n\r\n",
     501, "Transfer-Encoding"),
    (b"POST /v2/repository/index HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n\r\n", 501,
     "Transfer-Encoding"),
], ids=["no Host", "no Host (infer)", "two Hosts", "gzip, chunked", "identity"])
def test_framing_that_rfc_9112_refuses(srv, expected, request_bytes, status, needle):
    c = Conn(srv)
    c.send(request_bytes)
    _error(c.response(), status, needle)
    assert c.closed_by_server()
    _still_serving(srv, expected)


def test_http_1_0_without_host_is_fine(srv):
    c = Conn(srv)
    c.send(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
    assert c.response()[0] == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upgrade_h2c_is_ignored_and_loses_nothing(srv, expected, chunked):
    body = digits_body()
    upgrade = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    if chunked:
        first = (f"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nHost: t\r\n{upgrade}"
                 f"Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n").encode() + body + b"\r\n0\r\n\r\n"
    else:
        first = infer_request(body, extra=upgrade)
    c = Conn(srv)
    c.send(first + infer_request(body) + b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n")
    for _ in range(2):
        status, headers, out = c.response()
        assert status == 200 and "upgrade" not in headers, out
        _assert_logits(out, expected)
    assert c.response()[0] == 200
    _still_serving(srv, expected)


def test_infer_then_half_close_still_gets_its_answer(srv, expected):
    c = Conn(srv)
    c.send(infer_request(digits_body()) * 2)
    c.sock.shutdown(socket.SHUT_WR)
    for _ in range(2):
        status, _, body = c.response()
        assert status == 200
        _assert_logits(body, expected)
    assert c.closed_by_server()
    _still_serving(srv, expected)


@pytest.mark.parametrize("path", ["/metrics", "/v2/health/ready", "/v2/models/digits-cnn", "/v2"])
def test_head_is_answered_like_get_without_a_body(srv, path):
    c = Conn(srv)
    # HEAD then GET in one send: a body after the HEAD answer would be read as the GET's status line.
    c.send(f"HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\nGET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    head_status, head_headers, _ = c.response(head=True)
    get_status, get_headers, body = c.response()
    assert head_status == get_status == 200
    assert head_headers.get("content-type") == get_headers.get("content-type")
    if path != "/metrics":  # the exposition changes between the two requests
        assert head_headers.get("content-length") == get_headers.get("content-length") == str(len(body))


@pytest.mark.parametrize("path,body", [("/v2/models/digits-cnn/infer", digits_body()), ("/v2", None)],
                         ids=["infer (fast path)", "GET (ASGI)"])
def test_two_authorization_headers_are_refused(srv, expected, path, body):
    twice = "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n"
    c = Conn(srv)
    c.send(infer_request(body, extra=twice, path=path) if body is not None
           else f"GET {path} HTTP/1.1\r\nHost: t\r\n{twice}\r\n".encode())
    _error(c.response(), 400, "more than one Authorization")
    _still_serving(srv, expected)


@pytest.mark.parametrize("payload", [gzip.compress(digits_body()) + b"garbage",
                                     gzip.compress(digits_body()) + gzip.compress(digits_body())],
                         ids=["trailing garbage", "second gzip member"])
def test_bytes_after_the_gzip_stream_are_refused(srv, expected, payload):
    c = Conn(srv)
    c.send(infer_request(payload, extra="Content-Encoding: gzip\r\n"))
    _error(c.response(), 400, "after the end of the compressed stream")
    _still_serving(srv, expected)


# -- the fast path, found explicitly ---------------------------------------------------------------------
def test_fast_path_is_found_through_uvicorn_wrappers_and_says_when_it_is_off(tmp_path, caplog, srv):
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from service.app import create_app
    from service.guard import wrap
    from service.http_front import InferFastPath
    from service.settings import Settings

    settings = Settings(model_repo=tmp_path, cache_dir=tmp_path / "cache")
    guarded = wrap(create_app(settings), settings)
    with caplog.at_level(logging.INFO, logger="kiln.http"):
        direct = InferFastPath.find(guarded, None)
        proxied = InferFastPath.find(ProxyHeadersMiddleware(guarded), None)
        limited = InferFastPath.find(guarded, 100)

        class Unknown:
            app = guarded

            async def __call__(self, scope, receive, send):
                await self.app(scope, receive, send)

        unknown = InferFastPath.find(Unknown(), None)
    assert direct is not None and direct.guard is guarded and direct.route is guarded.app.infer_route
    assert proxied is not None and proxied.guard is guarded
    assert limited is None and unknown is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("stepping over ProxyHeadersMiddleware" in m for m in messages)
    assert any("fast path off: Unknown sits in front" in m for m in messages)
    assert any("fast path off: uvicorn's limit_concurrency" in m for m in messages)
    assert "infer fast path on" in srv.log()
