"""Drift statistics against independent implementations, and the detector's verdicts on fixed-seed streams."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import stats

from service.errors import InvalidInput
from service.monitor.drift import (
    DriftDetector,
    _kstwo_sf,
    feature_index,
    ks_2samp,
    ks_n,
    ks_quiet_below,
    proportions,
    psi,
    psi_edges,
)
from service.monitor.feedback import LiveQuality, RecentPredictions, parse

FEATURES = 12


def _detector(ref, **kw):
    return DriftDetector(ref, [f"x[{i}]" for i in range(ref.shape[1])], **kw)


def test_ks_statistic_and_p_value_equal_scipy_on_the_same_windows():
    rng = np.random.default_rng(1)
    ref = np.concatenate([rng.normal(size=(300, 6)), rng.integers(0, 17, size=(300, 6)).astype(float)], axis=1)
    det = _detector(ref, window=200, every=50)
    checked = 0
    for step in range(8):
        live = np.concatenate([rng.normal(0.3 * step, 1, size=(50, 6)), rng.integers(0, 17, size=(50, 6))], axis=1)
        (result,) = det.add(live)  # one evaluation every 50 rows
        window = det.window_rows()
        assert len(window) == min(200, 50 * (step + 1)) == result.rows
        for j in range(ref.shape[1]):
            want = stats.ks_2samp(window[:, j], ref[:, j], method="asymp")
            assert abs(result.ks[j] - want.statistic) <= 1e-9, (step, j)
            assert abs(result.p_values[j] - want.pvalue) <= 1e-9, (step, j)
            checked += 1
    assert checked == 8 * 12
    # Ties (the integer features) and a direct call, with the sorted reference as the detector keeps it.
    d, p = ks_2samp(window[:, 7], np.sort(ref[:, 7]))
    want = stats.ks_2samp(window[:, 7], ref[:, 7], method="asymp")
    assert (abs(d - want.statistic), abs(p - want.pvalue)) <= (1e-9, 1e-9)


def test_psi_equals_a_direct_computation():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(500, 3))
    det = _detector(ref, window=100, every=100, bins=10)
    live = rng.normal(0.5, 1.3, size=(100, 3))
    (result,) = det.add(live)
    for j in range(3):
        # Deciles of the reference as bin edges; np.histogram counts each bin half-open [a, b).
        inner = np.quantile(ref[:, j], np.linspace(0, 1, 11)[1:-1])
        edges = np.concatenate([[-np.inf], inner, [np.inf]])
        e = np.histogram(ref[:, j], edges)[0] / len(ref)
        a = np.histogram(live[:, j], edges)[0] / len(live)
        e, a = np.clip(e, 1e-4, None), np.clip(a, 1e-4, None)
        direct = float(np.sum((a - e) * np.log(a / e)))
        assert result.psi[j] == pytest.approx(direct, abs=1e-12)
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0
    # Discrete feature: tied quantiles merge into fewer bins.
    edges = psi_edges(np.array([0.0] * 90 + [1.0] * 10), 10)
    assert len(edges) <= 2 and np.all(np.diff(edges) > 0), edges
    assert proportions(np.array([0.0, 0.0, 1.0, 2.0]), np.array([0.5, 1.5])).tolist() == [0.5, 0.25, 0.25]


def _stream(seed: int, rows: int, shift: float, shifted: tuple[int, ...]):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES))
    x[:, list(shifted)] += shift
    return x


def test_a_one_std_shift_on_a_few_features_is_detected_within_500_rows_and_no_shift_is_not():
    ref = np.random.default_rng(10).normal(size=(256, FEATURES))
    quiet = _detector(ref)  # the defaults: window 250, every 50, p 0.05 Bonferroni
    assert quiet.add(_stream(11, 1, 0.0, ())) == []  # a single row: nothing due
    history = []
    for seed in range(12, 22):  # 500 unshifted rows
        (r,) = quiet.add(_stream(seed, 49 if seed == 12 else 50, 0.0, ()))
        history.append(r.detected)
    assert history == [False] * 10

    shifted = _detector(ref)
    assert len(shifted.add(_stream(30, 250, 0.0, ()))) == 5  # a full, clean window first: 5 evaluations
    first = None
    for i, seed in enumerate(range(31, 41)):  # then a sustained 1-std shift of 3 features
        (r,) = shifted.add(_stream(seed, 50, 1.0, (0, 4, 9)))
        if r.detected and first is None:
            first = 50 * (i + 1)
        if first is not None:
            assert r.detected, "a sustained shift stays detected"
    assert first is not None and first <= 500, first
    assert {"x[0]", "x[4]", "x[9]"} <= set(r.drifted)
    assert set(r.drifted) <= {"x[0]", "x[4]", "x[9]"}


def test_predicted_class_distribution_is_compared_with_the_reference_predictions():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(400, 2))
    ref_classes = rng.integers(0, 4, size=400)
    det = _detector(ref, window=200, every=200, reference_classes=ref_classes, n_classes=4)
    (same,) = det.add(rng.normal(size=(200, 2)), rng.integers(0, 4, size=200))
    assert same.class_p_value > 0.05 and not same.detected
    table = np.stack([np.bincount(det.window_classes(), minlength=4), np.bincount(ref_classes, minlength=4)])
    chi2, p, _, _ = stats.chi2_contingency(table)
    assert (same.class_chi2, same.class_p_value) == (pytest.approx(chi2), pytest.approx(p))
    (skewed,) = det.add(rng.normal(size=(200, 2)), np.where(rng.random(200) < 0.8, 0, rng.integers(0, 4, size=200)))
    assert skewed.detected and skewed.class_p_value < skewed.threshold and not skewed.drifted


def test_feature_index_subsamples_large_inputs_evenly():
    assert feature_index((1, 8, 8), 64).tolist() == list(range(64))
    idx = feature_index((3, 224, 224), 64)
    assert len(idx) == 64 and idx[0] == 0 and idx[-1] == 3 * 224 * 224 - 1 and np.all(np.diff(idx) > 0)


def test_live_accuracy_and_mae_equal_offline_metrics_exactly():
    rng = np.random.default_rng(4)
    recent = RecentPredictions(10_000)
    q = LiveQuality("auto", window=5000)
    logits = rng.normal(size=(3000, 10)).astype(np.float32)
    labels = rng.integers(0, 10, size=3000)
    for i in range(3000):
        recent.put(f"r{i}", logits[i:i + 1], 0.0)
    joined = q.join(recent, [(f"r{i}", np.asarray(labels[i])) for i in range(3000)], now=1.0)
    q.apply(recent, joined)
    assert q.task == "classification" and q.metric == "top1"
    assert q.value() == float(np.mean(np.argmax(logits, axis=1) == labels))
    # A second label for the same request does not count twice.
    again = q.join(recent, [("r0", np.asarray(labels[0]))], now=1.0)
    assert again[0].result == "duplicate"

    reg = LiveQuality("regression", window=1000)
    recent = RecentPredictions(100, "regression")  # the index keeps what its task's join needs
    pred = rng.normal(size=(50, 1, 2))
    truth = rng.normal(size=(50, 1, 2))
    for i in range(50):
        recent.put(str(i), pred[i], 0.0)
    reg.apply(recent, reg.join(recent, [(str(i), truth[i]) for i in range(50)], now=1.0))
    assert reg.value() == float(np.mean(np.abs(pred - truth).reshape(50, -1).mean(axis=1)))


def test_recent_predictions_hold_nothing_the_gc_walks_and_a_fixed_amount_of_memory():
    """An index the cyclic GC tracks makes every full collection walk its 100,000 entries (each a
    cache miss, milliseconds with the event loop stopped); per-request objects would too."""
    import gc

    rng = np.random.default_rng(7)
    recent = RecentPredictions(1000, "classification")
    batch = rng.normal(size=(32, 10)).astype(np.float32)
    for i in range(1000):
        recent.put(f"r{i}", batch[i % 32:i % 32 + 1], 0.0)
    assert recent.get("r999").classes.tolist() == [int(batch[999 % 32].argmax())]
    gc.collect()
    objects, held = len(gc.get_objects()), [recent._ring.nbytes, recent._when.nbytes, recent._ids.nbytes]
    for i in range(1000, 11_000):  # ten times the capacity again
        recent.put(f"r{i}", batch[i % 32:i % 32 + 1], 0.0)
    assert len(recent) == 1000
    gc.collect()
    assert not gc.is_tracked(recent._slots), "the id index is tracked by the cyclic GC"
    assert len(gc.get_objects()) - objects < 50, "the index leaves tracked objects per request"
    assert [recent._ring.nbytes, recent._when.nbytes, recent._ids.nbytes] == held
    recent.mark_labelled("r10005")
    assert recent.get("r10005").labelled is True and recent.get("r10006").labelled is False


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_recent_predictions_evict_oldest_first_and_join_exactly_across_shapes(task):
    """Off-layout predictions (another batch size, another dtype) and commits that wrap the ring
    join exactly as the outputs served; a re-used id answers with its newest prediction."""
    rng = np.random.default_rng(11)
    recent, served = RecentPredictions(300, task), {}
    lazy = RecentPredictions(300, task)  # never read until the end: its id dict is built then
    width = 10 if task == "classification" else 2
    for i in range(1000):
        rows = 3 if i % 7 == 0 else 1
        out = rng.normal(size=(rows, width)).astype(np.float64 if i % 11 == 0 else np.float32)
        recent.put(f"id-{i}", out, float(i))
        lazy.put(f"id-{i}", out, float(i))
        served[f"id-{i}"] = out
        if i % 97 == 0:  # a read between puts writes the pending ones first
            assert recent.get(f"id-{i}").when == float(i)
    # The same id again: a new prediction (the newest, in a slot of its own), which evicts the oldest.
    recent.put("id-800", served["id-800"] + 1, 1000.0)
    lazy.put("id-800", served["id-800"] + 1, 1000.0)
    served["id-800"] = served["id-800"] + 1
    assert len(recent) == 299
    assert all(recent.get(f"id-{i}") is None for i in range(701))  # the oldest went first (id-700 last)
    for i in range(701, 1000):
        rid = f"id-{i}"
        p, out = recent.get(rid), served[rid]
        assert p.rows == out.shape[0] and p.labelled is False
        if task == "classification":
            assert p.values is None and p.classes.tolist() == out.argmax(axis=1).tolist()
        else:
            assert p.classes is None and p.values.shape == out.shape and p.values.dtype == out.dtype
            np.testing.assert_array_equal(p.values, out)
    assert recent.get("id-800").when == 1000.0
    every = [f"id-{i}" for i in range(1000)]
    assert [None if p is None else (p.rows, p.when) for p in lazy.lookup(every)] == \
        [None if p is None else (p.rows, p.when) for p in recent.lookup(every)]
    q = LiveQuality(task, window=10_000)
    ids = [f"id-{i}" for i in range(701, 1000)]
    labels = [served[r].argmax(axis=1) if task == "classification" else served[r] * 0.5 for r in ids]
    joined = q.join(recent, list(zip(ids, labels)), now=1000.0, found=recent.lookup(ids))
    q.apply(recent, joined)
    assert [j.result for j in joined] == ["joined"] * len(ids)
    if task == "classification":
        assert q.value() == 1.0 and q.n == sum(len(served[r]) for r in ids)
    else:
        expected = np.concatenate([np.abs(served[r].astype(np.float64) - label.astype(np.float64)).mean(axis=1)
                                   for r, label in zip(ids, labels)])
        assert q.value() == float(np.mean(expected))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_batch_put_as_its_rows_is_indexed_as_its_requests_one_by_one(task):
    """put_rows (a batch's one output array, a row per request) leaves the index as put_many of the
    same requests' own outputs would: batches first (the layout chosen from a batch), mixed with
    multi-row and other-dtype requests (which split the pending batches), and across the ring's wrap."""
    rng = np.random.default_rng(5)
    width = 10 if task == "classification" else 3
    rows_first, one_by_one = RecentPredictions(250, task), RecentPredictions(250, task)
    served, i = {}, 0
    for b in range(120):
        n = int(rng.integers(1, 9))
        dtype = np.float64 if b % 13 == 5 else np.float32
        block = rng.normal(size=(n, width)).astype(dtype)
        ids = [f"b{i + k}" for k in range(n)]
        i += n
        rows_first.put_rows(ids, block, float(b))
        one_by_one.put_many(ids, [block[k:k + 1] for k in range(n)], float(b))
        served.update({rid: block[k:k + 1].copy() for k, rid in enumerate(ids)})
        if b % 17 == 3:  # a request of two rows between batches
            out = rng.normal(size=(2, width)).astype(np.float32)
            rid = f"b{i}"
            i += 1
            for r in (rows_first, one_by_one):
                r.put(rid, out, float(b))
            served[rid] = out
    every = list(served)
    want, got = one_by_one.lookup(every), rows_first.lookup(every)
    assert sum(p is not None for p in got) == 250 and got[-1] is not None and got[0] is None
    for rid, p, q in zip(every, got, want):
        assert (p is None) == (q is None), rid
        if p is None:
            continue
        assert (p.rows, p.when, p.labelled) == (q.rows, q.when, q.labelled)
        if task == "classification":
            assert p.classes.tolist() == q.classes.tolist() == served[rid].argmax(axis=1).tolist()
        else:
            assert p.values.dtype == q.values.dtype == served[rid].dtype
            np.testing.assert_array_equal(p.values, served[rid])
            np.testing.assert_array_equal(q.values, served[rid])


def test_feedback_bodies_parse_and_bad_ones_say_what_is_wrong():
    assert [(i, a.tolist()) for i, a in parse(b'{"id": "a", "label": 3}')] == [("a", 3)]
    assert len(parse(b'[{"id": "a", "label": 3}, {"id": 7, "label": "seven"}]')) == 2
    assert parse(b'{"feedback": [{"id": "a", "ground_truth": [1.5, 2]}]}')[0][1].tolist() == [1.5, 2.0]
    tensor = parse(b'{"id": "a", "label": {"datatype": "INT64", "shape": [2], "data": [1, 2]}}')[0][1]
    assert tensor.dtype == np.int64 and tensor.tolist() == [1, 2]
    for body, needle in [(b"{", "malformed JSON"), (b"[]", "at least one"), (b'{"label": 1}', "'id'"),
                         (b'{"id": "a"}', "'label' is missing"), (b'{"id": "a", "label": true}', "'label' must"),
                         (b'{"id": "a", "label": {"datatype": "FP32", "shape": [3], "data": [1]}}', "needs 3"),
                         (b'[1]', "expected an object")]:
        with pytest.raises(InvalidInput, match=needle):
            parse(body)
    q, recent = LiveQuality("classification", 10), RecentPredictions(10)
    recent.put("a", np.zeros((2, 10), np.float32), 0.0)
    with pytest.raises(InvalidInput, match="1 label"):
        q.join(recent, [("a", np.asarray(1))], now=0.0)
    with pytest.raises(InvalidInput, match="class index"):
        q.join(recent, [("a", np.asarray([1.5, 2]))], now=0.0)


def test_capture_store_byte_totals_follow_inserts_and_evictions_and_start_from_an_older_file(tmp_path):
    """The size gauge reads per-model totals that triggers keep, not a SUM over every sample."""
    import sqlite3

    from service.monitor.store import CaptureStore, Sample

    def sums(path):
        with sqlite3.connect(path) as db:
            return {(m, v): b for m, v, b in db.execute("SELECT model, version, SUM(bytes) FROM samples "
                                                        "GROUP BY model, version")}

    x = np.zeros((1, 64), np.float32)
    store = CaptureStore(tmp_path, 256 * 1024)
    for k in range(30):  # several times the cap: the oldest samples are evicted on the way
        store.insert(Sample("a" if k % 3 else "b", "1", f"r{k}-{i}", 0.0, 0.0, {"x": x}, {"y": x[:, :10]})
                     for i in range(20))
    assert store.bytes_by_model() == sums(store.path) and len(store.bytes_by_model()) == 2
    store.close()
    with sqlite3.connect(store.path) as db:  # a store written before the totals existed
        db.executescript("DROP TRIGGER sample_bytes_insert; DROP TRIGGER sample_bytes_delete; DROP TABLE sample_bytes")
    store = CaptureStore(tmp_path, 256 * 1024)
    assert store.bytes_by_model() == sums(store.path)
    store.insert([Sample("c", "2", "late", 0.0, 0.0, {"x": x}, {"y": x})])
    assert store.bytes_by_model() == sums(store.path) and ("c", "2") in store.bytes_by_model()
    store.close()


def test_an_evaluation_between_full_p_value_passes_marks_which_p_values_it_computed():
    """Between p_value_interval_s passes only the drifting features' p-values (and the first
    non-drifting one) are computed: result.fresh says which, so stale ones are not published."""
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(500, 4))
    clock = iter(float(t) for t in range(100)).__next__
    det = DriftDetector(ref, [f"f{j}" for j in range(4)], window=200, every=100, p_value_interval_s=1000.0,
                        clock=clock)
    live = rng.normal(size=(400, 4))
    live[:, 0] += 3.0
    results = det.add(live)  # an evaluation every 100 rows
    first, second = results[0], results[-1]
    assert first.fresh is not None and first.fresh.all()
    assert second.fresh is not None and second.fresh[0] and not second.fresh.all()
    assert second.detected and "f0" in second.drifted


