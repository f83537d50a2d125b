"""Triton's statistics extension (`GET v2/models[/{m}[/versions/{v}]]/stats`, gRPC ModelStatistics):
cumulative counts and durations per phase, from the same tally as the Prometheus series.

Phases as Triton fills them: `success` / `fail` are whole requests; `queue` is the wait in the
batcher, `compute_input` Kiln's decode, `compute_infer` the model call, `compute_output` the encode
(one count per successful request each). `inference_count` counts batch rows, `execution_count`
model calls; `batch_stats` has one entry per executed batch size with that size's model-call time.
Per process: with `--workers N` each worker answers with its own counts.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from . import metrics


class ExecutionStats:
    """Model calls of one model version, by batch size; fed by its batcher (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.executions = 0
        self.last_inference_ms = 0
        self.by_size: dict[int, list] = {}  # batch size -> [count, seconds]

    def record(self, rows: int, compute_s: float) -> None:
        with self._lock:
            self.executions += 1
            self.last_inference_ms = int(time.time() * 1000)
            entry = self.by_size.setdefault(rows, [0, 0.0])
            entry[0] += 1
            entry[1] += compute_s

    def snapshot(self) -> tuple[int, int, dict[int, tuple[int, float]]]:
        with self._lock:
            return self.executions, self.last_inference_ms, {k: (v[0], v[1]) for k, v in self.by_size.items()}


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": int(count), "ns": int(seconds * 1e9)}


def model_statistics(mv) -> dict[str, Any]:
    """One `model_stats` entry (Triton's JSON; the gRPC message has the same field names)."""
    totals = metrics.request_totals(mv.name, mv.version)
    executions, last_ms, by_size = mv.executions.snapshot()
    decode, queue, compute, encode, total = totals.seconds
    n = totals.success
    return {
        "name": mv.name,
        "version": mv.version,
        "last_inference": last_ms,
        "inference_count": totals.rows,
        "execution_count": executions,
        "inference_stats": {
            "success": _duration(n, total),
            "fail": _duration(totals.failed, totals.failed_s),
            "queue": _duration(n, queue),
            "compute_input": _duration(n, decode),
            "compute_infer": _duration(n, compute),
            "compute_output": _duration(n, encode),
            "cache_hit": _duration(0, 0.0),   # Kiln has no response cache
            "cache_miss": _duration(0, 0.0),
        },
        "batch_stats": [{"batch_size": size, "compute_infer": _duration(c, s)}
                        for size, (c, s) in sorted(by_size.items())],
    }


def statistics(repo, model: str | None = None, version: str | None = None) -> dict[str, Any]:
    """`{"model_stats": [...]}` for one model version, one model's versions, or every loaded model."""
    if model:
        versions = [repo.get(model, version)] if version else list(repo.models.get(model, {}).values())
        if not versions:
            repo.get(model)  # raises NotFound with the usual message
    else:
        versions = [mv for vs in list(repo.models.values()) for mv in vs.values()]
    return {"model_stats": [model_statistics(mv) for mv in versions]}
