"""Per-model dynamic batcher and runner pool.

One thread per runner instance (`instances: N`). Requests are queued by the event loop; an idle
runner thread takes every compatible queued request (up to `max_batch_size` rows), concatenates
them along the batch dimension, runs the model once and hands each client its own rows back
through its event loop (one `call_soon_threadsafe` per batch).

When to run — better than a fixed window:
- A lone request on an idle runner runs at once: the batcher waits only when requests are
  arriving faster than the batch it holds would run (the arrival-interval EWMA is shorter than the
  wait budget), so concurrency 1 sees no added delay.
- The wait budget is `min(max_queue_delay_ms, t(rows))`, where `t` is the model's measured cost
  curve (seconds per batch size: timed at warm-up, then an EWMA of every executed batch).
  Waiting longer than the batch's own run time never pays: running now and taking later arrivals
  as the next batch costs them at most that long. The batcher also waits only where the curve is
  sublinear (running rows+1 together saves ≥ 20 % of a batch-1 call over running them apart).
- Reaching `max_batch_size` or a preferred batch size dispatches at once.
- The batch size itself follows the curve: the size with the best cost per row among those the
  queue can fill (see `_batch_limit`), so a model that gets slower per row in big batches is not
  forced into them.
- A full queue (`max_queue_size` requests) answers 503 with Retry-After.

Cheap models run inline: when there is one instance and the cost curve says a full batch takes
less than INLINE_MAX_S, batches run on the event loop thread itself (everything parsed in one loop
iteration is one batch). No thread hand-off, no wake-up, no GIL ping-pong: on one core this is both
the cheapest and the lowest-latency schedule for models of tens of microseconds.

Without a `dynamic_batching` section (or with `max_batch_size: 0`) requests run one at a time
on the runner pool, never merged.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import metrics
from .errors import KilnError, Unavailable

log = logging.getLogger("kiln.batcher")

_CLOSE = object()
INLINE_MAX_S = float(__import__("os").environ.get("KILN_INLINE_MAX_MS", "1.0")) / 1000.0


class InferenceFailed(KilnError):
    status = 500
    outcome = "server_error"


@dataclass
class BatchPolicy:
    max_batch_size: int = 0          # 0: never merge requests
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1


@dataclass(eq=False)
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float


@dataclass(eq=False)
class _Worker:
    runner: Any
    wake: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    thread: threading.Thread | None = None
    failures: int = 0  # consecutive failed batches


# Staging slabs (max_batch_size rows each) a batcher keeps for reuse.
SLABS_KEPT = 4

# A runner whose batches fail this many times in a row is replaced by a fresh one.
REPLACE_AFTER_FAILURES = 3


class CostCurve:
    """Seconds per executed batch size: warm-up timings, then an EWMA of live batches."""

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha
        self.points: dict[int, float] = {}
        self._sorted: list[int] = []

    def observe(self, size: int, seconds: float) -> None:
        old = self.points.get(size)
        if old is None:
            self.points[size] = seconds
            self._sorted = sorted(self.points)
        else:
            self.points[size] = old + self.alpha * (seconds - old)

    def __call__(self, size: int) -> float | None:
        """Estimated seconds for `size` rows (interpolated; None before any measurement)."""
        p = self.points
        if size in p:
            return p[size]
        keys = self._sorted
        if not keys:
            return None
        lo = max((k for k in keys if k < size), default=None)
        hi = min((k for k in keys if k > size), default=None)
        if lo is None:
            return p[hi] * size / hi if hi else None
        if hi is None:
            return p[lo] * size / lo
        return p[lo] + (p[hi] - p[lo]) * (size - lo) / (hi - lo)

    def as_dict(self) -> dict[int, float]:
        return {k: self.points[k] for k in self._sorted}

    def fixed_seconds(self) -> float:
        """A call's cost beyond its rows: t(1) minus the per-row slope between the two largest
        measured sizes (inf when there are not two)."""
        keys = self._sorted
        if len(keys) < 2 or keys[0] != 1:
            return float("inf")
        hi, lo = keys[-1], keys[-2]
        slope = (self.points[hi] - self.points[lo]) / (hi - lo)
        return max(0.0, self.points[1] - slope)


class Batcher:
    def __init__(self, name: str, version: str, runners: list[Any], policy: BatchPolicy,
                 on_batch: Callable[[int, float], None] | None = None,
                 rebuild: Callable[[], Any] | None = None):
        self.name = name
        self._rebuild = rebuild
        self.replaced = 0  # runners replaced after repeated failures
        self.version = version
        self.policy = policy
        self.cost = CostCurve()
        self._lock = threading.Lock()
        self._pending: deque[_Item] = deque()
        self._rows = 0
        self._idle: list[_Worker] = []
        self._waiter: _Worker | None = None
        self._closed = False
        self._last_arrival = 0.0
        self._interarrival = float("inf")  # EWMA seconds between arrivals
        self._preferred = sorted(s for s in policy.preferred_batch_sizes if 0 < s <= max(policy.max_batch_size, 1))
        self._batch_hist = metrics.BATCH_SIZE.labels(name, version)
        self._depth = metrics.QUEUE_DEPTH.labels(name, version)
        self._on_batch = on_batch
        self.inline = False           # decided by calibrate()
        self._row_bytes = 0           # one row of the single input (calibrate), for staging()
        self._copy_row_s = 0.0        # seconds to copy one such row into a batch (calibrate)
        self._call_s = float("inf")   # a model call's fixed cost, beyond its rows (calibrate)
        self._slab: np.ndarray | None = None  # the slab staging() is filling
        self._slab_used = 0
        self._slabs: list[np.ndarray] = []    # slabs to reuse once nothing refers to them
        self._slow_inline = 0
        self._flush_scheduled = False
        self.workers = [_Worker(r) for r in runners]
        for i, w in enumerate(self.workers):
            w.thread = threading.Thread(target=self._work, args=(w,), name=f"kiln-{name}-{i}", daemon=True)
            w.thread.start()

    # -- warm-up ------------------------------------------------------------------------------
    def calibrate(self, sample: dict[str, np.ndarray], budget_s: float = 3.0, repeats: int = 3) -> dict[int, float]:
        """Time the first runner at batch sizes 1, 2, 4, ... (and the preferred sizes) to seed the
        cost curve. Runs before the model is READY, so no request competes with it."""
        runner = self.workers[0].runner
        sizes = [1]
        if self.policy.batching:
            s = 2
            while s < self.policy.max_batch_size:
                sizes.append(s)
                s *= 2
            sizes = sorted(set(sizes + self._preferred + [self.policy.max_batch_size]))
        deadline = time.perf_counter() + budget_s
        for size in sizes:
            batch = {k: np.ascontiguousarray(np.repeat(v[:1], size, axis=0)) if self.policy.batching else v
                     for k, v in sample.items()}
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                runner.infer(batch)
                times.append(time.perf_counter() - t)
            self.cost.observe(size, min(times))
            if time.perf_counter() > deadline:
                break
        if self.policy.batching and len(sample) == 1:
            only = next(iter(sample.values()))
            if only.dtype != object and only.ndim and only.shape[0] == 1:
                self._row_bytes = only.nbytes
                self._copy_row_s = _copy_seconds_per_row(only, self.policy.max_batch_size)
        self._call_s = self.cost.fixed_seconds()
        biggest = self.cost(max(self.policy.max_batch_size, 1))
        self.inline = len(self.workers) == 1 and biggest is not None and biggest < INLINE_MAX_S
        log.info("model %s v%s cost curve (ms): %s (fixed cost per call %.1f µs, copy per row %.2f µs); %s",
                 self.name, self.version, {k: round(v * 1000, 3) for k, v in self.cost.as_dict().items()},
                 self._call_s * 1e6, self._copy_row_s * 1e6,
                 "inline on the event loop" if self.inline else f"{len(self.workers)} runner thread(s)")
        return self.cost.as_dict()

    # -- request side (event loop) ---------------------------------------------------------------
    def queue_depth(self) -> int:
        return len(self._pending)

    async def submit(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, float]:
        """Outputs for these inputs (this request's rows only), queue seconds, compute seconds."""
        return await self.enqueue(inputs)

    def enqueue(self, inputs: dict[str, np.ndarray]) -> asyncio.Future:
        """Queue these inputs; the future resolves to `submit`'s result. Completing or cancelling
        the future first (a timeout, service/limits.py) drops the request if it has not run yet."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self.policy.batching:
            first = next(iter(inputs.values()))
            rows = int(first.shape[0]) if first.ndim else 1
            key = tuple([(k, v.dtype, v.shape[1:]) for k, v in inputs.items()])
        else:
            rows, key = 1, ()
        now = time.perf_counter()
        item = _Item(inputs, rows, key, fut, loop, now)
        wake = None
        with self._lock:
            if self._closed:
                raise Unavailable(f"model '{self.name}' version {self.version} is unloading")
            if len(self._pending) >= self.policy.max_queue_size:
                raise Unavailable(f"model '{self.name}' version {self.version} is overloaded: "
                                  f"{len(self._pending)} requests queued (max_queue_size "
                                  f"{self.policy.max_queue_size})", retry_after=1)
            gap = now - self._last_arrival
            self._last_arrival = now
            ia = self._interarrival
            self._interarrival = gap if ia == float("inf") else ia + 0.2 * (min(gap, 1.0) - ia)
            self._pending.append(item)
            self._rows += rows
            if self.inline:
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    loop.call_soon(self._flush_inline)
            elif self._idle:
                wake = self._idle.pop()
            elif self._waiter is not None and self._full():
                wake, self._waiter = self._waiter, None
            depth = len(self._pending)
        if not self.inline:  # inline: the flush reports the depth once per batch
            self._depth.set(depth)
        if wake is not None:
            wake.wake.put(None)
        return fut

    def staging(self, nbytes: int) -> np.ndarray | None:
        """Memory (uint8) for a request's input tensor, received there straight from the socket
        (service/http_protocol.py): consecutive requests get adjacent regions of one slab, so a
        batch of them is a view of the slab and `_run` needs no concatenation. Only for batched
        single-input models on runner threads; None when the size is not whole rows.

        Slabs are reused, which spares the page faults of fresh memory, only once no array refers
        to them any more: every view of a slab (regions, the arrays decoded from them, batches)
        holds a reference to it, so its reference count says when it is free."""
        rb = self._row_bytes
        if not rb or self.inline or nbytes <= 0 or nbytes % rb or nbytes > rb * self.policy.max_batch_size:
            return None
        slab = self._slab
        if slab is None or self._slab_used + nbytes > slab.nbytes:
            slab = self._slab = self._free_slab(rb * self.policy.max_batch_size)
            self._slab_used = 0
        elif self._slab_used and sys.getrefcount(slab) == 3 + any(s is slab for s in self._slabs):
            # Nothing refers to the slab but this batcher (and `slab` here): start it over. At low
            # concurrency every request then lands in the same memory, still warm in the cache.
            self._slab_used = 0
        region = slab[self._slab_used:self._slab_used + nbytes]
        self._slab_used += nbytes
        return region

    def _free_slab(self, size: int) -> np.ndarray:
        slabs = self._slabs
        for i in range(len(slabs)):
            if sys.getrefcount(slabs[i]) == 2:  # the list's reference and the call's: free
                return slabs[i]
        slab = np.empty(size, np.uint8)
        if len(slabs) < SLABS_KEPT:
            slabs.append(slab)
        return slab

    def _flush_inline(self) -> None:
        """Event-loop side: run everything queued now, in batches of up to max_batch_size rows."""
        while True:
            with self._lock:
                self._flush_scheduled = False
                if self.policy.batching:
                    self._rows = max(self._rows, self.policy.max_batch_size)  # never wait inline
                    batch, _ = self._take(0.0)
                    self._rows = sum(it.rows for it in self._pending)
                else:
                    batch, _ = self._take(0.0)
                depth = len(self._pending)
            if batch is None:
                return
            self._depth.set(depth)
            self._run(self.workers[0], batch)

    def _full(self) -> bool:
        rows = self._rows
        if rows >= self.policy.max_batch_size:
            return True
        return any(rows == p for p in self._preferred) or (self._preferred and rows >= self._preferred[-1])

    # -- runner side (worker threads) --------------------------------------------------------------
    def _wait_budget(self, rows: int) -> float:
        """Seconds worth waiting for more rows before running `rows` (0: run now)."""
        p = self.policy
        if not p.batching or p.max_queue_delay_s <= 0 or rows >= p.max_batch_size:
            return 0.0
        t_rows, t_one, t_next = self.cost(rows), self.cost(1), self.cost(rows + 1)
        if t_rows is None or t_one is None or t_next is None:
            return 0.0
        budget = min(p.max_queue_delay_s, t_rows)
        if self._interarrival >= budget:           # no other request expected in time: run now
            return 0.0
        if t_rows + t_one - t_next < 0.2 * t_one:  # batching this model does not pay
            return 0.0
        return budget

    def _batch_limit(self, available: int) -> int:
        """Rows to put in the next batch: the size with the best measured cost per row among those
        the queue can fill (within 5 %, the largest). Where batching pays (an MLP) that is everything
        queued up to max_batch_size; where a bigger batch costs more per row (a CNN whose activations
        leave the cache) it stays small instead of making everyone wait for a slow big batch."""
        cap = self.policy.max_batch_size
        keys = self.cost._sorted  # noqa: SLF001
        if not keys:
            return cap
        avail = max(1, min(available, cap))
        per_row = {}
        for b in [k for k in keys if k <= avail] + [avail]:
            t = self.cost(b)
            if t is not None:
                per_row[b] = t / b
        if not per_row:
            return cap
        best = min(per_row.values())
        return max(b for b, v in per_row.items() if v <= best * 1.05)

    def _take(self, now: float) -> tuple[list[_Item] | None, float | None]:
        """Under the lock: a batch to run now, or (None, seconds to wait), or (None, None) if empty."""
        pending = self._pending
        while pending and pending[0].future.done():  # timed out (service/limits.py) or cancelled: never run
            self._rows -= pending.popleft().rows
        if not pending:
            return None, None
        p = self.policy
        if not p.batching:
            item = pending.popleft()
            self._rows -= item.rows
            return [item], None
        if not self._full():
            remaining = self._wait_budget(self._rows) - (now - pending[0].enqueued)
            if remaining > 0:
                return None, remaining
        first = pending[0]
        limit = self._batch_limit(self._rows)
        batch, rows, skipped = [], 0, []
        while pending:
            item = pending[0]
            if item.future.done():  # timed out while queued: drop it
                pending.popleft()
                self._rows -= item.rows
                continue
            if item.key != first.key:
                skipped.append(pending.popleft())
                continue
            if rows + item.rows > limit and batch:
                break
            pending.popleft()
            batch.append(item)
            rows += item.rows
            if rows >= limit:
                break
        if self._row_bytes and not self.inline and len(batch) > 1:
            batch, later = self._in_memory_order(batch, rows)
            if later:
                skipped = later + skipped
                rows -= sum(it.rows for it in later)
        if skipped:
            pending.extendleft(reversed(skipped))
        self._rows -= rows
        return batch, None

    def _in_memory_order(self, batch: list[_Item], rows: int) -> tuple[list[_Item], list[_Item]]:
        """(batch to run now, items to leave queued). Staged requests (see `staging`) whose regions
        lie back to back make a batch that is a view of the slab, in address order; arrival order
        and slab boundaries break that up. Then the oldest request's run alone is the batch, and the
        rest runs next, when one more model call costs less than copying the whole batch (both
        measured at warm-up and logged with the cost curve)."""
        (name,) = batch[0].inputs
        runs: list[list[_Item]] = []
        end = -1
        for it in sorted(batch, key=lambda it: _address(it.inputs[name])):
            a = it.inputs[name]
            start = _address(a)
            if start == end and a.flags.c_contiguous:
                runs[-1].append(it)
            else:
                runs.append([it])
            end = start + a.nbytes
        if len(runs) == 1:
            return runs[0], []
        if self._call_s >= rows * self._copy_row_s:  # copying is cheaper than one more model call
            return batch, []
        own = next(r for r in runs if batch[0] in r)
        chosen = set(map(id, own))
        return own, [it for it in batch if id(it) not in chosen]

    def _work(self, w: _Worker) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                if self._waiter is w:
                    self._waiter = None
                if w in self._idle:
                    self._idle.remove(w)
                batch, wait = self._take(time.perf_counter())
                if batch is None:
                    if wait is None:
                        self._idle.append(w)
                    else:
                        self._waiter = w
                depth = len(self._pending)
            if batch is None:
                try:
                    token = w.wake.get(timeout=wait) if wait is not None else w.wake.get()
                except queue.Empty:
                    continue
                if token is _CLOSE:
                    return
                continue
            self._depth.set(depth)
            self._run(w, batch)

    def _run(self, w: _Worker, batch: list[_Item]) -> None:
        start = time.perf_counter()
        inline_cpu = time.thread_time() if self.inline and threading.current_thread() is not w.thread else None
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = {k: _gather([it.inputs[k] for it in batch]) for k in batch[0].inputs}
            outputs = w.runner.infer(inputs)
            error = None
        except Exception as err:  # one bad batch must not kill the runner thread
            outputs, error = None, InferenceFailed(
                f"model '{self.name}' failed during inference: {type(err).__name__}: {err}")
        w.failures = w.failures + 1 if error else 0
        if error and w.failures >= REPLACE_AFTER_FAILURES:
            self._replace_runner(w)
        end = time.perf_counter()
        compute = end - start
        if inline_cpu is not None:
            # Inputs bigger than the calibration sample (a variable dimension) must not block the loop.
            # Judged on the loop thread's CPU time, three batches in a row: a preempted batch (a busy
            # machine) reads long on the wall clock and is no reason to leave the inline path.
            cpu = time.thread_time() - inline_cpu
            self._slow_inline = self._slow_inline + 1 if cpu > 4 * INLINE_MAX_S else 0
            if self._slow_inline >= 3:
                self.inline = False
                log.warning("model %s v%s: batches take %.1f ms of CPU inline; moving inference to runner "
                            "threads", self.name, self.version, cpu * 1000)
        rows = sum(it.rows for it in batch)
        if error is None:
            if self.policy.batching:
                self.cost.observe(rows, compute)
            self._batch_hist.observe(rows)
            if self._on_batch is not None:
                self._on_batch(rows, compute)
        results: list[tuple[_Item, Any]] = []
        if error is not None:
            results = [(it, error) for it in batch]
        elif len(batch) == 1:
            results = [(batch[0], (outputs, start - batch[0].enqueued, compute))]
        else:
            offset = 0
            for it in batch:
                own = {k: (v[offset:offset + it.rows] if v.ndim and v.shape[0] == rows else v)
                       for k, v in outputs.items()}
                offset += it.rows
                results.append((it, (own, start - it.enqueued, compute)))
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for it, res in results:
            by_loop.setdefault(it.loop, []).append((it.future, res))
        current = asyncio._get_running_loop()
        for loop, items in by_loop.items():
            if loop is current:
                _resolve(items)
                continue
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:  # the client's loop is gone
                pass

    # -- shutdown -------------------------------------------------------------------------------------
    def _replace_runner(self, w: _Worker) -> None:
        """Swap a runner that keeps failing for a fresh one; the old one is closed."""
        if self._rebuild is None:
            return
        try:
            fresh = self._rebuild()
        except Exception:
            log.exception("model %s v%s: replacing a failing runner failed; keeping the old one",
                          self.name, self.version)
            return
        old, w.runner, w.failures = w.runner, fresh, 0
        self.replaced += 1
        log.warning("model %s v%s: runner failed %d batches in a row: replaced with a fresh one",
                    self.name, self.version, REPLACE_AFTER_FAILURES)
        try:
            old.close()
        except Exception:
            log.exception("closing the replaced runner of %s failed", self.name)

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._rows = 0
        for w in self.workers:
            w.wake.put(_CLOSE)
        error = Unavailable(f"model '{self.name}' version {self.version} was unloaded")
        for it in pending:
            try:
                it.loop.call_soon_threadsafe(_resolve, [(it.future, error)])
            except RuntimeError:
                pass
        for w in self.workers:
            if w.thread is not None and w.thread is not threading.current_thread():
                w.thread.join(timeout)


def _gather(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays joined along the batch dimension: a view when they lie back to back in memory
    (Batcher.staging), else a copy."""
    first = arrays[0]
    if first.flags.c_contiguous and first.size:
        end = _address(first) + first.nbytes
        rows, size = first.shape[0], first.size
        for a in arrays[1:]:
            if not a.flags.c_contiguous or _address(a) != end:
                break
            end += a.nbytes
            rows += a.shape[0]
            size += a.size
        else:
            # Every byte of the view belongs to one of `arrays` (same dtype and row shape: one batch
            # key), and the batch holds all of them while the runner uses the view.
            whole = np.lib.stride_tricks.as_strided(first.reshape(-1), shape=(size,), strides=(first.itemsize,))
            return whole.reshape(rows, *first.shape[1:])
    return np.concatenate(arrays)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _copy_seconds_per_row(row: np.ndarray, rows: int) -> float:
    """What `np.concatenate` costs per row of this size into a fresh batch (best of three)."""
    parts = [np.ascontiguousarray(row) for _ in range(max(2, min(rows, 32)))]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.concatenate(parts)
        best = min(best, time.perf_counter() - t)
    return best / len(parts)


def _resolve(items: list) -> None:
    for fut, res in items:
        if fut.done():
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)
