"""gRPC's wire: the HTTP/2 server subset gRPC needs (RFC 9113), on asyncio, as one Protocol per connection.

grpc.aio's server costs more server CPU per call with an empty handler than Kiln's whole HTTP/1.1
infer request (`python -m bench.grpc --floor` measures this transport's floor; docs/throughput.md has
the figures), so Kiln speaks HTTP/2 itself, on the HTTP server's event loop; grpcio stays for the
generated messages and as the client in tests and benches. What it does:

- connection: the client preface, SETTINGS both ways (the peer's INITIAL_WINDOW_SIZE and
  MAX_FRAME_SIZE applied), PING acks, GOAWAY (graceful on shutdown: in-flight calls finish; with
  an error code on protocol errors), PRIORITY ignored, PUSH_PROMISE refused;
- streams: HEADERS + CONTINUATION (padding and priority fields skipped), DATA, RST_STREAM, a bound
  on concurrent streams (REFUSED_STREAM beyond it);
- flow control: sending waits for the peer's connection and stream windows, DATA split at its
  MAX_FRAME_SIZE; receiving advertises large windows and tops them up in batches, not per frame;
- HPACK: decoded with the `hpack` package, behind a per-connection cache of header block bytes →
  headers, kept only for blocks that leave the dynamic table as it was (in steady state a
  client's blocks repeat byte for byte, so decoding is a dict lookup); responses are precomputed
  blocks that never touch the table (static-table indices and literals without indexing);
- gRPC: the 5-byte message prefix (gzip / deflate request messages inflated, any other encoding
  UNIMPLEMENTED), `grpc-timeout` as the call's deadline (the handler is cancelled when it passes),
  a message over the body limit refused as RESOURCE_EXHAUSTED from its prefix (never buffered),
  unknown methods UNIMPLEMENTED, a content-type other than application/grpc HTTP 415,
  trailers-only responses for errors before any message;
- bounds (the HTTP front's settings): the connection bound (the longest-idle connection gives way,
  service/http_front.py IdleConnections), the preface and a header block within
  KILN_HEADER_TIMEOUT_S, a half-received message within KILN_BODY_TIMEOUT_S, no reading while
  the transport's write buffer is over its high-water mark (dropped after KILN_SEND_TIMEOUT_S),
  and frames that ask for work without being a request (pings, settings, resets, empty DATA,
  PRIORITY, unknown types) bounded between two responses: past that, GOAWAY ENHANCE_YOUR_CALM.

Dispatch is by `:path` through a method table built from the services' generated descriptors
(`MethodTable`); a handler gets the request message (or an async iterator of them) and a `Call`,
this module's context: headers (the request's, as the guard reads HTTP's), time_remaining,
set_trailing_metadata, abort, write.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from hpack import Decoder
from hpack.exceptions import HPACKError

from .http_front import IdleConnections
from .settings import HttpLimits

log = logging.getLogger("kiln.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

# Error codes (RFC 9113 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

# SETTINGS identifiers.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

MAX_WINDOW = (1 << 31) - 1
MAX_STREAMS = 256                 # concurrent streams per connection (a client queues the rest itself)
STREAM_WINDOW = 4 << 20           # what a client may send on a stream before we top it up
CONNECTION_WINDOW = 32 << 20      # ... and on the connection
MAX_FRAME_IN = 1 << 20            # the largest frame we accept (the peer sends at most this)
JUNK_BOUND = 1000                 # pings, settings, resets, empty DATA ... between two responses
PARTIAL_MESSAGES = 4              # unfinished messages a connection may buffer, in KILN_MAX_BODY_BYTES

_HEAD = struct.Struct(">IBI")     # (length << 8 | type, flags, stream id): a frame's 9-byte header
_U32 = struct.Struct(">I")
_PREFIX = struct.Struct(">BI")    # a gRPC message: compressed flag, length


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) << 8 | ftype, flags, sid) + payload


# -- HPACK, the response side: blocks that never touch the dynamic table ---------------------------
def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + _hpack_int(16, 7) + b"application/grpc"  # :status 200, content-type
OK_TRAILERS = literal(b"grpc-status", b"0")


MAX_MESSAGE_CHARS = 1024  # of grpc-message: the trailers must fit one frame of the peer's smallest size


def _grpc_message(message: str) -> bytes:
    """grpc-message: UTF-8, percent-encoded outside printable ASCII (and '%' itself)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    out = bytearray()
    for b in message.encode("utf-8"):
        out += b"%%%02X" % b if b < 0x20 or b > 0x7E or b == 0x25 else bytes((b,))
    return bytes(out)


