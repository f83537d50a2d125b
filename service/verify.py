"""The gates a compiled model passes before READY: parity with the source, and accuracy.

The reference they compare with is `backends.reference.Reference`, shared with `kiln optimize`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backends import TensorInfo
from backends.datatypes import numpy_dtype
from backends.signature import SourceFacts


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
    # The input shapes the gate ran, one "x[4, 3, 224, 224]" line per golden set.
    inputs: list[str] = field(default_factory=list)

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


# -- golden inputs that fit the model ------------------------------------------------------------
# Order: verify.samples > verify.shapes / verify.values > sizes inferred from the source. Inferred
# sizes try realistic values first; a candidate the reference cannot run says nothing about a
# compiled model, so the next is tried, and when none runs the gate is "unverified".

IMAGE_SIDES = (224, 128, 64, 32)
SEQUENCE_LENGTHS = (16, 128, 512)
BATCH_NAMES = {"batch", "batch_size", "batchsize", "bs", "n", "b", "num_batch", "batch_dim"}
_SPATIAL = ("height", "width", "h", "w", "y", "x")
_SIZE_KEY = re.compile(r"size|shape|resolution|height|width", re.IGNORECASE)


class GoldenError(ValueError):
    """The config's hints do not fit the model, or the reference cannot run what they describe."""


@dataclass(frozen=True)
class GoldenSet:
    inputs: dict[str, np.ndarray]
    origin: str  # verify.samples | verify.shapes | inferred

    def describe(self) -> str:
        return ", ".join(f"{k}{list(v.shape)}" for k, v in self.inputs.items())


@dataclass(frozen=True)
class Golden:
    """The inputs every build of a model is verified and warmed on, and the reference's outputs."""

    sets: tuple[GoldenSet, ...]
    expected: tuple[dict[str, np.ndarray], ...]
    # Why parity cannot be checked ("" when it can): no input the reference runs, or no reference.
    unverified: str = ""
    # Candidates the reference could not run, "shapes: error", for the logs and the reason.
    skipped: tuple[str, ...] = ()

    @property
    def verified(self) -> bool:
        return not self.unverified

    def warm_sample(self, batching: bool) -> dict[str, np.ndarray] | None:
        if not self.sets:
            return None
        first = self.sets[0].inputs
        return {k: v[:1] for k, v in first.items()} if batching else first


def _image_layout(shape: tuple[int, ...], names: tuple[str | None, ...]) -> tuple[int, int] | None:
    """The (height, width) dim indices of an image-like rank-4 input, NCHW or NHWC, else None."""
    if len(shape) != 4:
        return None
    lowered = [(n or "").lower() for n in names] + [""] * 4
    if shape[1] in (1, 3, 4) and -1 in shape[2:]:
        return 2, 3
    if shape[3] in (1, 3, 4) and -1 in shape[1:3]:
        return 1, 2
    if any(n in _SPATIAL for n in lowered[2:4]):
        return 2, 3
    return None


def metadata_sides(metadata: dict[str, str]) -> list[tuple[int, int]]:
    """Image sizes a model's metadata names (image_size: 320, input_shape: "3,48,320", ...)."""
    sides = []
    for key, value in metadata.items():
        if not _SIZE_KEY.search(key):
            continue
        nums = [int(n) for n in re.findall(r"\d+", value) if 8 <= int(n) <= 4096]
        if len(nums) >= 2:
            sides.append((nums[-2], nums[-1]))
        elif len(nums) == 1:
            sides.append((nums[0], nums[0]))
    return sides


def _candidate_shapes(inputs: list[TensorInfo], facts: SourceFacts, batch: int,
                      hints: dict[str, list[int]]) -> list[dict[str, tuple[int, ...]]]:
    """Shapes to try, most realistic first; an input with a hint keeps it in every candidate."""
    image = [*metadata_sides(facts.metadata), *((s, s) for s in IMAGE_SIDES)]
    image = list(dict.fromkeys(image))
    steps = max(len(image), len(SEQUENCE_LENGTHS))
    out = []
    for step in range(steps):
        side = image[min(step, len(image) - 1)]
        length = SEQUENCE_LENGTHS[min(step, len(SEQUENCE_LENGTHS) - 1)]
        named: dict[str, int] = {}
        cand: dict[str, tuple[int, ...]] = {}
        for spec in inputs:
            if spec.name in hints:
                cand[spec.name] = tuple(hints[spec.name])
                for d, n in zip(hints[spec.name], facts.dim_names.get(spec.name, ())):
                    if n:
                        named.setdefault(n, d)
                continue
            names = facts.dim_names.get(spec.name) or (None,) * len(spec.shape)
            layout = _image_layout(spec.shape, names)
            dims = []
            for i, (d, n) in enumerate(zip(spec.shape, names)):
                if d > 0:
                    dims.append(d)
                    continue
                if n and n in named:
                    value = named[n]
                elif (n or "").lower() in BATCH_NAMES or (i == 0 and not n):
                    value = batch
                elif layout and i in layout:
                    value = side[layout.index(i)]
                else:
                    value = length
                if n:
                    named.setdefault(n, value)
                dims.append(value)
            cand[spec.name] = tuple(dims)
        if cand not in out:
            out.append(cand)
    return out


