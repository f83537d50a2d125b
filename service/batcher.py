"""Per-model dynamic batcher and runner pool: the queue and the execution of batches.

One thread per runner instance (`instances: N`). Requests are queued by the event loop; an idle
runner thread takes every compatible queued request, concatenates them along the batch dimension,
runs the model once and hands each client its own rows back through its event loop (one
`call_soon_threadsafe` per batch).

The parts it is built from, each with one job and tested on its own:
- service/batch_policy.py — when to run and how many rows to take: pure functions over the
  model's measured cost curve (seconds per batch size: timed at warm-up, then an EWMA of every
  executed batch), the arrival interval and the configured policy.
- service/staging.py — the slabs a batched model's requests are received into, so a batch of
  adjacent requests is a view instead of a copy.
- this module — the queue (a full one answers 503 with Retry-After), inline or threaded execution,
  replacing a runner that keeps failing, and the batcher's health.

Cheap models run inline: when there is one instance and the cost curve says a full batch takes
less than INLINE_MAX_S, batches run on the event loop thread itself (everything parsed in one loop
iteration is one batch). No thread hand-off, no wake-up, no GIL ping-pong: on one core this is both
the cheapest and the lowest-latency schedule for models of tens of microseconds.

Without a `dynamic_batching` section (or with `max_batch_size: 0`) requests run one at a time
on the runner pool, never merged.

Observing: with an `observer` set (the model version's monitor, service/monitor/hub.py), a request
enqueued with a request id is handed, with the others of its batch, to `observer(Served)` on its
event loop once its future holds the result: one call per batch, with the batch's own input and
output arrays, so what the monitor does per request is paid per batch, and the request path pays
only for carrying the id. Only requests this batch answered are in it (not one that timed out
first, not a failed batch, not one enqueued without an id: a rollout's shadow copy).

Health: a runner thread that dies or an inline flush that raises (a bug, never a bad request: those
fail their own batch) breaks the batcher. It then answers every queued and later request 503 at
once with the reason, logs the failure with its traceback, and tells its owner (`on_broken`), which
reports the model not ready, instead of leaving requests to time out behind a dead queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics
from .batch_policy import (
    ArrivalRate,
    BatchPolicy,
    CostCurve,
    batch_limit,
    copy_beats_call,
    is_full,
    runs_inline,
    wait_budget,
)
from .errors import KilnError, Unavailable
from .staging import StagingSlabs, contiguous_runs, gather

__all__ = ["REPLACE_AFTER_FAILURES", "BatchPolicy", "Batcher", "Calibration", "CostCurve", "InferenceFailed", "Observer",
           "Served"]

log = logging.getLogger("kiln.batcher")

_CLOSE = object()
INLINE_MAX_S = float(os.environ.get("KILN_INLINE_MAX_MS", "1.0")) / 1000.0

# A runner whose batches fail this many times in a row is replaced by a fresh one.
REPLACE_AFTER_FAILURES = 3


class InferenceFailed(KilnError):
    status = 500
    outcome = "server_error"


@dataclass(frozen=True)
class Calibration:
    """What warm-up measured beyond the cost curve (see Batcher.calibrate)."""

    row_bytes: int = 0              # one row of the single input (0: staging not used)
    copy_row_s: float = 0.0         # seconds to copy one such row into a batch
    call_s: float = float("inf")    # a model call's fixed cost, beyond its rows


# What sees each executed batch's observed requests (see "Observing" above).
Observer = Callable[["Served"], None]


class Served:
    """The observed requests of one executed batch, in batch order (see "Observing" above).

    ids are what every observation reads (the index); each request's own inputs, outputs and
    latency only a captured one or a partial batch needs, so a batch's are listed only when asked for."""

    __slots__ = ("ids", "batch_inputs", "batch_outputs", "_items", "_done", "_inputs", "_outputs", "_seconds")

    def __init__(self, ids: list[str], inputs: list[dict[str, np.ndarray]] | None,
                 outputs: list[dict[str, np.ndarray]] | None, seconds: list[float] | None,
                 batch_inputs: dict[str, np.ndarray] | None = None,
                 batch_outputs: dict[str, np.ndarray] | None = None, *, items: list | None = None,
                 done: float = 0.0):
        self.ids = ids
        # The whole batch's inputs and outputs (rows in the order above), when these requests are
        # the whole batch; else None (some request was not observed, or timed out before its result).
        self.batch_inputs = batch_inputs
        self.batch_outputs = batch_outputs
        self._items, self._done = items, done  # the batcher's (item, result) pairs, read on demand
        self._inputs, self._outputs, self._seconds = inputs, outputs, seconds

    @property
    def inputs(self) -> list[dict[str, np.ndarray]]:
        """Each request's own inputs."""
        if self._inputs is None:
            self._inputs = [it.inputs for it, _ in self._items]
        return self._inputs

    @property
    def outputs(self) -> list[dict[str, np.ndarray]]:
        """Each request's own outputs."""
        if self._outputs is None:
            self._outputs = [res[0] for _, res in self._items]
        return self._outputs

    @property
    def seconds(self) -> list[float]:
        """Each request's start → its outputs ready."""
        if self._seconds is None:
            self._seconds = [self._done - it.start for it, _ in self._items]
        return self._seconds


