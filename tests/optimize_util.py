"""Helpers shared by tests/test_optimize_*.py."""

from __future__ import annotations

import functools
from pathlib import Path

from tests.kiln_server import DEFAULT_REPO

MODEL = DEFAULT_REPO / "digits-cnn"


@functools.lru_cache(maxsize=1)
def splits():
    from optimize import digits

    return digits.load_splits(0)


@functools.lru_cache(maxsize=1)
def default_workload():
    """The bundled model with its default data (digits) and metric (top1)."""
    import tempfile

    from optimize import workload

    return workload.build(str(MODEL), workdir=Path(tempfile.mkdtemp(prefix="kiln-test-")))


def build_served(model_dir: Path, cache_dir: Path):
    """Build a written model folder the way `kiln serve` does (compile, parity and accuracy gates); return the version."""
    from service.repository import ModelRepository

    repo = ModelRepository(model_dir.parent, cache_dir)
    (mv,) = repo._versions_for(model_dir)  # noqa: SLF001
    mv.build()
    return mv


MODELS_PY = Path(__file__).with_name("byom_models.py")
MLP = f"{MODELS_PY}:mlp"
WINE = f"{MODELS_PY}:wine_data"


def trained_weights(factory: str, data: str, path: Path, *, epochs: int, lr: float = 3e-3, **kwargs) -> Path:
    """Train a factory's module briefly on all of its data (so metrics mean something) and save the state dict."""
    import torch

    from optimize import data as dt
    from optimize import train
    from optimize.source import Factory

    file, _, fn = factory.rpartition(":")
    module = Factory(Path(file), fn, kwargs).build()
    d = dt.load_data(data, [])
    train.fit(module, d, d.head(64), epochs=epochs, lr=lr, classifier=True, progress=False, desc="pre-train")
    torch.save(module.state_dict(), path)
    return path