def test_a_quiet_statistic_needs_no_p_value_and_the_verdict_stays_exact():
    """At or below ks_quiet_below(n, threshold) a statistic's p-value is at least the threshold:
    checked on every value D takes near that bound for the default window and a reference of 128
    rows. So between full passes an unshifted stream's full windows compute no p-value, and every
    evaluation's verdict and drifting features are those of computing all p-values."""
    n1, n2, tests = 250, 128, 65
    en, threshold = ks_n(n1, n2), 0.05 / tests
    quiet = ks_quiet_below(en, threshold)
    assert 0.1 < quiet < 0.3
    lattice = np.unique(np.abs(np.arange(n1 + 1)[:, None] / n1 - np.arange(n2 + 1)[None, :] / n2))
    near = lattice[(lattice <= quiet) & (lattice > quiet - 0.01)]
    assert len(near) > 100 and all(_kstwo_sf(float(d), en) >= threshold for d in near)
    rng = np.random.default_rng(11)
    ref = rng.normal(size=(n2, 8))
    live = rng.normal(size=(1500, 8))
    live[1000:, 2] += 1.0  # the last 500 rows drift on one feature
    every = _detector(ref, window=n1, every=50, p_value_interval_s=0.0)
    between = _detector(ref, window=n1, every=50, p_value_interval_s=1e9)
    all_computed, skipping = every.add(live), between.add(live)
    assert [r.detected for r in skipping] == [r.detected for r in all_computed]
    assert [r.drifted for r in skipping] == [r.drifted for r in all_computed]
    assert any(r.detected for r in skipping) and not all(r.detected for r in skipping)
    quiet_ones = [r for r in skipping if not r.detected and r.rows == n1]  # a full window: the bound is used
    assert quiet_ones and not any(r.fresh.any() for r in quiet_ones)  # no p-value computed for them


