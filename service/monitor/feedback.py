"""Feedback: ground-truth labels joined to served predictions by request id, and the live metric.

Body of `POST /v2/models/{m}[/versions/{v}]/feedback` (JSON), any of:

    {"id": "req-1", "label": 3}
    [{"id": "req-1", "label": 3}, {"id": "req-2", "label": "seven"}]
    {"feedback": [{"id": "req-3", "label": [0.5, 1.25]}]}
    {"id": "req-4", "label": {"datatype": "FP32", "shape": [1, 2], "data": [0.5, 1.25]}}   (a v2 tensor)

A label is one value per batch row of the request (a class index, a class name from the model's
labels file, or the expected output values). Classifiers score top-1 (argmax of the output
equals the label), regressors the mean absolute error.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import orjson

from backends.datatypes import V2_TO_NUMPY

from ..errors import InvalidInput

MAX_ITEMS = 100_000


def _label_array(raw: Any, where: str) -> np.ndarray:
    if isinstance(raw, dict):  # a v2 tensor
        datatype, shape, data = raw.get("datatype"), raw.get("shape"), raw.get("data")
        if datatype not in V2_TO_NUMPY or datatype == "BYTES":
            raise InvalidInput(f"{where}: label tensor needs a numeric 'datatype', got {datatype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidInput(f"{where}: label tensor 'shape' must be a list of non-negative integers")
        try:
            arr = np.asarray(data, dtype=V2_TO_NUMPY[datatype])
        except (TypeError, ValueError, OverflowError) as err:
            raise InvalidInput(f"{where}: label tensor data is not {datatype}: {err}") from None
        if arr.size != math.prod(shape):
            raise InvalidInput(f"{where}: label tensor shape {shape} needs {math.prod(shape)} values, data has {arr.size}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise InvalidInput(f"{where}: label tensor holds NaN or Inf")
        return arr.reshape(shape)
    if isinstance(raw, bool) or raw is None:
        raise InvalidInput(f"{where}: 'label' must be a number, a class name, a list or a v2 tensor")
    if isinstance(raw, str):
        return np.asarray([raw], dtype=object)
    try:
        arr = np.asarray(raw)
    except (TypeError, ValueError) as err:
        raise InvalidInput(f"{where}: 'label' is not an array: {err}") from None
    if arr.dtype == object or arr.dtype.kind not in "iufU":
        raise InvalidInput(f"{where}: 'label' must hold numbers or class names")
    if arr.dtype.kind == "U":
        arr = arr.astype(object)
    elif arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InvalidInput(f"{where}: 'label' holds NaN or Inf")
    return arr


def parse(body: bytes) -> list[tuple[str, np.ndarray]]:
    """(request id, label array) per item; InvalidInput (400) naming the first bad item."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"malformed JSON in feedback body: {err}") from None
    if isinstance(doc, dict) and "feedback" in doc:
        doc = doc["feedback"]
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise InvalidInput("feedback needs at least one {\"id\": ..., \"label\": ...}")
    if len(items) > MAX_ITEMS:
        raise InvalidInput(f"feedback of {len(items)} items exceeds the limit of {MAX_ITEMS} per request")
    out = []
    for i, item in enumerate(items):
        where = f"feedback item {i}"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where}: expected an object {{\"id\": ..., \"label\": ...}}")
        rid = item.get("id")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "":
            raise InvalidInput(f"{where}: 'id' (the request id of the prediction) is missing")
        key = "label" if "label" in item else "ground_truth" if "ground_truth" in item else None
        if key is None:
            raise InvalidInput(f"{where}: 'label' is missing")
        out.append((str(rid), _label_array(item[key], where)))
    return out


COMMIT = 256               # predictions put() collects before writing them into the index in one step
RING_MAX_BYTES = 64 << 20  # a regressor's value ring larger than this keeps per-entry copies instead


class Prediction(NamedTuple):
    """What the index kept of one served prediction: all a feedback join needs."""

    rows: int                      # batch rows of the output (1 for an unbatched output)
    classes: np.ndarray | None     # a classifier's predicted class per row (argmax)
    values: np.ndarray | None      # a regressor's output, shaped as served
    when: float                    # time.time() when it was served
    labelled: bool                 # a label was already joined to it


def _per_request(outs: list[np.ndarray], blocks: list[int]) -> list[np.ndarray]:
    """Pending outputs with each batch entry (put_rows) split into its requests' one-row views."""
    if not blocks:
        return outs
    at = set(blocks)
    return [row for i, o in enumerate(outs) for row in ([o[j:j + 1] for j in range(len(o))] if i in at else (o,))]


class RecentPredictions:
    """The last `capacity` predictions by request id (any request, sampled or not), for joining
    feedback. Written and read on the event loop only: no lock.

    Per request it keeps only what a join needs (a classifier's predicted class per row, a
    regressor's output values) in numpy rings allocated once: nothing per request that the cyclic
    GC tracks (so no collection walks 100,000 entries) or that eviction frees (a slot is
    overwritten). `put_many` only extends three short lists; every COMMIT predictions, and before
    any read, they are written into the rings at once (one concatenate, one argmax). The id -> slot
    dict is built when feedback first reads the index (a server that gets no feedback never pays
    for it) and kept by each commit from then on. Its keys and values are str and int, so the GC
    does not track it either. A
    prediction of another shape than the one the ring holds (another batch size) keeps a small copy
    of its own, in an object array (which the GC does not walk)."""

    def __init__(self, capacity: int, task: str = "auto"):
        self.capacity = capacity
        self.task = task  # classification | regression | auto: decided by the first prediction
        # Put since the last commit: ids and outputs (a batch extends each once), and each put's time
        # and count of predictions.
        self._pending_ids: list[str] = []
        self._pending_outs: list[np.ndarray] = []
        self._pending_when: list[float] = []
        self._pending_count: list[int] = []
        self._pending_blocks: list[int] = []  # positions in _pending_outs holding several requests' rows (put_rows)
        self._ids = np.empty(capacity, dtype=object)    # request id per slot (None: empty)
        self._when = np.zeros(capacity)
        self._labelled = np.zeros(capacity, dtype=bool)
        self._own = np.empty(capacity, dtype=object)    # None, or (rows, classes, values) of an off-layout entry
        self._owned = False                   # any slot ever held an off-layout entry
        self._layout: tuple[tuple[int, ...], np.dtype] | None = None  # (shape, dtype) the ring holds
        self._ring: np.ndarray | None = None  # classes (capacity,) or values (capacity, size)
        self._written = 0                     # predictions committed so far; the next goes to slot _written % capacity
        self._slots: dict[str, int] = {}      # id -> slot, kept once feedback has read the index
        self._kept = False

    def put(self, request_id: str, output: np.ndarray, when: float) -> None:
        self.put_many([request_id], [output], when)

    def put_many(self, request_ids: list[str], outputs: list[np.ndarray], when: float) -> None:
        """Predictions, each request's own output (service/monitor/hub.py puts each batch at once)."""
        self._pending_ids += request_ids
        self._pending_outs += outputs
        self._pending_when.append(when)
        self._pending_count.append(len(request_ids))
        if len(self._pending_ids) >= COMMIT:
            self.commit()

    def put_rows(self, request_ids: list[str], rows: np.ndarray, when: float) -> None:
        """A batch's predictions as its one output array, a row per request (what the batcher
        executed): one pending entry for the batch, not one view per request."""
        n = len(request_ids)
        self._pending_ids += request_ids
        self._pending_when.append(when)
        self._pending_count.append(n)
        if n > 1:
            self._pending_blocks.append(len(self._pending_outs))
        self._pending_outs.append(rows)
        if len(self._pending_ids) >= COMMIT:
            self.commit()

    def commit(self) -> None:
        """Write the pending predictions into the rings (put does it every COMMIT; reads first)."""
        if not self._pending_ids:
            return
        rids, outs, blocks = self._pending_ids, self._pending_outs, self._pending_blocks
        whens = np.repeat(self._pending_when, self._pending_count)
        self._pending_ids, self._pending_outs, self._pending_blocks = [], [], []
        self._pending_when, self._pending_count = [], []
        cap = self.capacity
        if len(rids) > cap:
            outs, blocks = _per_request(outs, blocks), []
            rids, outs, whens = rids[-cap:], outs[-cap:], whens[-cap:]
        n = len(rids)
        start = self._written % cap
        slots = np.arange(start, start + n) % cap if start + n > cap else slice(start, start + n)
        if self._kept:  # feedback reads this index: the dict follows every write (no catch-up stall)
            slot_of = self._slots
            for s, old in zip(np.arange(cap)[slots].tolist(), self._ids[slots].tolist()):
                if old is not None and slot_of.get(old) == s:
                    del slot_of[old]
            slot_of.update(zip(rids, range(start, start + n)) if start + n <= cap
                           else zip(rids, slots.tolist()))
        self._written += n
        # fromiter: no type discovery over the list, which costs more than the copy
        self._ids[slots] = np.fromiter(rids, dtype=object, count=n)
        self._when[slots] = whens
        self._labelled[slots] = False
        if self._owned:
            self._own[slots] = None
        if self._layout is None:
            outs, blocks = _per_request(outs, blocks), []
            self._choose_layout(outs)
        rows = self._rows_of(outs, n, bool(blocks)) if self._layout is not None else None
        if rows is not None:
            self._ring[slots] = rows
            return
        outs = _per_request(outs, blocks)
        self._owned = True
        index = np.arange(cap)[slots]
        shape, dtype = self._layout or ((), None)
        fits = [o.shape == shape and o.dtype == dtype for o in outs] if self._layout else [False] * n
        if any(fits):
            stack = np.stack([o for o, f in zip(outs, fits) if f]).reshape(sum(fits), -1)
            self._ring[index[fits]] = stack.argmax(axis=1) if self._ring.ndim == 1 else stack
        own = self._own
        for i, (output, fit) in enumerate(zip(outs, fits)):
            if not fit:
                own[index[i]] = self._compact(output)

    def _rows_of(self, outs: list[np.ndarray], n: int, blocks: bool) -> np.ndarray | None:
        """The ring rows of n predictions that all have the ring's layout (one concatenate), else None.
        `blocks`: some entries are a batch's rows (put_rows), so each prediction must be one row."""
        shape, dtype = self._layout
        try:
            if not shape or (shape[0] != 1 if blocks else set(map(len, outs)) != {shape[0]}):
                return None
            stack = np.concatenate(outs)
        except (TypeError, ValueError):  # a 0-d output, or another trailing shape
            return None
        if stack.shape[1:] != shape[1:] or (blocks and len(stack) != n):
            return None
        stack = stack.reshape(n, -1)
        if self._ring.ndim == 1:
            return stack.argmax(axis=1)
        if stack.dtype != dtype or [o.dtype for o in outs].count(dtype) != len(outs):
            return None  # values are kept exactly: no item cast to another dtype
        return stack

    def _choose_layout(self, outs: list[np.ndarray]) -> None:
        """The task (when auto) from the first prediction, and the one (shape, dtype) the ring holds:
        a classifier's first one-row output (kept as its argmax), a regressor's first output."""
        first = outs[0]
        if self.task == "auto":  # as LiveQuality decides: more than one value per row is a classifier
            rows = first.shape[0] if first.ndim > 1 else 1
            self.task = "classification" if rows and first.size // rows > 1 else "regression"
        for output in outs:
            if output.dtype.kind not in "biuf" or output.size == 0:
                continue
            if self.task != "classification":
                if self.capacity * output.nbytes <= RING_MAX_BYTES:
                    self._ring = np.zeros((self.capacity, output.size), dtype=output.dtype)
                    self._layout = (output.shape, output.dtype)
                return
            if output.ndim <= 1 or output.shape[0] == 1:
                self._ring = np.zeros(self.capacity, dtype=np.int64)
                self._layout = (output.shape, output.dtype)
                return

    def _compact(self, output: np.ndarray) -> tuple[int, np.ndarray | None, np.ndarray | None]:
        rows = output.shape[0] if output.ndim > 1 else 1
        if self.task == "classification" and output.dtype.kind in "biuf" and output.size:
            return rows, output.reshape(rows, -1).argmax(axis=1), None
        return rows, None, np.array(output)

    def _index(self) -> dict[str, int]:
        """The id -> slot dict, up to date. Built at the first read (a server that gets no feedback
        never pays for it), then kept by every commit; the newest prediction of a re-used id wins."""
        self.commit()
        if not self._kept:
            cap = self.capacity
            first = self._written % cap if self._written >= cap else 0
            order = np.arange(first, first + min(cap, self._written)) % cap
            self._slots = dict(zip(self._ids[order].tolist(), order.tolist()))
            self._kept = True
        return self._slots

    def get(self, request_id: str) -> Prediction | None:
        """The prediction served under this id, or None for an id not (or no longer) in the index."""
        slot = self._index().get(request_id)
        return None if slot is None else self._prediction(slot)

    def lookup(self, request_ids: list[str]) -> list[Prediction | None]:
        """get() of many ids at once: a snapshot, so the join can run in another thread while the
        event loop keeps writing."""
        slot_of = self._index()
        return [None if (s := slot_of.get(rid)) is None else self._prediction(s) for rid in request_ids]

    def _prediction(self, slot: int) -> Prediction:
        own = self._own[slot]
        if own is not None:
            rows, classes, values = own
        elif self._ring.ndim == 1:
            rows, classes, values = 1, self._ring[slot:slot + 1].copy(), None
        else:
            shape = self._layout[0]
            rows, classes, values = (shape[0] if len(shape) > 1 else 1), None, self._ring[slot].reshape(shape).copy()
        return Prediction(rows, classes, values, float(self._when[slot]), bool(self._labelled[slot]))

    def mark_labelled(self, request_id: str) -> None:
        slot = self._index().get(request_id)
        if slot is not None:
            self._labelled[slot] = True

    def __len__(self) -> int:
        """Distinct ids the index answers for."""
        return len(self._index())


@dataclass
class Joined:
    request_id: str
    label: np.ndarray
    scores: np.ndarray | None   # per row; None when the label is late (stored, not scored)
    result: str                 # joined | late | unmatched | duplicate


class LiveQuality:
    """Top-1 accuracy (classification) or MAE (regression) over the last `window` labelled rows."""

    def __init__(self, task: str, window: int, class_names: list[str] | None = None, max_delay_s: float = 3600.0):
        self.task = task              # classification | regression | auto (decided by the first output seen)
        self.window = window
        self.max_delay_s = max_delay_s
        self.class_index = {n: i for i, n in enumerate(class_names or [])}
        self._scores: deque[float] = deque(maxlen=window)

    @property
    def metric(self) -> str:
        return "mae" if self.task == "regression" else "top1"

    def _task_for(self, p: Prediction) -> str:
        if self.task == "auto":  # the index decided it from the first prediction (the same rule)
            self.task = "classification" if p.classes is not None else "regression"
        return self.task

    def score(self, p: Prediction, label: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-row scores of a prediction against its label (1/0 correct, or mean abs error), and
        the label as stored (class indices, or values shaped like the output)."""
        rows = p.rows
        task = self._task_for(p)
        if task == "classification":
            flat = label.reshape(-1)
            if flat.dtype == object:
                try:
                    flat = np.asarray([self.class_index[n] for n in flat], dtype=np.int64)
                except KeyError as err:
                    raise InvalidInput(f"{where}: unknown class name {err.args[0]!r}") from None
            elif flat.dtype.kind == "f":
                if not np.all(np.isfinite(flat)) or np.any(flat != np.round(flat)):
                    raise InvalidInput(f"{where}: a classifier's label is a class index (an integer)")
                flat = flat.astype(np.int64)
            if flat.size != rows:
                raise InvalidInput(f"{where}: {flat.size} label(s) for a prediction of {rows} row(s)")
            predicted = p.classes if p.classes is not None else p.values.reshape(rows, -1).argmax(axis=1)
            return (predicted == flat).astype(np.float64), flat.astype(np.int64)
        output = p.values
        if output is None:
            raise InvalidInput(f"{where}: a regressor's label for a prediction the index kept as classes "
                               "(RecentPredictions and LiveQuality of different tasks)")
        if label.dtype == object:
            raise InvalidInput(f"{where}: a regressor's label is numbers, not class names")
        if label.size != output.size:
            raise InvalidInput(f"{where}: label has {label.size} value(s), the prediction {output.size}")
        values = label.reshape(output.shape).astype(np.float64)
        err = np.abs(output.reshape(rows, -1).astype(np.float64) - values.reshape(rows, -1))
        return err.mean(axis=1), values

    def join(self, recent: RecentPredictions, items: list[tuple[str, np.ndarray]], now: float,
             found: list[Prediction | None] | None = None) -> list[Joined]:
        """Score every item without changing any state (a bad item fails the whole request).
        `found`: recent.lookup() of the items' ids, taken on the event loop when the join itself
        runs in another thread."""
        if found is None:
            found = recent.lookup([rid for rid, _ in items])
        out = []
        seen: set[str] = set()
        for i, ((rid, label), entry) in enumerate(zip(items, found)):
            if entry is None:
                out.append(Joined(rid, label, None, "unmatched"))
                continue
            scores, label = self.score(entry, label, f"feedback item {i} (id {rid!r})")
            if entry.labelled or rid in seen:
                out.append(Joined(rid, label, None, "duplicate"))
            elif now - entry.when > self.max_delay_s:
                out.append(Joined(rid, label, None, "late"))
            else:
                out.append(Joined(rid, label, scores, "joined"))
            seen.add(rid)
        return out

    def apply(self, recent: RecentPredictions, joined: list[Joined]) -> None:
        for j in joined:
            if j.result in ("joined", "late"):
                recent.mark_labelled(j.request_id)
            if j.scores is not None:
                self._scores.extend(j.scores.tolist())

    @property
    def n(self) -> int:
        return len(self._scores)

    def value(self) -> float | None:
        """The metric over the window: the same float numpy gives for these scores (np.mean)."""
        if not self._scores:
            return None
        return float(np.mean(np.fromiter(self._scores, dtype=np.float64, count=len(self._scores))))