@dataclass(eq=False)
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    request_id: str | None = None  # observed under this id (None: not observed)
    start: float = 0.0             # the request's perf_counter start, for its observed latency


@dataclass(eq=False)
class _Worker:
    runner: Any
    wake: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    thread: threading.Thread | None = None
    failures: int = 0  # consecutive failed batches


class Batcher:
    def __init__(self, name: str, version: str, runners: list[Any], policy: BatchPolicy,
                 on_batch: Callable[[int, float], None] | None = None,
                 rebuild: Callable[[], Any] | None = None,
                 on_broken: Callable[[str], None] | None = None):
        self.name = name
        self.version = version
        self.policy = policy
        self.cost = CostCurve()
        self.arrivals = ArrivalRate()
        self.calibration = Calibration()
        self.inline = False           # decided by calibrate()
        self.replaced = 0             # runners replaced after repeated failures
        self.broken: str | None = None  # why the batcher can no longer serve (see module docstring)
        self._rebuild = rebuild
        self._on_batch = on_batch
        self._on_broken = on_broken
        self.observer: Observer | None = None  # sees each batch's observed requests (see "Observing")
        self._lock = threading.Lock()
        self._pending: deque[_Item] = deque()
        self._rows = 0
        self._idle: list[_Worker] = []
        self._waiter: _Worker | None = None
        self._closed = False
        self._staging: StagingSlabs | None = None  # calibrate(): batched single-input models
        self._slow_inline = 0
        self._flush_scheduled = False
        self._batch_hist = metrics.BATCH_SIZE.labels(name, version)
        self._depth = metrics.QUEUE_DEPTH.labels(name, version)
        self.workers = [_Worker(r) for r in runners]
        for i, w in enumerate(self.workers):
            w.thread = threading.Thread(target=self._work, args=(w,), name=f"kiln-{name}-{i}", daemon=True)
            w.thread.start()

    # -- warm-up ------------------------------------------------------------------------------
    def calibrate(self, sample: dict[str, np.ndarray], budget_s: float = 3.0, repeats: int = 3) -> dict[int, float]:
        """Time the first runner at batch sizes 1, 2, 4, ... (and the preferred sizes) to seed the
        cost curve. Runs before the model is READY, so no request competes with it."""
        runner = self.workers[0].runner
        p = self.policy
        sizes = [1]
        if p.batching:
            s = 2
            while s < p.max_batch_size:
                sizes.append(s)
                s *= 2
            sizes = sorted(set(sizes + list(p.preferred) + [p.max_batch_size]))
        deadline = time.perf_counter() + budget_s
        for size in sizes:
            batch = {k: np.ascontiguousarray(np.repeat(v[:1], size, axis=0)) if p.batching else v
                     for k, v in sample.items()}
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                runner.infer(batch)
                times.append(time.perf_counter() - t)
            self.cost.observe(size, min(times))
            if time.perf_counter() > deadline:
                break
        row_bytes, copy_row_s = 0, 0.0
        if p.batching and len(sample) == 1:
            only = next(iter(sample.values()))
            if only.dtype != object and only.ndim and only.shape[0] == 1 and only.nbytes:
                row_bytes, copy_row_s = only.nbytes, _copy_seconds_per_row(only, p.max_batch_size)
        self.calibration = Calibration(row_bytes, copy_row_s, self.cost.fixed_seconds())
        self._staging = StagingSlabs(row_bytes, p.max_batch_size) if row_bytes else None
        self.inline = runs_inline(len(self.workers), self.cost(max(p.max_batch_size, 1)), INLINE_MAX_S)
        log.info("model %s v%s cost curve (ms): %s (fixed cost per call %.1f µs, copy per row %.2f µs); %s",
                 self.name, self.version, {k: round(v * 1000, 3) for k, v in self.cost.as_dict().items()},
                 self.calibration.call_s * 1e6, copy_row_s * 1e6,
                 "inline on the event loop" if self.inline else f"{len(self.workers)} runner thread(s)")
        return self.cost.as_dict()

    # -- request side (event loop) ---------------------------------------------------------------
    def queue_depth(self) -> int:
        return len(self._pending)

    async def submit(self, inputs: dict[str, np.ndarray], request_id: str | None = None,
                     start: float = 0.0) -> tuple[dict[str, np.ndarray], float, float]:
        """Outputs for these inputs (this request's rows only), queue seconds, compute seconds."""
        return await self.enqueue(inputs, request_id, start)

    def enqueue(self, inputs: dict[str, np.ndarray], request_id: str | None = None,
                start: float = 0.0) -> asyncio.Future:
        """Queue these inputs; the future resolves to `submit`'s result. Completing or cancelling
        the future first (a timeout, service/limits.py) drops the request if it has not run yet.
        `request_id`, `start`: the request's id and perf_counter start, for the observer (see
        "Observing" above)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self.policy.batching:
            first = next(iter(inputs.values()))
            rows = int(first.shape[0]) if first.ndim else 1
            key = tuple([(k, v.dtype, v.shape[1:]) for k, v in inputs.items()])
        else:
            rows, key = 1, ()
        now = time.perf_counter()
        item = _Item(inputs, rows, key, fut, loop, now, request_id, start)
        wake = None
        with self._lock:
            if self._closed:
                raise self._refusal()
            if len(self._pending) >= self.policy.max_queue_size:
                raise Unavailable(f"model '{self.name}' version {self.version} is overloaded: "
                                  f"{len(self._pending)} requests queued (max_queue_size "
                                  f"{self.policy.max_queue_size})", retry_after=1)
            self.arrivals.observe(now)
            self._pending.append(item)
            self._rows += rows
            if self.inline:
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    loop.call_soon(self._flush_inline)
            elif self._idle:
                wake = self._idle.pop()
            elif self._waiter is not None and is_full(self._rows, self.policy):
                wake, self._waiter = self._waiter, None
            depth = len(self._pending)
        if not self.inline:  # inline: the flush reports the depth once per batch
            self._depth.set(depth)
        if wake is not None:
            wake.wake.put(None)
        return fut

    def staging(self, nbytes: int) -> np.ndarray | None:
        """Memory (uint8) for a request's input tensor, received there straight from the socket
        (service/http_protocol.py; see service/staging.py). Only for batched single-input models on
        runner threads (inline models concatenate on the loop); None when the size is not whole rows."""
        slabs = self._staging
        if slabs is None or self.inline:
            return None
        return slabs.region(nbytes)

    def _refusal(self) -> Unavailable:
        if self.broken:
            return Unavailable(f"model '{self.name}' version {self.version} is not ready: {self.broken}")
        return Unavailable(f"model '{self.name}' version {self.version} is unloading")

    def _flush_inline(self) -> None:
        """Event-loop side: run everything queued now, in batches of up to max_batch_size rows.
        An exception here would be logged by asyncio and forgotten, leaving the queue dead behind
        `_flush_scheduled`: it breaks the batcher instead."""
        batch = None
        try:
            while True:
                batch = None
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
        except BaseException as err:  # a bug in the batcher: fail loudly, not silently
            self._break(f"the inline batch loop raised {type(err).__name__}: {err}", batch or [], err)
            if not isinstance(err, Exception):
                raise

    # -- runner side (worker threads) --------------------------------------------------------------
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
        if not is_full(self._rows, p):
            remaining = wait_budget(self._rows, p, self.cost, self.arrivals.interval) - (now - pending[0].enqueued)
            if remaining > 0:
                return None, remaining
        first = pending[0]
        limit = batch_limit(self._rows, p.max_batch_size, self.cost)
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
        if self._staging is not None and not self.inline and len(batch) > 1:
            batch, later = self._in_memory_order(batch, rows)
            if later:
                skipped = later + skipped
                rows -= sum(it.rows for it in later)
        if skipped:
            pending.extendleft(reversed(skipped))
        self._rows -= rows
        return batch, None

    def _in_memory_order(self, batch: list[_Item], rows: int) -> tuple[list[_Item], list[_Item]]:
        """(batch to run now, items to leave queued). Staged requests whose regions lie back to back
        make a batch that is a view of the slab, in address order; arrival order and slab boundaries
        break that up. Then the oldest request's run alone is the batch, and the rest runs next,
        unless copying the whole batch costs less than one more model call."""
        (name,) = batch[0].inputs
        runs = contiguous_runs([it.inputs[name] for it in batch])
        if len(runs) == 1:
            return [batch[i] for i in runs[0]], []
        cal = self.calibration
        if copy_beats_call(cal.call_s, cal.copy_row_s, rows):
            return batch, []
        own = next(r for r in runs if 0 in r)
        chosen = set(own)
        return [batch[i] for i in own], [it for i, it in enumerate(batch) if i not in chosen]

    def _work(self, w: _Worker) -> None:
        """A runner thread. Whatever kills it (a bug, never a bad request) breaks the batcher."""
        batch = None
        try:
            while True:
                batch = None
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
        except BaseException as err:  # noqa: BLE001 - the thread ends here either way: say why
            self._break(f"runner thread {threading.current_thread().name} died: {type(err).__name__}: {err}",
                        batch or [], err)

    def _run(self, w: _Worker, batch: list[_Item]) -> None:
        start = time.perf_counter()
        inline_cpu = time.thread_time() if self.inline and threading.current_thread() is not w.thread else None
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = {k: gather([it.inputs[k] for it in batch]) for k in batch[0].inputs}
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
        _deliver(results, None if error is not None else (inputs, outputs), self.observer)

    # -- failure handling -----------------------------------------------------------------------------
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

    def _break(self, reason: str, inflight: list[_Item], cause: BaseException) -> None:
        """Stop serving for good: every queued request, and the batch that was running, gets 503 with
        the reason now; the other runner threads end; the owner hears of it."""
        with self._lock:
            if self.broken is not None or self._closed:  # already broken, or unloading: nothing to report
                first, pending = False, list(self._pending)
            else:
                first, pending = True, list(self._pending)
                self.broken = reason
            self._closed = True
            self._pending = deque()
            self._rows = 0
        if first:
            log.error("model %s v%s: batcher broken, the model is not ready until it is loaded again: %s",
                      self.name, self.version, reason, exc_info=cause)
        for w in self.workers:
            w.wake.put(_CLOSE)
        error = self._refusal()
        _deliver([(it, error) for it in [*inflight, *pending]])
        if first and self._on_broken is not None:
            try:
                self._on_broken(reason)
            except Exception:
                log.exception("model %s v%s: reporting the broken batcher failed", self.name, self.version)

    # -- shutdown -------------------------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._rows = 0
        for w in self.workers:
            w.wake.put(_CLOSE)
        error = Unavailable(f"model '{self.name}' version {self.version} was unloaded")
        _deliver([(it, error) for it in pending])
        for w in self.workers:
            if w.thread is not None and w.thread is not threading.current_thread():
                w.thread.join(timeout)


def _copy_seconds_per_row(row: np.ndarray, rows: int) -> float:
    """What `np.concatenate` costs per row of this size into a fresh batch (best of three)."""
    parts = [np.ascontiguousarray(row) for _ in range(max(2, min(rows, 32)))]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.concatenate(parts)
        best = min(best, time.perf_counter() - t)
    return best / len(parts)


def _deliver(results: list[tuple[_Item, Any]],
             batch: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
             observer: Observer | None = None) -> None:
    """Hand each item its result (or exception) on its own event loop: one call per loop.
    `batch`: the executed batch's (inputs, outputs), for its observer."""
    if not results:
        return
    first = results[0][0].loop
    by_loop: dict[asyncio.AbstractEventLoop, list] = {first: results}
    if any(it.loop is not first for it, _ in results):
        by_loop = {}
        for it, res in results:
            by_loop.setdefault(it.loop, []).append((it, res))
        batch = None  # no one loop sees the whole batch
    current = asyncio._get_running_loop()
    for loop, items in by_loop.items():
        if loop is current:
            _resolve(items, batch, observer)
            continue
        try:
            loop.call_soon_threadsafe(_resolve, items, batch, observer)
        except RuntimeError:  # the client's loop is gone
            pass


