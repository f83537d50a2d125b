"""Measure a model on a backend the way Kiln serves it: backend compile -> load -> warm -> time.

Latency: ``backends.timing.time_runner`` (the server's statistic) on single ``runner.infer`` calls
in-process, after warm-up, with the backend's serving defaults (1 intra-op thread). The metric is the
workload's (``optimize.workload``), computed on the compiled artifact's outputs — what will be served.
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
    spread_ms: dict[int, float] = field(default_factory=dict)  # batch -> interquartile range, ms
    accuracy: float | None = None  # the workload's metric (whatever it is) on this compiled artifact
    artifact_bytes: int | None = None
    compile_s: float | None = None

    def as_dict(self) -> dict:
        return {
            "backend": self.backend, "precision": self.precision, "ok": self.ok, "reason": self.reason,
            "p50_ms": {str(k): v for k, v in self.p50_ms.items()},
            "spread_ms": {str(k): v for k, v in self.spread_ms.items()}, "accuracy": self.accuracy,
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
            if ok and runnable:
                ok = not be.compile_only()[0]
        except Exception:
            ok = False
        if ok:
            out.append(n)
    return out


def io_specs(sources: dict[str, Path]) -> tuple[list, list]:
    """Backend TensorInfo lists (inputs, outputs) of the sources: ``backends.signature``, the server's own reader."""
    from backends.signature import read_signature

    return read_signature({k: Path(v) for k, v in sources.items() if v is not None})


def _options(precision: str, calibration: dict | None, extra: dict | None, io: tuple | None = None):
    from backends import CompileOptions

    inputs, outputs = io if io is not None else ([], [])
    return CompileOptions(
        precision=precision, max_batch_size=32, inputs=list(inputs), outputs=list(outputs),
        calibration=calibration, extra={"threads": 1, **(extra or {})},
    )


def pick_source(backend, sources: dict[str, Path]) -> Path | None:
    for fmt in getattr(backend, "source_formats", ("onnx",)):
        if sources.get(fmt) is not None:
            return sources[fmt]
    return None


def compile_artifact(backend_name: str, sources: dict[str, Path], precision: str, workdir: Path,
                     calibration: dict[str, np.ndarray] | None = None, extra: dict | None = None, io: tuple | None = None):
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
    sources = {k: v for k, v in sources.items() if v is not None}
    options = _options(precision, calibration, extra, io if io is not None else io_specs(sources))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        artifact = be.compile(Path(src), options, workdir)
    except (CompileFailed, BackendUnavailable) as err:
        raise StepFailed(f"{backend_name} {precision}: {err}") from None
    return be, Path(artifact), options, time.perf_counter() - t0


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


def measure(backend_name: str, sources: dict[str, Path], *, precision: str = "fp32", inputs: dict[str, np.ndarray],
            evaluate=None, calibration: dict[str, np.ndarray] | None = None, batches: tuple[int, ...] = (1, 32),
            runs: int = 200, extra: dict | None = None, workdir: Path | None = None, io: tuple | None = None,
            progress: bool = False, runs_batched: int | None = None, warmup: int = 10) -> Measurement:
    """Compile + load + metric + time, the way Kiln serves it; a failure is returned as ``ok=False`` with the reason.

    ``evaluate(runner) -> float`` is the workload's metric on the compiled artifact; ``inputs`` are the rows
    timed (``backends.timing.time_runner``: the one statistic, median of the quietest block); ``runs`` calls at
    batch 1, ``runs_batched`` (default a quarter, at least 20) at larger batches."""
    from backends.timing import time_runner

    m = Measurement(backend_name, precision, ok=False)
    extra = {**MEASURE_EXTRA.get(backend_name, {}), **(extra or {})}
    with tempfile.TemporaryDirectory(prefix="kiln-opt-") as tmp:
        wd = Path(workdir) if workdir is not None else Path(tmp)
        try:
            be, artifact, options, m.compile_s = compile_artifact(backend_name, sources, precision, wd, calibration, extra, io)
            m.artifact_bytes = artifact_bytes(artifact)
            runner = be.load(artifact, options)
        except StepFailed as err:
            m.reason = str(err)
            return m
        except Exception as err:  # a runtime refusing the artifact
            m.reason = f"{backend_name} {precision}: load failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            return m
        bar = None
        try:
            if evaluate is not None:
                m.accuracy = evaluate(runner)
            counts = {b: runs if b == 1 else (runs_batched or max(runs // 4, 20)) for b in batches}
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=sum(counts.values()), desc=f"time {backend_name} {precision}", unit="call", leave=False)
            for b in batches:
                t = time_runner(runner, inputs, b, counts[b], warmup=warmup, blocks=3, progress=bar.update if bar else None)
                m.p50_ms[b] = t.median_ms
                m.spread_ms[b] = t.spread_ms
            m.ok = True
        except OptimizeError:
            raise
        except Exception as err:
            m.reason = f"{backend_name} {precision}: inference failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        finally:
            if bar is not None:
                bar.close()
            try:
                runner.close()
            except Exception:
                pass
    return m
