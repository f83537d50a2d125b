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


@dataclass(frozen=True)
class Int8Recipe:
    """How a backend builds INT8 on a given CPU, and why (shown by `kiln optimize quantize` and the report)."""

    name: str
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)  # backend_options the recipe compiles with


class Runner(Protocol):
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str
    # Source formats this backend compiles from, preferred first ("onnx", "pt2").
    source_formats: tuple[str, ...]
    # Precisions this backend can build.
    precisions: tuple[str, ...]
    # Optional, with defaults in BackendBase: Triton's platform name, built formats it serves as they
    # are (service/source.py ARTIFACT_FILES: "openvino_ir", "tflite", "plan", "mlpackage").
    platform: str
    artifact_formats: tuple[str, ...]

    def version(self) -> str: ...

    def available(self) -> tuple[bool, str]: ...

    def compile(self, source: Path, options: CompileOptions, workdir: Path) -> Path: ...

    def load(self, artifact: Path, options: CompileOptions) -> Runner: ...

    def load_artifact(self, path: Path, options: CompileOptions) -> Runner: ...

    def describe(self, artifact: Path) -> dict[str, Any]: ...

    def compile_only(self) -> tuple[bool, str]: ...

    def is_reference(self, source_format: str, options: CompileOptions) -> bool: ...

    # INT8 recipe on a CPU: `mode` "static" (calibrated) or "dynamic"; `units` names the CPU's int8
    # dot-product units in words; `int8_dot`: it has VNNI/AMX/sdot; `x86`: an x86 CPU. None: no such mode.
    # `int8_isa`: the backends.hw ISA flags its int8 kernels exploit, best first (ranks `--backend auto`).
    int8_isa: tuple[str, ...]

    def int8_recipe(self, mode: str, units: str, int8_dot: bool, x86: bool) -> Int8Recipe | None: ...


class BackendBase:
    """Defaults for the optional hooks, so callers call them instead of probing with hasattr."""

    name = ""
    source_formats: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ("fp32",)
    platform = ""
    artifact_formats: tuple[str, ...] = ()
    int8_isa: tuple[str, ...] = ()

    def load_artifact(self, path: Path, options: CompileOptions) -> Runner:
        """Serve an artifact the user brought (one of artifact_formats), built elsewhere."""
        return self.load(path, options)  # type: ignore[attr-defined]

    def describe(self, artifact: Path) -> dict[str, Any]:
        """What compile found out about the artifact (shown in the attempt's details)."""
        return {}

    def compile_only(self) -> tuple[bool, str]:
        """(True, why) when this machine can build and check the artifact but not run it."""
        return False, ""

    def is_reference(self, source_format: str, options: CompileOptions) -> bool:
        """True when a build with these options computes exactly what the FP32 reference computes
        (backends/reference.py), so a gate that cannot run proves nothing either way about it."""
        return False

    def int8_recipe(self, mode: str, units: str, int8_dot: bool, x86: bool) -> Int8Recipe | None:
        """The INT8 recipe this backend compiles on such a CPU; None when it builds no INT8 of that mode."""
        return None


class BackendUnavailable(RuntimeError):
    """The runtime or the hardware the backend needs is missing on this machine."""


class CompileFailed(RuntimeError):
    """Conversion of the source failed; the message says why."""