def _resolve(items: list[tuple[_Item, Any]], batch=None, observer: Observer | None = None) -> None:
    """Complete the futures, then show the observer the requests answered here. Nothing per
    request beyond that in the usual case: every one answered (counted by the exceptions) and observed."""
    missed = 0
    for it, res in items:
        fut = it.future
        if fut.done():
            missed += 1
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
            missed += 1
            continue
        fut.set_result(res)
    if observer is None or missed == len(items):
        return
    if missed:  # a timeout came first, or a failed batch: the requests this call answered, without the batch's arrays
        items = [(it, res) for it, res in items if _answered(it.future, res)]
        batch = None
    ids = [it.request_id for it, _ in items]  # a comprehension: twice as fast here as map(attrgetter)
    if not all(ids):  # requests enqueued without an id (a rollout's shadow copies) are not observed
        items = [entry for entry in items if entry[0].request_id is not None]
        if not items:
            return
        ids, batch = [it.request_id for it, _ in items], None
    inputs, outputs = batch if batch is not None else (None, None)
    try:
        observer(Served(ids, None, None, None, inputs, outputs, items=items, done=time.perf_counter()))
    except Exception:  # an observer that raises loses its batch's observation, never a response
        log.exception("observing a batch failed")


def _answered(fut: asyncio.Future, res: Any) -> bool:
    """Whether this result is what the (done) future holds: not a timeout or a cancel that came first."""
    return not fut.cancelled() and fut.exception() is None and fut.result() is res
