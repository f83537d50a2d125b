"""The dynamic batcher on its own, with real ONNX Runtime runners (no HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.ort import OnnxRuntimeRunner
from service.batcher import Batcher, BatchPolicy, Calibration, CostCurve
from service.staging import gather
from service.errors import Unavailable


def linear_model(path, n_in=16, n_out=4, seed=0):
    """y = x @ W + b with a dynamic batch dim: every row's output depends on that row only."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "lin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def ort_runner(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return OnnxRuntimeRunner(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))


class Gated:
    """A real runner that blocks until the test opens the gate (to fill the queue)."""

    def __init__(self, runner):
        self.runner = runner
        self.gate = threading.Event()
        self.started = threading.Event()

    def infer(self, inputs):
        self.started.set()
        self.gate.wait(10)
        return self.runner.infer(inputs)

    def close(self):
        pass


class Broken:
    """A runner whose every batch fails."""

    def infer(self, inputs):
        raise RuntimeError("boom")

    def close(self):
        pass


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return linear_model(tmp_path_factory.mktemp("lin") / "lin.onnx")


@pytest.mark.parametrize("mode", ["threads", "inline", "two-instances", "staged"])
def test_each_client_gets_its_own_rows_in_order(model_path, mode):
    """`staged`: inputs live in Batcher.staging memory, as the HTTP protocol receives them, so
    batches of adjacent requests are views of the slab instead of copies."""
    runners = [ort_runner(model_path) for _ in range(2 if mode == "two-instances" else 1)]
    sizes = []
    b = Batcher("lin", "1", runners, BatchPolicy(16, 0.004, (4, 8, 16), 10_000),
                on_batch=lambda rows, s: sizes.append(rows))
    b.calibrate({"x": np.zeros((1, 16), np.float32)})
    b.inline = mode == "inline"
    ref = ort_runner(model_path)
    rng = np.random.default_rng(1)
    requests = [rng.standard_normal((int(rng.integers(1, 6)), 16)).astype(np.float32) for _ in range(300)]
    sizes.clear()

    async def client(x, delay):
        await asyncio.sleep(delay)
        if mode == "staged":
            region = b.staging(x.nbytes)
            assert region is not None
            staged = np.frombuffer(region, np.float32).reshape(x.shape)
            staged[...] = x
            x = staged
        out, queue_s, compute_s = await b.submit({"x": x})
        return out, queue_s, compute_s

    async def main():
        return await asyncio.gather(*(client(x, (i % 7) * 0.0005) for i, x in enumerate(requests)))

    try:
        results = asyncio.run(main())
    finally:
        b.close()
    for x, (out, queue_s, compute_s) in zip(requests, results):
        assert set(out) == {"y"}
        assert out["y"].shape == (len(x), 4)
        np.testing.assert_allclose(out["y"], ref.infer({"x": x})["y"], rtol=1e-5, atol=1e-5)
        assert queue_s >= 0 and compute_s > 0
    assert sum(sizes) == sum(len(x) for x in requests)
    assert max(sizes) > 5, f"requests were never merged: batch sizes {sorted(set(sizes))}"
    assert max(sizes) <= 16


def test_staging_memory_makes_adjacent_requests_one_view(model_path):
    """The batcher hands out staging regions (its slabs: tests/test_staging.py) for whole rows only."""
    b = Batcher("lin", "1", [ort_runner(model_path)], BatchPolicy(16, 0.004, (4, 8, 16), 100))
    try:
        b.calibrate({"x": np.zeros((1, 16), np.float32)})
        b.inline = False  # a model this small would run inline, where staging is not used
        rows = (1, 3, 2)
        arrays = []
        for i, n in enumerate(rows):
            a = np.frombuffer(b.staging(n * 64), np.float32).reshape(n, 16)  # 64 bytes per row
            a[...] = i + np.arange(n * 16, dtype=np.float32).reshape(n, 16)
            arrays.append(a)
        joined = gather(arrays)
        assert joined.shape == (6, 16) and np.shares_memory(joined, arrays[0])  # a view, no copy
        np.testing.assert_array_equal(joined, np.concatenate(arrays))
        # Not adjacent (another region in between) or not staged at all: a copy, same values.
        gap = b.staging(64)
        apart = np.frombuffer(b.staging(64), np.float32).reshape(1, 16)
        assert gap is not None
        mixed = gather([arrays[0], apart, np.ones((2, 16), np.float32)])
        assert not np.shares_memory(mixed, arrays[0]) and mixed.shape == (4, 16)
        assert b.staging(17 * 64) is None  # over max_batch_size
        assert b.staging(100) is None      # not whole rows
        b.inline = True
        assert b.staging(64) is None       # inline models concatenate on the loop
    finally:
        b.close()


