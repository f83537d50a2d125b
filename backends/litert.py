"""LiteRT (TFLite): compile the `.pt2` with litert-torch, run with ai-edge-litert's Interpreter (XNNPACK).

LiteRT converts static shapes only, and resizing a converted batch-1 model does not work for this
kind of graph (the flatten before the classifier is baked as a constant `[1, N]` reshape; XNNPACK
refuses to re-plan it: "failed to reshape runtimeNode"). So the artifact is one `.tflite` per batch
*bucket* (default: 1, 4, 16 and max_batch_size; `backend_options.batch_sizes` overrides), and the
runner pads a request up to the smallest bucket that holds it and slices the outputs back. A batch
above the largest bucket is split into chunks. Padding rows are zeros and never reach the caller.

int8: PT2E static quantization (litert-torch's PT2EQuantizer, symmetric, per-channel weights),
observers calibrated on the model's calibration data, then converted per bucket. The converted
model takes and returns int8 tensors; the runner quantizes inputs and dequantizes outputs with the
tensors' own scale/zero-point, so the served interface stays FP32.

Compile needs torch + litert-torch (the `convert` extra); serving needs only ai-edge-litert.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .base import BackendBase, CompileFailed, CompileOptions, Int8Recipe

INDEX = "litert.json"


def batch_buckets(options: CompileOptions) -> list[int]:
    """The static batch sizes to convert for."""
    wanted = options.extra.get("batch_sizes")
    top = options.max_batch_size
    if wanted:
        sizes = {int(b) for b in wanted}
    elif top <= 0:
        sizes = {1}
    else:
        sizes = {b for b in (1, 4, 16) if b < top} | {top}
    if top > 0 and any(b > top or b < 1 for b in sizes):
        raise CompileFailed(f"litert: batch_sizes {sorted(sizes)} must be within 1..max_batch_size {top}")
    return sorted(sizes)


def _example(options: CompileOptions, batch: int) -> tuple:
    import torch

    args = []
    for spec in options.inputs:
        shape = [batch if (i == 0 and options.max_batch_size > 0) else d for i, d in enumerate(spec.shape)]
        if any(d < 1 for d in shape):
            raise CompileFailed(f"litert needs static shapes: input '{spec.name}' has shape {list(spec.shape)}")
        if options.calibration and spec.name in options.calibration:
            arr = options.calibration[spec.name]
            idx = np.arange(batch) % len(arr)
            args.append(torch.from_numpy(np.ascontiguousarray(arr[idx])))
        else:
            dtype = {"FP32": torch.float32, "FP16": torch.float16, "INT64": torch.int64, "INT32": torch.int32,
                     "UINT8": torch.uint8, "INT8": torch.int8, "BOOL": torch.bool}.get(spec.datatype, torch.float32)
            args.append(torch.zeros(shape, dtype=dtype))
    return tuple(args)


class LiteRTRunner:
    def __init__(self, index: dict, folder: Path, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.batched = bool(index["batched"])
        self.buckets: dict[int, tuple] = {}
        for entry in index["models"]:
            it = Interpreter(model_path=str(folder / entry["file"]), num_threads=threads)
            it.allocate_tensors()
            ins = sorted(it.get_input_details(), key=lambda d: d["index"])
            outs = sorted(it.get_output_details(), key=lambda d: d["index"])
            self.buckets[int(entry["batch"])] = (it, ins, outs)
        self.sizes = sorted(self.buckets)
        self.input_names = index["inputs"]
        self.output_names = index["outputs"]

    @staticmethod
    def _to_model(x: np.ndarray, detail: dict) -> np.ndarray:
        dtype = detail["dtype"]
        if np.dtype(dtype).kind in "iu" and x.dtype.kind == "f":
            scale, zero = detail["quantization"]
            info = np.iinfo(dtype)
            return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
        return x.astype(dtype, copy=False)

    @staticmethod
    def _from_model(y: np.ndarray, detail: dict) -> np.ndarray:
        scale, zero = detail["quantization"]
        if np.dtype(detail["dtype"]).kind in "iu" and scale:
            return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
        return y

    def _run(self, size: int, inputs: list[np.ndarray]) -> list[np.ndarray]:
        it, ins, outs = self.buckets[size]
        for arr, d in zip(inputs, ins):
            it.set_tensor(d["index"], np.ascontiguousarray(self._to_model(arr, d)))
        it.invoke()
        # get_tensor copies, so the next invoke cannot overwrite what we return.
        return [self._from_model(it.get_tensor(d["index"]), d) for d in outs]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = [inputs[n] for n in self.input_names]
        if not self.batched:
            return dict(zip(self.output_names, self._run(self.sizes[0], arrays)))
        n = len(arrays[0])
        parts: list[list[np.ndarray]] = []
        start = 0
        while start < n:
            rows = min(n - start, self.sizes[-1])
            size = next(b for b in self.sizes if b >= rows)
            chunk = [a[start:start + rows] for a in arrays]
            if size > rows:  # pad to the bucket with zero rows
                chunk = [np.concatenate([c, np.zeros((size - rows, *c.shape[1:]), c.dtype)]) for c in chunk]
            parts.append([o[:rows] for o in self._run(size, chunk)])
            start += rows
        if len(parts) == 1:
            return dict(zip(self.output_names, parts[0]))
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(self.output_names)}

    def close(self) -> None:
        self.buckets = {}


class LiteRTBackend(BackendBase):
    name = "litert"
    platform = "tflite"
    artifact_formats = ("tflite",)
    source_formats = ("pt2",)
    precisions = ("fp32", "int8")
    int8_isa = ("arm_i8mm", "arm_dotprod")  # XNNPACK's qs8 kernels

    def int8_recipe(self, mode: str, units: str, int8_dot: bool, x86: bool) -> Int8Recipe | None:
        if mode != "static":
            return None
        return Int8Recipe("LiteRT PT2E static INT8 (XNNPACK quantizer, per-channel weights)",
                          f"{units}: XNNPACK's qs8 kernels " + ("use the int8 dot-product instructions" if int8_dot
                                                                else "emulate int8 dot products"))

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        parts = []
        for dist in ("ai-edge-litert", "litert-torch"):
            try:
                parts.append(f"{dist} {version(dist)}")
            except PackageNotFoundError:
                parts.append(f"{dist} -")
        return ", ".join(parts)

    def available(self) -> tuple[bool, str]:
        try:
            from ai_edge_litert.interpreter import Interpreter  # noqa: F401
        except ImportError as err:
            return False, f"LiteRT runtime not installed: ai-edge-litert ({err})"
        return True, self.version()

    def compile(self, source: Path, options: CompileOptions, workdir: Path) -> Path:
        try:
            import litert_torch
            import torch
        except ImportError as err:
            raise CompileFailed(f"litert compile needs torch and litert-torch (the 'convert' extra): {err}") from err
        if options.precision not in self.precisions:
            raise CompileFailed(f"litert: precision '{options.precision}' is not supported")
        sizes = batch_buckets(options)
        # litert-torch prints a progress tree to stdout for every conversion; keep stdout for callers.
        os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
        try:
            module = _to_eval(torch.export.load(str(source)).module())
        except Exception as err:
            raise CompileFailed(f"litert: cannot load {source.name}: {type(err).__name__}: {err}") from err
        quant_config = None
        if options.precision == "int8":
            module, quant_config = _quantize_pt2e(module, options)
        models = []
        for b in sizes:
            path = workdir / f"model_b{b}.tflite"
            try:
                edge = litert_torch.convert(module, _example(options, b), quant_config=quant_config)
                edge.export(str(path))
            except CompileFailed:
                raise
            except Exception as err:
                raise CompileFailed(f"litert-torch could not convert {source.name} at batch {b}: "
                                    f"{type(err).__name__}: {err}") from err
            models.append({"batch": b, "file": path.name, "bytes": os.path.getsize(path)})
        index = {"batched": options.max_batch_size > 0, "precision": options.precision, "models": models,
                 "inputs": [t.name for t in options.inputs], "outputs": [t.name for t in options.outputs]}
        artifact = workdir / INDEX
        artifact.write_text(json.dumps(index, indent=2))
        return artifact

    def load(self, artifact: Path, options: CompileOptions) -> LiteRTRunner:
        index = json.loads(Path(artifact).read_text())
        return LiteRTRunner(index, Path(artifact).parent, int(options.extra.get("threads", 1)))

    def load_artifact(self, path: Path, options: CompileOptions) -> LiteRTRunner:
        """A .tflite built elsewhere: one static-shape model; batched requests run in chunks of its
        own batch size (padded, as compiled buckets are)."""
        first = options.inputs[0].shape if options.inputs else ()
        batched = options.max_batch_size > 0 and bool(first)
        index = {"batched": batched, "models": [{"batch": int(first[0]) if batched and first[0] > 0 else 1,
                                                 "file": Path(path).name}],
                 "inputs": [t.name for t in options.inputs], "outputs": [t.name for t in options.outputs]}
        return LiteRTRunner(index, Path(path).parent, int(options.extra.get("threads", 1)))


def _to_eval(module):
    """Exported modules have no .eval(); torchao's helper switches dropout/batch-norm ops to inference."""
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval

        return move_exported_model_to_eval(module)
    except Exception:  # older torchao / nothing to switch: the graph is used as exported
        return module


def _quantize_pt2e(module, options: CompileOptions):
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize import quant_config as qcfg
    from torchao.quantization.pt2e import quantize_pt2e

    if not options.calibration:
        raise CompileFailed("litert int8 needs calibration data (config verify.samples)")
    names = [t.name for t in options.inputs]
    missing = [n for n in names if n not in options.calibration]
    if missing:
        raise CompileFailed(f"litert int8: no calibration data for inputs {missing}")
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    try:
        prepared = quantize_pt2e.prepare_pt2e(module, quantizer)
        n = len(options.calibration[names[0]])
        step = options.max_batch_size or 1  # the .pt2's batch dim is dynamic: calibrate in batches
        with torch.no_grad():
            for i in range(0, n, step):
                prepared(*(torch.from_numpy(np.ascontiguousarray(options.calibration[k][i:i + step])) for k in names))
        quantized = _to_eval(quantize_pt2e.convert_pt2e(prepared, fold_quantize=False))
    except Exception as err:
        raise CompileFailed(f"litert int8 (PT2E) quantization failed: {type(err).__name__}: {err}") from err
    return quantized, qcfg.QuantConfig(pt2e_quantizer=quantizer)
