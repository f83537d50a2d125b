"""uvicorn's httptools protocol, with `POST …/infer` answered straight from the parser callbacks.

uvicorn turns every request into ASGI: a scope dict, a RequestResponseCycle with an asyncio.Event,
receive/send message dicts, header validation by regex, and Kiln's guard wrapping `send` in a
closure. On a 784-float MLP that was a fifth to a quarter of the server's CPU per request (JSON
133 → 106 µs, binary 101 → 73 µs once it was gone; docs/throughput.md). Here an infer request
instead becomes an `_InferCycle`: the body is collected as the parser hands it over (or read straight
into its buffer, see KilnHttpProtocol), the guard's steps (service/guard.py: request id, drain,
in-flight bound, auth, logs) and the shared infer route (service/infer.py) run in one task, and the
response is one `transport.write`. Other routes, websockets, graceful shutdown and TLS are
uvicorn's own code: `_InferCycle` has the attributes the protocol touches on a cycle, so pipelined
requests of either kind queue behind each other in order. The connection's own rules — limits,
timeouts, backpressure, refusals in order, RFC 9112 framing — are KilnHttpProtocol's (its docstring),
with what all connections share in service/http_front.py.

Used by `kiln serve` (`uvicorn.Config(http=connection_class(limits))`); under any other server the
same route is reached through ASGI (service/app.py), with the same answers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import urllib.parse
import weakref

import httptools
import numpy as np
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .errors import KilnError, Unavailable, error_reply
from .guard import log as guard_log
from .http_front import Front, HttpLimits, InferFastPath
from .infer import error_reply as route_error_reply
from .infer import match_infer_path, too_large
from .logs import REQUEST, quote_path, safe

# The first read of a request: room for the headers and a typical JSON body (the MLP's 784 floats
# are ~15 KB). Whatever of an infer body does not fit is read straight into its buffer; a bigger
# scratch only adds copies (64 KiB cost a 600 KB image ~22 µs more of event-loop CPU).
_SCRATCH_BYTES = 16384

# What the connection is reading: nothing of an unfinished request, a request's head, its body.
_IDLE, _HEAD, _BODY = 0, 1, 2

# One Front per uvicorn server (that is, per process): limits, the fast path, the idle connections.
_FRONTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _front(server_state, config, limits: HttpLimits) -> Front:
    front = _FRONTS.get(server_state)
    if front is None:
        front = _FRONTS[server_state] = Front(limits, InferFastPath.find(config.loaded_app, config.limit_concurrency))
    return front


def connection_class(limits: HttpLimits):
    """The `http=` protocol factory for uvicorn.Config, held to `limits` (picklable, for workers)."""
    return functools.partial(KilnConnection, limits=limits)


class _Refusal(Exception):
    """Raised inside a parser callback: httptools stops parsing and the connection answers
    `status` with `message` (after the responses it still owes), then closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _response(default_headers, status: int, headers, payload: bytes, keep_alive: bool,
              request_id: str | None = None) -> list[bytes]:
    """A response head (and payload, when small) as the pieces of one write."""
    head = [STATUS_LINE[status]]
    for name, value in default_headers:
        head += (name, b": ", value, b"\r\n")
    for name, value in headers:
        head += (name, b": ", value, b"\r\n")
    if request_id is not None:
        head += (b"x-request-id: ", request_id.encode(), b"\r\n")
    head += (b"content-length: ", str(len(payload)).encode(),
             b"\r\n\r\n" if keep_alive else b"\r\nconnection: close\r\n\r\n")
    if len(payload) < 65536:
        head.append(payload)
        return [b"".join(head)]
    return [b"".join(head), payload]


class KilnConnection(asyncio.BufferedProtocol):
    """The transport's protocol: uvloop reads into caller-supplied buffers only for protocols that
    are not asyncio.Protocol subclasses, and uvicorn's protocol is one, so this forwards to it."""

    __slots__ = ("http",)

    def __init__(self, *args, limits: HttpLimits | None = None, **kwargs) -> None:
        self.http = KilnHttpProtocol(*args, limits=limits or HttpLimits.from_settings(), **kwargs)

    def connection_made(self, transport) -> None:
        self.http.connection_made(transport)

    def connection_lost(self, exc) -> None:
        self.http.connection_lost(exc)

    def eof_received(self):
        return self.http.eof_received()

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.http.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.http.buffer_updated(nbytes)


