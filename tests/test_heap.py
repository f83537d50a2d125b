"""The long-lived heap is frozen out of Python's cyclic GC (service/heap.py), and model changes still
free what they drop."""

from __future__ import annotations

import gc
import weakref

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
        assert model_ref() is None, "the unloaded model stayed in memory"

        # Reloading freezes the new model's objects too.
        repo.load("digits-cnn")
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
