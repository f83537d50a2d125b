"""The long-lived heap is frozen out of Python's cyclic GC (service/heap.py), and model changes still
free what they drop."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

from service.app import create_app
from service.repository import ModelRepository
from service.settings import Settings
from tests.kiln_server import DEFAULT_REPO


def _collector_sees(obj) -> bool:
    """gc.get_objects() lists generations 0-2; frozen objects are in none of them."""
    return any(o is obj for o in gc.get_objects())


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_loaded_models_frozen_unloaded_ones_freed(tmp_path):
    repo = ModelRepository(DEFAULT_REPO, tmp_path / "cache", ["digits-cnn"], freeze_heap=True)
    try:
        repo.load_all()
        mv = repo.get("digits-cnn")
        assert mv.ready, mv.reason
        assert gc.get_freeze_count() > 0
        assert not _collector_sees(mv), "the loaded model is still scanned by every full collection"

        # Garbage made after the freeze (what requests make) is still collected.
        fresh = _Cycle()
        fresh_ref = weakref.ref(fresh)
        assert _collector_sees(fresh)
        del fresh
        gc.collect()
        assert fresh_ref() is None

        # A frozen object is never collected, so unloading must settle the heap again: a model
        # held only by a reference cycle is freed.
        mv.cycle = mv
        model_ref = weakref.ref(mv)
        del mv
        repo.unload("digits-cnn")
        assert repo.settler.pending, "an unload that changed the models must settle the heap"
        repo.settle_pending()  # the settle would run after KILN_GC_SETTLE_DELAY_S of quiet
        assert model_ref() is None, "the unloaded model stayed in memory"

        # Reloading freezes the new model's objects too.
        repo.load("digits-cnn")
        repo.settle_pending()
        assert not _collector_sees(repo.get("digits-cnn"))
    finally:
        repo.close()
    assert gc.get_freeze_count() == 0, "close() must hand the frozen heap back to the collector"


def test_repository_alone_leaves_the_collector_alone(tmp_path):
    repo = ModelRepository(DEFAULT_REPO, tmp_path / "cache", ["digits-cnn"])
    frozen = gc.get_freeze_count()
    try:
        repo.load_all()
        assert gc.get_freeze_count() == frozen
        assert _collector_sees(repo.get("digits-cnn"))
    finally:
        repo.close()


def test_server_setting(monkeypatch, tmp_path):
    settings = Settings(model_repo=DEFAULT_REPO, cache_dir=tmp_path)
    assert create_app(settings).state.repository.freeze_heap is True
    monkeypatch.setenv("KILN_GC_FREEZE", "false")
    assert create_app(Settings(model_repo=DEFAULT_REPO, cache_dir=tmp_path)).state.repository.freeze_heap is False


def test_served_process_freezes_its_heap(server):
    assert "heap settled:" in server.log(), server.log()[-2000:]


def test_settler_coalesces_a_burst_into_one_settle():
    from service.heap import Settler

    settler = Settler(quiet_s=1.0, max_delay_s=10.0)
    try:
        t0 = time.monotonic()
        for _ in range(20):  # twenty model changes in a row
            settler.request()
        assert settler.settles == 0 and settler.pending  # nothing on the caller's path
        deadline = time.monotonic() + 10
        while settler.settles == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.monotonic() - t0 >= 1.0  # after the quiet period
        time.sleep(1.2)
        assert settler.settles == 1 and not settler.pending
    finally:
        settler.close()
    assert gc.get_freeze_count() > 0
    gc.unfreeze()


def test_settler_settles_under_steady_churn_by_the_max_delay():
    from service.heap import Settler

    settler = Settler(quiet_s=0.2, max_delay_s=0.5)
    # When each settle starts: a full collection of this process's heap (torch, ONNX Runtime, ...
    # after the rest of the suite) can outlast the churn on a busy 2-core machine.
    started, settle = [], settler._settle
    settler._settle = lambda: (started.append(time.monotonic()), settle())
    try:
        end = time.monotonic() + 1.3
        while time.monotonic() < end:  # a change every 50 ms: never 0.2 s of quiet
            settler.request()
            time.sleep(0.05)
        during = [t for t in started if t < end]
        assert 1 <= len(during) <= 6, during  # not zero (never quiet), not one per change (26)
    finally:
        settler.close()
    gc.unfreeze()


def test_refused_loads_settle_nothing(tmp_path):
    from service.errors import InvalidInput, NotFound

    repo = ModelRepository(DEFAULT_REPO, tmp_path / "cache", ["digits-cnn"], freeze_heap=True, settle_quiet_s=0.05)
    try:
        repo.load_all()
        before = repo.settler.settles
        for _ in range(10):
            with pytest.raises(NotFound):
                repo.load("no-such-model")
            with pytest.raises(InvalidInput):
                repo.load("../etc")
            with pytest.raises(NotFound):
                repo.unload("no-such-model")
        assert not repo.settler.pending
        time.sleep(0.3)
        assert repo.settler.settles == before
        assert not repo.turns.busy("no-such-model")  # refused names leave nothing behind
    finally:
        repo.close()
