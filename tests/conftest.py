from __future__ import annotations

import numpy as np
import pytest

from tests.kiln_server import DEFAULT_REPO, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The real server on the default model repository, READY."""
    log_dir = tmp_path_factory.mktemp("kiln-server")
    srv = start_server(DEFAULT_REPO, log_dir=log_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def eval_set():
    with np.load(DEFAULT_REPO / "digits-cnn" / "data" / "eval.npz") as f:
        return f["input"], f["label"]
