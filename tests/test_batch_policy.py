"""The batching policy (service/batch_policy.py) on its own: pure functions over a cost curve."""

from __future__ import annotations

import math

import pytest

from service.batch_policy import (
    ArrivalRate,
    BatchPolicy,
    CostCurve,
    batch_limit,
    copy_beats_call,
    is_full,
    runs_inline,
    wait_budget,
)


def curve(points: dict[int, float]) -> CostCurve:
    c = CostCurve()
    for size, seconds in points.items():
        c.observe(size, seconds)
    return c


def sublinear(n_max: int = 16, base: float = 0.010, per_row: float = 0.0001) -> CostCurve:
    """Batching pays a lot: t(n) = base + per_row * n."""
    return curve({n: base + per_row * n for n in range(1, n_max + 1)})


def test_cost_curve_interpolates_and_extrapolates():
    c = curve({1: 0.001, 8: 0.004})
    assert c(1) == 0.001 and c(8) == 0.004
    assert c(4) == pytest.approx(0.001 + 0.003 * 3 / 7)
    assert c(16) == pytest.approx(0.008)
    assert CostCurve()(4) is None


def test_cost_curve_ignores_what_it_cannot_divide_by():
    """A batch of 0 rows (or a bad timing) is never recorded, so cost per row never divides by 0."""
    c = curve({1: 0.001, 4: 0.002})
    assert c.observe(0, 0.0005) is False
    assert c.observe(-3, 0.0005) is False
    assert c.observe(2, math.nan) is False and c.observe(2, math.inf) is False and c.observe(2, -1.0) is False
    assert c.sizes == [1, 4] and c(0) is None and c(-1) is None
    assert batch_limit(0, 16, c) >= 1
    zero_only = CostCurve()
    zero_only.observe(0, 0.001)
    assert zero_only.sizes == [] and batch_limit(5, 16, zero_only) == 16


def test_cost_curve_ewma_and_fixed_cost():
    c = curve({1: 0.010, 8: 0.017, 16: 0.025})
    c.observe(1, 0.020)
    assert c(1) == pytest.approx(0.010 + 0.1 * 0.010)
    # slope between the two largest sizes: 1 ms/row, so a call costs t(1) - 1 ms beyond its rows
    assert c.fixed_seconds() == pytest.approx(c(1) - 0.001)
    assert curve({1: 0.01}).fixed_seconds() == math.inf


def test_batch_limit_takes_everything_where_batching_pays():
    c = sublinear()
    assert batch_limit(5, 16, c) == 5
    assert batch_limit(40, 16, c) == 16
    assert batch_limit(0, 16, c) == 1
    assert batch_limit(5, 16, CostCurve()) == 16  # nothing measured yet: up to the cap


def test_batch_limit_stays_small_where_big_batches_cost_more_per_row():
    # A CNN whose activations leave the cache: 4 rows is the cheapest per row.
    c = curve({1: 0.0010, 2: 0.0016, 4: 0.0024, 8: 0.0080, 16: 0.0200})
    assert batch_limit(16, 16, c) == 4
    assert batch_limit(3, 16, c) == 3


def test_is_full_on_max_and_preferred_sizes():
    p = BatchPolicy(16, 0.002, (4, 8, 32, 0), 100)
    assert p.preferred == (4, 8)  # unreachable and non-positive sizes dropped, sorted
    assert [n for n in range(1, 18) if is_full(n, p)] == [4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    plain = BatchPolicy(16, 0.002)
    assert not is_full(15, plain) and is_full(16, plain)


def test_wait_budget_waits_only_when_it_pays():
    p = BatchPolicy(16, 0.005, (), 100)
    c = sublinear()  # t(1) = 10.1 ms: the budget is max_queue_delay
    assert wait_budget(1, p, c, interarrival=0.001) == 0.005
    assert wait_budget(1, p, c, interarrival=0.010) == 0.0   # nobody expected in time: run now
    assert wait_budget(16, p, c, interarrival=0.001) == 0.0  # full
    assert wait_budget(1, BatchPolicy(16, 0.0), c, 0.001) == 0.0          # no delay configured
    assert wait_budget(1, BatchPolicy(0, 0.005), c, 0.001) == 0.0         # no batching
    assert wait_budget(1, p, CostCurve(), 0.001) == 0.0                   # nothing measured
    linear = curve({n: 0.001 * n for n in range(1, 17)})                  # batching saves nothing
    assert wait_budget(1, p, linear, 0.0001) == 0.0
    fast = sublinear(base=0.002)  # t(1) = 2.1 ms < delay: the batch's own run time bounds the wait
    assert wait_budget(1, p, fast, 0.0001) == pytest.approx(fast(1))


def test_arrival_rate_ewma():
    a = ArrivalRate()
    a.observe(10.0)
    assert a.interval == math.inf  # the first arrival has no gap before it
    a.observe(10.002)
    assert a.interval == pytest.approx(0.002)
    a.observe(100.0)  # a long pause counts as 1 s, not 90
    assert a.interval == pytest.approx(0.002 + 0.2 * (1.0 - 0.002))
    a.seed(0.001, 5.0)
    assert a.interval == 0.001 and a.last == pytest.approx(4.999)


def test_copy_and_inline_decisions():
    assert copy_beats_call(call_s=10e-6, copy_row_s=1e-6, rows=8)
    assert not copy_beats_call(call_s=10e-6, copy_row_s=2e-6, rows=8)
    assert runs_inline(1, 0.0002, 0.001)
    assert not runs_inline(2, 0.0002, 0.001) and not runs_inline(1, 0.002, 0.001)
    assert not runs_inline(1, None, 0.001)