def fill_inputs(inputs: list[TensorInfo], shapes: dict[str, tuple[int, ...]], facts: SourceFacts,
                values: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays of the given shapes: config values (fixed or a range) first; integer inputs that index
    an embedding stay below its rows; other integers are small; floats are standard normal."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in inputs:
        shape = shapes[spec.name]
        dtype = numpy_dtype(spec.datatype)
        hint = values.get(spec.name)
        if hint is not None and dtype.kind in "iuf":
            if hint.min == hint.max:
                out[spec.name] = np.full(shape, hint.min, dtype=dtype)
            elif dtype.kind == "f":
                out[spec.name] = rng.uniform(hint.min, hint.max, shape).astype(dtype)
            else:
                out[spec.name] = rng.integers(int(hint.min), int(hint.max) + 1, shape).astype(dtype)
        elif dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif dtype.kind in "iu":
            top = facts.upper_bounds.get(spec.name, 8)
            out[spec.name] = rng.integers(0, max(top, 1), shape).astype(dtype)
        else:
            out[spec.name] = np.array([b"kiln"] * int(np.prod(shape)), dtype=object).reshape(shape)
    return out


def _check_hints(spec, inputs: list[TensorInfo], where: str) -> None:
    by_name = {t.name: t for t in inputs}
    for field_name in ("shapes", "values"):
        for name in getattr(spec, field_name):
            if name not in by_name:
                raise GoldenError(f"{where}: field 'verify.{field_name}.{name}': the model has no input '{name}' "
                                  f"(inputs: {', '.join(by_name)})")
    for name, shapes in spec.shapes.items():
        want = by_name[name].shape
        for shape in shapes:
            if len(shape) != len(want) or any(w > 0 and w != d for w, d in zip(want, shape)):
                raise GoldenError(f"{where}: field 'verify.shapes.{name}': shape {shape} does not fit the "
                                  f"model's {list(want)}")


def _error_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def resolve_golden(inputs: list[TensorInfo], facts: SourceFacts, spec, batch: int, probe,
                   where: str, samples: dict[str, np.ndarray] | None = None,
                   record: bool = True, batch_limit: int = 0) -> Golden:
    """The golden sets for a model. `probe` runs inputs (the reference, or the served artifact when
    there is no source); a candidate it cannot run is skipped. `record`: keep probe outputs as the
    expected values. Raises GoldenError when the config's own samples or shapes do not run."""
    def run(inp):
        return run_batched(probe, inp, batch_limit)

    if samples is not None:
        try:
            expected = run(samples)
        except Exception as err:
            raise GoldenError(f"the reference cannot run verify.samples: {_error_line(err)}") from None
        gs = GoldenSet(samples, "verify.samples")
        return Golden((gs,), (expected,) if record else ())
    _check_hints(spec, inputs, where)
    hinted = max((len(v) for v in spec.shapes.values()), default=0)
    sets: list[GoldenSet] = []
    expected: list[dict[str, np.ndarray]] = []
    skipped: list[str] = []
    for k in range(max(hinted, 1)):
        hints = {name: shapes[min(k, len(shapes) - 1)] for name, shapes in spec.shapes.items()}
        origin = "verify.shapes" if hints else ("verify.values" if spec.values else "inferred")
        for shapes in _candidate_shapes(inputs, facts, batch, hints):
            arrays = fill_inputs(inputs, shapes, facts, spec.values, seed=k)
            try:
                out = run(arrays)
            except Exception as err:
                skipped.append(f"{GoldenSet(arrays, origin).describe()}: {_error_line(err)}")
                continue
            sets.append(GoldenSet(arrays, origin))
            expected.append(out)
            break
        else:
            if hints:
                raise GoldenError(f"the reference cannot run the inputs verify.shapes gives "
                                  f"({'; '.join(skipped[-1:])})")
    if not sets:
        tried = "; ".join(skipped[-3:])
        return Golden((), (), f"the reference runs none of the inputs tried ({tried})", tuple(skipped))
    return Golden(tuple(sets), tuple(expected) if record else (), "", tuple(skipped))


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
