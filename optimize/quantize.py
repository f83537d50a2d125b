"""``kiln optimize quantize``: INT8 per backend.

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

import numpy as np

from .errors import OptimizeError, StepFailed
from .hw import Recipe

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

    @property
    def drop(self) -> float | None:
        a, b = self.fp32.get("accuracy"), self.int8.get("accuracy")
        return None if a is None or b is None else a - b

    def as_dict(self) -> dict:
        return {"backend": self.backend, "mode": self.mode, "recipe": self.recipe.__dict__, "fp32": self.fp32,
                "int8": self.int8, "accuracy_drop": self.drop, "out": self.out, "notes": self.notes}


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


def static_int8(backend: str, sources: dict[str, Path], calibration: np.ndarray, workdir: Path, input_name: str = "input",
                extra: dict | None = None, io: tuple | None = None):
    """Compile with the backend's INT8 recipe. Returns (backend object, artifact, options)."""
    from .bench import compile_artifact

    be, artifact, options, _ = compile_artifact(backend, sources, "int8", workdir, calibration, input_name, extra, io=io)
    return be, artifact, options


def quantize(src, backend: str, mode: str, calib_x: np.ndarray | None, x_eval: np.ndarray, y_eval: np.ndarray,
             *, out: Path | None = None, runs: int = 200, max_drop: float = 0.01, command: str = "") -> QuantResult:
    from . import hw, modelio
    from .bench import available_backends, io_specs, measure

    validate(backend, mode)
    cpu = hw.detect()
    notes = []
    if backend == "auto":
        avail = available_backends()
        if mode == "dynamic":
            backend, why = "onnxruntime", "dynamic INT8 is an ONNX Runtime recipe"
        else:
            backend, why = hw.auto_backend(cpu, avail)
        notes.append(f"--backend auto chose {backend}: {why}")
    recipe = hw.choose_recipe(backend, mode, cpu)
    spec = modelio.input_spec(src)
    if mode == "static" and calib_x is None:
        raise OptimizeError(f"{src.arg}: static INT8 needs calibration data: pass --calib FILE.npz")
    sources = {"onnx": src.onnx, "pt2": src.pt2}
    io = io_specs(src)
    fp32 = measure(backend, sources, precision="fp32", x_eval=x_eval, y_eval=y_eval, input_name=spec.name, runs=runs, io=io)
    with tempfile.TemporaryDirectory(prefix="kiln-q-") as tmp:
        tmp = Path(tmp)
        if mode == "dynamic":
            if src.onnx is None:
                raise OptimizeError(f"{src.arg}: dynamic INT8 needs an ONNX model")
            qpath = dynamic_int8(src.onnx, tmp / "model.int8-dynamic.onnx", reduce_range=recipe.extra.get("reduce_range", False))
            int8 = measure("onnxruntime", {"onnx": qpath}, precision="fp32", x_eval=x_eval, y_eval=y_eval,
                           input_name=spec.name, runs=runs, io=io)
            int8.precision = "int8-dynamic"
            int8.artifact_bytes = qpath.stat().st_size
        else:
            int8 = measure(backend, sources, precision="int8", x_eval=x_eval, y_eval=y_eval, calibration=calib_x,
                           input_name=spec.name, runs=runs, extra=recipe.extra, io=io, workdir=tmp / "int8")
            qpath = tmp / "int8" / "model.onnx" if backend == "onnxruntime" else None
        if not int8.ok:
            raise StepFailed(int8.reason)
        result = QuantResult(backend, mode, recipe, fp32.as_dict(), int8.as_dict(), notes=notes)
        if out is not None:
            info = {"command": command, "technique": f"int8-{mode}", **result.as_dict(), "cpu": cpu.as_dict()}
            if backend == "onnxruntime":
                # The quantized graph is itself the servable source (QDQ or integer ops; runs on any ONNX runtime).
                modelio.write_model_folder(out, src=src, onnx_file=qpath, backend="onnxruntime", precision="fp32",
                                           max_drop=max_drop, info=info,
                                           comment=f"INT8 ({recipe.name}) written by kiln optimize quantize;\n"
                                                   "the graph itself is quantized, so it is served as an fp32-precision source.")
            else:
                if src.onnx is None and src.pt2 is None:
                    raise OptimizeError(f"{src.arg}: nothing to write")
                _write_source_copy(out, src, backend, max_drop, info, recipe)
            result.out = str(out)
    return result


def _write_source_copy(out: Path, src, backend: str, max_drop: float, info: dict, recipe: Recipe) -> None:
    import shutil

    from . import modelio

    if src.onnx is not None:
        modelio.write_model_folder(out, src=src, onnx_file=src.onnx, backend=backend, precision="int8", max_drop=max_drop,
                                   info=info, comment=f"INT8 on {backend}: {recipe.name};\nthe server compiles it from the fp32 "
                                                      "source with data/calib.npz (written by kiln optimize quantize).",
                                   backend_options=recipe.extra or None)
    if src.pt2 is not None:
        (out / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.pt2, out / "1" / "model.pt2")
        if src.onnx is None:
            from .modelio import _yaml_config

            (out / "config.yaml").write_text(_yaml_config(backend, "int8", max_drop, f"INT8 on {backend}", recipe.extra or None))
            (out / "data").mkdir(exist_ok=True)
            for key in ("calib", "eval"):
                if getattr(src, key):
                    shutil.copyfile(getattr(src, key), out / "data" / f"{key}.npz")
