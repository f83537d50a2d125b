"""uvicorn's httptools protocol, with `POST …/infer` answered straight from the parser callbacks.

uvicorn turns every request into ASGI: a scope dict, a RequestResponseCycle with an asyncio.Event,
receive/send message dicts, header validation by regex, and Kiln's guard wrapping `send` in a
closure. On a 784-float MLP that was a fifth to a quarter of the server's CPU per request (JSON
133 → 106 µs, binary 101 → 73 µs once it was gone; docs/throughput.md). Here an infer request
instead becomes an `_InferCycle`: the body is collected as the parser hands it over (or read straight
into its buffer, see KilnHttpProtocol), the guard's steps (service/guard.py: request id, drain,
in-flight bound, auth, logs) and the shared infer route (service/infer.py) run in one task, and the
response is one `transport.write`. Everything else — other routes, websockets, keep-alive, pipelining, graceful
shutdown, TLS — is uvicorn's own code, unchanged: `_InferCycle` has the attributes the protocol
touches on a cycle, so pipelined requests of either kind queue behind each other in order.

Used by `kiln serve` (`uvicorn.Config(http=KilnConnection)`); under any other server the same
route is reached through ASGI (service/app.py), with the same answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse

import httptools
import numpy as np
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .errors import KilnError, Unavailable
from .guard import Guard
from .guard import log as guard_log
from .infer import InferRoute, error_reply, match_infer_path, too_large
from .logs import REQUEST


# The first read of a request: room for the headers and a typical JSON body (the MLP's 784 floats
# are ~15 KB). Whatever of an infer body does not fit is read straight into its buffer; a bigger
# scratch only adds copies (64 KiB cost a 600 KB image ~22 µs more of event-loop CPU).
_SCRATCH_BYTES = 16384


class KilnConnection(asyncio.BufferedProtocol):
    """The transport's protocol: uvloop reads into caller-supplied buffers only for protocols that
    are not asyncio.Protocol subclasses, and uvicorn's protocol is one, so this forwards to it."""

    __slots__ = ("http",)

    def __init__(self, *args, **kwargs) -> None:
        self.http = KilnHttpProtocol(*args, **kwargs)

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
    slices or join. On a 600 KB image those copies were half of the event loop's CPU (perf)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._scratch: memoryview | None = None
        self._direct: _InferCycle | None = None  # the cycle whose body the loop reads into
        guard = self.app if isinstance(self.app, Guard) else None
        route = getattr(guard.app, "infer_route", None) if guard is not None else None
        # The fast path needs Kiln's guard in front (auth, drain, ids) and no uvicorn concurrency limit.
        self.infer: tuple[Guard, InferRoute] | None = (
            (guard, route) if isinstance(route, InferRoute) and self.limit_concurrency is None else None)

    # -- buffered reads ----------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        direct = self._direct
        if direct is not None:
            return direct.buffer()
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH_BYTES))
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        direct = self._direct
        if direct is not None:
            direct.size += nbytes
            if direct.size >= direct.declared:
                # httptools still expects these body bytes: the next request gets a fresh parser.
                self._direct = None
                self.parser = httptools.HttpRequestParser(self)
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
                direct.complete()
            return
        self.data_received(bytes(self._scratch[:nbytes]))
        cycle = self.cycle
        if type(cycle) is _InferCycle and cycle.more_body and self.parser is not None and cycle.go_direct():
            self._direct = cycle

    def on_message_begin(self) -> None:
        # The ASGI scope is built in on_headers_complete, only for requests that go to ASGI.
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def on_headers_complete(self) -> None:
        target = None
        if self.infer is not None and self.parser.get_method() == b"POST" and not self.parser.should_upgrade():
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
        cycle = self.cycle
        if isinstance(cycle, _InferCycle):
            cycle.complete()
        else:
            super().on_message_complete()


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
            self.proto.infer[1].refuse(*self.target, None)
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
                or self.declared > self.proto.infer[1].body_limit):
            return False
        received = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        hlen = self._header_length()
        region = self.proto.infer[1].staging(*self.target, self.declared - hlen) if hlen else None
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
        guard = proto.infer[0]
        self.started = True
        self.start_t = time.perf_counter()
        self.ctx, auth = guard.context(self.headers)
        rejection = guard.admit("POST", self.path, auth)
        if rejection is not None:
            return self._reply(*rejection)
        self.admitted = True
        if self._check_size(True, self.declared) or self._check_size(False):
            return
        if self.expect_100 and self.more_body:
            proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not self.more_body:
            self._dispatch()

    def _check_size(self, declared: bool, size: int | None = None) -> bool:
        route = self.proto.infer[1]
        exc = too_large(self.size if size is None else size, route.body_limit, declared)
        if exc is None:
            return False
        # Refused before the body is read: close the connection rather than read it to the end.
        self.too_large, self.keep_alive, self.chunks = True, False, []
        self._reply(*route.refuse(*self.target, exc))
        return True

    def _dispatch(self) -> None:
        self.dispatched = True
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
            reply = await self.proto.infer[1](*self.target, self.headers, body, self.start_t, binary)
        except Exception as exc:  # the route answers its own errors; this is a bug, still answer
            reply = error_reply(KilnError(f"internal error: {type(exc).__name__}: {exc}"))
        except BaseException:  # cancelled: uvicorn's shutdown ran out of patience
            self._reply(*error_reply(Unavailable("server is shutting down")))
            raise
        self._reply(*reply)

    def _reply(self, status: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> None:
        if self.response_complete:
            return
        self.response_complete = True
        proto = self.proto
        guard = proto.infer[0]
        if self.admitted:
            guard.release()
        if not self.disconnected:
            keep_alive = self.keep_alive and (b"connection", b"close") not in headers
            head = [STATUS_LINE[status]]
            for name, value in proto.server_state.default_headers:
                head += (name, b": ", value, b"\r\n")
            for name, value in headers:
                head += (name, b": ", value, b"\r\n")
            head += (b"x-request-id: ", self.ctx[0].encode(), b"\r\ncontent-length: ", str(len(payload)).encode(),
                     b"\r\n" if keep_alive else b"\r\nconnection: close\r\n", b"\r\n")
            if len(payload) < 65536:
                head.append(payload)
                proto.transport.write(b"".join(head))
            else:
                proto.transport.writelines([b"".join(head), payload])
            if not keep_alive:
                proto.transport.close()
        if status >= 400 or self.disconnected or guard_log.isEnabledFor(logging.DEBUG):
            token = REQUEST.set(self.ctx)
            guard.log("POST", self.path, 0 if self.disconnected else status, payload[:512], self.start_t)
            REQUEST.reset(token)
        if not self.disconnected:
            proto.on_response_complete()
