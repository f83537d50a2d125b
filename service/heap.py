"""Keep CPython's cyclic garbage collector off the long-lived heap.

After startup a server's heap is mostly objects that live as long as the process: modules, the app,
ONNX Runtime sessions, compiled models. Every full (generation 2) collection walks all of them:
~26 ms with the benchmark's MLP loaded, about once per 20,000 requests under load
(`KILN_GC_FREEZE=false python -m bench.protocol --model mlp`), a stall of the event loop and so of
every request in flight. `gc.freeze()` moves everything alive at that moment to the permanent
generation, which collections skip; the garbage that requests make is collected as before.

Frozen objects are never collected, even when they later become unreachable reference cycles, so
the heap is settled again (unfreeze, full collection, freeze) whenever the set of loaded models
changes: an unloaded model's cycles are freed then.
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
