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
def default_module():
    from optimize import modelio

    return modelio.load_module(modelio.resolve(MODEL))


def build_served(model_dir: Path, cache_dir: Path):
    """Build a written model folder the way `kiln serve` does (compile, parity and accuracy gates); return the version."""
    from service.repository import ModelRepository

    repo = ModelRepository(model_dir.parent, cache_dir)
    (mv,) = repo._versions_for(model_dir)  # noqa: SLF001
    mv.build()
    return mv
