"""ONNX Runtime: CPU execution provider, CUDA / TensorRT execution providers when present.

The artifact is the ONNX graph after ONNX Runtime's own graph optimizations, saved once so a warm
start skips them.

Precisions:
- fp32: the source graph.
- fp16: weights and compute in fp16 (`onnxruntime.transformers.float16`, keep_io_types=True so the
  served interface stays FP32). On a CPU without fp16 kernels this is *slower* (casts around every
  op); it exists for GPU execution providers and for size.
- int8: static QDQ quantization (`quantize_static`, per-channel weights, activations calibrated on
  the model's calibration data). Dynamic quantization is deliberately not offered: it turns Conv into
  ConvInteger, which is ~4x slower on a CNN here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .base import BackendBase, CompileFailed, CompileOptions, Int8Recipe

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


class OnnxRuntimeBackend(BackendBase):
    name = "onnxruntime"
    platform = "onnxruntime_onnx"
    source_formats = ("onnx",)
    precisions = ("fp32", "fp16", "int8")
    int8_isa = ()  # MLAS int8 GEMM runs on any CPU

    def int8_recipe(self, mode: str, units: str, int8_dot: bool, x86: bool) -> Int8Recipe | None:
        reduce_range = not int8_dot and x86
        if mode == "dynamic":
            return Int8Recipe(
                "ONNX Runtime dynamic INT8 (quantize_dynamic: int8 weights, activations quantized per call; "
                "MatMulInteger/ConvInteger)",
                f"{units}: no calibration needed; pays off for MatMul-heavy models, usually slower for convolutions "
                "(ConvInteger has no fused fast path)", {"reduce_range": reduce_range})
        if mode != "static":
            return None
        why = (f"{units}: full 8-bit weights (u8 activations × s8 weights accumulate exactly in VNNI/AMX/sdot)"
               if not reduce_range else f"{units}: 7-bit weights (reduce_range) so u8×s8 pairwise sums cannot saturate vpmaddubsw")
        return Int8Recipe("ONNX Runtime static QDQ (quantize_static: u8 activations, s8 per-channel weights, MinMax calibration)",
                          why, {"reduce_range": reduce_range})

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
        if options.precision == "int8":
            source = quantize_int8(source, options, workdir)
        elif options.precision == "fp16":
            source = convert_fp16(source, workdir)
        try:
            # Building a session with optimized_model_filepath writes the optimized graph.
            so = session_options(options.extra, artifact)
            if options.precision == "int8":
                # Keep the QDQ pairs as they are: ONNX Runtime fuses them into int8 kernels at load,
                # and an offline "extended" pass may fold them into CPU-only contrib ops.
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CompileFailed(f"onnxruntime could not load {source.name}: {err}") from err
        if not artifact.exists():
            shutil.copyfile(source, artifact)
        if source.parent == workdir and source != artifact:
            source.unlink(missing_ok=True)  # intermediate (quantized / fp16 graph before optimization)
        return artifact

    def is_reference(self, source_format: str, options: CompileOptions) -> bool:
        # The reference is ONNX Runtime fp32 on the CPU over the ONNX source: a CPU-only fp32 build
        # of the same graph (ONNX Runtime's own graph optimizations applied) is that computation.
        return (source_format == "onnx" and options.precision == "fp32"
                and _providers(options.extra) == ["CPUExecutionProvider"])

    def load(self, artifact: Path, options: CompileOptions) -> OnnxRuntimeRunner:
        import onnxruntime as ort

        session = ort.InferenceSession(
            str(artifact), session_options(options.extra), providers=_providers(options.extra)
        )
        return OnnxRuntimeRunner(session)


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over the model's calibration arrays."""

    def __init__(self, calibration: dict[str, np.ndarray], batch: int):
        n = len(next(iter(calibration.values())))
        self._batches = iter([{k: np.ascontiguousarray(v[i:i + batch]) for k, v in calibration.items()}
                              for i in range(0, n, batch)])

    def get_next(self):
        return next(self._batches, None)

    def rewind(self):  # pragma: no cover - not used by MinMax calibration
        pass


def quantize_int8(source: Path, options: CompileOptions, workdir: Path) -> Path:
    """Static QDQ int8: per-channel symmetric int8 weights, int8 activations from calibration ranges."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not options.calibration:
        raise CompileFailed("onnxruntime int8 needs calibration data (config verify.samples)")
    extra = options.extra
    prepped = workdir / "prep.onnx"
    out = workdir / "int8-qdq.onnx"
    try:
        quant_pre_process(str(source), str(prepped), skip_symbolic_shape=True)
    except Exception:  # pre-processing is an optimisation; quantize the source as it is
        prepped = source
    batch = options.max_batch_size or 1
    reader = _Calibration(options.calibration, batch)
    CalibrationDataReader.register(_Calibration)
    try:
        quantize_static(
            str(prepped), str(out), reader,
            quant_format=QuantFormat.QDQ,
            per_channel=bool(extra.get("per_channel", True)),
            activation_type=getattr(QuantType, extra.get("activation_type", "QUInt8")),
            weight_type=getattr(QuantType, extra.get("weight_type", "QInt8")),
            reduce_range=bool(extra.get("reduce_range", False)),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    except Exception as err:
        raise CompileFailed(f"onnxruntime int8 quantization failed: {type(err).__name__}: {err}") from err
    finally:
        if prepped != source:
            prepped.unlink(missing_ok=True)
    return out


def convert_fp16(source: Path, workdir: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out = workdir / "fp16.onnx"
    try:
        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.save(model, str(out))
    except Exception as err:
        raise CompileFailed(f"onnxruntime fp16 conversion failed: {type(err).__name__}: {err}") from err
    return out
