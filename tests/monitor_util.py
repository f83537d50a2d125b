"""What the monitoring tests read back from a server's capture store: its drift history, and
`kiln monitor export` run until the export holds what a test is waiting for."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.monitor.store import CaptureStore
from tests.kiln_server import ROOT


def drift_history(store_dir: Path, model: str) -> list[dict]:
    store = CaptureStore(store_dir, 1 << 30, readonly=True)  # read only: the cap is the server's business
    try:
        return store.drift_history(model)
    finally:
        store.close()


def drift_history_after(store_dir: Path, model: str, seen: int, timeout: float = 30.0) -> list[dict]:
    """The drift evaluations once the detector has evaluated `seen` rows (it reads them in blocks)."""
    deadline = time.monotonic() + timeout
    while not (history := drift_history(store_dir, model)) or history[-1]["detail"]["seen"] < seen:
        assert time.monotonic() < deadline, history[-1:]
        time.sleep(0.05)
    return history


def export_labelled(store_dir: Path, model: str, out: Path, done: Callable[[dict[str, np.ndarray]], bool],
                    timeout: float = 30.0) -> tuple[subprocess.CompletedProcess, dict[str, np.ndarray]]:
    """`kiln monitor export MODEL --labelled`, again every 0.2 s until `done(arrays)` or `timeout`
    (samples and labels reach the store through the server's worker, one write a second). Returns
    the last run and the arrays of the last export that succeeded ({} when none did)."""
    deadline = time.monotonic() + timeout
    arrays: dict[str, np.ndarray] = {}
    while True:
        proc = subprocess.run([sys.executable, "-m", "service.cli", "monitor", "export", model, "--labelled",
                               "--out", str(out), "--store", str(store_dir)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120, check=False)
        if proc.returncode == 0:
            with np.load(out) as f:
                arrays = {k: f[k] for k in f.files}
            if done(arrays):
                return proc, arrays
        if time.monotonic() > deadline:
            return proc, arrays
        time.sleep(0.2)
