"""Keep CPython's cyclic garbage collector off the long-lived heap.

After startup a server's heap is mostly objects that live as long as the process: modules, the app,
ONNX Runtime sessions, compiled models. Every full (generation 2) collection walks all of them:
~26 ms with the benchmark's MLP loaded, about once per 20,000 requests under load
(`KILN_GC_FREEZE=false python -m bench.protocol --model mlp`), a stall of the event loop and so of
every request in flight. `gc.freeze()` moves everything alive at that moment to the permanent
generation, which collections skip; the garbage that requests make is collected as before.

Frozen objects are never collected, even when they later become unreachable reference cycles, so
the heap is settled again (unfreeze, full collection, freeze) whenever the set of loaded models
changes: an unloaded model's cycles are freed then. `Settler` does that off the request path, once
per burst of changes (KILN_GC_SETTLE_DELAY_S of quiet), and never for a load that changed nothing.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger("kiln.heap")
_lock = threading.Lock()


def settle() -> None:
    """Collect everything collectable, then freeze what is left (call when the long-lived heap changed)."""
    with _lock:
        t0 = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        log.info("heap settled: %d long-lived objects frozen out of garbage collection (full collection "
                 "took %.1f ms)", gc.get_freeze_count(), (time.perf_counter() - t0) * 1000)


def release() -> None:
    """Hand every frozen object back to the collector (on shutdown, or a repository closed in-process)."""
    with _lock:
        gc.unfreeze()


class Settler:
    """Settles the heap once after a burst of model changes, off the request that made them.

    `request()` marks the heap as changed and returns at once; a background thread settles when no
    change has come for `quiet_s` (so twenty loads in a row cost one full collection, not twenty),
    and at the latest `max_delay_s` after the first change of a burst (steady churn still settles).
    A repository calls it only when a load or unload changed the loaded models; a refused one
    changes nothing and settles nothing."""

    def __init__(self, quiet_s: float = 1.0, max_delay_s: float = 10.0):
        self.quiet_s = quiet_s
        self.max_delay_s = max(max_delay_s, quiet_s)
        self.settles = 0  # how many settles this settler ran
        self._cond = threading.Condition()
        self._first: float | None = None  # monotonic time of the burst's first change (None: none pending)
        self._last = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> bool:
        return self._first is not None

    def request(self) -> None:
        """The long-lived heap changed: settle once the burst is over."""
        with self._cond:
            if self._closed:
                return
            now = time.monotonic()
            if self._first is None:
                self._first = now
            self._last = now
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kiln-heap-settler", daemon=True)
                self._thread.start()
            self._cond.notify()

    def flush(self) -> None:
        """Settle now if a settle is pending (before readiness, in tests)."""
        with self._cond:
            due, self._first = self._first is not None, None
        if due:
            self._settle()

    def close(self) -> None:
        """Drop any pending settle and stop the thread (the repository is closing)."""
        with self._cond:
            self._closed, self._first = True, None
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def _settle(self) -> None:
        settle()
        self.settles += 1

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._first is None:
                    self._cond.wait()
                    continue
                due = min(self._last + self.quiet_s, self._first + self.max_delay_s)
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                self._first = None
                self._cond.release()
                try:
                    self._settle()
                except Exception:  # a failed collection must not end the settler
                    log.exception("settling the heap failed")
                finally:
                    self._cond.acquire()