def test_the_capture_countdown_picks_requests_at_the_sample_rate():
    """Gaps between captured requests are geometric: each request captured with probability rate,
    independently, as one draw per request would be (the draw itself is saved)."""
    import random
    from types import SimpleNamespace

    from service.monitor.hub import ModelMonitor

    draw = random.Random(3).random
    for rate in (0.01, 0.25):
        mon = SimpleNamespace(sample_rate=rate, enabled=True, _random=draw)
        gaps = np.array([ModelMonitor.capture_gap(mon) for _ in range(40_000)])
        assert gaps.min() == 1 and abs(gaps.mean() * rate - 1) < 0.03  # E[gap] = 1 / rate
        assert abs(np.mean(gaps == 1) - rate) < 0.01  # P(the very next request) = rate
    assert ModelMonitor.capture_gap(SimpleNamespace(sample_rate=1.0, enabled=True, _random=draw)) == 1
    assert ModelMonitor.capture_gap(SimpleNamespace(sample_rate=0.0, enabled=True, _random=draw)) == float("inf")
    assert ModelMonitor.capture_gap(SimpleNamespace(sample_rate=0.5, enabled=False, _random=draw)) == float("inf")


def test_npy_blobs_are_the_bytes_np_save_writes():
    """to_npy builds the header once per dtype and shape; the blob must stay what np.save writes."""
    import io

    from service.monitor.store import from_npy, to_npy

    rng = np.random.default_rng(7)
    arrays = [rng.random((1, 1, 8, 8), dtype=np.float32), rng.integers(-9, 9, (3, 5)).astype(">i4"),
              np.zeros((0, 4), np.float16), np.array(3.5), np.arange(6, dtype=np.uint8).reshape(2, 3).T,
              np.ones((2, 2), bool), rng.random((4, 300)).astype(np.float64)[:, ::3]]
    for arr in arrays:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        assert to_npy(arr) == buf.getvalue(), (arr.dtype, arr.shape)
        back = from_npy(to_npy(arr))  # as stored since the first version: ascontiguousarray (ndim >= 1)
        assert back.dtype == arr.dtype and np.array_equal(back, np.ascontiguousarray(arr))


