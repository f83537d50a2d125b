"""Run the server with graceful shutdown: SIGTERM → drain → exit 0.

uvicorn's own signal handling stops accepting at once and, since 0.29, re-raises the captured
signal after shutdown, so the process dies of SIGTERM (exit -15). Kubernetes expects a clean exit
and wants the pod to stop taking traffic *before* it stops answering. Here:

1. SIGTERM or SIGINT: readiness turns false and new requests get 503 at once (service/guard.py);
   the listening socket stays open so late requests get a clear 503, not a reset;
2. requests already in flight finish, for up to KILN_SHUTDOWN_GRACE_S;
3. then uvicorn shuts down (closes the socket and idle connections, runs the lifespan shutdown:
   batchers and runners closed) and the process exits 0. A second SIGINT/SIGTERM skips the wait.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time

import uvicorn

from . import guard

log = logging.getLogger("kiln.lifecycle")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, grace_s: float):
        super().__init__(config)
        self.grace_s = grace_s

    @property
    def drain(self) -> guard.Drain:
        return guard.DRAIN  # this process's (a worker process has its own)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
        # Unlike uvicorn, do not re-raise the signal: a drained shutdown is a clean exit.

    def _on_signal(self, sig: int, frame) -> None:
        if self.drain.draining:  # second signal: stop waiting
            log.warning("second %s: shutting down now (%d request(s) in flight)", signal.Signals(sig).name,
                        self.drain.inflight)
            self.should_exit = True
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self.drain.begin()
        log.info("%s: draining (readiness false, new requests 503); %d request(s) in flight, grace %.1fs",
                 signal.Signals(sig).name, self.drain.inflight, self.grace_s)

    async def on_tick(self, counter: int) -> bool:
        d = self.drain
        if d.draining and not self.should_exit:
            waited = time.monotonic() - d.since
            if d.inflight <= 0:
                log.info("drained in %.2fs: shutting down", waited)
                self.should_exit = True
            elif waited >= self.grace_s:
                log.warning("grace period of %.1fs over with %d request(s) still in flight: shutting down",
                            self.grace_s, d.inflight)
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app, *, host: str, port: int, log_level: str, grace_s: float, workers: int = 1,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None, log_config=None,
          http_limits=None) -> int:
    """Serve until signalled; the process exit code (0 after a drained shutdown, 3 if startup failed).
    With workers > 1, `app` is an import string of an app factory; each worker drains on its own."""
    # Imported here: it pulls in service.metrics, which must see PROMETHEUS_MULTIPROC_DIR (set by
    # `kiln serve --workers N` just before this) when it creates its metrics.
    from .settings import HttpLimits
    from .http_protocol import connection_class

    limits = http_limits or HttpLimits.from_settings()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), loop="uvloop",
                            http=connection_class(limits), timeout_keep_alive=limits.keep_alive_timeout_s,
                            access_log=False, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                            timeout_graceful_shutdown=max(1, min(5, int(grace_s))), log_config=log_config,
                            proxy_headers=False,  # Kiln never reads the client address
                            workers=workers, factory=workers > 1)
    server = GracefulServer(config, grace_s)
    if workers > 1:
        from uvicorn.supervisors import multiprocess

        # Each worker process builds its server through Process.server: make that a GracefulServer.
        multiprocess.Process = _GracefulProcess
        sock = config.bind_socket()
        multiprocess.Multiprocess(config, sockets=[sock]).run()
        return 0
    server.run()
    return 0 if server.started else 3


def _graceful_process_class():
    from uvicorn.supervisors import multiprocess

    class GracefulProcess(multiprocess.Process):
        """A uvicorn worker process whose server drains on SIGTERM (grace from KILN_SHUTDOWN_GRACE_S)."""

        @property
        def server(self) -> uvicorn.Server:
            if self._server is None:
                from .settings import Settings

                self._server = GracefulServer(self.config, Settings().shutdown_grace_s)
            return self._server

    GracefulProcess.__qualname__ = GracefulProcess.__name__ = "_GracefulProcess"
    GracefulProcess.__module__ = __name__
    return GracefulProcess


_GracefulProcess = _graceful_process_class()