class KilnHttpProtocol(HttpToolsProtocol):
    """Reads are buffered (KilnConnection): headers and small bodies go through a per-connection
    scratch buffer to httptools as usual; the rest of an infer body larger than one read is
    received straight into its final buffer, with no intermediate bytes objects, httptools body
    slices or join. On a 600 KB image those copies were half of the event loop's CPU (perf).

    What uvicorn leaves open, this closes (docs/hardening.md, "The HTTP front"): head and URL size
    limits (431 / 414), header and body read timeouts (408), a timeout for fresh and kept-alive
    connections, the connection bound, write backpressure (no reading while the transport's write
    buffer is above its high-water mark, dropped after KILN_SEND_TIMEOUT_S), responses in order
    even when a later request is malformed, an answer after the client half-closes, RFC 9112's
    Host and Transfer-Encoding rules, and `Upgrade: h2c` ignored rather than eating the body."""

    def __init__(self, *args, limits: HttpLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.front = _front(self.server_state, self.config, limits)
        self.limits = limits
        self.timeout_keep_alive = limits.keep_alive_timeout_s
        self.infer: InferFastPath | None = self.front.fast_path
        self.url = b""
        self._scratch: memoryview | None = None
        self._direct: _InferCycle | None = None  # the cycle whose body the loop reads into
        self._phase = _IDLE
        self._head_since = self._last_read = 0.0
        self._head_bytes = 0
        self._completed_in_feed = False
        self._read_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._failure: tuple[int, str] | None = None  # the error to answer once earlier responses are out
        self._eof = False             # the client half-closed: close after the responses owed
        self._after_drain = False     # a response completed while writes were blocked
        self._upgrade_body = None     # "chunked" or a length: the body of a request whose Upgrade is ignored
        self._synthetic = False       # parsing the stand-in head that frames that body

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if not self.front.connections.make_room(len(self.connections), self):
            self._failure = (503, "")
            self._write_error(503, f"server is at its bound of {self.front.connections.bound} open connections, "
                                   f"none idle (KILN_MAX_CONNECTIONS)", [(b"retry-after", b"1")])
            return
        self.front.connections.idle(self)
        # uvicorn times out idle keep-alive connections only after a response: a fresh one too.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def evict(self) -> None:
        """Closed to make room for a new connection (IdleConnections): no request is in progress."""
        self.transport.close()

    def connection_lost(self, exc) -> None:
        self.front.connections.lost(self)
        for timer in (self._read_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._read_timer = self._send_timer = None
        super().connection_lost(exc)

    def eof_received(self):
        """The client half-closed its side: answer what it asked for, then close. A request cut
        short by the EOF can never complete; it is dropped."""
        self._eof = True
        if self._phase == _BODY and not self.pipeline:
            return None  # the request being read is the only one owed, and its body can never come
        if self._responses_pending() and self.scheme != "https":  # TLS transports cannot half-close
            return True  # keep the transport open for writing; _next closes it
        return None

    # -- buffered reads ----------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        direct = self._direct
        if direct is not None:
            return direct.buffer()
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH_BYTES))
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self._last_read = self.loop.time()
        direct = self._direct
        if direct is not None:
            direct.size += nbytes
            if direct.size >= direct.declared:
                # httptools still expects these body bytes: the next request gets a fresh parser.
                self._direct = None
                self._phase = _IDLE
                self._new_parser()
                direct.complete()
            return
        if self._failure is not None:
            return  # refused: nothing more is parsed
        self.data_received(bytes(self._scratch[:nbytes]))
        cycle = self.cycle
        if type(cycle) is _InferCycle and cycle.more_body and self.parser is not None and cycle.go_direct():
            self._direct = cycle

    def _new_parser(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self._completed_in_feed = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                return self.handle_websocket_upgrade()
            return self._ignore_upgrade(data[upgrade.args[0]:])
        except httptools.HttpParserError as err:
            refusal = err.__context__ if isinstance(err.__context__, _Refusal) else None
            if refusal is None:
                refusal = _Refusal(400, f"invalid HTTP request: {err}")
            return self._fail(refusal.status, refusal.message)
        if self._phase == _HEAD and not self._completed_in_feed:
            # Still inside a head: all of this read belongs to it. (A read that also ended the previous
            # request is not counted: the bound is then at most one read later.)
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._fail(431, f"request header fields exceed {self.limits.max_header_bytes} bytes "
                                f"(KILN_MAX_HEADER_BYTES)")

    def _ignore_upgrade(self, rest: bytes) -> None:
        """An Upgrade Kiln does not speak (h2c, ...): RFC 9110 7.8 lets the server ignore it and answer
        in HTTP/1.1. httptools skipped the body of such a request and stopped at the end of its head;
        a fresh parser reads on, framing that body by a stand-in head with the same length or chunking."""
        self._new_parser()
        if self._upgrade_body is not None:
            framing, self._upgrade_body = self._upgrade_body, None
            self._synthetic = True
            self.parser.feed_data(b"POST / HTTP/1.1\r\nhost: kiln\r\n" + (
                b"transfer-encoding: chunked" if framing == "chunked" else b"content-length: %d" % framing)
                + b"\r\n\r\n")
        if rest:
            self.data_received(rest)

    # -- parser callbacks --------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._synthetic:
            return
        # The ASGI scope is built in on_headers_complete, only for requests that go to ASGI.
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._phase = _HEAD
        self._head_since = self.loop.time()
        self._head_bytes = 0
        self.front.connections.busy(self)
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_read_timer)

    def on_url(self, url: bytes) -> None:
        if self._synthetic:
            return
        self.url += url
        if len(self.url) > self.limits.max_url_bytes:
            raise _Refusal(414, f"request target exceeds {self.limits.max_url_bytes} bytes (KILN_MAX_URL_BYTES)")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._synthetic:
            super().on_header(name, value)

    def _check_framing(self) -> None:
        """RFC 9112: exactly one Host in HTTP/1.1 (3.2); no transfer coding but a final `chunked` (6.1)."""
        hosts = 0
        coding = None
        for name, value in self.headers:
            if name == b"host":
                hosts += 1
            elif name == b"transfer-encoding":
                coding = value if coding is None else coding + b"," + value
        version = self.parser.get_http_version()
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            raise _Refusal(400, "an HTTP/1.1 request needs exactly one Host header" if hosts == 0
                           else "more than one Host header")
        if coding is not None:
            if version != "1.1":
                raise _Refusal(400, f"Transfer-Encoding in an HTTP/{version} request")
            codings = [c.strip().lower() for c in coding.split(b",")]
            if codings != [b"chunked"]:
                raise _Refusal(501, f"Transfer-Encoding {safe(coding.decode('latin-1'))!r} is not supported: "
                                    f"only 'chunked' (compress the body with Content-Encoding instead)")

    def on_headers_complete(self) -> None:
        if self._synthetic:
            self._synthetic = False
            return
        self._check_framing()
        self._phase = _BODY
        upgrade = self.parser.should_upgrade()
        if upgrade and not self._should_upgrade():
            upgrade = False
            chunked = any(k == b"transfer-encoding" for k, _ in self.headers)
            length = next((int(v) for k, v in self.headers if k == b"content-length" and v.isdigit()), 0)
            self._upgrade_body = "chunked" if chunked else (length or None)
        target = None
        if self.infer is not None and not upgrade and self.parser.get_method() == b"POST":
            path = httptools.parse_url(self.url).path.decode("latin-1")
            if "%" in path:
                path = urllib.parse.unquote(path)
            target = match_infer_path(path)
        if target is None:
            return self._asgi_headers_complete()
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        existing = self.cycle
        self.cycle = _InferCycle(self, path, target, self.headers, keep_alive, self.expect_100_continue)
        if existing is None or existing.response_complete:
            self.cycle.start()
        else:  # pipelined behind a request still being answered
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, None))

    def _asgi_headers_complete(self) -> None:
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()  # the scope, exactly as uvicorn builds it
        self.url, self.expect_100_continue = url, expect
        self.headers = self.scope["headers"] = headers
        super().on_headers_complete()

    def _start_asgi_task(self, cycle, app) -> None:
        if isinstance(cycle, _InferCycle):
            # A pipelined request whose turn came: uvicorn calls this from inside the previous
            # response's send, before that request has left the guard (its in-flight slot).
            self.loop.call_soon(cycle.start)
        else:
            super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if isinstance(cycle, _InferCycle):
            cycle.feed(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._upgrade_body is not None:
            return  # httptools skipped the body of an ignored Upgrade: _ignore_upgrade reads it
        self._phase = _IDLE
        self._completed_in_feed = True
        cycle = self.cycle
        if isinstance(cycle, _InferCycle):
            cycle.complete()
        else:
            super().on_message_complete()

    # -- responses ---------------------------------------------------------------------------------
    def _responses_pending(self) -> bool:
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        self._next()

    def _next(self) -> None:
        """After a response: the next pipelined request, the refusal or close owed, or keep-alive."""
        if self.transport.is_closing():
            return
        if self.flow.write_paused:
            # Backpressure: nothing more is read or answered until the client has read this.
            self._after_drain = True
            self.flow.pause_reading()
            return
        self._unset_keepalive_if_required()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            if cycle.more_body and (self._eof or self._failure is not None):
                # Its body can never come (EOF), or is the one that failed: answer that, and close.
                if self._failure is not None:
                    self._write_error(*self._failure)
                else:
                    self.transport.close()
                return
            if not self.pipeline:
                # Read on only once the queue is empty (uvicorn reads on after every response, so a
                # client that pipelines faster than it is answered grows the queue without bound).
                self.flow.resume_reading()
            self._start_asgi_task(cycle, app)
        elif self._failure is not None:
            self._write_error(*self._failure)
        elif self._eof:
            self.transport.close()
        else:
            self.flow.resume_reading()
            if self._phase == _IDLE:
                self.front.connections.idle(self)
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

    def _fail(self, status: int, message: str) -> None:
        """Refuse the request being read: answered after the responses still owed, then closed."""
        if self._failure is not None:
            return
        if self._phase == _BODY:
            return self._refuse_body(status, message)
        self._failure = (status, message)
        self.flow.pause_reading()
        if not self._responses_pending():
            self._write_error(status, message)

    def _refuse_body(self, status: int, message: str) -> None:
        """The request whose body is being read can never complete (it stalled, or its framing is
        broken): it gets `status` now, or when its turn comes if earlier answers are owed; then close."""
        self._failure = (status, message)
        self.flow.pause_reading()
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self.transport.close()  # already answered (the app did not wait for the body)
        elif self.pipeline:
            return  # _next answers it after the responses before it
        elif isinstance(cycle, _InferCycle):
            cycle.keep_alive = False
            cycle.abandon(status, message)
        elif cycle.response_started:
            cycle.keep_alive = False  # the app answers without the rest of the body; then close
        else:
            cycle.disconnected = True  # the app waiting in receive() gets http.disconnect
            cycle.message_event.set()
            self._write_error(status, message)

    def _write_error(self, status: int, message: str, extra=()) -> None:
        """A v2 error answer written by the connection itself (no request reached the app), then close."""
        if not self.transport.is_closing():
            status, headers, payload = error_reply(status, message, extra)
            self.transport.writelines(_response(self.server_state.default_headers, status, headers, payload, False))
            self.transport.close()
        if status != 503:
            target = quote_path(self.url[:512].decode("latin-1")) if self.url else "(no request line)"
            guard_log.warning("%s -> %d: %s", target, status, safe(message), extra={"status": status})

    def pause_writing(self) -> None:
        self.flow.pause_writing()
        self.flow.pause_reading()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.limits.send_timeout_s, self._on_send_timeout)

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._after_drain:
            self._after_drain = False
            self._next()
        elif not self.pipeline and self._failure is None and not self.transport.is_closing():
            self.flow.resume_reading()

    def _on_send_timeout(self) -> None:
        self._send_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # its app must not write to the aborted transport
        guard_log.warning("client read nothing of its responses for %.3g s (KILN_SEND_TIMEOUT_S): connection "
                          "dropped", self.limits.send_timeout_s)
        self.transport.abort()

    # -- read timeouts -----------------------------------------------------------------------------
    def _on_read_timer(self) -> None:
        """One lazy timer per connection: re-armed for what is left of the current phase's time."""
        self._read_timer = None
        if self._phase == _IDLE or self._failure is not None or self.transport.is_closing():
            return
        now = self.loop.time()
        head = self._phase == _HEAD
        if self.flow.read_paused or (self._responses_pending() if head else bool(self.pipeline)):
            # The server is the slow side (answering earlier requests, or not reading): restart the clock.
            self._head_since = self._last_read = now
        if head:
            left = self._head_since + self.limits.header_timeout_s - now
        else:
            left = max(self._last_read, self._head_since) + self.limits.body_timeout_s - now
        if left > 0:
            self._read_timer = self.loop.call_later(left, self._on_read_timer)
        elif head:
            self._fail(408, f"request headers not complete after {self.limits.header_timeout_s:.3g} s "
                            f"(KILN_HEADER_TIMEOUT_S)")
        else:
            self._refuse_body(408, f"request body: nothing received for {self.limits.body_timeout_s:.3g} s "
                                   f"(KILN_BODY_TIMEOUT_S)")