def test_drift_history_is_written_with_the_samples_and_trimmed_to_its_limit(tmp_path):
    """Drift rows go into the samples' transaction (or alone); the table is counted every
    TRIM_EVERY of its limit, not at every row, and still ends at its limit, newest rows kept."""
    from service.monitor.store import TRIM_EVERY, CaptureStore, DriftRow, Sample

    store = CaptureStore(tmp_path, 64 << 20)
    store.history_rows = 200
    assert 25 >= store.history_rows * TRIM_EVERY  # so every write below is followed by a count
    x = np.zeros((1, 4), np.float32)
    for k in range(30):  # 750 evaluations for a limit of 200
        rows = [DriftRow("m", "1", float(k * 25 + i), 250, i % 2 == 0, 0.5, 0.1, 0.01, {"seen": k * 25 + i})
                for i in range(25)]
        samples = [Sample("m", "1", f"r{k}", 0.0, 0.0, {"x": x}, {"y": x})] if k % 2 else []
        store.insert(samples, rows)
    history = store.drift_history("m")
    assert [h["detail"]["seen"] for h in history] == list(range(550, 750))
    assert [h["detected"] for h in history[:4]] == [1, 0, 1, 0]
    assert len(list(store.samples("m"))) == 15
    store.close()


def test_the_class_chi_square_equals_scipys_chi2_contingency():
    from service.monitor.drift import chi2_homogeneity

    rng = np.random.default_rng(8)
    for k in (2, 3, 10, 2, 2):  # k = 2: one degree of freedom, where SciPy applies Yates' correction
        table = rng.integers(1, 60, (2, k))
        chi2, p, _, _ = stats.chi2_contingency(table)
        assert chi2_homogeneity(table) == (pytest.approx(chi2, rel=1e-12), pytest.approx(p, rel=1e-9, abs=1e-300))
    table = np.array([[3, 4], [3, 5]])  # |observed - expected| under 0.5: Yates moves it to 0, not past it
    assert chi2_homogeneity(table) == pytest.approx(stats.chi2_contingency(table)[:2])


