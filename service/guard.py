"""The outermost ASGI layer: request id and trace context, auth, drain, the in-flight bound, logs.

It wraps the whole app, and Kiln's HTTP protocol (service/http_protocol.py) calls the same steps
(`context`, `check`, `acquire`, `release`, `log`) for the infer requests it answers without ASGI, so every HTTP
request passes here exactly once:

1. request context: X-Request-ID (or a fresh id) and W3C `traceparent` into service.logs.REQUEST,
   echoed back as the `x-request-id` response header;
2. drain: after SIGTERM (service/lifecycle.py) `/v2/health/ready` answers 503 and every other new
   request except liveness gets 503 `{"error"}` with `Connection: close`; requests already inside
   finish normally;
3. the server-wide in-flight bound (KILN_MAX_INFLIGHT) → 503 + Retry-After; the infer fast path
   takes its slot only once the request's body is in (`acquire`), after drain and auth (`check`);
4. bearer-token auth (service/auth.py) → 401 / 403; two Authorization headers → 400;
5. HEAD on a GET route is served as that GET without its body;
6. one log line per request at DEBUG, one per error response (status ≥ 400) at WARNING, with the
   error message, status, duration and request id; the path percent-encoded again, so that it
   cannot break the line.
"""

from __future__ import annotations

import logging
import time

import orjson

from .auth import AuthError, TokenAuth
from .errors import error_reply
from .logs import REQUEST, parse_traceparent, quote_path, request_id, safe

log = logging.getLogger("kiln.http")

DUPLICATE = "\0duplicate"  # Guard.context's Authorization value when the header came twice


class Drain:
    """Shared shutdown state: set by the signal handler, read by the middleware and the server loop."""

    def __init__(self) -> None:
        self.draining = False
        self.since = 0.0
        self.inflight = 0

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self.since = time.monotonic()


# One per process (uvicorn workers are separate processes): the signal handler and the middleware
# of a process share it.
DRAIN = Drain()


def wrap(app, settings) -> Guard:
    """The app behind the guard configured from settings (auth from KILN_AUTH_TOKENS_FILE)."""
    auth = TokenAuth(settings.auth_tokens_file, settings.auth_open) if settings.auth_tokens_file else None
    return Guard(app, DRAIN, auth, settings.max_inflight)


class Guard:
    def __init__(self, app, drain: Drain | None = None, auth: TokenAuth | None = None, max_inflight: int = 0):
        self.app = app
        self.drain = drain if drain is not None else DRAIN
        self.auth = auth
        self.max_inflight = max_inflight

    def __getattr__(self, name):  # app.state, app.openapi(), ... stay reachable through the wrapper
        if name == "app":
            raise AttributeError(name)
        return getattr(self.app, name)

    # -- the steps, shared by the ASGI wrapper below and the infer fast path (service/http_protocol.py)
    def context(self, headers) -> tuple[tuple[str, str | None, str | None], str | None]:
        """((request id, trace id, parent span id), Authorization header) from the request headers.
        Two Authorization headers give DUPLICATE: which one counts is ambiguous, so `check` refuses it."""
        rid_header = tp_header = auth_header = None
        for k, v in headers:
            if k == b"x-request-id":
                rid_header = v.decode("latin-1")
            elif k == b"traceparent":
                tp_header = v.decode("latin-1")
            elif k == b"authorization":
                auth_header = DUPLICATE if auth_header is not None else v.decode("latin-1")
        return (request_id(rid_header), *parse_traceparent(tp_header)), auth_header

    def check(self, method: str, path: str, auth_header: str | None):
        """Drain and auth: None when the request may go on, else the rejection (status, headers,
        body) to send. Asked as soon as the headers are in, before any body is read."""
        drain = self.drain
        if drain.draining and path != "/v2/health/live":
            return error_reply(503, "server is shutting down" if path != "/v2/health/ready"
                               else "server is not ready: shutting down", [(b"connection", b"close")])
        if auth_header is DUPLICATE:
            return error_reply(400, "more than one Authorization header")
        if self.auth is not None:
            try:
                self.auth.check(method, path, auth_header)
            except AuthError as err:
                extra = [(b"www-authenticate", b'Bearer realm="kiln"')] if err.status == 401 else []
                return error_reply(err.status, err.message, extra)
        return None

    def acquire(self, path: str):
        """The in-flight bound: None when the request is admitted (then counted in flight: call
        `release`), else the 503 to send. The infer fast path asks only once the body is read, so
        clients that send half a body hold a connection, never a slot."""
        drain = self.drain
        if self.max_inflight and drain.inflight >= self.max_inflight and not path.startswith("/v2/health/"):
            return error_reply(503, f"server is overloaded: {drain.inflight} requests in flight "
                               f"(KILN_MAX_INFLIGHT {self.max_inflight})", [(b"retry-after", b"1")])
        drain.inflight += 1
        return None

    def admit(self, method: str, path: str, auth_header: str | None):
        """`check` then `acquire`, for requests whose body the app reads itself (ASGI)."""
        return self.check(method, path, auth_header) or self.acquire(path)

    def release(self) -> None:
        self.drain.inflight -= 1

    def log(self, method: str, path: str, status: int, error: bytes, start: float) -> None:
        """The request's log line: WARNING with the `{"error"}` message for status >= 400 (or no
        response at all), DEBUG otherwise; health probes only at DEBUG."""
        if (status >= 400 or status == 0) and not path.startswith("/v2/health/"):
            if status == 0:
                message = "no response (client disconnected or the app failed)"
            else:
                try:
                    message = orjson.loads(error).get("error", "")
                except (orjson.JSONDecodeError, AttributeError):
                    message = error[:200].decode("utf-8", "replace")
            log.warning("%s %s -> %d: %s", method, quote_path(path), status, safe(message),
                        extra={"status": status, "duration_ms": round((time.perf_counter() - start) * 1000, 3)})
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> %d", method, quote_path(path), status,
                      extra={"status": status, "duration_ms": round((time.perf_counter() - start) * 1000, 3)})

    # -- ASGI ------------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        ctx, auth_header = self.context(scope["headers"])
        token = REQUEST.set(ctx)
        rid_bytes = ctx[0].encode()
        path, method = scope["path"], scope["method"]
        head = method == "HEAD"
        if head:
            # Answered as GET (RFC 9110 9.3.2: same headers, no content); the server drops the body.
            scope, method = {**scope, "method": "GET"}, "GET"
        state = {"status": 0, "error": b""}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid_bytes)]
            elif message["type"] == "http.response.body":
                if state["status"] >= 400 and len(state["error"]) < 512:
                    state["error"] += message.get("body", b"")[:512]
                if head:
                    message = {**message, "body": b""}
            await send(message)

        admitted = False
        try:
            rejection = self.admit(method, path, auth_header)
            if rejection is not None:
                status, headers, body = rejection
                headers = [*headers, (b"content-length", str(len(body)).encode())]
                await send_wrapper({"type": "http.response.start", "status": status, "headers": headers})
                await send_wrapper({"type": "http.response.body", "body": body})
                return
            admitted = True
            await self.app(scope, receive, send_wrapper)
        finally:
            if admitted:
                self.release()
            self.log(method, path, state["status"], state["error"], start)
            REQUEST.reset(token)