class _InferCycle:
    """One infer request on the fast path. Quacks like uvicorn's RequestResponseCycle where the
    protocol touches a cycle: response_complete, keep_alive, disconnected, message_event.set()."""

    __slots__ = ("proto", "path", "target", "headers", "keep_alive", "expect_100", "chunks", "size",
                 "more_body", "started", "dispatched", "response_complete", "disconnected", "ctx", "start_t",
                 "admitted", "too_large", "message_event", "declared", "sized", "view", "tensor", "split")

    def __init__(self, proto: KilnHttpProtocol, path: str, target: tuple[str, str | None],
                 headers: list[tuple[bytes, bytes]], keep_alive: bool, expect_100: bool):
        self.proto = proto
        self.path = path
        self.target = target
        self.headers = headers
        self.keep_alive = keep_alive
        self.expect_100 = expect_100
        self.chunks: list[bytes] = []
        self.size = 0
        self.more_body = True
        self.started = self.dispatched = self.response_complete = self.disconnected = False
        self.admitted = self.too_large = False
        self.ctx = None
        self.start_t = 0.0
        self.message_event = self  # connection_lost calls cycle.message_event.set()
        self.declared, self.sized = 0, False  # Content-Length, and whether it alone frames the body
        chunked = False
        for k, v in headers:
            if k == b"content-length" and v.isdigit():
                self.declared, self.sized = int(v), True
            elif k == b"transfer-encoding":
                chunked = True
        self.sized = self.sized and not chunked
        self.view: memoryview | None = None    # the body buffer while the loop reads into it ...
        self.tensor: memoryview | None = None  # ... and, when staged, the binary tensor's own buffer
        self.split = 0                         # where the body passes from `view` to `tensor`

    def set(self) -> None:
        """Called by connection_lost (after setting `disconnected`): a client gone mid-body."""
        if self.disconnected and self.started and not self.dispatched and not self.response_complete:
            self.proto.infer.route.refuse(*self.target, None)
            self._reply(0, [], b"")

    # -- parser side ------------------------------------------------------------------------------
    def feed(self, body: bytes) -> None:
        if self.response_complete or self.too_large:
            return
        self.size += len(body)
        self.chunks.append(body)
        if self.started:
            self._check_size(False)

    def go_direct(self) -> bool:
        """Receive the rest of a Content-Length body straight into its final buffer (see
        KilnHttpProtocol.get_buffer); not for bodies over the limit or requests already answered.
        A binary request's tensor goes into memory the model's batcher hands out (`staging`), so a
        batch of such requests needs no concatenation; the JSON header into a small buffer of its own."""
        if (not self.sized or self.response_complete or self.too_large or self.size >= self.declared
                or self.declared > self.proto.infer.route.body_limit):
            return False
        received = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        hlen = self._header_length()
        region = self.proto.infer.route.staging(*self.target, self.declared - hlen) if hlen else None
        if region is not None:
            self.view, self.tensor, self.split = memoryview(bytearray(hlen)), memoryview(region), hlen
            n = min(len(received), hlen)
            self.view[:n] = received[:n]
            self.tensor[:len(received) - n] = received[n:]
        else:
            # Not bytearray(n): it zero-fills 600 KB that recv is about to overwrite.
            self.view, self.split = memoryview(np.empty(self.declared, np.uint8)).cast("B"), self.declared
            self.view[:len(received)] = received
        self.chunks = [self.view]
        return True

    def _header_length(self) -> int:
        """Inference-Header-Content-Length when the body is a JSON header plus binary tensors
        (not compressed), else 0."""
        hlen = 0
        for k, v in self.headers:
            if k == b"inference-header-content-length" and v.isdigit():
                hlen = int(v)
            elif k == b"content-encoding":
                return 0
        return hlen if hlen < self.declared else 0

    def buffer(self) -> memoryview:
        """Where the next body bytes go."""
        if self.size < self.split:
            return self.view[self.size:self.split]
        return self.tensor[self.size - self.split:]

    def complete(self) -> None:
        self.more_body = False
        if self.started and not self.response_complete and not self.dispatched:
            self._dispatch()

    # -- request side -----------------------------------------------------------------------------
    def start(self) -> None:
        """The connection's turn: guard, body limit, 100-continue, then run once the body is in."""
        proto = self.proto
        if self.disconnected or proto.transport.is_closing():
            return  # gone before its turn came (pipelined): nothing to admit or answer
        guard = proto.infer.guard
        self.started = True
        self.start_t = time.perf_counter()
        self.ctx, auth = guard.context(self.headers)
        rejection = guard.check("POST", self.path, auth)  # drain, auth; the in-flight slot once the body is in
        if rejection is not None:
            return self._reply(*rejection)
        if self._check_size(True, self.declared) or self._check_size(False):
            return
        if self.expect_100 and self.more_body:
            proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not self.more_body:
            self._dispatch()

    def _check_size(self, declared: bool, size: int | None = None) -> bool:
        route = self.proto.infer.route
        exc = too_large(self.size if size is None else size, route.body_limit, declared)
        if exc is None:
            return False
        # Refused before the body is read: close the connection rather than read it to the end.
        self.too_large, self.keep_alive, self.chunks = True, False, []
        self._reply(*route.refuse(*self.target, exc))
        return True

    def abandon(self, status: int, message: str) -> None:
        """The body stopped coming or its framing broke (KilnHttpProtocol._refuse_body): answer
        `status`; the connection then closes."""
        if self.started and not self.response_complete and not self.dispatched:
            self.chunks, self.view, self.tensor = [], None, None
            self.proto.infer.route.refuse(*self.target, None)
            self._reply(*error_reply(status, message))

    def _dispatch(self) -> None:
        self.dispatched = True
        rejection = self.proto.infer.guard.acquire(self.path)
        if rejection is not None:
            self.chunks, self.view, self.tensor = [], None, None
            return self._reply(*rejection)
        self.admitted = True
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        binary = self.tensor
        self.chunks, self.view, self.tensor = [], None, None
        proto = self.proto
        task = proto.loop.create_task(self._run(body, binary))
        task.add_done_callback(proto.tasks.discard)
        proto.tasks.add(task)

    async def _run(self, body: bytes, binary: memoryview | None) -> None:
        REQUEST.set(self.ctx)  # this task's own context: log lines while serving carry the ids
        try:
            reply = await self.proto.infer.route(*self.target, self.headers, body, self.start_t, binary)
        except Exception as exc:  # the route answers its own errors; this is a bug, still answer
            reply = route_error_reply(KilnError(f"internal error: {type(exc).__name__}: {exc}"))
        except BaseException:  # cancelled: uvicorn's shutdown ran out of patience
            self._reply(*route_error_reply(Unavailable("server is shutting down")))
            raise
        self._reply(*reply)

    def _reply(self, status: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> None:
        if self.response_complete:
            return
        self.response_complete = True
        proto = self.proto
        guard = proto.infer.guard
        if self.admitted:
            guard.release()
        # A transport already closing (a timeout, the connection bound) takes no more writes.
        gone = self.disconnected or proto.transport.is_closing()
        if not gone:
            keep_alive = self.keep_alive and (b"connection", b"close") not in headers
            pieces = _response(proto.server_state.default_headers, status, headers, payload, keep_alive, self.ctx[0])
            if len(pieces) == 1:
                proto.transport.write(pieces[0])
            else:
                proto.transport.writelines(pieces)
            if not keep_alive:
                proto.transport.close()
        if status >= 400 or gone or guard_log.isEnabledFor(logging.DEBUG):
            token = REQUEST.set(self.ctx)
            guard.log("POST", self.path, 0 if gone else status, payload[:512], self.start_t)
            REQUEST.reset(token)
        if not gone:
            proto.on_response_complete()
