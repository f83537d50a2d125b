"""The gates a compiled model passes before READY: parity with the source, and accuracy.

The reference they compare with is `backends.reference.Reference`, shared with `kiln optimize`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backends import TensorInfo

from backends.datatypes import numpy_dtype


@dataclass
class OutputParity:
    output: str
    max_abs_error: float
    max_rel_error: float
    passed: bool


@dataclass
class ParityResult:
    passed: bool
    samples: int
    atol: float
    rtol: float
    outputs: list[OutputParity] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_npz_inputs(path: Path, inputs: list[TensorInfo], limit: int | None = None) -> dict[str, np.ndarray]:
    """Arrays for each input from an .npz: by input name, or the only/first array for one input."""
    with np.load(path, allow_pickle=False) as data:
        keys = list(data.keys())
        out = {}
        for spec in inputs:
            if spec.name in keys:
                arr = data[spec.name]
            elif len(inputs) == 1 and keys:
                arr = data["x" if "x" in keys else keys[0]]
            else:
                raise ValueError(f"{path}: no array for input '{spec.name}' (arrays: {keys})")
            out[spec.name] = np.ascontiguousarray(arr[:limit] if limit else arr).astype(numpy_dtype(spec.datatype), copy=False)
    return out


def generate_inputs(inputs: list[TensorInfo], batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Golden inputs from the spec when the config names no samples: variable dims become small."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in inputs:
        shape = tuple(batch if (i == 0 and d == -1) else (d if d > 0 else 4) for i, d in enumerate(spec.shape))
        dtype = numpy_dtype(spec.datatype)
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif dtype.kind in "iu":
            out[spec.name] = rng.integers(0, 8, shape).astype(dtype)
        else:
            out[spec.name] = np.array([b"kiln"] * int(np.prod(shape)), dtype=object).reshape(shape)
    return out


def compare(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], atol: float, rtol: float,
            samples: int) -> ParityResult:
    result = ParityResult(passed=True, samples=samples, atol=atol, rtol=rtol)
    for name, ref in expected.items():
        if name not in actual:
            result.passed = False
            result.reason = f"output '{name}' missing from the compiled model"
            continue
        got = np.asarray(actual[name])
        if got.shape != ref.shape:
            result.passed = False
            result.reason = f"output '{name}': shape {list(got.shape)} != reference {list(ref.shape)}"
            continue
        if ref.dtype.kind in "fc" or got.dtype.kind in "fc":
            r = ref.astype(np.float64)
            diff = np.abs(got.astype(np.float64) - r)
            max_abs = float(diff.max()) if diff.size else 0.0
            max_rel = float((diff / np.maximum(np.abs(r), 1e-12)).max()) if diff.size else 0.0
            ok = bool(np.all(diff <= atol + rtol * np.abs(r))) and bool(np.all(np.isfinite(got) == np.isfinite(r)))
        elif ref.dtype == object or got.dtype == object:
            ok = bool(np.array_equal(got, ref))
            max_abs = max_rel = 0.0 if ok else float("inf")
        else:
            ok = bool(np.array_equal(got, ref))
            max_abs = 0.0 if ok else float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
            max_rel = max_abs
        result.outputs.append(OutputParity(name, max_abs, max_rel, ok))
        if not ok:
            result.passed = False
            result.reason = (
                f"output '{name}': max abs error {max_abs:.3g}, max rel error {max_rel:.3g} "
                f"exceed atol {atol:g} + rtol {rtol:g}"
            )
    return result


# Parity for lossy precisions. A lossy build is *meant* to differ from the fp32 reference, so its
# parity gate is a sanity check (wrong layout, garbage weights, a broken conversion), and the accuracy
# gate judges quality. Rule, unless the config's `verify.precisions.<p>` gives absolute values:
#   atol = ATOL_FRACTION x max |reference output| over the golden set,  rtol = RTOL
LOSSY_TOLERANCE = {"fp16": (0.01, 0.01), "int8": (0.1, 0.1)}


def tolerance(spec, precision: str, expected: dict[str, np.ndarray]) -> tuple[float, float, str]:
    """(atol, rtol, how they were chosen) for a build of `precision` (spec: the config's VerifySpec)."""
    if precision in spec.precisions:
        t = spec.precisions[precision]
        return t.atol, t.rtol, f"verify.precisions.{precision}"
    if precision not in LOSSY_TOLERANCE:
        return spec.atol, spec.rtol, "verify"
    fraction, rtol = LOSSY_TOLERANCE[precision]
    scale = max((float(np.abs(v).max()) for v in expected.values()
                 if np.asarray(v).dtype.kind == "f" and np.asarray(v).size), default=1.0)
    return max(spec.atol, fraction * scale), max(spec.rtol, rtol), \
        f"{precision} default: atol {fraction:g} x max|reference| ({scale:.3g}), rtol {rtol:g}"


def run_batched(infer, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Run a whole dataset through `infer` in batches (batch <= 0: one call)."""
    n = len(next(iter(inputs.values())))
    if batch <= 0 or n <= batch:
        return infer(inputs)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch):
        out = infer({k: v[start:start + batch] for k, v in inputs.items()})
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))