def test_drift_rows_reach_the_detector_in_blocks_exactly_and_only_the_intervals_budget(tmp_path):
    """Requests of 7 rows. With the default min_interval_s (1 s) the first `every` (50) rows of the
    interval reach the detector, the 8th request split at the block's end, and none after them;
    with min_interval_s 0 every row does (no budget: each request's rows handed over at once). In
    order and exactly, with their predicted classes. Without a reference, once the worker has
    found none, no more rows are copied."""
    from pathlib import Path

    from service.monitor.hub import Monitor
    from service.repository import ModelRepository
    from service.settings import Settings

    repo = ModelRepository(Path(__file__).resolve().parents[1] / "model_repo", tmp_path / "cache", ["digits-cnn"])
    repo.load_all()
    rng = np.random.default_rng(11)
    x = rng.random((50 * 7, 1, 8, 8), dtype=np.float32)
    logits = rng.random((50 * 7, 10), dtype=np.float32)
    try:
        mv = repo.get("digits-cnn")
        drift = mv.config.monitor.drift
        assert (drift.every, drift.window, drift.min_interval_s) == (50, 250, 1.0)  # the defaults
        for interval, taken in ((1.0, 50), (0.0, 350)):
            drift.min_interval_s = interval  # read by the model's monitor when the first request comes
            mon = Monitor(Settings(cache_dir=tmp_path, monitor_dir=tmp_path / f"store-{interval}",
                                   monitor_sample_rate=0.0))
            try:
                for i in range(50):
                    mon.observe(mv, f"r{i}", {"input": x[7 * i:7 * i + 7]}, {"logits": logits[7 * i:7 * i + 7]}, 0.0)
                mon.flush(60)
                model_monitor = mon._models[("digits-cnn", mv.version)]
                deadline = time.monotonic() + 60  # the worker loads the reference first
                while ((model_monitor.detector is None or model_monitor.detector.seen < taken)
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                time.sleep(0.2)  # time for rows past the budget, if any were taken, to arrive
                det = model_monitor.detector
                assert det is not None and det.seen == taken
                last = slice(max(0, taken - 250), taken)  # the window: the last 250 of them
                assert np.array_equal(det.window_rows(), x[last].reshape(-1, 64).astype(np.float64))
                assert np.array_equal(det.window_classes(), logits[last].argmax(axis=1))
            finally:
                mon.close()
        # No reference: once the worker has found that, the event loop stops copying rows.
        mv.config.verify.samples, mv.config.accuracy = None, None
        mon = Monitor(Settings(cache_dir=tmp_path, monitor_dir=tmp_path / "store-none", monitor_sample_rate=0.0))
        try:
            mon.observe(mv, "first", {"input": x[:7]}, {"logits": logits[:7]}, 0.0)
            mon.flush(60)
            model_monitor = mon._models[("digits-cnn", mv.version)]
            deadline = time.monotonic() + 60
            while model_monitor._drift_state != "off" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert model_monitor._drift_state == "off" and model_monitor.detector is None
            for i in range(1, 50):
                mon.observe(mv, f"n{i}", {"input": x[7 * i:7 * i + 7]}, {"logits": logits[7 * i:7 * i + 7]}, 0.0)
            assert model_monitor.drift_reset == float("inf") and model_monitor.block_age(time.time()) is None
        finally:
            mon.close()
    finally:
        repo.close()


@pytest.mark.parametrize("form", ["whole batches", "batches with other rows"])
def test_a_batch_leaves_the_monitor_as_its_requests_one_by_one_would(tmp_path, form):
    """What the batcher hands the monitor per batch (service/batcher.py's Served) leaves the same
    state as its requests handed over one at a time: the same requests captured (the same seeded
    countdown), with their own inputs and outputs; the same predictions in the index; the same
    drift rows. "whole batches" offers the batch's arrays (drift copies them at once), "batches
    with other rows" does not (drift takes each request's own rows)."""
    import random
    from pathlib import Path

    from service.batcher import Served
    from service.monitor.hub import Monitor
    from service.monitor.store import CaptureStore
    from service.repository import ModelRepository
    from service.settings import Settings

    repo = ModelRepository(Path(__file__).resolve().parents[1] / "model_repo", tmp_path / "cache", ["digits-cnn"])
    repo.load_all()
    rng = np.random.default_rng(5)
    rows = rng.integers(1, 4, 60)
    xs = [rng.random((int(n), 1, 8, 8), dtype=np.float32) for n in rows]
    ys = [rng.random((int(n), 10), dtype=np.float32) for n in rows]
    sizes = [1, 8, 3, 5, 2, 7, 4, 6, 1, 9, 2, 3, 5, 4]  # batches of 60 requests
    assert sum(sizes) == 60
    state = {}
    try:
        mv = repo.get("digits-cnn")
        for way in ("one by one", form):
            folder = tmp_path / way
            mon = Monitor(Settings(cache_dir=tmp_path, monitor_dir=folder, monitor_sample_rate=0.2))
            mon._random = random.Random(7).random  # the countdown's draws, the same in both ways
            try:
                if way == "one by one":
                    for i in range(60):
                        mon.observe(mv, f"r{i}", {"input": xs[i]}, {"logits": ys[i]}, 0.0)
                else:
                    first = 0
                    for size in sizes:
                        part = range(first, first + size)
                        whole = form == "whole batches"
                        mon.observer(mv)(Served([f"r{i}" for i in part], [{"input": xs[i]} for i in part],
                                             [{"logits": ys[i]} for i in part], [0.001] * size,
                                             {"input": np.concatenate([xs[i] for i in part])} if whole else None,
                                             {"logits": np.concatenate([ys[i] for i in part])} if whole else None))
                        first += size
                mon.flush(60)
                model_monitor = mon._models[("digits-cnn", mv.version)]
                deadline = time.monotonic() + 60  # the worker loads the reference first
                while (model_monitor.detector is None or model_monitor.detector.seen < 50) and time.monotonic() < deadline:
                    time.sleep(0.05)
                det = model_monitor.detector
                predictions = model_monitor.recent.lookup([f"r{i}" for i in range(60)])
                state[way] = (det.seen, det.window_rows(), det.window_classes(),
                              [(p.rows, p.classes.tolist()) for p in predictions])
            finally:
                mon.close()
            store = CaptureStore(folder, 1 << 30, readonly=True)
            try:
                captured = list(store.samples("digits-cnn"))
            finally:
                store.close()
            assert 4 <= len(captured) <= 25  # about 0.2 of 60
            for s in captured:
                i = int(s.request_id[1:])
                assert np.array_equal(s.inputs["input"], xs[i]) and np.array_equal(s.outputs["logits"], ys[i])
            state[way] += ([s.request_id for s in captured],)
        one, batched = state["one by one"], state[form]
        assert one[0] == batched[0] == 50  # the interval's budget of drift rows
        assert np.array_equal(one[1], batched[1]) and np.array_equal(one[2], batched[2])
        assert np.array_equal(one[1], np.concatenate(xs).reshape(-1, 64)[:50].astype(np.float64))
        assert one[3] == batched[3] == [(len(y), y.argmax(axis=1).tolist()) for y in ys]
        assert one[4] == batched[4]  # the same requests captured
    finally:
        repo.close()
