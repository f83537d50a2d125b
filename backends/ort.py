"""ONNX Runtime: CPU execution provider, CUDA / TensorRT execution providers when present.

The artifact is the ONNX graph after ONNX Runtime's own graph optimizations, saved once so a warm
start skips them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .base import CompileFailed, CompileOptions

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _providers(extra: dict) -> list[str]:
    import onnxruntime as ort

    wanted = extra.get("providers")
    have = ort.get_available_providers()
    if wanted:
        missing = [p for p in wanted if p not in have]
        if missing:
            raise CompileFailed(f"ONNX Runtime providers not available here: {missing} (have {have})")
        return list(wanted)
    return [p for p in GPU_PROVIDERS if p in have] + ["CPUExecutionProvider"]


def session_options(extra: dict, optimized_path: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # One thread per instance serves concurrent small requests best on few cores; more instances
    # or `threads` in backend_options scale it up.
    so.intra_op_num_threads = int(extra.get("threads", 1))
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if extra.get("spinning") else "0")
    so.log_severity_level = 3
    if optimized_path is not None:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized_path)
    return so


def ort_strings(arr: np.ndarray) -> np.ndarray:
    """ONNX Runtime string tensors take str objects; v2 BYTES arrive as bytes."""
    if arr.dtype != object:
        return arr
    return np.vectorize(lambda b: b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else b,
                        otypes=[object])(arr)


class OnnxRuntimeRunner:
    def __init__(self, session):
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, {k: ort_strings(v) for k, v in inputs.items()})
        return dict(zip(self.output_names, results))

    def close(self) -> None:
        self.session = None


class OnnxRuntimeBackend:
    name = "onnxruntime"
    source_formats = ("onnx",)
    precisions = ("fp32",)

    def version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as err:
            return False, f"onnxruntime is not installed ({err})"
        return True, f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}"

    def compile(self, source: Path, options: CompileOptions, workdir: Path) -> Path:
        import onnxruntime as ort

        if options.precision not in self.precisions:
            raise CompileFailed(f"onnxruntime: precision '{options.precision}' is not supported")
        artifact = workdir / "model.onnx"
        try:
            # Building a session with optimized_model_filepath writes the optimized graph.
            ort.InferenceSession(
                str(source), session_options(options.extra, artifact), providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CompileFailed(f"onnxruntime could not load {source.name}: {err}") from err
        if not artifact.exists():
            shutil.copyfile(source, artifact)
        return artifact

    def load(self, artifact: Path, options: CompileOptions) -> OnnxRuntimeRunner:
        import onnxruntime as ort

        session = ort.InferenceSession(
            str(artifact), session_options(options.extra), providers=_providers(options.extra)
        )
        return OnnxRuntimeRunner(session)
