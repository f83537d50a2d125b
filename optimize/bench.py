"""Measure a model on a backend the way Kiln serves it: backend compile -> load -> warm -> time.

Latency is the median (p50) of single ``runner.infer`` calls in-process, after warm-up, with the
backend's serving defaults (1 intra-op thread). Accuracy is top-1 on the held-out set through the
same runner, in batches of at most 32.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import OptimizeError, StepFailed


@dataclass
class Measurement:
    backend: str
    precision: str
    ok: bool
    reason: str = ""
    p50_ms: dict[int, float] = field(default_factory=dict)  # batch -> ms
    accuracy: float | None = None
    artifact_bytes: int | None = None
    compile_s: float | None = None

    def as_dict(self) -> dict:
        return {
            "backend": self.backend, "precision": self.precision, "ok": self.ok, "reason": self.reason,
            "p50_ms": {str(k): v for k, v in self.p50_ms.items()}, "accuracy": self.accuracy,
            "artifact_bytes": self.artifact_bytes, "compile_s": self.compile_s,
        }


def backend_names() -> list[str]:
    from backends import backend_names as names

    return names()


def check_backend(name: str) -> None:
    names = backend_names()
    if name not in names:
        raise OptimizeError(f"unknown backend '{name}' (known: {', '.join(names)})")


# Per-backend compile hints for measuring: LiteRT converts one static-shape model per batch bucket;
# only the batch sizes that are timed (1, 32) are needed.
MEASURE_EXTRA = {"litert": {"batch_sizes": [1, 32]}}


def available_backends(runnable: bool = True) -> list[str]:
    """Backends whose runtime is here; with ``runnable``, only those that can also run (Core ML on Linux cannot)."""
    from backends import get_backend

    out = []
    for n in backend_names():
        try:
            be = get_backend(n)
            ok, _ = be.available()
            if ok and runnable and hasattr(be, "compile_only"):
                ok = not be.compile_only()[0]
        except Exception:
            ok = False
        if ok:
            out.append(n)
    return out


def io_specs(src) -> tuple[list, list]:
    """Backend TensorInfo lists (inputs, outputs) of a model source (batch dim -1)."""
    from backends import TensorInfo

    from .modelio import input_spec

    spec = input_spec(src)
    dt = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8", "int8": "INT8"}
    inputs = [TensorInfo(spec.name, dt.get(spec.dtype, "FP32"), tuple([-1] + list(spec.shape[1:])))]
    outputs = [TensorInfo("logits", "FP32", (-1, 10))]
    if src.onnx is not None:
        import onnx

        proto = onnx.load(str(src.onnx), load_external_data=False)
        outputs = []
        for o in proto.graph.output:
            t = o.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            np_dt = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            outputs.append(TensorInfo(o.name, dt.get(np_dt, "FP32"), tuple([-1] + shape[1:])))
    return inputs, outputs


def _options(precision: str, calibration: np.ndarray | None, input_name: str, extra: dict | None, io: tuple | None = None):
    from backends import CompileOptions

    inputs, outputs = io if io is not None else ([], [])
    return CompileOptions(
        precision=precision, max_batch_size=32, inputs=list(inputs), outputs=list(outputs),
        calibration={input_name: calibration} if calibration is not None else None,
        extra={"threads": 1, **(extra or {})},
    )


def pick_source(backend, sources: dict[str, Path]) -> Path | None:
    for fmt in getattr(backend, "source_formats", ("onnx",)):
        if sources.get(fmt) is not None:
            return sources[fmt]
    return None


def compile_artifact(backend_name: str, sources: dict[str, Path], precision: str, workdir: Path,
                     calibration: np.ndarray | None = None, input_name: str = "input", extra: dict | None = None,
                     io: tuple | None = None):
    """Compile with the backend's own recipe (INT8 included). Raises StepFailed with the reason."""
    from backends import BackendUnavailable, CompileFailed, get_backend

    be = get_backend(backend_name)
    ok, why = be.available()
    if not ok:
        raise StepFailed(f"{backend_name}: not available here ({why})")
    if precision not in be.precisions:
        raise StepFailed(f"{backend_name}: no {precision} recipe (it builds {', '.join(be.precisions)})")
    src = pick_source(be, sources)
    if src is None:
        raise StepFailed(f"{backend_name}: needs a {' or '.join(be.source_formats)} source, have {', '.join(k for k, v in sources.items() if v)}")
    options = _options(precision, calibration, input_name, extra, io)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        artifact = be.compile(Path(src), options, workdir)
    except (CompileFailed, BackendUnavailable) as err:
        raise StepFailed(f"{backend_name} {precision}: {err}") from None
    return be, Path(artifact), options, time.perf_counter() - t0


