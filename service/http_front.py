"""The server-wide parts of Kiln's HTTP/1.1 front (service/http_protocol.py is one connection):

- `HttpLimits`: the size and time bounds every connection is held to (KILN_MAX_HEADER_BYTES,
  KILN_MAX_URL_BYTES, KILN_HEADER_TIMEOUT_S, KILN_BODY_TIMEOUT_S, KILN_KEEP_ALIVE_TIMEOUT_S,
  KILN_SEND_TIMEOUT_S, KILN_MAX_CONNECTIONS), a plain value that travels to worker processes;
- `InferFastPath`: whether `POST …/infer` is answered straight from the parser, and through which
  guard and route — decided once per process, and logged either way;
- `IdleConnections`: the open connections with no request on them, oldest first, so that at the
  connection bound a newcomer closes the longest-idle one instead of the process running out of
  file descriptors (where every new client's connection would be reset).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from .guard import Guard
from .infer import InferRoute
from .settings import HttpLimits

__all__ = ["Front", "HttpLimits", "IdleConnections", "InferFastPath"]

log = logging.getLogger("kiln.http")

# ASGI wrappers uvicorn itself may put in front of the app that the fast path can step over: they
# only rewrite the client address and scheme (Kiln reads neither) or log ASGI messages at TRACE.
_TRANSPARENT = {"ProxyHeadersMiddleware", "MessageLoggerMiddleware"}


@dataclass(frozen=True)
class InferFastPath:
    """Kiln's guard (auth, drain, ids, in-flight bound, logs) and the shared infer route that the
    protocol calls for `POST …/infer` without building an ASGI request."""

    guard: Guard
    route: InferRoute

    @classmethod
    def find(cls, app, limit_concurrency: int | None) -> InferFastPath | None:
        """The fast path for the app uvicorn loaded, or None (every request then goes through ASGI,
        with the same answers, slower). Says which, once per process, with the reason."""
        skipped = []
        while not isinstance(app, Guard):
            name = type(app).__name__
            inner = getattr(app, "app", None)
            if name not in _TRANSPARENT or inner is None:
                log.warning("infer fast path off: %s sits in front of Kiln's guard; infer requests go "
                            "through ASGI", name)
                return None
            skipped.append(name)
            app = inner
        route = getattr(app.app, "infer_route", None)
        if not isinstance(route, InferRoute):
            log.warning("infer fast path off: the app behind the guard has no Kiln infer route")
            return None
        if limit_concurrency is not None:
            log.warning("infer fast path off: uvicorn's limit_concurrency is set (it counts ASGI tasks only)")
            return None
        log.info("infer fast path on%s", f" (stepping over {', '.join(skipped)}: Kiln reads neither the client "
                                         f"address nor the scheme)" if skipped else "")
        return cls(app, route)


class IdleConnections:
    """Open connections with no request in progress, longest-idle first; and the bound on open
    connections that makes one of them give way to a newcomer."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._idle: collections.OrderedDict[object, None] = collections.OrderedDict()
        self._closing: set = set()

    def __len__(self) -> int:
        return len(self._idle)

    def idle(self, conn) -> None:
        self._idle[conn] = None
        self._idle.move_to_end(conn)

    def busy(self, conn) -> None:
        self._idle.pop(conn, None)

    def lost(self, conn) -> None:
        self._idle.pop(conn, None)
        self._closing.discard(conn)

    def make_room(self, open_now: int, newcomer) -> bool:
        """Called with `newcomer` already counted in `open_now`: close longest-idle connections
        until the bound holds. False when none is idle (the newcomer is then refused)."""
        open_now -= len(self._closing)  # evicted, their descriptors about to be freed
        while open_now > self.bound:
            victim = next((c for c in self._idle if c is not newcomer), None)
            if victim is None:
                return False
            self._idle.pop(victim)
            self._closing.add(victim)
            victim.evict()
            open_now -= 1
        return True


class Front:
    """What every connection of one uvicorn server shares: limits, fast path, idle connections."""

    def __init__(self, limits: HttpLimits, fast_path: InferFastPath | None) -> None:
        self.limits = limits
        self.fast_path = fast_path
        self.connections = IdleConnections(limits.connection_bound())
        log.debug("HTTP front: %s, at most %d connections", limits, self.connections.bound)
