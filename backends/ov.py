"""OpenVINO on the CPU.

OpenVINO picks bf16 by itself on CPUs with avx512_bf16/AMX, which moves outputs by ~1e-3; a model
asks for fp32 unless its config says otherwise, so `INFERENCE_PRECISION_HINT` is always set.

int8 = NNCF post-training static quantization (`nncf.quantize`) over the model's calibration data;
the non-quantized rest of the graph runs f32.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import numpy as np

from .base import BackendBase, CompileFailed, CompileOptions, Int8Recipe

HINTS = {"fp32": "f32", "fp16": "f16", "int8": "f32"}


def _cpu_supports(capability: str) -> bool:
    import openvino as ov

    return capability in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def precision_hint(precision: str, extra: dict) -> str:
    """The CPU's inference precision for a model precision (an explicit hint in extra wins)."""
    if "inference_precision" in extra:
        return str(extra["inference_precision"])
    if precision == "fp16" and not _cpu_supports("FP16"):
        # No native fp16 arithmetic on this CPU: fp16 weights, bf16 compute when there is bf16.
        return "bf16" if _cpu_supports("BF16") else "f32"
    return HINTS.get(precision, "f32")


class OpenVinoRunner:
    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.output_names = [out.get_any_name() for out in compiled.outputs]
        self.input_names = {name for inp in compiled.inputs for name in inp.get_names()}

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # A model converted from a .pt2 names its inputs after the forward() arguments ("x"), not the
        # signature's: feed by position then.
        feed = inputs if set(inputs) <= self.input_names else list(inputs.values())
        self.request.infer(feed)
        # The request reuses its output buffers: copy before the next call overwrites them.
        return {
            name: self.request.get_output_tensor(i).data.copy() for i, name in enumerate(self.output_names)
        }

    def close(self) -> None:
        self.request = None
        self.compiled = None


@contextlib.contextmanager
def _root_logger_kept():
    """ov.convert_model sets the root logger to ERROR (and adds a filter) and leaves it so when the
    conversion fails: every INFO and WARNING of the server after it would be lost. Put it back."""
    root = logging.getLogger()
    level, filters, handlers = root.level, list(root.filters), list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        root.filters, root.handlers = filters, handlers


class OpenVinoBackend(BackendBase):
    name = "openvino"
    platform = "openvino"
    artifact_formats = ("openvino_ir",)
    source_formats = ("onnx", "pt2")
    precisions = ("fp32", "fp16", "int8")
    int8_isa = ("amx_int8", "amx_tile", "avx512_vnni", "avx_vnni")  # oneDNN's int8 kernels

    def int8_recipe(self, mode: str, units: str, int8_dot: bool, x86: bool) -> Int8Recipe | None:
        if mode != "static":
            return None
        return Int8Recipe("OpenVINO NNCF post-training quantization (nncf.quantize, performance preset: symmetric INT8 "
                          "weights and activations)",
                          f"{units}: oneDNN picks " + ("AMX/VNNI int8 kernels" if int8_dot and x86 else "its generic int8 kernels (smaller gain)"))

    def version(self) -> str:
        import openvino as ov

        return ov.get_version()

    def available(self) -> tuple[bool, str]:
        try:
            import openvino as ov
        except ImportError as err:
            return False, f"openvino is not installed ({err})"
        devices = ov.Core().available_devices
        if "CPU" not in devices:
            return False, f"OpenVINO sees no CPU device (devices: {devices})"
        return True, f"openvino {ov.get_version()}, devices {devices}"

    def compile(self, source: Path, options: CompileOptions, workdir: Path) -> Path:
        import openvino as ov

        if options.precision not in self.precisions:
            raise CompileFailed(f"openvino: precision '{options.precision}' is not supported")
        try:
            with _root_logger_kept():
                if source.suffix == ".pt2":
                    import torch

                    model = ov.convert_model(torch.export.load(str(source)))
                else:
                    model = ov.convert_model(str(source))
        except Exception as err:
            raise CompileFailed(conversion_failure(source, err)) from err
        if options.precision == "int8":
            model = quantize_int8(model, options)
        artifact = workdir / "model.xml"
        # save_model compresses weights to fp16 by default; keep fp32 unless fp16 was asked for.
        ov.save_model(model, str(artifact), compress_to_fp16=options.precision == "fp16")
        return artifact

    def load(self, artifact: Path, options: CompileOptions) -> OpenVinoRunner:
        import openvino as ov

        config = {
            "INFERENCE_PRECISION_HINT": precision_hint(options.precision, options.extra),
            "PERFORMANCE_HINT": str(options.extra.get("performance_hint", "LATENCY")),
            "INFERENCE_NUM_THREADS": int(options.extra.get("threads", 1)),
        }
        compiled = ov.Core().compile_model(str(artifact), "CPU", config)
        return OpenVinoRunner(compiled)


def quantize_int8(model, options: CompileOptions):
    import nncf

    if not options.calibration:
        raise CompileFailed("openvino int8 needs calibration data (config verify.samples)")
    # Calibration is keyed by the signature's input names; the converted model may name its inputs
    # differently (a .pt2 gives "x"), so feed by position: a bare array for one input, a list otherwise.
    order = [t.name for t in options.inputs] or list(options.calibration)
    n = len(options.calibration[order[0]])
    batch = options.max_batch_size or 1
    items = []
    for i in range(0, n, batch):
        part = [options.calibration[k][i:i + batch] for k in order]
        items.append(part[0] if len(part) == 1 else part)
    try:
        # nncf draws progress bars on stdout; keep stdout for the caller (e.g. `kiln compile` tables).
        with contextlib.redirect_stdout(sys.stderr):
            return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items),
                                 preset=nncf.QuantizationPreset.PERFORMANCE)
    except Exception as err:
        raise CompileFailed(f"openvino int8 (nncf.quantize) failed: {type(err).__name__}: {err}") from err


def unconverted_ops(source: Path) -> list[str]:
    """The source's ops OpenVINO's ONNX frontend has no conversion rule for (its partial conversion
    leaves them as framework nodes)."""
    import openvino as ov

    # Keep the manager, frontend and input model alive while the converted model is read: the
    # framework nodes point into them (dropping them early crashes the process).
    manager = ov.frontend.FrontEndManager()
    fe = manager.load_by_framework("onnx")
    input_model = fe.load(str(source))
    model = fe.convert_partially(input_model)
    ops = set()
    for op in model.get_ordered_ops():
        if "FrameworkNode" in op.get_type_name():
            attrs = op.get_attributes()
            domain, kind = attrs.get("ONNX_META_domain", ""), attrs.get("ONNX_META_type", op.get_type_name())
            ops.add(f"{domain}.{kind}" if domain else kind)
    del model, input_model, fe, manager
    return sorted(ops)


def conversion_failure(source: Path, err: Exception) -> str:
    """A conversion failure that names the ops that did not convert, not a C++ check location."""
    text = str(err)
    ops: list[str] = []
    if source.suffix == ".onnx":
        try:
            ops = unconverted_ops(source)
        except Exception:  # the partial conversion failed as well: the error text is all there is
            ops = []
    summary = next((line.strip(" -") for line in text.splitlines() if "conversion rule" in line), "")
    if ops:
        return f"openvino cannot convert {source.name}: no conversion rule for op(s) {', '.join(ops)}"
    return f"openvino could not convert {source.name}: {summary or text}"
