"""``kiln optimize quantize``: INT8 per backend.

Any workload (``optimize.workload``): the user's ONNX / .pt2 / factory, calibrated with the user's
calibration split, measured with the user's metric on the compiled artifacts.

- ``static``: the backend's own ``compile(precision="int8")`` recipe (ONNX Runtime static QDQ,
  OpenVINO NNCF, LiteRT PT2E) — the very code the server runs for a ``precision: int8`` config, so
  what is measured here is what gets served. One helper (:func:`static_int8`) serves every backend.
- ``dynamic``: ONNX Runtime ``quantize_dynamic`` (int8 weights, activations quantized at run time;
  no calibration data) — implemented here, it is not a serving precision of its own: the output is
  an ONNX graph with ``DynamicQuantizeLinear``/``MatMulInteger``/``ConvInteger`` nodes that runs as fp32
  source on ONNX Runtime.

The output folder is servable: ONNX Runtime recipes write the quantized ONNX as ``1/model.onnx``;
OpenVINO/LiteRT write the fp32 source with ``precision: int8`` in config.yaml (the server compiles the
same recipe from ``data/calib.npz``, cached).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from backends.hw import Recipe

from .errors import OptimizeError, StepFailed

MODES = ("static", "dynamic")


@dataclass
class QuantResult:
    backend: str
    mode: str
    recipe: Recipe
    fp32: dict  # Measurement.as_dict()
    int8: dict
    out: str | None = None
    notes: list[str] = field(default_factory=list)

    metric: object = None  # optimize.metric.Metric: the drop is in its unit, positive = worse

    @property
    def drop(self) -> float | None:
        a, b = self.fp32.get("accuracy"), self.int8.get("accuracy")
        if a is None or b is None:
            return None
        return self.metric.drop(a, b) if self.metric is not None else a - b

    def as_dict(self) -> dict:
        return {"backend": self.backend, "mode": self.mode, "recipe": self.recipe.__dict__, "fp32": self.fp32,
                "int8": self.int8, "metric_drop": self.drop, "out": self.out, "notes": self.notes}


def validate(backend: str, mode: str) -> None:
    from .bench import check_backend

    if mode not in MODES:
        raise OptimizeError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
    if backend != "auto":
        check_backend(backend)
    if mode == "dynamic" and backend not in ("onnxruntime", "auto"):
        raise OptimizeError(f"--mode dynamic is an ONNX Runtime recipe (quantize_dynamic); use --mode static for {backend}")


def dynamic_int8(source_onnx: Path, out_path: Path, *, reduce_range: bool = False) -> Path:
    """ONNX Runtime dynamic INT8: int8 weights (per-tensor), uint8 activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-dq-") as tmp:
        prepped = Path(tmp) / "prep.onnx"
        try:
            quant_pre_process(str(source_onnx), str(prepped), skip_symbolic_shape=True)
        except Exception:
            prepped = Path(source_onnx)
        try:
            quantize_dynamic(str(prepped), str(out_path), weight_type=QuantType.QInt8, reduce_range=reduce_range)
        except Exception as err:
            raise StepFailed(f"onnxruntime dynamic int8 failed: {type(err).__name__}: {err}") from None
    return out_path


def quantize(w, backend: str, mode: str, *, out: Path | None = None, runs: int = 200, max_drop: float = 0.01,
             command: str = "", progress: bool = True) -> QuantResult:
    """INT8 of the workload's model on ``backend``: fp32 and int8 both measured (metric on the compiled artifact,
    p50 at batch 1 and 32), the servable folder written to ``out``."""
    from backends import hw

    from . import modelio
    from .bench import available_backends, measure

    validate(backend, mode)
    cpu = hw.detect()
    notes = []
    if backend == "auto":
        if mode == "dynamic":
            backend, why = "onnxruntime", "dynamic INT8 is an ONNX Runtime recipe"
        else:
            backend, why = hw.auto_backend(cpu, available_backends())
        notes.append(f"--backend auto chose {backend}: {why}")
    recipe = hw.choose_recipe(backend, mode, cpu)
    sources = dict(w.model.sources)
    io = (w.inputs, w.outputs)
    parity: dict[str, float] = {}

    def evaluate(runner) -> float:
        parity["max_abs_error"] = w.parity_error(runner)
        return w.evaluate(runner)

    timing = w.splits.eval.inputs
    fp32 = measure(backend, sources, precision="fp32", inputs=timing, evaluate=w.evaluate, runs=runs, io=io, progress=progress)
    with tempfile.TemporaryDirectory(prefix="kiln-q-") as tmp:
        tmp = Path(tmp)
        if mode == "dynamic":
            if "onnx" not in sources:
                raise OptimizeError(f"{w.model.arg}: dynamic INT8 needs an ONNX model")
            qpath = dynamic_int8(sources["onnx"], tmp / "model.int8-dynamic.onnx", reduce_range=recipe.extra.get("reduce_range", False))
            int8 = measure("onnxruntime", {"onnx": qpath}, precision="fp32", inputs=timing, evaluate=evaluate, runs=runs, io=io,
                           progress=progress)
            int8.precision = "int8-dynamic"
            int8.artifact_bytes = qpath.stat().st_size
        else:
            int8 = measure(backend, sources, precision="int8", inputs=timing, evaluate=evaluate, calibration=w.splits.calib.inputs,
                           runs=runs, extra=recipe.extra, io=io, workdir=tmp / "int8", progress=progress)
            qpath = tmp / "int8" / "model.onnx" if backend == "onnxruntime" else None
        if not int8.ok:
            raise StepFailed(int8.reason)
        result = QuantResult(backend, mode, recipe, fp32.as_dict(), int8.as_dict(), notes=notes)
        result.metric = w.metric
        if out is not None:
            info = {"command": command, "technique": f"int8-{mode}", **result.as_dict(), "cpu": cpu.as_dict(),
                    "parity_vs_original": parity}
            tol = 2 * parity.get("max_abs_error", 0.0) + 1e-6
            if backend == "onnxruntime":
                # The quantized graph is itself the servable source (QDQ or integer ops), served as an fp32 source.
                modelio.write_workload_folder(out, w, sources={"onnx": qpath}, backend="onnxruntime", precision="fp32",
                                              max_drop=max_drop, info=info,
                                              comment=f"INT8 ({recipe.name}) written by kiln optimize quantize;\n"
                                                      "the graph itself is quantized, so it is served as an fp32-precision source.")
            else:
                modelio.write_workload_folder(out, w, sources=sources, backend=backend, precision="int8", max_drop=max_drop,
                                              info=info, backend_options=recipe.extra or None, lossy_atol=tol,
                                              comment=f"INT8 on {backend}: {recipe.name};\nthe server compiles it from the fp32 "
                                                      "source with data/calib.npz (written by kiln optimize quantize).")
            result.out = str(out)
    return result