class Recording:
    """A real runner that records each batch's input and waits for the test's gate first."""

    def __init__(self, runner):
        self.runner = runner
        self.gate = threading.Event()
        self.batches: list[np.ndarray] = []

    def infer(self, inputs):
        self.gate.wait(10)
        self.batches.append(inputs["x"])
        return self.runner.infer(inputs)

    def close(self):
        pass


@pytest.mark.parametrize("case", ["out-of-order", "across-slabs", "copy-is-cheaper"])
def test_batches_follow_staging_memory(model_path, case):
    """Staged requests that complete out of order, or whose regions straddle two slabs, still make
    batches that are views of the slab (service/batcher.py `_in_memory_order`), unless one more model
    call costs more than copying; every client still gets its own rows."""
    rec = Recording(ort_runner(model_path))
    b = Batcher("lin", "1", [rec], BatchPolicy(16, 0.0, (), 100))
    ref = ort_runner(model_path)
    try:
        rec.gate.set()
        b.calibrate({"x": np.zeros((1, 16), np.float32)})
        rec.gate.clear()
        rec.batches.clear()
        b.inline = False
        b.cost = CostCurve()
        _fake_slow_curve(b)  # batching pays: the batch size is what the queue holds, not cost-curve noise
        row_bytes = b.calibration.row_bytes
        if case == "copy-is-cheaper":
            b.calibration = Calibration(row_bytes, copy_row_s=0.0, call_s=1.0)
        else:
            b.calibration = Calibration(row_bytes, copy_row_s=1.0, call_s=0.0)
        if case != "out-of-order":
            # The slab holds 16 rows: three more fit, the next three go to a new slab. (Kept: a slab
            # nothing refers to starts over.)
            filler = b.staging(13 * 64)  # noqa: F841
        rng = np.random.default_rng(3)
        xs, staged = [], []
        for _ in range(6):
            x = rng.standard_normal((1, 16)).astype(np.float32)
            a = np.frombuffer(b.staging(64), np.float32).reshape(1, 16)
            a[...] = x
            xs.append(x)
            staged.append(a)
        order = [2, 0, 1, 4, 3, 5] if case == "out-of-order" else list(range(6))

        async def main():
            blocker = asyncio.ensure_future(b.submit({"x": np.zeros((1, 16), np.float32)}))
            await asyncio.sleep(0.05)  # the runner holds the blocker at the gate; the six queue up
            futs = {i: asyncio.ensure_future(b.submit({"x": staged[i]})) for i in order}
            await asyncio.sleep(0.01)
            rec.gate.set()
            await blocker
            return {i: (await f)[0]["y"] for i, f in futs.items()}

        outs = asyncio.run(main())
    finally:
        rec.gate.set()
        b.close()
    for i, x in enumerate(xs):
        np.testing.assert_allclose(outs[i], ref.infer({"x": x})["y"], rtol=1e-5, atol=1e-5)
    batches = rec.batches[1:]  # after the blocker
    views = [any(np.shares_memory(batch, a) for a in staged) for batch in batches]
    if case == "out-of-order":
        assert [len(x) for x in batches] == [6] and views == [True]
        np.testing.assert_array_equal(batches[0], np.concatenate(xs))  # address order
    elif case == "across-slabs":
        assert [len(x) for x in batches] == [3, 3] and views == [True, True]
    else:
        assert [len(x) for x in batches] == [6] and views == [False]


