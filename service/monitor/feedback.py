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
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

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


class RecentPredictions:
    """The last `capacity` predictions by request id (any request, sampled or not), for joining
    feedback. Written and read on the event loop only: no lock."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, list] = OrderedDict()

    def put(self, request_id: str, output: np.ndarray, when: float) -> None:
        items = self._items
        # A tuple, not a list: the collector stops tracking a tuple of untracked values at its first
        # young collection, so 100,000 entries never reach the old generation that full collections
        # walk (a list would, and every full collection would stall the event loop on them). A view
        # is copied so an entry holds its own rows, not the whole batch's output.
        items[request_id] = (output if output.base is None else output.copy(), when, False)
        if len(items) > self.capacity:
            items.popitem(last=False)

    def get(self, request_id: str) -> tuple | None:
        """(output, time, labelled), or None for an id not (or no longer) in the index."""
        return self._items.get(request_id)

    def mark_labelled(self, request_id: str) -> None:
        entry = self._items.get(request_id)
        if entry is not None:
            self._items[request_id] = (entry[0], entry[1], True)

    def __len__(self) -> int:
        return len(self._items)


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

    def _task_for(self, output: np.ndarray, rows: int) -> str:
        if self.task == "auto":
            self.task = "classification" if output.reshape(rows, -1).shape[1] > 1 else "regression"
        return self.task

    def score(self, output: np.ndarray, label: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-row scores of a prediction against its label (1/0 correct, or mean abs error), and
        the label as stored (class indices, or values shaped like the output)."""
        rows = output.shape[0] if output.ndim > 1 else 1
        task = self._task_for(output, rows)
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
            predicted = output.reshape(rows, -1).argmax(axis=1)
            return (predicted == flat).astype(np.float64), flat.astype(np.int64)
        if label.dtype == object:
            raise InvalidInput(f"{where}: a regressor's label is numbers, not class names")
        if label.size != output.size:
            raise InvalidInput(f"{where}: label has {label.size} value(s), the prediction {output.size}")
        values = label.reshape(output.shape).astype(np.float64)
        err = np.abs(output.reshape(rows, -1).astype(np.float64) - values.reshape(rows, -1))
        return err.mean(axis=1), values

    def join(self, recent: RecentPredictions, items: list[tuple[str, np.ndarray]], now: float) -> list[Joined]:
        """Score every item without changing any state (a bad item fails the whole request)."""
        out = []
        seen: set[str] = set()
        for i, (rid, label) in enumerate(items):
            entry = recent.get(rid)
            if entry is None:
                out.append(Joined(rid, label, None, "unmatched"))
                continue
            output, when, labelled = entry
            scores, label = self.score(output, label, f"feedback item {i} (id {rid!r})")
            if labelled or rid in seen:
                out.append(Joined(rid, label, None, "duplicate"))
            elif now - when > self.max_delay_s:
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