def status_block(code: grpc.StatusCode, message: str, metadata=()) -> bytes:
    block = literal(b"grpc-status", str(code.value[0]).encode())
    if message:
        block += literal(b"grpc-message", _grpc_message(message))
    for k, v in metadata:
        block += literal(k.encode("latin-1") if isinstance(k, str) else k,
                         v.encode("latin-1") if isinstance(v, str) else v)
    return block


def _parse_timeout(value: bytes) -> float | None:
    """grpc-timeout (up to 8 digits and a unit) in seconds; None when malformed."""
    unit = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


class RpcAbort(Exception):
    """Raised by `Call.abort`: the call ends with this status (as grpc.aio's abort does)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# -- the method table --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    path: bytes
    name: str
    request_type: Any
    client_streaming: bool
    server_streaming: bool
    handler: Callable


class MethodTable(dict):
    """`:path` → Method, from the services' generated descriptors and an object with one async
    method per RPC (unary → response; client streaming takes an async iterator; server streaming
    is an async generator, or writes with `call.write`). An RPC the object lacks is UNIMPLEMENTED."""

    def add(self, service_descriptor, servicer) -> None:
        for m in service_descriptor.methods:
            if getattr(servicer, m.name, None) is None:
                continue
            path = f"/{service_descriptor.full_name}/{m.name}".encode()
            self[path] = Method(path, m.name, GetMessageClass(m.input_type), m.client_streaming,
                                m.server_streaming, getattr(servicer, m.name))


# -- a call --------------------------------------------------------------------------------------------
_DONE = object()  # the end of a client's message stream


class Call:
    """One stream: its state on the wire, and the context its handler is given."""

    __slots__ = (
        "conn",
        "count",
        "deadline",
        "drained",
        "encoding",
        "finished",
        "headers",
        "headers_sent",
        "messages",
        "method",
        "pending",
        "rbuf",
        "recv_window",
        "remote_closed",
        "send_window",
        "sid",
        "task",
        "timer",
        "trailers",
        "trailing",
        "waiter",
    )

    def __init__(self, conn: GrpcConnection, sid: int, headers, send_window: int):
        self.conn = conn
        self.sid = sid
        self.method: Method | None = None
        self.headers = headers
        self.deadline: float | None = None
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.remote_closed = self.headers_sent = self.finished = False
        self.rbuf: bytearray | None = None   # a message arriving in pieces
        self.task: asyncio.Task | None = None
        self.trailing = ()
        self.pending: bytearray | None = None  # DATA waiting for window
        self.trailers: bytes | None = None     # trailers to send once `pending` is out
        self.drained: asyncio.Future | None = None
        self.messages: collections.deque | None = None  # client streaming: messages not yet read
        self.waiter: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.encoding: bytes | None = None
        self.count = 0                       # messages received

    # -- the handler's context (what Kiln's servicers used of grpc.aio's ServicerContext) ---------
    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - self.conn.loop.time())

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise RpcAbort(code, details)

    async def write(self, message) -> None:
        """Send one response message; waits while the peer's window or the socket is full."""
        if self.finished:
            raise asyncio.CancelledError("the call is over")
        self.conn.send_message(self, message.SerializeToString())
        if self.pending or self.conn.write_paused:
            await self.conn.drained(self)

    # -- client streaming ------------------------------------------------------------------------
    def __aiter__(self):
        return self

    async def __anext__(self):
        while not self.messages:
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item = self.messages.popleft()
        if item is _DONE:
            self.messages.append(_DONE)
            raise StopAsyncIteration
        return item

    def _push(self, item) -> None:
        self.messages.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


# -- the connection ------------------------------------------------------------------------------------
class Server:
    """What every connection of one listening socket shares, and the socket itself."""

    def __init__(self, methods: MethodTable, limits: HttpLimits, max_message_bytes: int):
        self.methods = methods
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.connections = IdleConnections(limits.connection_bound())
        self.open: set[GrpcConnection] = set()
        self.closing = False
        self.listener: asyncio.AbstractServer | None = None

    async def listen(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        self.listener = await loop.create_server(lambda: GrpcConnection(self), host, port, ssl=ssl_context,
                                                 reuse_port=True, backlog=2048)

    async def stop(self, grace_s: float) -> None:
        """GOAWAY on every connection (the calls it names finish, new streams are refused), then close."""
        self.closing = True
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.open):
            conn.goaway(NO_ERROR, b"server shutting down", graceful=True)
        deadline = time.monotonic() + grace_s
        while self.open and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.open):
            conn.abort()


class GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection: frames in, calls dispatched, frames out (the module docstring)."""

    def __init__(self, server: Server):
        self.server = server
        self.methods = server.methods
        self.limits = server.limits
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface = False                 # the client preface and its first SETTINGS are in
        self.calls: dict[int, Call] = {}
        self.last_sid = 0
        self.goaway_sent = False
        self.max_frame_out = 16384           # the peer's SETTINGS
        self.peer_window = 65535             # initial stream window the peer grants
        self.send_window = 65535             # connection window the peer grants
        self.recv_window = CONNECTION_WINDOW
        self.blocked: dict[int, Call] = {}   # calls with DATA waiting for window
        self.decoder = Decoder(max_header_list_size=self.limits.max_header_bytes)
        self.hcache: dict[bytes, list] = {}
        self.block_sid = 0                   # a header block waiting for CONTINUATION
        self.block = bytearray()
        self.block_flags = 0
        self.block_since = 0.0
        self.junk = 0
        self.write_paused = False
        self.waiting: list[asyncio.Future] = []  # writers waiting for the socket to drain
        self.partial = 0                     # bytes of messages received in pieces, not yet whole
        self.opened = 0.0
        self.last_read = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.send_timer: asyncio.TimerHandle | None = None
        self.lost = False

    # -- connection lifecycle --------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        server = self.server
        server.open.add(self)
        if server.closing or not server.connections.make_room(len(server.open), self):
            transport.close()
            if not server.closing:
                log.warning("gRPC: connection refused: at the bound of %d open connections, none idle "
                            "(KILN_MAX_CONNECTIONS)", server.connections.bound)
            return
        server.connections.idle(self)
        transport.write(frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in (
            (S_MAX_CONCURRENT_STREAMS, MAX_STREAMS), (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (S_MAX_FRAME_SIZE, MAX_FRAME_IN), (S_MAX_HEADER_LIST_SIZE, self.limits.max_header_bytes),
            (S_ENABLE_PUSH, 0)))) + frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - 65535)))
        self.opened = self.last_read = self.loop.time()
        self.timer = self.loop.call_later(self.limits.header_timeout_s, self._on_timer)

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.server.open.discard(self)
        self.server.connections.lost(self)
        for t in (self.timer, self.send_timer):
            if t is not None:
                t.cancel()
        for call in list(self.calls.values()):
            self._drop(call)
        self.calls.clear()
        self.blocked.clear()
        for f in self.waiting:
            if not f.done():
                f.cancel()
        self.waiting.clear()

    def evict(self) -> None:
        """Closed to make room for a new connection (IdleConnections): no call is open on it."""
        self.goaway(NO_ERROR, b"connection bound reached (KILN_MAX_CONNECTIONS)")

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def goaway(self, code: int, debug: bytes = b"", graceful: bool = False) -> None:
        """GOAWAY naming the last stream this server will answer; graceful: close once those are done."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if not self.goaway_sent:
            self.goaway_sent = True
            t.write(frame(GOAWAY, 0, 0, _U32.pack(self.last_sid) + _U32.pack(code) + debug[:256]))
        if not graceful:
            t.close()
            for call in list(self.calls.values()):
                self._drop(call)
        elif not self.calls:
            t.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.transport.pause_reading()
        if self.send_timer is None:
            self.send_timer = self.loop.call_later(self.limits.send_timeout_s, self._on_send_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        if not self.transport.is_closing():
            self.transport.resume_reading()
        waiting, self.waiting = self.waiting, []
        for f in waiting:
            if not f.done():
                f.set_result(None)

    def _on_send_timeout(self) -> None:
        self.send_timer = None
        log.warning("gRPC: client read nothing of its responses for %.3g s (KILN_SEND_TIMEOUT_S): connection "
                    "dropped", self.limits.send_timeout_s)
        self.transport.abort()

    def _on_timer(self) -> None:
        """One lazy timer: the preface, a header block and half-received messages must keep coming."""
        self.timer = None
        if self.lost or self.transport.is_closing():
            return
        now = self.loop.time()
        limits = self.limits
        if not self.preface:
            left = self.opened + limits.header_timeout_s - now
            why = f"no HTTP/2 preface after {limits.header_timeout_s:.3g} s (KILN_HEADER_TIMEOUT_S)"
        elif self.block_sid:
            left = self.block_since + limits.header_timeout_s - now
            why = f"header block not complete after {limits.header_timeout_s:.3g} s (KILN_HEADER_TIMEOUT_S)"
        elif not self.write_paused and self._owed():
            left = self.last_read + limits.body_timeout_s - now
            why = f"request message: nothing received for {limits.body_timeout_s:.3g} s (KILN_BODY_TIMEOUT_S)"
        else:  # nothing owed by the client, or the server is the slow side: the clock restarts
            self.last_read = now
            left = min(limits.header_timeout_s, limits.body_timeout_s)
            why = ""
        if left > 0 or not why:
            self.timer = self.loop.call_later(max(left, 0.05), self._on_timer)
            return
        log.warning("gRPC: %s: connection closed", why)
        if self.preface:
            self.goaway(PROTOCOL_ERROR if self.block_sid else CANCEL, why.encode())
        else:
            self.transport.close()

    def _owed(self) -> bool:
        """Whether the client owes a call request bytes: the rest of a message, or the one message
        of a unary or server-streaming call. (A bidi stream may rest between messages; a stream
        whose answers wait for the client's window is held back by the server.)"""
        for c in self.calls.values():
            if c.finished or c.pending:
                continue
            if c.rbuf is not None or (c.task is None and c.method is not None and not c.method.client_streaming):
                return True
        return False

    # -- reading -----------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused, or closed after GOAWAY: what was still in flight is not read
        self.last_read = self.loop.time()
        buf = self.buf
        if buf:
            buf += data
            data = buf
        try:
            pos = 0
            if not self.preface:
                if len(data) < 24 + 9:
                    if PREFACE[:len(data)] != bytes(data[:24]):
                        raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    if data is not buf:
                        buf += data
                    return
                if bytes(data[:24]) != PREFACE:
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                if data[27] != SETTINGS:
                    raise _ConnectionError(PROTOCOL_ERROR, "the preface must be followed by SETTINGS")
                self.preface = True
                pos = 24
            pos = self._frames(data, pos)
        except _ConnectionError as err:
            log.warning("gRPC: %s: connection closed (GOAWAY %#x)", err.message, err.code)
            self.buf = bytearray()
            if self.preface:
                self.goaway(err.code, err.message.encode())
            else:
                self.transport.close()
            return
        if data is buf:
            del buf[:pos]
        elif pos < len(data):
            self.buf = bytearray(data[pos:])

    def _frames(self, data, pos: int) -> int:
        n = len(data)
        unpack = _HEAD.unpack_from
        while n - pos >= 9:
            lt, flags, sid = unpack(data, pos)
            length = lt >> 8
            if length > MAX_FRAME_IN:
                raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes (at most {MAX_FRAME_IN})")
            end = pos + 9 + length
            if end > n:
                break
            ftype = lt & 0xFF
            sid &= MAX_WINDOW
            payload = data[pos + 9:end]
            pos = end
            if self.block_sid and ftype != CONTINUATION:
                raise _ConnectionError(PROTOCOL_ERROR, "a header block was interrupted by another frame")
            if ftype == DATA:
                self._on_data(flags, sid, payload)
            elif ftype == HEADERS:
                self._on_headers(flags, sid, payload)
            elif ftype == WINDOW_UPDATE:
                self._on_window_update(sid, payload)
            elif ftype == PING:
                self._on_ping(flags, sid, payload)
            elif ftype == SETTINGS:
                self._on_settings(flags, sid, payload)
            elif ftype == RST_STREAM:
                self._on_rst(sid, payload)
            elif ftype == CONTINUATION:
                self._on_continuation(flags, sid, payload)
            elif ftype == GOAWAY:
                self._on_goaway(sid, payload)
            elif ftype == PRIORITY:
                if sid == 0:
                    raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
                self._junk()
            elif ftype == PUSH_PROMISE:
                raise _ConnectionError(PROTOCOL_ERROR, "a client must not send PUSH_PROMISE")
            else:
                self._junk()  # unknown frame types are ignored (RFC 9113 4.1), but counted
        return pos

    def _junk(self) -> None:
        self.junk += 1
        if self.junk > JUNK_BOUND:
            raise _ConnectionError(ENHANCE_YOUR_CALM, f"more than {JUNK_BOUND} control frames without a request")

    # -- control frames --------------------------------------------------------------------------
    def _on_settings(self, flags: int, sid: int, payload) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6 bytes")
        self._junk()
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE over 2^31-1")
                delta = value - self.peer_window
                self.peer_window = value
                for call in self.calls.values():
                    call.send_window += delta
                    if call.send_window > MAX_WINDOW:
                        raise _ConnectionError(FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
            elif key == S_MAX_FRAME_SIZE:
                if not 16384 <= value <= (1 << 24) - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value} out of range")
                self.max_frame_out = value
            elif key == S_ENABLE_PUSH and value > 1:
                raise _ConnectionError(PROTOCOL_ERROR, "ENABLE_PUSH other than 0 or 1")
            # HEADER_TABLE_SIZE: the response blocks never use the dynamic table; the rest is advisory.
        self.transport.write(frame(SETTINGS, ACK, 0))
        if self.blocked:
            self._flush_blocked()

    def _on_ping(self, flags: int, sid: int, payload) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnectionError(FRAME_SIZE_ERROR, "PING payload not 8 bytes")
        if not flags & ACK:
            self._junk()
            self.transport.write(frame(PING, ACK, 0, bytes(payload)))

    def _on_goaway(self, sid: int, payload) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
        # The client will open no more streams; those open finish, then it closes.

    def _on_window_update(self, sid: int, payload) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload not 4 bytes")
        inc = _U32.unpack(payload)[0] & MAX_WINDOW
        if sid == 0:
            if inc == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            if self.blocked:
                self._flush_blocked()
            return
        call = self.calls.get(sid)
        if call is None:
            if sid > self.last_sid:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if inc == 0:
            return self._reset(call, PROTOCOL_ERROR)
        call.send_window += inc
        if call.send_window > MAX_WINDOW:
            return self._reset(call, FLOW_CONTROL_ERROR)
        if call.pending:
            self._flush(call)

    def _on_rst(self, sid: int, payload) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM payload not 4 bytes")
        if sid == 0 or sid > self.last_sid:
            raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0 or an idle stream")
        call = self.calls.pop(sid, None)
        if call is not None:
            self._junk()
            self._drop(call)
            self._closed_call()

    # -- headers ---------------------------------------------------------------------------------
    def _on_headers(self, flags: int, sid: int, payload) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & PADDED:
            if not payload:
                raise _ConnectionError(PROTOCOL_ERROR, "padded HEADERS without a pad length")
            start, end = 1, end - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
        if start > end:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS padding longer than the frame")
        fragment = payload[start:end] if start or end != len(payload) else payload
        if flags & END_HEADERS:
            return self._header_block(sid, flags, fragment)
        self.block_sid, self.block_flags, self.block_since = sid, flags, self.loop.time()
        self.block = bytearray(fragment)
        self._check_block_size(len(self.block))

    def _on_continuation(self, flags: int, sid: int, payload) -> None:
        if not self.block_sid or sid != self.block_sid:
            raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without a header block to continue")
        self.block += payload
        self._check_block_size(len(self.block))
        if flags & END_HEADERS:
            block, self.block, self.block_sid = bytes(self.block), bytearray(), 0
            self._header_block(sid, self.block_flags, block)

    def _check_block_size(self, size: int) -> None:
        if size > self.limits.max_header_bytes:
            raise _ConnectionError(ENHANCE_YOUR_CALM, f"header block over {self.limits.max_header_bytes} bytes "
                                                      f"(KILN_MAX_HEADER_BYTES)")

    def _decode(self, block) -> list:
        if type(block) is not bytes:
            block = bytes(block)
        headers = self.hcache.get(block)
        if headers is not None:
            return headers
        self._check_block_size(len(block))
        table = self.decoder.header_table
        entries = table.dynamic_entries
        first = entries[0] if entries else None
        size, maxsize = len(entries), table.maxsize
        try:
            headers = self.decoder.decode(block, raw=True)
        except (HPACKError, IndexError, ValueError) as err:  # the latter two on some truncated blocks
            raise _ConnectionError(COMPRESSION_ERROR, f"header block: {type(err).__name__}: {err}") from None
        if len(entries) == size and table.maxsize == maxsize and (entries[0] if entries else None) is first:
            if len(self.hcache) >= 64:
                self.hcache.clear()
            self.hcache[block] = headers
        elif self.hcache:
            self.hcache.clear()  # cached blocks may refer to entries that moved
        return headers

    def _header_block(self, sid: int, flags: int, block) -> None:
        headers = self._decode(block)  # always, so the decoder's table stays in step with the client's
        call = self.calls.get(sid)
        if call is not None:  # trailers from the client: gRPC sends none, but they end the stream
            if not flags & END_STREAM:
                return self._reset(call, PROTOCOL_ERROR)
            return self._end_of_input(call)
        if sid <= self.last_sid or not sid & 1:
            raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on stream {sid}: closed, or not a client stream id")
        self.last_sid = sid
        if self.goaway_sent:
            return  # after GOAWAY: the client knows this stream was not processed
        if len(self.calls) >= MAX_STREAMS:
            self.transport.write(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        call = Call(self, sid, headers, self.peer_window)
        if not self.calls:
            self.server.connections.busy(self)
        self.calls[sid] = call
        path = ctype = timeout = None
        method_ok = False
        for k, v in headers:
            if k == b":path":
                path = v
            elif k == b"content-type":
                ctype = v
            elif k == b":method":
                method_ok = v == b"POST"
            elif k == b"grpc-timeout":
                timeout = v
            elif k == b"grpc-encoding":
                call.encoding = v
        if not method_ok or path is None:
            return self._respond_http(call, 405 if path is not None else 400)
        if ctype is None or not (ctype == b"application/grpc" or ctype.startswith((b"application/grpc+",
                                                                                   b"application/grpc;"))):
            return self._respond_http(call, 415)
        if timeout is not None:
            seconds = _parse_timeout(timeout)
            if seconds is None:
                return self.finish(call, grpc.StatusCode.INTERNAL, f"malformed grpc-timeout {timeout!r}")
            call.deadline = self.loop.time() + seconds
            call.timer = self.loop.call_at(call.deadline, self._deadline, call)
        method = self.methods.get(path)
        if method is None:
            return self.finish(call, grpc.StatusCode.UNIMPLEMENTED,
                               f"unknown method {path.decode('latin-1', 'replace')[:200]}")
        if call.encoding is not None and call.encoding not in (b"identity", b"gzip", b"deflate"):
            return self.finish(call, grpc.StatusCode.UNIMPLEMENTED,
                               f"grpc-encoding {call.encoding.decode('latin-1', 'replace')[:50]!r} is not supported "
                               "(identity, gzip, deflate)")
        call.method = method
        if method.client_streaming:
            call.messages = collections.deque()
            call.task = self.loop.create_task(self._run(call, method, self._stream_in, call, method))
        if flags & END_STREAM:
            self._end_of_input(call)

    def _respond_http(self, call: Call, status: int) -> None:
        """A non-gRPC answer: a plain HTTP status (415 for a content-type that is not gRPC's)."""
        code = {400: b"\x8c"}.get(status) or b"\x08\x03" + str(status).encode()  # :status, never indexed
        self.transport.write(frame(HEADERS, END_HEADERS | END_STREAM, call.sid, code))
        call.headers_sent = call.finished = True
        self._close_call(call)

    # -- data --------------------------------------------------------------------------------------
    def _on_data(self, flags: int, sid: int, payload) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        self.recv_window -= length
        if self.recv_window < 0:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        if self.recv_window < CONNECTION_WINDOW // 2:
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - self.recv_window)))
            self.recv_window = CONNECTION_WINDOW
        call = self.calls.get(sid)
        if call is None or call.remote_closed:
            if sid > self.last_sid:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            if call is not None:
                self._reset(call, STREAM_CLOSED)
            return  # a stream already answered or reset: its late DATA is dropped
        call.recv_window -= length
        if call.recv_window < 0:
            return self._reset(call, FLOW_CONTROL_ERROR)
        if flags & PADDED:
            if not length or payload[0] >= length:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA padding longer than the frame")
            payload = payload[1:length - payload[0]]
        if not payload and not flags & END_STREAM:
            self._junk()
        if call.finished or not payload:
            pass
        elif call.rbuf is None:
            self._messages(call, payload)  # the common case: whole messages in one frame
        else:
            call.rbuf += payload
            self.partial += len(payload)
            if self.partial > PARTIAL_MESSAGES * self.server.max_message_bytes:
                # Many streams each sending part of a large message: memory, not progress.
                return self.finish(call, grpc.StatusCode.RESOURCE_EXHAUSTED, (
                    f"the connection holds {self.partial} bytes of unfinished messages (at most {PARTIAL_MESSAGES} "
                    "x KILN_MAX_BODY_BYTES)"))
            used = self._messages(call, call.rbuf)
            buf = call.rbuf
            if buf is not None:
                if used:
                    del buf[:used]
                    self.partial -= used
                if not buf:
                    call.rbuf = None
        if flags & END_STREAM:
            self._end_of_input(call)
        elif not call.pending:  # a stream whose answers wait for the client's window gets no more input
            self._top_up(call)

    def _top_up(self, call: Call) -> None:
        """The stream's receive window back to full once half is used (one WINDOW_UPDATE per half)."""
        if not call.finished and not call.remote_closed and call.recv_window < STREAM_WINDOW // 2:
            self.transport.write(frame(WINDOW_UPDATE, 0, call.sid, _U32.pack(STREAM_WINDOW - call.recv_window)))
            call.recv_window = STREAM_WINDOW

    def _messages(self, call: Call, data) -> int:
        """Hand over the whole messages in `data`; returns the bytes used when `data` is
        call.rbuf, else keeps the tail of a message that goes on in call.rbuf."""
        n, pos = len(data), 0
        in_buf = data is call.rbuf
        limit = self.server.max_message_bytes
        while n - pos >= 5:
            compressed, size = _PREFIX.unpack_from(data, pos)
            if size > limit:
                self.finish(call, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"received message larger than max ({size} vs. {limit}: KILN_MAX_BODY_BYTES)")
                return 0
            if n - pos - 5 < size:
                break
            body = data[pos + 5:pos + 5 + size]
            pos += 5 + size
            if compressed:
                if call.encoding in (None, b"identity"):
                    self.finish(call, grpc.StatusCode.INTERNAL, "compressed message without a grpc-encoding")
                    return 0
                try:
                    body = _inflate(bytes(body), call.encoding, limit)
                except ValueError as err:
                    self.finish(call, grpc.StatusCode.RESOURCE_EXHAUSTED if "larger" in str(err)
                                else grpc.StatusCode.INTERNAL, str(err))
                    return 0
            self._message(call, body)
            if call.finished:
                return 0
        if in_buf:
            return pos
        if pos < n:  # the start of a message that goes on in the next frames
            call.rbuf = bytearray(data[pos:])
            self.partial += n - pos
        return pos

    def _message(self, call: Call, body) -> None:
        method = call.method
        try:
            request = method.request_type.FromString(bytes(body) if type(body) is not bytes else body)
        except DecodeError:
            return self.finish(call, grpc.StatusCode.INTERNAL, f"cannot parse the {method.request_type.__name__} "
                                                               "message")
        call.count += 1
        if method.client_streaming:
            call._push(request)
        elif call.count > 1:
            self.finish(call, grpc.StatusCode.UNIMPLEMENTED, f"{method.name} takes one request message, got more")
        elif method.server_streaming:
            call.task = self.loop.create_task(self._run(call, method, self._stream_out, call, method, request))
        else:
            call.task = self.loop.create_task(self._run(call, method, method.handler, request, call))

    def _end_of_input(self, call: Call) -> None:
        call.remote_closed = True
        if call.rbuf is not None:
            self._discard(call)
            if not call.finished:
                return self.finish(call, grpc.StatusCode.INTERNAL, "the stream ended inside a message")
        if call.finished:
            return self._close_call(call)
        method = call.method
        if method is None:
            return
        if method.client_streaming:
            call._push(_DONE)
        elif call.count == 0:
            self.finish(call, grpc.StatusCode.INTERNAL, f"{method.name}: the stream ended without a request message")

    # -- running handlers --------------------------------------------------------------------------
    async def _run(self, call: Call, method: Method, handler: Callable, *args) -> None:
        """Run a handler to the call's status: a message it returns is the unary reply (else OK once
        it has written its own), an abort its status, a cancel or a bug their statuses."""
        try:
            reply = await handler(*args)
        except RpcAbort as err:
            return self.finish(call, err.code, err.message, call.trailing)
        except asyncio.CancelledError:
            return self._cancelled(call)
        except Exception as exc:  # a handler bug still answers
            log.exception("gRPC %s failed", method.name)
            return self.finish(call, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        if reply is not None:
            self.reply(call, reply.SerializeToString())
        else:
            self.finish(call, grpc.StatusCode.OK, "", call.trailing)

    @staticmethod
    async def _stream_out(call: Call, method: Method, request) -> None:
        """Server streaming: each message the handler yields, written as the windows allow."""
        async for reply in method.handler(request, call):
            await call.write(reply)

    @staticmethod
    async def _stream_in(call: Call, method: Method) -> None:
        """Client (and bidi) streaming: the handler reads the call; a message it returns is written last."""
        result = await method.handler(call, call)
        if result is not None:
            await call.write(result)

    def _cancelled(self, call: Call) -> None:
        """The handler was cancelled: the deadline passed (answered in `_deadline`), the client
        reset the stream, the connection went, or the server stops."""
        if not call.finished and not self.lost:
            self.finish(call, grpc.StatusCode.CANCELLED, "the call was cancelled")

    def _deadline(self, call: Call) -> None:
        call.timer = None
        if call.finished:
            return
        self.finish(call, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if call.task is not None:
            call.task.cancel()

    # -- writing -----------------------------------------------------------------------------------
    def reply(self, call: Call, message: bytes) -> None:
        """A unary response: headers, the message and the OK trailers, in one write when the windows allow."""
        if call.finished:
            return
        sid = call.sid
        size = len(message) + 5
        trailers = OK_TRAILERS if not call.trailing else status_block(grpc.StatusCode.OK, "", call.trailing)
        if (size <= self.send_window and size <= call.send_window and size <= self.max_frame_out
                and not call.headers_sent):
            self.send_window -= size
            call.send_window -= size
            self.transport.write(b"".join((
                _HEAD.pack(len(RESPONSE_HEADERS) << 8 | HEADERS, END_HEADERS, sid), RESPONSE_HEADERS,
                _HEAD.pack(size << 8 | DATA, 0, sid), _PREFIX.pack(0, len(message)), message,
                _HEAD.pack(len(trailers) << 8 | HEADERS, END_HEADERS | END_STREAM, sid), trailers)))
            call.headers_sent = call.finished = True
            self.junk = 0
            return self._close_call(call)
        call.finished = False
        self.send_message(call, message)
        call.finished = True
        if call.pending:
            call.trailers = trailers
        else:
            self.transport.write(frame(HEADERS, END_HEADERS | END_STREAM, sid, trailers))
            self._close_call(call)

    def send_message(self, call: Call, message: bytes) -> None:
        if not call.headers_sent:
            call.headers_sent = True
            self.transport.write(frame(HEADERS, END_HEADERS, call.sid, RESPONSE_HEADERS))
        self.junk = 0
        data = _PREFIX.pack(0, len(message)) + message
        if call.pending:
            call.pending += data
        else:
            call.pending = bytearray(data)
        self._flush(call)

    def _flush(self, call: Call) -> None:
        """Send what the windows allow of call.pending, then its trailers once all of it is out."""
        pending = call.pending
        out = []
        limit = self.max_frame_out
        while pending and self.send_window > 0 and call.send_window > 0:
            n = min(len(pending), self.send_window, call.send_window, limit)
            out.append(_HEAD.pack(n << 8 | DATA, 0, call.sid))
            out.append(bytes(pending[:n]))
            del pending[:n]
            self.send_window -= n
            call.send_window -= n
        done = False
        if pending:
            self.blocked[call.sid] = call
        else:
            self.blocked.pop(call.sid, None)
            call.pending = None
            if call.trailers is not None:
                out.append(frame(HEADERS, END_HEADERS | END_STREAM, call.sid, call.trailers))
                call.trailers = None
                done = True
        if out:
            self.transport.writelines(out)
        if not pending:
            if call.drained is not None and not call.drained.done():
                call.drained.set_result(None)
            if done:
                self._close_call(call)
            else:
                self._top_up(call)  # held back while the answers waited

    def _flush_blocked(self) -> None:
        for call in list(self.blocked.values()):
            if self.send_window <= 0:
                break
            self._flush(call)

    async def drained(self, call: Call) -> None:
        """Wait until the call's DATA is out and the socket takes more."""
        while (call.pending or self.write_paused) and not call.finished and not self.lost:
            fut = self.loop.create_future()
            if call.pending:
                call.drained = fut
            else:
                self.waiting.append(fut)
            await fut
        if self.lost or call.finished:
            raise asyncio.CancelledError("the call is over")

    def finish(self, call: Call, code: grpc.StatusCode, message: str, metadata=()) -> None:
        """End the call with a status: trailers-only when nothing was sent yet, else trailers after
        the DATA still waiting for window."""
        if call.finished or self.transport.is_closing():
            call.finished = True
            return
        call.finished = True
        self.junk = 0
        block = status_block(code, message, metadata)
        if not call.headers_sent:
            call.headers_sent = True
            self.transport.write(frame(HEADERS, END_HEADERS | END_STREAM, call.sid, RESPONSE_HEADERS + block))
        elif call.pending:
            call.trailers = block
            return
        else:
            self.transport.write(frame(HEADERS, END_HEADERS | END_STREAM, call.sid, block))
        self._close_call(call)

    def _discard(self, call: Call) -> None:
        if call.rbuf is not None:
            self.partial -= len(call.rbuf)
            call.rbuf = None

    def _close_call(self, call: Call) -> None:
        """Our side is done: forget the call, resetting its stream if the client is still sending."""
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if self.calls.get(call.sid) is not call:
            return
        if not call.remote_closed:
            # RFC 9113 8.1: the response is complete; the client need not send the rest of its request.
            self.transport.write(frame(RST_STREAM, 0, call.sid, _U32.pack(NO_ERROR)))
            self._discard(call)
        if call.task is not None and not call.task.done() and call.task is not asyncio.current_task():
            call.task.cancel()  # a stream handler still reading requests that can no longer come
        del self.calls[call.sid]
        self._closed_call()

    def _closed_call(self) -> None:
        if not self.calls:
            if self.goaway_sent:
                self.transport.close()
            elif not self.lost:
                self.server.connections.idle(self)

    def _reset(self, call: Call, code: int) -> None:
        if self.calls.pop(call.sid, None) is None:
            return
        self.transport.write(frame(RST_STREAM, 0, call.sid, _U32.pack(code)))
        self._drop(call)
        self._closed_call()

    def _drop(self, call: Call) -> None:
        """The stream is gone (reset, the connection lost): stop its handler, free what it holds."""
        call.finished = True
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        self._discard(call)
        call.pending = None
        self.blocked.pop(call.sid, None)
        if call.drained is not None and not call.drained.done():
            call.drained.cancel()
        if call.task is not None and not call.task.done():
            call.task.cancel()


def _inflate(body: bytes, encoding: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(31 if encoding == b"gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as err:
        raise ValueError(f"cannot inflate the {encoding.decode()} message: {err}") from None
    if len(out) > limit:
        raise ValueError(f"inflated message larger than max ({limit} bytes: KILN_MAX_BODY_BYTES)")
    return out


def server_ssl_context(certfile, keyfile) -> ssl.SSLContext:
    """TLS for gRPC from Kiln's certificate files, ALPN `h2` (grpc clients require it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(certfile), str(keyfile))
    ctx.set_alpn_protocols(["h2"])
    return ctx
