"""Timing a runner: one statistic for the server's `auto` choice, `kiln bench` and `kiln optimize`.

The timed calls are split into blocks and the quietest block's median is the figure: a burst of load
from another process on a shared machine spoils a block, not the result. The spread (interquartile
range of that block) says how much to trust it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    batch: int
    median_ms: float
    spread_ms: float  # interquartile range of the quietest block
    calls: int

    def as_dict(self) -> dict[str, float]:
        return {"batch": self.batch, "median_ms": round(self.median_ms, 5), "spread_ms": round(self.spread_ms, 5),
                "calls": self.calls}


def batch_of(inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """`batch` rows of every input, cycling through the rows there are; batch 0: the inputs as they
    are (a model without a batch dimension: scalars, a state whose batch is not dim 0)."""
    if batch <= 0:
        return inputs
    rows = len(next(iter(inputs.values())))
    idx = np.arange(batch) % rows
    return {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}


def time_runner(runner, inputs: dict[str, np.ndarray], batch: int, runs: int = 60, warmup: int = 10,
                blocks: int = 3, progress=None) -> Timing:
    """Median latency of `runner.infer` on `batch` rows of `inputs` (see the module docstring).

    `progress`, when given, is called once per timed call (a tqdm's `update`, say)."""
    sample = batch_of(inputs, batch)
    for _ in range(warmup):
        runner.infer(sample)
    per_block = max(runs // max(blocks, 1), 5)
    best: list[float] | None = None
    for _ in range(max(blocks, 1)):
        times = []
        for _ in range(per_block):
            t = time.perf_counter()
            runner.infer(sample)
            times.append(time.perf_counter() - t)
            if progress is not None:
                progress(1)
        if best is None or statistics.median(times) < statistics.median(best):
            best = times
    q = statistics.quantiles(best, n=4) if len(best) >= 2 else [best[0]] * 3
    return Timing(batch, statistics.median(best) * 1e3, (q[2] - q[0]) * 1e3, per_block * max(blocks, 1))