def time_runner(runner, input_name: str, x: np.ndarray, batch: int, runs: int, warmup: int = 20, blocks: int = 3) -> float:
    """Median latency in ms of ``runner.infer`` at ``batch`` (``backends.timing``'s statistic)."""
    from backends.timing import time_runner as time_backend_runner

    return time_backend_runner(runner, {input_name: x}, batch, runs, warmup, blocks).median_ms


def runner_accuracy(runner, input_name: str, x: np.ndarray, y: np.ndarray, batch: int = 32) -> float:
    preds = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        out = runner.infer({input_name: np.ascontiguousarray(xb)})
        preds.append(next(iter(out.values())).reshape(len(xb), -1).argmax(1))
    return float((np.concatenate(preds) == y).mean())


def artifact_bytes(artifact: Path) -> int:
    """Bytes of one deployable model: ONNX file; OpenVINO xml + bin; LiteRT: the batch-1 .tflite of its index."""
    import json

    from .modelio import file_size

    if artifact.suffix == ".xml":
        return file_size([artifact, artifact.with_suffix(".bin")])
    if artifact.suffix == ".json":
        try:
            models = json.loads(artifact.read_text()).get("models", [])
        except (OSError, ValueError):
            models = []
        if models:
            first = min(models, key=lambda m: m.get("batch", 0))
            return file_size([artifact.parent / first["file"]])
    return file_size([artifact])


def measure(backend_name: str, sources: dict[str, Path], *, precision: str = "fp32", x_eval: np.ndarray,
            y_eval: np.ndarray, calibration: np.ndarray | None = None, input_name: str = "input",
            batches: tuple[int, ...] = (1, 32), runs: int = 200, extra: dict | None = None,
            workdir: Path | None = None, io: tuple | None = None) -> Measurement:
    """Compile + load + time + accuracy; a failure is returned as ``ok=False`` with the reason."""
    m = Measurement(backend_name, precision, ok=False)
    extra = {**MEASURE_EXTRA.get(backend_name, {}), **(extra or {})}
    with tempfile.TemporaryDirectory(prefix="kiln-opt-") as tmp:
        wd = Path(workdir) if workdir is not None else Path(tmp)
        try:
            be, artifact, options, m.compile_s = compile_artifact(backend_name, sources, precision, wd, calibration, input_name, extra, io)
            m.artifact_bytes = artifact_bytes(artifact)
            runner = be.load(artifact, options)
        except StepFailed as err:
            m.reason = str(err)
            return m
        except Exception as err:  # a runtime refusing the artifact
            m.reason = f"{backend_name} {precision}: load failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            return m
        try:
            m.accuracy = runner_accuracy(runner, input_name, x_eval, y_eval)
            for b in batches:
                m.p50_ms[b] = time_runner(runner, input_name, x_eval, b, runs if b == 1 else max(runs // 4, 20))
            m.ok = True
        except Exception as err:
            m.reason = f"{backend_name} {precision}: inference failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        finally:
            try:
                runner.close()
            except Exception:
                pass
    return m
