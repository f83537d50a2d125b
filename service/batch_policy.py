"""When to run a batch and how many rows to put in it: pure functions over the cost curve.

The batcher (service/batcher.py) holds the queue and the runner threads; every decision it makes
about batching is asked here, from values it passes in (queued rows, the cost curve, the arrival
interval, the configured policy), so each rule can be tested on its own numbers.

- `wait_budget`: seconds worth waiting for more rows. A lone request on an idle runner runs at
  once: waiting pays only when requests arrive faster than the batch held would run (the
  arrival-interval EWMA is shorter than the wait budget), and only where the curve is sublinear
  (running rows+1 together saves ≥ 20 % of a batch-1 call over running them apart). The budget is
  `min(max_queue_delay, t(rows))`: waiting longer than the batch's own run time never pays.
- `is_full`: `max_batch_size` or a preferred batch size dispatches at once.
- `batch_limit`: the size with the best measured cost per row among those the queue can fill, so a
  model that gets slower per row in big batches is not forced into them.
- `copy_beats_call`: whether copying a batch together costs less than one more model call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class BatchPolicy:
    """The model's dynamic-batching configuration (config.yaml `dynamic_batching`)."""

    max_batch_size: int = 0          # 0: never merge requests
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    # The preferred sizes that can be reached, ascending.
    preferred: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cap = max(self.max_batch_size, 1)
        self.preferred = tuple(sorted({s for s in self.preferred_batch_sizes if 0 < s <= cap}))

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1


class CostCurve:
    """Seconds per executed batch size: warm-up timings, then an EWMA of live batches.

    Only batches of at least one row and a finite, non-negative duration are recorded: the curve is
    divided by its sizes (cost per row), so it must never hold a size of 0, whatever it is fed."""

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha
        self._points: dict[int, float] = {}
        self._sorted: list[int] = []

    def observe(self, size: int, seconds: float) -> bool:
        """Record one executed batch; False (and nothing recorded) for a size < 1 or a bad duration."""
        if size < 1 or not math.isfinite(seconds) or seconds < 0:
            return False
        old = self._points.get(size)
        if old is None:
            self._points[size] = seconds
            self._sorted = sorted(self._points)
        else:
            self._points[size] = old + self.alpha * (seconds - old)
        return True

    @property
    def sizes(self) -> list[int]:
        """The measured batch sizes, ascending (each ≥ 1)."""
        return self._sorted

    def __call__(self, size: int) -> float | None:
        """Estimated seconds for `size` rows (interpolated; None before any measurement or for size < 1)."""
        p = self._points
        if size in p:
            return p[size]
        keys = self._sorted
        if not keys or size < 1:
            return None
        lo = max((k for k in keys if k < size), default=None)
        hi = min((k for k in keys if k > size), default=None)
        if lo is None:
            return p[hi] * size / hi
        if hi is None:
            return p[lo] * size / lo
        return p[lo] + (p[hi] - p[lo]) * (size - lo) / (hi - lo)

    def as_dict(self) -> dict[int, float]:
        return {k: self._points[k] for k in self._sorted}

    def fixed_seconds(self) -> float:
        """A call's cost beyond its rows: t(1) minus the per-row slope between the two largest
        measured sizes (inf when there are not two)."""
        keys = self._sorted
        if len(keys) < 2 or keys[0] != 1:
            return float("inf")
        hi, lo = keys[-1], keys[-2]
        slope = (self._points[hi] - self._points[lo]) / (hi - lo)
        return max(0.0, self._points[1] - slope)


class ArrivalRate:
    """EWMA of the seconds between request arrivals (gaps capped at 1 s, so one idle minute does not
    take minutes to forget)."""

    def __init__(self) -> None:
        self.interval = float("inf")
        self.last = 0.0

    def observe(self, now: float) -> None:
        last, self.last = self.last, now
        if not last:  # the first arrival: no gap before it
            return
        gap = now - last
        ia = self.interval
        self.interval = gap if ia == float("inf") else ia + 0.2 * (min(gap, 1.0) - ia)

    def seed(self, interval: float, now: float) -> None:
        """As if arrivals `interval` apart had been seen up to `now`."""
        self.interval, self.last = interval, now - interval


def is_full(rows: int, policy: BatchPolicy) -> bool:
    """The queued rows make a batch to dispatch at once (max_batch_size or a preferred size)."""
    if rows >= policy.max_batch_size:
        return True
    preferred = policy.preferred
    return bool(preferred) and (rows in preferred or rows >= preferred[-1])


def wait_budget(rows: int, policy: BatchPolicy, cost: CostCurve, interarrival: float) -> float:
    """Seconds worth waiting for more rows before running `rows` (0: run now)."""
    if not policy.batching or policy.max_queue_delay_s <= 0 or rows >= policy.max_batch_size:
        return 0.0
    t_rows, t_one, t_next = cost(rows), cost(1), cost(rows + 1)
    if t_rows is None or t_one is None or t_next is None:
        return 0.0
    budget = min(policy.max_queue_delay_s, t_rows)
    if interarrival >= budget:                 # no other request expected in time: run now
        return 0.0
    if t_rows + t_one - t_next < 0.2 * t_one:  # batching this model does not pay
        return 0.0
    return budget


def batch_limit(available: int, cap: int, cost: CostCurve) -> int:
    """Rows to put in the next batch: the size with the best measured cost per row among those the
    queue can fill (within 5 %, the largest). Where batching pays (an MLP) that is everything queued
    up to `cap`; where a bigger batch costs more per row (a CNN whose activations leave the cache) it
    stays small instead of making everyone wait for a slow big batch. Always ≥ 1."""
    cap = max(1, cap)
    keys = cost.sizes
    if not keys:
        return cap
    avail = max(1, min(available, cap))
    per_row = {}
    for b in [k for k in keys if k <= avail] + [avail]:
        t = cost(b)
        if t is not None:
            per_row[b] = t / b
    if not per_row:
        return cap
    best = min(per_row.values())
    return max(b for b, v in per_row.items() if v <= best * 1.05)


def copy_beats_call(call_s: float, copy_row_s: float, rows: int) -> bool:
    """Copying `rows` rows into one batch costs no more than one more model call (both measured at
    warm-up): then a batch whose rows lie apart in memory is copied rather than split."""
    return call_s >= rows * copy_row_s


def runs_inline(instances: int, full_batch_s: float | None, inline_max_s: float) -> bool:
    """Cheap models run on the event loop itself: one instance, and a full batch cheaper than the bound."""
    return instances == 1 and full_batch_s is not None and full_batch_s < inline_max_s
