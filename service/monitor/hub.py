"""The monitor: what the infer path hands over, and the background worker that does the rest.

Request path, in two halves. Per request: only the request's id and start, carried with it through
the batcher (the model version's observer was given to its batcher once, by `Monitor.attach` on its
first request: service/infer.py). Per batch
(`ModelMonitor.observe`, which the batcher calls on the event loop once the batch's futures hold
their results, service/batcher.py): the batch's predictions into the recent-predictions index
(a few list appends; every 256 predictions one vectorized write into its numpy rings,
service/monitor/feedback.py), the capture countdown, and for a captured request one append to a
bounded deque — never a lock, a write or a wait, and paid once per batch rather than once per
request. A full deque drops the sample and counts it (kiln_capture_samples_total{result="dropped"}).
Drift rows (the first `every` rows of each `min_interval_s`: one evaluation's worth) are copied
from the batch's input arrays into one block per model, which goes to the worker as one item when
it is full, when the next interval starts, or when it has waited IDLE_S (the worker asks the loop
for it): one item an evaluation rather than one per request.

Worker thread (`kiln-monitor`): asleep until a batch's worth (WAKE_AT items) is queued, or at most
IDLE_S, so it takes the GIL and the core a few times a second rather than polling; it drains the
deque into the drift windows (service/monitor/drift.py), the capture store
(service/monitor/store.py, one commit a second) and the CloudEvents sink (service/monitor/sink.py).
Feedback (`Monitor.feedback`) is joined on the event loop, against the same index the batches
write, so it needs no lock either (a large body is looked up there and scored in a thread).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .. import metrics as server_metrics
from ..batcher import Observer, Served
from ..errors import InvalidInput
from . import feedback as fb
from . import metrics as mm_metrics
from .drift import DriftDetector, DriftResult, feature_index
from .store import CaptureStore, DriftRow, Sample

log = logging.getLogger("kiln.monitor")

WAKE_AT = 256             # queued items that wake the worker at once (else it wakes every IDLE_S)
IDLE_S = 0.5              # the worker's longest sleep: the latency of a sample or drift row reaching it
BATCH = 512               # items the worker takes at once
WRITE_S = 1.0             # captured samples are written at most once a second: one commit (and its fsync) a second, not one a poll
TICK_S = 2.0              # store size gauges, live-metric history
INLINE_FEEDBACK = 256     # larger feedback bodies are scored in a thread, off the event loop
PREDICTED_CLASS = "predicted_class"


def _resolve(path: str, model_dir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else model_dir / p


class ModelMonitor:
    """One model version's monitoring: its rates, recent predictions, live quality and drift."""

    def __init__(self, hub: Monitor, mv):
        cfg = mv.config.monitor
        self.mv = mv
        self.name, self.version = mv.name, mv.version
        self.enabled = hub.enabled and cfg.enabled
        self.sample_rate = cfg.sample_rate if cfg.sample_rate is not None else hub.sample_rate
        self.batched = mv.config.max_batch_size > 0
        names = [o.name for o in mv.outputs]
        self.output = cfg.output if cfg.output in names else (names[0] if names else None)
        spec = next((o for o in mv.outputs if o.name == self.output), None)
        task = cfg.task
        if task == "auto" and spec is not None and spec.shape and spec.shape[-1] != -1:
            task = "classification" if spec.shape[-1] > 1 else "regression"
        self.recent = fb.RecentPredictions(hub.recent_capacity, task)
        self.quality = fb.LiveQuality(task, cfg.feedback.window, mv.labels, cfg.feedback.max_delay_s)
        # Drift: which flattened elements of which inputs are features (fixed-shape numeric inputs).
        dcfg = cfg.drift
        # Rows per block, and per interval: one evaluation's worth (see the budget below).
        self.drift_rows = dcfg.every
        self.drift_rate = dcfg.sample_rate if (self.enabled and dcfg.enabled) else 0.0
        # (input, its feature elements or None for all of them in order (a plain copy), how many)
        self.features: list[tuple[str, np.ndarray | None, int]] = []
        for t in mv.inputs:
            row_shape = tuple(t.shape[1:] if self.batched else t.shape)
            if t.datatype in ("BYTES", "BOOL") or any(d < 0 for d in row_shape):
                continue
            idx = feature_index(row_shape, dcfg.max_features)
            whole = len(idx) == math.prod(row_shape) and bool(np.all(idx == np.arange(len(idx))))
            self.features.append((t.name, None if whole else idx, len(idx)))
        if not self.features:
            self.drift_rate = 0.0
        self.detector: DriftDetector | None = None
        self._feature_gauges: list[tuple[Any, Any, Any]] | None = None
        # Rows the detector uses: an evaluation every `every` new rows, at most one per
        # min_interval_s. So a busy model feeds it `every` rows per interval (the first ones): each
        # evaluation then sees as many new rows as a quiet model's does, and the rows past them,
        # which only a later evaluation would see and only after more rows replaced them, cost
        # nothing. The window then spans window / every intervals rather than one.
        self.drift_interval = dcfg.min_interval_s
        self.drift_budget, self.drift_reset = (dcfg.every, 0.0) if self.drift_rate > 0 else (0, math.inf)
        # The drift rows are written in place into one block of `every` rows (and the output rows
        # beside them, for the predicted classes), handed to the worker whole: one queue item an
        # evaluation, not one per request.
        self._block: np.ndarray | None = None
        self._block_out: np.ndarray | None = None  # None: some output did not fit (no classes)
        self._block_rows = 0
        self._block_since = 0.0
        self._hand_over, self._room = hub._hand_over, hub._room
        # Capture: a countdown to the next captured request, its gaps drawn from the geometric
        # distribution: the same requests as one random draw per request would pick, without the draw.
        self._random = hub._random
        self.capture_in = self.capture_gap()
        self._drift_state = "new"  # new | on | off (set by the worker)
        self.drift_detected = False
        self.last_live = 0.0
        if self.enabled:
            acc = mv.config.accuracy
            if acc is not None and acc.min_accuracy is not None:
                mm_metrics.LIVE_ACCURACY_MIN.labels(self.name, self.version).set(acc.min_accuracy)
            self.stored = mm_metrics.CAPTURE_SAMPLES.labels(self.name, self.version, "stored")
            self.dropped = mm_metrics.CAPTURE_SAMPLES.labels(self.name, self.version, "dropped")
            self.stored.inc(0)
            self.dropped.inc(0)

    # -- request path -----------------------------------------------------------------------------
    def capture_gap(self) -> float:
        """Requests until the next captured one (1 = the next), for a capture rate of sample_rate."""
        rate = self.sample_rate if self.enabled else 0.0
        if rate <= 0:
            return math.inf
        if rate >= 1:
            return 1
        return 1 + math.floor(math.log(1.0 - self._random()) / math.log1p(-rate))

    def observe(self, served: Served) -> None:
        """One batch's answered requests (service/batcher.py, on the event loop): their predictions
        into the index, the capture countdown, and their rows while drift wants them."""
        now = time.time()
        ids = served.ids
        n = len(ids)
        name = self.output
        if name is not None:
            block = served.batch_outputs.get(name) if served.batch_outputs is not None else None
            if (block is not None and self.batched and block.ndim and len(block) == n
                    and len(next(iter(served.batch_inputs.values()))) == n):  # n rows for n requests: one each
                self.recent.put_rows(ids, block, now)
            elif name in (outputs := served.outputs)[0]:
                self.recent.put_many(ids, [o[name] for o in outputs], now)
        self.capture_in -= n
        while self.capture_in <= 0:  # the request the countdown reached (1 = the batch's first)
            i = n - 1 + self.capture_in
            self.capture_in += self.capture_gap()
            self._capture(served, i, now)
        if self.drift_budget > 0 or now >= self.drift_reset:
            self.take_drift(served, now)

    def _capture(self, served: Served, i: int, now: float) -> None:
        if not self._room():
            self.dropped.inc()
            return
        # Copied now: a binary request's inputs are views of a staging slab, which is reused
        # (warm, without page faults) only once nothing refers to it (service/staging.py).
        inputs = {k: np.array(v) for k, v in served.inputs[i].items()}
        self._hand_over((self, served.ids[i], now, served.seconds[i], inputs, served.outputs[i]))

    def take_drift(self, served: Served, now: float) -> None:
        """The batch's rows into the interval's drift block, while this interval's budget lasts: the
        batch's own arrays at once when it holds no one else's rows, else request by request."""
        if self._drift_state == "off":  # the worker found no usable reference: no more rows
            self.drift_budget, self.drift_reset = 0, math.inf
            return
        if served.batch_inputs is not None and self.drift_rate >= 1.0:
            self._take_rows(served.batch_inputs, served.batch_outputs.get(self.output), now)
            return
        for inputs, outputs in zip(served.inputs, served.outputs):
            if self.drift_rate < 1.0 and self._random() >= self.drift_rate:
                continue
            self._take_rows(inputs, outputs.get(self.output), now)

    def _take_rows(self, inputs: dict[str, np.ndarray], output: np.ndarray | None, now: float) -> None:
        """These arrays' rows into the block (a full block goes to the worker, and the rest of the
        rows start the next one)."""
        if now >= self.drift_reset:
            self.hand_over_block()  # the last interval's rows
            self.drift_reset, self.drift_budget = now + self.drift_interval, self.drift_rows
        arrays = [inputs.get(name) for name, _, _ in self.features]
        if any(a is None for a in arrays):
            return
        rows = arrays[0].shape[0] if self.batched else 1
        first = 0
        while first < rows and (self.drift_budget > 0 or not self.drift_interval):
            n = self._write_rows(arrays, output, rows, first, now)
            first += n
            self.drift_budget -= n
            if self._block_rows >= self.drift_rows:
                self.hand_over_block()

    def _write_rows(self, arrays: list[np.ndarray], output: np.ndarray | None, rows: int, first: int,
                    now: float) -> int:
        """Copy rows first.. of the request's features (and output) into the block; how many fit."""
        window = self.drift_rows
        if self._block is None:
            self._block = np.empty((window, sum(width for _, _, width in self.features)))
            self._block_out = None
            if output is not None and output.size and output.dtype.kind in "biuf":
                self._block_out = np.empty((window, output.size // max(1, rows)), dtype=output.dtype)
            self._block_rows, self._block_since = 0, now
        start = self._block_rows
        n = min(rows - first, window - start)
        if self.drift_interval:
            n = min(n, self.drift_budget)
        col = 0
        for (_, idx, width), arr in zip(self.features, arrays):
            flat = arr.reshape(rows, -1)[first:first + n]
            self._block[start:start + n, col:col + width] = flat if idx is None else flat[:, idx]
            col += width
        out = self._block_out
        if out is not None:
            if output is not None and output.dtype == out.dtype and output.size == rows * out.shape[1]:
                out[start:start + n] = output.reshape(rows, -1)[first:first + n]
            else:
                self._block_out = None
        self._block_rows = start + n
        return n

    def block_age(self, now: float) -> float | None:
        """Seconds since the drift block got its first row; None when it holds none."""
        return now - self._block_since if self._block is not None and self._block_rows else None

    def hand_over_block(self) -> None:
        """Queue the block's rows for the worker (event loop thread only: it owns the block)."""
        if self._block is None or not self._block_rows:
            return
        n, block, out = self._block_rows, self._block, self._block_out
        self._block, self._block_out, self._block_rows = None, None, 0
        self._hand_over(("drift", self, block[:n], None if out is None else out[:n]))

    # -- worker side ------------------------------------------------------------------------------
    def _init_drift(self) -> None:
        """Load the reference (and, for classifiers, its predictions by the FP32 source). The state
        is set once, at the end: the event loop reads "off" as "stop taking rows"."""
        mv, cfg = self.mv, self.mv.config
        path = cfg.monitor.reference or cfg.verify.samples or (cfg.accuracy.dataset if cfg.accuracy else None)
        if path is None:
            log.info("model %s v%s: no drift reference (monitor.reference, verify.samples or accuracy.dataset): "
                     "drift is off", self.name, self.version)
            self._drift_state = "off"
            return
        from ..verify import load_npz_inputs, run_batched

        try:
            ref = load_npz_inputs(_resolve(path, mv.model_dir), mv.inputs)
            n = len(next(iter(ref.values())))
            parts, names = [], []
            for name, idx, width in self.features:
                flat = ref[name].reshape(n, -1)
                parts.append((flat if idx is None else flat[:, idx]).astype(np.float64))
                names += [f"{name}[{int(i)}]" for i in (range(width) if idx is None else idx)]
            rows = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
            classes = n_classes = None
            if self.quality.task == "classification" and mv.sources:
                from backends.reference import Reference

                out = run_batched(Reference(mv.sources).infer, ref, cfg.max_batch_size)
                pred = dict(zip([o.name for o in mv.outputs], out.values()))[self.output]
                pred = pred.reshape(n, -1)
                classes, n_classes = pred.argmax(axis=1), pred.shape[1]
            d = cfg.monitor.drift
            # No min_interval_s here: take_drift hands over at most `every` rows per interval, so
            # the detector evaluates at most once an interval already, and each block it gets
            # after a full one is evaluated rather than deferred by the worker's wake-up jitter.
            self.detector = DriftDetector(rows, names, window=d.window, every=d.every, p_value=d.p_value,
                                          bins=d.psi_bins, reference_classes=classes, n_classes=n_classes,
                                          p_value_interval_s=d.p_value_interval_s)
        except Exception as err:  # noqa: BLE001 - a bad reference turns drift off for this model, nothing else
            log.warning("model %s v%s: drift reference %s unusable, drift is off: %s: %s", self.name, self.version,
                        path, type(err).__name__, err)
            self._drift_state = "off"
            return
        self._drift_state = "on"
        mm_metrics.DRIFT_DETECTED.labels(self.name, self.version).set(0)
        log.info("model %s v%s: drift against %s (%d reference rows, %d features)", self.name, self.version, path,
                 len(rows), len(names))

    def feed_drift(self, rows: np.ndarray, outputs: np.ndarray | None, history: list[DriftRow]) -> None:
        """A block of rows, with the output rows beside them (for the predicted classes); each
        evaluation that fell due is published and appended to `history` (written with the samples)."""
        if self._drift_state == "new":
            self._init_drift()
        if self._drift_state != "on":
            return
        classes = None
        if self.detector.reference_classes is not None and outputs is not None:
            classes = outputs.argmax(axis=1)
        for result in self.detector.add(rows, classes):
            self._publish(result, history)

    def _gauges(self, features: list[str]) -> list[tuple[Any, Any, Any]]:
        """The (ks, psi, p-value) gauge children of each feature, looked up once: an evaluation
        sets about three per feature, and a lookup by labels costs more than the set."""
        if self._feature_gauges is None:
            m, v = self.name, self.version
            self._feature_gauges = [(mm_metrics.DRIFT_STATISTIC.labels(m, v, f, "ks"),
                                     mm_metrics.DRIFT_STATISTIC.labels(m, v, f, "psi"),
                                     mm_metrics.DRIFT_P_VALUE.labels(m, v, f, "ks")) for f in features]
        return self._feature_gauges

    def _publish(self, r: DriftResult, history: list[DriftRow]) -> None:
        m, v = self.name, self.version
        fresh = r.fresh
        for j, (ks, ps, pv) in enumerate(self._gauges(r.features)):
            ks.set(r.ks[j])
            ps.set(r.psi[j])
            if fresh is None or fresh[j]:
                pv.set(r.p_values[j])
        if r.class_p_value is not None:
            mm_metrics.DRIFT_STATISTIC.labels(m, v, PREDICTED_CLASS, "chi2").set(r.class_chi2)
            mm_metrics.DRIFT_STATISTIC.labels(m, v, PREDICTED_CLASS, "psi").set(r.class_psi)
            mm_metrics.DRIFT_P_VALUE.labels(m, v, PREDICTED_CLASS, "chi2").set(r.class_p_value)
        mm_metrics.DRIFT_DETECTED.labels(m, v).set(1 if r.detected else 0)
        if r.detected != self.drift_detected:
            self.drift_detected = r.detected
            if r.detected:
                log.warning("model %s v%s: drift detected over the last %d rows: %s%s", m, v, r.rows,
                            ", ".join(r.drifted[:8]) or PREDICTED_CLASS, "…" if len(r.drifted) > 8 else "")
            else:
                log.info("model %s v%s: no drift over the last %d rows", m, v, r.rows)
        history.append(DriftRow(m, v, time.time(), r.rows, r.detected, float(r.p_values.min()), float(r.ks.max()),
                                float(r.psi.max()), r.summary()))


class Monitor:
    """Server-wide: settings, the model monitors, the hand-off queue, the worker, store and sink."""

    def __init__(self, settings):
        self.enabled = settings.monitor_enabled
        self.sample_rate = settings.monitor_sample_rate
        self.recent_capacity = settings.monitor_recent_predictions
        self.queue_size = settings.monitor_queue_size
        self._queue: deque = deque()
        self._models: dict[tuple[str, str], ModelMonitor] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._random = random.random
        self.store: CaptureStore | None = None
        self.sink = None
        self._stop = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list = []  # (ModelMonitor, Sample) waiting for the next write
        self._history: list[DriftRow] = []  # drift evaluations waiting for the next write
        # Feedback for stored samples, written after the samples it may label (they wait up to WRITE_S).
        self._pending_labels: list = []
        self._last_write = 0.0
        if not self.enabled:
            return
        folder = settings.monitor_dir or (Path(settings.cache_dir) / "monitor")
        self.store = CaptureStore(folder, settings.monitor_max_bytes)
        if settings.monitor_sink_url:
            from .sink import CloudEventSink

            self.sink = CloudEventSink(settings.monitor_sink_url, buffer=settings.monitor_sink_buffer,
                                       retries=settings.monitor_sink_retries, on_result=self._event_result)
        server_metrics.FORGET_HOOKS.append(self.forget)
        self._thread = threading.Thread(target=self._run, name="kiln-monitor", daemon=True)
        self._thread.start()
        log.info("monitoring: capture %.4g of requests into %s (cap %d bytes)%s", self.sample_rate, self.store.path,
                 settings.monitor_max_bytes, f", CloudEvents to {settings.monitor_sink_url}" if self.sink else "")

    # -- model monitors -------------------------------------------------------------------------
    def for_model(self, mv) -> ModelMonitor:
        key = (mv.name, mv.version)
        mon = self._models.get(key)
        if mon is None or mon.mv is not mv:  # first request, or the model was reloaded
            mon = self._models[key] = ModelMonitor(self, mv)
        return mon

    def live_accuracy(self, model: str, version: str) -> float | None:
        """Top-1 accuracy from feedback labels over the version's live window; None before any label
        or for a regressor. The rollout guard's min_live_accuracy reads it (service/rollout.py)."""
        mon = self._models.get((model, version))
        if mon is None or mon.quality.metric != "top1":
            return None
        return mon.quality.value()

    def forget(self, model: str, version: str) -> None:
        self._models.pop((model, version), None)
        mm_metrics.forget(model, version)

    # -- the infer path ---------------------------------------------------------------------------
    def attach(self, mv) -> None:
        """Give this model version's batcher its observer (None when the version is not monitored):
        the infer path calls it on the version's first request (service/infer.py)."""
        observer = None
        try:
            observer = self.observer(mv)
        except Exception:  # monitoring must never fail a request: this version goes unobserved
            log.exception("monitor: watching %s version %s failed", mv.name, mv.version)
        mv.observe_with(self, observer)

    def observer(self, mv) -> Observer | None:
        """What sees this version's executed batches (service/batcher.py), or None when the version
        is not monitored."""
        mon = self.for_model(mv)
        if self._loop is None:  # the loop that owns the drift blocks (see _run)
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:  # called outside a loop (in-process benchmark)
                pass
        return mon.observe if mon.enabled else None

    def observe(self, mv, request_id: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                start: float) -> None:
        """One answered request handed over outside a batcher (in-process tests and benchmarks):
        the path every batch takes, for a batch of this one request."""
        observer = self.observer(mv)
        if observer is not None:
            observer(Served([request_id], [inputs], [outputs], [time.perf_counter() - start], inputs, outputs))

    def _room(self) -> bool:
        """Whether the hand-off queue takes another item."""
        return len(self._queue) < self.queue_size

    def _hand_over(self, item: tuple) -> None:
        """Queue an item for the worker (the event loop's side: a deque append, no lock). A full
        queue drops it (observe counts a dropped capture before it gets here)."""
        queue = self._queue
        if len(queue) >= self.queue_size:
            return
        queue.append(item)
        if len(queue) == WAKE_AT:  # a batch's worth: wake the worker now (one Event.set per batch)
            self._wake.set()

    def _flush_blocks(self, older_than: float = 0.0) -> None:
        """Hand over the drift blocks filled for at least `older_than` s (on the event loop: a
        quiet model's partial block reaches the worker without waiting for its next request)."""
        try:
            now = time.time()
            for mon in list(self._models.values()):
                age = mon.block_age(now)
                if age is not None and age >= older_than:
                    mon.hand_over_block()
        except Exception:
            log.exception("monitor: handing over drift rows failed")

    # -- feedback ---------------------------------------------------------------------------------
    async def feedback(self, mv, body: bytes) -> dict[str, Any]:
        mon = self.for_model(mv)
        if not mon.enabled:
            raise InvalidInput(f"monitoring is off for model '{mv.name}' version {mv.version} "
                               f"({'KILN_MONITOR_ENABLED=false' if not self.enabled else 'monitor.enabled: false'}): "
                               "no predictions are kept to join feedback with")
        items = fb.parse(body)
        now = time.time()
        if len(items) > INLINE_FEEDBACK:  # looked up here (a snapshot), scored in a thread
            found = mon.recent.lookup([rid for rid, _ in items])
            joined = await asyncio.to_thread(mon.quality.join, mon.recent, items, now, found)
        else:
            joined = mon.quality.join(mon.recent, items, now)
        mon.quality.apply(mon.recent, joined)
        counts = {"joined": 0, "late": 0, "unmatched": 0, "duplicate": 0}
        for j in joined:
            counts[j.result] += 1
        for result, c in counts.items():
            child = mm_metrics.FEEDBACK.labels(mv.name, mv.version, result)
            child.inc(c)
        value, n = mon.quality.value(), mon.quality.n
        metric = mon.quality.metric
        if value is not None:
            (mm_metrics.LIVE_ACCURACY if metric == "top1" else mm_metrics.LIVE_MAE).labels(mv.name, mv.version).set(value)
        mm_metrics.LIVE_LABELS.labels(mv.name, mv.version).set(n)
        if len(self._queue) < self.queue_size:
            # Unmatched labels are not stored: without the prediction their meaning (class names, shape) is unknown.
            self._queue.append(("labels", [(mv.name, mv.version, j.request_id, now, j.label) for j in joined
                                           if j.result != "unmatched"]))
            if value is not None and now - mon.last_live >= 1.0:
                mon.last_live = now
                self._queue.append(("live", mv.name, mv.version, now, metric, value, n))
        return {"model_name": mv.name, "model_version": mv.version, **counts,
                "unmatched_ids": [j.request_id for j in joined if j.result == "unmatched"][:100],
                "live": {"metric": metric, "value": value, "rows": n, "window": mon.quality.window}}

    # -- worker -----------------------------------------------------------------------------------
    def _run(self) -> None:
        last_tick = 0.0
        while True:
            queue = self._queue
            if queue:
                batch = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
                try:
                    self._process(batch)
                except Exception:
                    log.exception("monitor worker: a batch of %d item(s) failed", len(batch))
            elif self._stop:
                self._write_pending()
                return
            else:  # asleep until a batch's worth is queued, a flush, or IDLE_S: a few wake-ups a second
                if not self._wake.wait(IDLE_S):
                    self._request_block_flush(IDLE_S)
                self._wake.clear()
            now = time.monotonic()
            if (self._pending or self._history or self._pending_labels) and now - self._last_write >= WRITE_S:
                self._write_pending()
            if now - last_tick >= TICK_S:
                last_tick = now
                self._tick()

    def _request_block_flush(self, older_than: float) -> None:
        """Ask the event loop for the drift blocks that waited `older_than` s (a quiet model)."""
        loop = self._loop
        now = time.time()
        if loop is None or loop.is_closed() or all(m.block_age(now) is None for m in list(self._models.values())):
            return
        try:
            loop.call_soon_threadsafe(self._flush_blocks, older_than)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _process(self, batch: list) -> None:
        samples: list[tuple[ModelMonitor, Sample]] = []
        labels: list = []
        for item in batch:
            head = item[0]
            if head == "labels":
                labels += item[1]
            elif head == "live":
                self.store.add_live(*item[1:])
            elif head == "drift":
                _, mon, rows, outputs = item
                try:
                    mon.feed_drift(rows, outputs, self._history)
                except Exception:
                    log.exception("monitor: drift of %s v%s failed", mon.name, mon.version)
            else:  # a captured request: inputs copied by observe; outputs may be views of a batch's
                mon, rid, when, latency, inputs, outputs = item
                samples.append((mon, Sample(mon.name, mon.version, rid, when, latency, inputs,
                                            {k: np.array(v) for k, v in outputs.items()})))
        self._pending += samples
        self._pending_labels += labels

    def _write_pending(self) -> None:
        samples, self._pending = self._pending, []
        history, self._history = self._history, []
        labels, self._pending_labels = self._pending_labels, []
        self._last_write = time.monotonic()
        if samples or history:
            self._write_samples(samples, history)
        if labels:
            try:
                self.store.add_labels(labels)
            except Exception:
                log.exception("monitor: writing %d feedback label(s) failed", len(labels))

    def _write_samples(self, samples: list, history: list[DriftRow]) -> None:
        try:
            _, evicted, too_large = self.store.insert((s for _, s in samples), history)
        except Exception:
            log.exception("monitor: writing %d captured sample(s) failed", len(samples))
            for mon, _ in samples:
                mm_metrics.CAPTURE_SAMPLES.labels(mon.name, mon.version, "failed").inc()
        else:
            skipped = {id(s) for s in too_large}
            for mon, s in samples:
                (mon.dropped if id(s) in skipped else mon.stored).inc()
            if too_large:
                log.warning("monitor: %d captured sample(s) larger than a quarter of KILN_MONITOR_MAX_BYTES "
                            "not stored", len(too_large))
            for model, version in evicted:
                mm_metrics.CAPTURE_SAMPLES.labels(model, version, "evicted").inc()
            if self.sink is not None:
                for _, s in samples:
                    self.sink.submit(s.model, s.version, s.request_id, s.time, *cloudevent_bodies(s))

    def _tick(self) -> None:
        try:
            sizes = self.store.bytes_by_model()
        except Exception:
            log.exception("monitor: reading the store size failed")
            return
        for (model, version), mon in list(self._models.items()):
            if mon.enabled:
                mm_metrics.CAPTURE_BYTES.labels(model, version).set(sizes.get((model, version), 0))

    def _event_result(self, model: str, version: str, result: str) -> None:
        mm_metrics.CAPTURE_EVENTS.labels(model, version, result).inc()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the worker has taken everything queued so far, the drift rows of the current
        interval included (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        loop = self._loop
        try:
            on_loop = loop is not None and asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if loop is None or on_loop or loop.is_closed():
            self._flush_blocks()
        else:  # the loop owns the blocks: it hands them over, this thread waits until it has
            done = threading.Event()

            def flush_on_loop() -> None:
                try:
                    self._flush_blocks()
                finally:
                    done.set()

            try:
                loop.call_soon_threadsafe(flush_on_loop)
                done.wait(timeout)
            except RuntimeError:  # the loop closed meanwhile
                pass
        while self._queue and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.01)

    def close(self) -> None:
        if self._thread is None:
            return
        self.flush()
        self._stop = True
        self._wake.set()
        self._thread.join(10)
        if self.sink is not None:
            self.sink.close()
        self.store.close()
        if self.forget in server_metrics.FORGET_HOOKS:
            server_metrics.FORGET_HOOKS.remove(self.forget)


def cloudevent_bodies(s: Sample) -> tuple[bytes, bytes]:
    """The v2 request and response JSON of a captured sample (the CloudEvents' data)."""
    from backends.datatypes import v2_datatype

    from ..protocol import encode_response

    inputs = []
    for name, arr in s.inputs.items():
        datatype = v2_datatype(arr.dtype)
        data = ([b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in arr.reshape(-1)]
                if datatype == "BYTES" else np.ascontiguousarray(arr).reshape(-1))
        inputs.append({"name": name, "datatype": datatype, "shape": list(arr.shape), "data": data})
    request = orjson.dumps({"id": s.request_id, "inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    response, _ = encode_response(s.model, s.version, s.request_id, [(k, v, False) for k, v in s.outputs.items()])
    return request, response