def test_mixed_shapes_are_never_merged(tmp_path):
    """Requests whose non-batch dims differ go to different batches (a model with a variable dim)."""
    # Row sums: the batch dim stays, the variable dim n is summed away.
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)], "sum",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])], [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "sum.onnx"))
    b = Batcher("sum", "1", [ort_runner(tmp_path / "sum.onnx")], BatchPolicy(8, 0.002, (), 100))
    xs = [np.full((2, n), 1.0, np.float32) for n in (3, 5, 3, 5, 7, 3)]

    async def main():
        return await asyncio.gather(*(b.submit({"x": x}) for x in xs))

    try:
        results = asyncio.run(main())
    finally:
        b.close()
    for x, (out, _, _) in zip(xs, results):
        np.testing.assert_array_equal(out["y"], np.full(2, x.shape[1], np.float32))


def test_full_queue_is_503_with_retry_after(model_path):
    gated = Gated(ort_runner(model_path))
    b = Batcher("lin", "1", [gated], BatchPolicy(4, 0.0, (), max_queue_size=3))
    x = np.ones((1, 16), np.float32)

    async def main():
        first = asyncio.ensure_future(b.submit({"x": x}))
        while not gated.started.is_set():      # the runner holds the first request
            await asyncio.sleep(0.001)
        queued = [asyncio.ensure_future(b.submit({"x": x})) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert b.queue_depth() == 3
        with pytest.raises(Unavailable) as err:
            await b.submit({"x": x})
        gated.gate.set()
        done = await asyncio.gather(first, *queued)
        return err.value, done

    try:
        exc, done = asyncio.run(main())
    finally:
        gated.gate.set()
        b.close()
    assert exc.status == 503 and exc.retry_after and exc.retry_after >= 1
    assert "max_queue_size 3" in exc.message
    assert len(done) == 4


def _fake_slow_curve(b: Batcher, base: float = 0.010) -> None:
    """A cost curve where batching pays a lot (t(n) = base + 0.1 ms * n)."""
    for n in range(1, 17):
        b.cost.observe(n, base + 0.0001 * n)


def test_lone_request_runs_at_once(model_path):
    """Concurrency 1: no added delay, even with a long max_queue_delay and a curve that favours waiting."""
    b = Batcher("lin", "1", [ort_runner(model_path)], BatchPolicy(16, 0.050, (8, 16), 100))
    _fake_slow_curve(b)
    x = np.ones((1, 16), np.float32)

    async def main():
        waits = []
        for _ in range(20):
            _, queue_s, _ = await b.submit({"x": x})
            waits.append(queue_s)
            await asyncio.sleep(0.02)  # a closed-loop client with think time: arrivals slower than t(1)
        return waits

    try:
        waits = asyncio.run(main())
    finally:
        b.close()
    assert sorted(waits)[len(waits) // 2] < 0.002, waits
    assert max(waits) < 0.010, waits


def test_wait_bounded_by_max_queue_delay_and_coalesces(model_path):
    """Under a fast arrival stream the batcher waits for more rows, never longer than max_queue_delay_ms."""
    # Delays ten times a loaded CI core's thread wake-up jitter, so the bounds below stay meaningful there.
    delay = 0.050
    sizes = []
    b = Batcher("lin", "1", [ort_runner(model_path)], BatchPolicy(16, delay, (16,), 100),
                on_batch=lambda rows, s: sizes.append(rows))
    _fake_slow_curve(b, base=0.100)  # t(1) = 100.1 ms > delay: the budget is max_queue_delay itself
    x = np.ones((1, 16), np.float32)

    async def main():
        b.arrivals.seed(0.010, time.perf_counter())  # a stream of arrivals 10 ms apart has been seen
        t0 = time.perf_counter()
        first = asyncio.ensure_future(b.submit({"x": x}))
        await asyncio.sleep(0.020)
        second = asyncio.ensure_future(b.submit({"x": x}))
        (_, q1, _), (_, q2, _) = await asyncio.gather(first, second)
        lone_t0 = time.perf_counter()
        b.arrivals.seed(0.010, time.perf_counter())
        _, q3, _ = await b.submit({"x": x})  # nobody else comes: runs when the delay is spent
        return q1, q2, q3, time.perf_counter() - t0, time.perf_counter() - lone_t0

    try:
        q1, q2, q3, _, lone_total = asyncio.run(main())
    finally:
        b.close()
    slack = 0.025  # thread wake-up on a busy CI core
    assert sizes[0] == 2, f"the two requests were not merged: {sizes}"
    assert q1 <= delay + slack, q1
    assert q1 >= 0.015, q1  # it did wait for the second request
    assert delay * 0.8 <= q3 <= delay + slack, q3
    assert lone_total < delay + 0.1


def test_cost_curve_interpolates():
    b = Batcher("x", "1", [], BatchPolicy(32, 0.002, (), 10))
    b.cost.observe(1, 0.001)
    b.cost.observe(8, 0.004)
    assert b.cost(1) == 0.001 and b.cost(8) == 0.004
    assert abs(b.cost(4) - (0.001 + 0.003 * 3 / 7)) < 1e-12
    assert abs(b.cost(16) - 0.008) < 1e-12
    b.close()


def test_runner_error_fails_only_that_batch(model_path):
    b = Batcher("lin", "1", [Broken()], BatchPolicy(4, 0.0, (), 10))

    async def main():
        with pytest.raises(Exception) as err:
            await b.submit({"x": np.ones((1, 16), np.float32)})
        return err.value

    try:
        exc = asyncio.run(main())
    finally:
        b.close()
    assert exc.status == 500 and "boom" in exc.message


def test_inline_path_leaves_only_for_cpu_heavy_batches():
    """A batch that is slow on the wall clock (preempted, sleeping) keeps a cheap model inline; three
    batches in a row that burn CPU beyond the bound move it to the runner threads."""

    class Runner:
        def __init__(self):
            self.mode = "sleep"

        def infer(self, inputs):
            if self.mode == "sleep":
                time.sleep(0.010)
            else:
                end = time.thread_time() + 0.006
                while time.thread_time() < end:
                    pass
            return {"y": inputs["x"]}

        def close(self):
            pass

    r = Runner()
    b = Batcher("cpu", "1", [r], BatchPolicy(8, 0.0, (), 100))
    b.inline = True
    x = np.ones((1, 2), np.float32)

    async def main(n):
        for _ in range(n):
            await b.submit({"x": x})

    try:
        asyncio.run(main(5))
        assert b.inline, "wall-clock slowness moved the model off the inline path"
        r.mode = "spin"
        asyncio.run(main(2))
        assert b.inline
        asyncio.run(main(1))
        assert not b.inline
        asyncio.run(main(2))  # and it still answers, now from a runner thread
    finally:
        b.close()


def test_crashed_runner_is_replaced(model_path):
    """A runner whose session is gone fails every batch; after a few failures it is rebuilt."""
    from service.batcher import REPLACE_AFTER_FAILURES

    crashed = ort_runner(model_path)
    crashed.close()  # the session is gone: every infer raises, as after a native crash
    b = Batcher("lin", "1", [crashed], BatchPolicy(4, 0.0, (), 10), rebuild=lambda: ort_runner(model_path))
    x = np.ones((2, 16), np.float32)

    async def main():
        outcomes = []
        for _ in range(REPLACE_AFTER_FAILURES + 2):
            try:
                out, _, _ = await b.submit({"x": x})
                outcomes.append(out["y"].shape)
            except Exception as exc:  # noqa: BLE001 - the test records what each request got
                outcomes.append(type(exc).__name__)
        return outcomes

    try:
        outcomes = asyncio.run(main())
    finally:
        b.close()
    assert outcomes[:REPLACE_AFTER_FAILURES] == ["InferenceFailed"] * REPLACE_AFTER_FAILURES
    assert outcomes[REPLACE_AFTER_FAILURES:] == [(2, 4), (2, 4)]
    assert b.replaced == 1


@pytest.mark.parametrize("mode", ["threads", "inline"])
def test_zero_row_batch_leaves_the_cost_curve_and_the_queue_working(model_path, mode):
    """A 0-row request reaching the batcher (the HTTP route refuses it first, with 400) runs, is
    never recorded in the cost curve, and every later request is still answered."""
    b = Batcher("lin", "1", [ort_runner(model_path)], BatchPolicy(16, 0.002, (), 100))
    ref = ort_runner(model_path)
    try:
        b.calibrate({"x": np.zeros((1, 16), np.float32)})
        b.inline = mode == "inline"
        sizes = list(b.cost.as_dict())
        x = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)

        async def main():
            empty, _, _ = await b.submit({"x": np.zeros((0, 16), np.float32)})
            outs = await asyncio.gather(*(b.submit({"x": x}) for _ in range(20)))
            return empty, outs

        empty, outs = asyncio.run(main())
    finally:
        b.close()
    assert empty["y"].shape == (0, 4)
    assert 0 not in b.cost.sizes and set(b.cost.sizes) >= set(sizes)
    for out, _, _ in outs:
        np.testing.assert_allclose(out["y"], ref.infer({"x": x})["y"], rtol=1e-5, atol=1e-5)
    assert b.broken is None


@pytest.mark.parametrize("mode", ["threads", "inline"])
def test_a_broken_batcher_says_so_at_once(model_path, mode, caplog):
    """A fault in the batcher itself (here the on_batch hook raising after a batch ran: in the runner
    thread, or in the event-loop callback inline) breaks it: the request in that batch and every
    later one get 503 with the reason at once, not a timeout; the owner is told; the log says why."""
    told = []

    def faulty_hook(rows, seconds):
        raise ZeroDivisionError("division by zero")

    b = Batcher("lin", "1", [ort_runner(model_path)], BatchPolicy(16, 0.0, (), 100),
                on_batch=faulty_hook, on_broken=told.append)
    try:
        b.calibrate({"x": np.zeros((1, 16), np.float32)})
        b.inline = mode == "inline"
        x = np.ones((1, 16), np.float32)

        async def main():
            outcomes = []
            for _ in range(3):
                t0 = time.perf_counter()
                try:
                    await asyncio.wait_for(b.submit({"x": x}), 5)
                    outcomes.append(("ok", time.perf_counter() - t0))
                except Unavailable as exc:
                    outcomes.append((exc.message, time.perf_counter() - t0))
            return outcomes

        with caplog.at_level("ERROR", logger="kiln.batcher"):
            outcomes = asyncio.run(main())
    finally:
        b.close()
    assert b.broken and "ZeroDivisionError" in b.broken
    assert told == [b.broken]
    for message, seconds in outcomes:
        assert "is not ready" in message and "ZeroDivisionError" in message, outcomes
        assert seconds < 1.0, outcomes
    assert any("batcher broken" in r.getMessage() and r.exc_info for r in caplog.records)
    if mode == "threads":
        assert not any(w.thread.is_alive() for w in b.workers)


@pytest.mark.parametrize("mode", ["threads", "inline"])
def test_observer_sees_each_batch_once_with_its_answered_requests(model_path, mode):
    """With an observer set, enqueue(request_id=...) hands it one Served per batch, on the event
    loop, after the futures hold their results: each request's id, own inputs and outputs, and the
    whole batch's arrays when the batch is exactly the observed requests. Requests without an id (a
    rollout's shadow copies) are left out, and then the batch arrays are not offered."""
    b = Batcher("lin", "1", [ort_runner(model_path)], BatchPolicy(16, 0.004, (16,), 100))
    b.calibrate({"x": np.zeros((1, 16), np.float32)})
    b.inline = mode == "inline"
    seen: list = []
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 16)).astype(np.float32) for _ in range(40)]

    def observer(served):
        seen.append((threading.current_thread() is threading.main_thread(), served,
                     [loop_futures[i].done() for i in (int(r[1:]) for r in served.ids)]))

    b.observer = observer

    loop_futures: list = []

    async def main():
        for i, x in enumerate(xs):  # one burst: the batcher merges them
            loop_futures.append(b.enqueue({"x": x}, None if i % 10 == 9 else f"r{i}", time.perf_counter()))
        return await asyncio.gather(*loop_futures)

    try:
        results = asyncio.run(main())
    finally:
        b.close()
    observed = [rid for _, s, _ in seen for rid in s.ids]
    assert observed == [f"r{i}" for i in range(40) if i % 10 != 9]  # every watched request once, in order
    assert all(on_loop and all(done) for on_loop, _, done in seen)  # on the loop, after the results
    for _, s, _ in seen:
        for rid, x_own, out, secs in zip(s.ids, s.inputs, s.outputs, s.seconds):
            i = int(rid[1:])
            assert x_own["x"] is xs[i] and out["y"] is not None and secs > 0
            np.testing.assert_array_equal(out["y"], results[i][0]["y"])
        if s.batch_inputs is not None:  # the whole batch: exactly these requests' rows, in order
            np.testing.assert_array_equal(s.batch_inputs["x"], np.concatenate([x["x"] for x in s.inputs]))
            np.testing.assert_array_equal(s.batch_outputs["y"], np.concatenate([o["y"] for o in s.outputs]))
    assert len(seen) < 36  # per batch, not per request
    assert any(s.batch_inputs is not None for _, s, _ in seen)


