"""The one small interface every backend implements.

A backend turns a source model into an artifact (`compile`, a pure function of its inputs so the
result can be cached) and an artifact into a `Runner` (`load`). Nothing else is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str  # v2 datatype
    shape: tuple[int, ...]  # -1 = variable


@dataclass
class CompileOptions:
    precision: str = "fp32"
    max_batch_size: int = 0
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    # Calibration inputs (name -> batch) for int8; None when not given.
    calibration: dict[str, np.ndarray] | None = None
    # Free-form backend knobs from the config's backend_options.
    extra: dict[str, Any] = field(default_factory=dict)

    def cache_fields(self) -> dict[str, Any]:
        """What of the options changes the artifact (calibration is hashed separately)."""
        return {
            "precision": self.precision,
            "max_batch_size": self.max_batch_size,
            "inputs": [vars(t) for t in self.inputs],
            "outputs": [vars(t) for t in self.outputs],
            "extra": self.extra,
        }


class Runner(Protocol):
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str
    # Source formats this backend compiles from, preferred first ("onnx", "pt2").
    source_formats: tuple[str, ...]
    # Precisions this backend can build.
    precisions: tuple[str, ...]

    def version(self) -> str: ...

    def available(self) -> tuple[bool, str]: ...

    def compile(self, source: Path, options: CompileOptions, workdir: Path) -> Path: ...

    def load(self, artifact: Path, options: CompileOptions) -> Runner: ...


class BackendUnavailable(RuntimeError):
    """The runtime or the hardware the backend needs is missing on this machine."""


class CompileFailed(RuntimeError):
    """Conversion of the source failed; the message says why."""