def test_observer_skips_failed_batches_and_timed_out_requests_and_cannot_fail_one(model_path):
    """A failed batch is not observed; a request whose future was completed while its batch ran (a
    timeout) is not in its batch's Served, nor are the batch arrays then; an observer that raises
    loses only its own observation: every response still arrives."""
    futures: dict = {}

    class TimesOutOne:
        """Runs inline, on the loop: fails the 'late' request's future mid-batch, as the timer of
        service/limits.py would."""

        def __init__(self):
            self.runner = ort_runner(model_path)

        def infer(self, inputs):
            futures["late"].set_exception(TimeoutError("gave up"))
            return self.runner.infer(inputs)

        def close(self):
            pass

    b = Batcher("lin", "1", [TimesOutOne()], BatchPolicy(8, 0.0, (), 100))
    b.inline = True  # everything queued in one loop iteration is one batch
    seen: list = []

    def observer(served):
        seen.append(served)
        raise RuntimeError("observer bug")

    b.observer = observer

    async def main():
        start = time.perf_counter()
        for rid, rows in (("first", 1), ("late", 1), ("kept", 2)):
            futures[rid] = b.enqueue({"x": np.full((rows, 16), len(rid), np.float32)}, rid, start)
        out = await asyncio.gather(futures["first"], futures["kept"])
        with pytest.raises(TimeoutError):
            await futures["late"]
        return out

    try:
        out = asyncio.run(main())
    finally:
        b.close()
    assert [o[0]["y"].shape for o in out] == [(1, 4), (2, 4)]
    assert [s.ids for s in seen] == [["first", "kept"]]  # one batch, without the timed-out request
    assert seen[0].batch_inputs is None and [x["x"].shape for x in seen[0].inputs] == [(1, 16), (2, 16)]

    broken = Batcher("lin", "1", [Broken()], BatchPolicy(4, 0.0, (), 10))
    calls: list = []
    broken.observer = calls.append

    async def fail():
        with pytest.raises(Exception, match="boom"):
            await broken.submit({"x": np.ones((1, 16), np.float32)}, "x", 0.0)

    try:
        asyncio.run(fail())
    finally:
        broken.close()
    assert calls == []
