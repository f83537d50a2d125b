"""Core ML: the `.pt2` converted by coremltools to an mlprogram `.mlpackage` (fp32 or fp16).

Conversion runs anywhere; prediction needs macOS (coremltools: "Model prediction is only supported
on macOS"). So on every OS `compile` converts *and validates the package structurally* against the
source, and writes the findings to `validation.json` next to the package:
- input/output names (renamed to the source's) and shapes (rank, fixed dims, flexible batch),
- MIL op counts,
- every weight of the source state dict found among the MIL constants and equal within tolerance
  (fp32: exact; fp16: within fp16 rounding, 1e-3 relative to the tensor's max).
A package that fails any of these fails the compile. On macOS `load` gives a runner that predicts;
elsewhere `load` raises BackendUnavailable("Core ML prediction needs macOS ...") so the model goes
FAILED with that reason, the validation results visible in the attempt's details.

`backend_options.coreml_weights`: "int8" (linear symmetric weight quantization) or "palettize4"
(4-bit k-means palettization), via coremltools.optimize; off by default.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from pathlib import Path

import numpy as np

from .base import BackendBase, BackendUnavailable, CompileFailed, CompileOptions

PACKAGE = "model.mlpackage"
VALIDATION = "validation.json"


def prediction_supported() -> tuple[bool, str]:
    if platform.system() != "Darwin":
        return False, f"Core ML prediction needs macOS (this is {platform.system()} {platform.machine()})"
    return True, f"macOS {platform.mac_ver()[0]}"


class CoreMLRunner:
    def __init__(self, model, input_names: list[str], output_names: list[str]):
        self.model = model
        self.input_names = input_names
        self.output_names = output_names

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.model.predict({n: inputs[n] for n in self.input_names})
        return {n: np.asarray(out[n], dtype=np.float32) for n in self.output_names}

    def close(self) -> None:
        self.model = None


def _weight_match(state: dict[str, np.ndarray], consts: dict[str, np.ndarray], fp16: bool,
                  compressed: bool) -> dict:
    """Each source weight found among the MIL constants (by name) and equal within tolerance."""
    checked, missing, worst = 0, [], 0.0
    for name, ref in state.items():
        key = "p_" + name.replace(".", "_")
        cand = next((v for k, v in consts.items() if k == key or k.startswith(key + "_to_fp16")
                     or k == key + "_to_fp16"), None)
        if cand is None:
            missing.append(name)
            continue
        if cand.shape != ref.shape:
            raise CompileFailed(f"coreml validation: weight '{name}' shape {list(cand.shape)} != source {list(ref.shape)}")
        err = float(np.abs(cand.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        tol = (1e-3 * max(scale, 1e-6)) if fp16 else 0.0
        if err > tol:
            raise CompileFailed(f"coreml validation: weight '{name}' differs from the source by {err:.3g} "
                                f"(tolerance {tol:.3g})")
        worst = max(worst, err)
        checked += 1
    if missing and not compressed:
        raise CompileFailed(f"coreml validation: source weights not found in the package: {missing[:5]}")
    return {"weights_checked": checked, "weights_total": len(state), "weights_max_abs_error": worst,
            "weights_not_compared": missing}


class CoreMLBackend(BackendBase):
    name = "coreml"
    platform = "coreml"
    artifact_formats = ("mlpackage",)
    source_formats = ("pt2",)
    precisions = ("fp32", "fp16")

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:  # without importing coremltools (slow: it imports torch)
            return version("coremltools")
        except PackageNotFoundError:
            return "-"

    def available(self) -> tuple[bool, str]:
        try:
            import coremltools as ct
        except ImportError as err:
            return False, f"coremltools is not installed ({err})"
        ok, why = prediction_supported()
        if not ok:
            return True, f"coremltools {ct.__version__}: compile and validate only ({why})"
        return True, f"coremltools {ct.__version__} on {why}"

    def compile_only(self) -> tuple[bool, str]:
        ok, why = prediction_supported()
        return (not ok), why

    def compile(self, source: Path, options: CompileOptions, workdir: Path) -> Path:
        try:
            import coremltools as ct
            import torch
        except ImportError as err:
            raise CompileFailed(f"coreml compile needs torch and coremltools (the 'convert' extra): {err}") from err
        if options.precision not in self.precisions:
            raise CompileFailed(f"coreml: precision '{options.precision}' is not supported")
        fp16 = options.precision == "fp16"
        try:
            ep = torch.export.load(str(source))
            state = {k: v.detach().numpy() for k, v in ep.state_dict.items()}
            ep = ep.run_decompositions({})
            model = ct.convert(ep, convert_to="mlprogram",
                               compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32)
        except Exception as err:
            raise CompileFailed(f"coremltools could not convert {source.name}: {type(err).__name__}: {err}") from err
        prog = model._mil_program  # noqa: SLF001 - the converted program, for structural checks
        main = prog.functions["main"]
        ops = Counter(op.op_type for op in main.operations)
        consts = {op.name: np.asarray(op.outputs[0].val) for op in main.operations
                  if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)}
        weights = _weight_match(state, consts, fp16, compressed=False)
        out_shapes = [[int(d) if isinstance(d, (int, np.integer)) else -1 for d in v.shape] for v in main.outputs]

        # Interface: rename features to the source's names (positional), then check shapes.
        spec = model.get_spec()
        in_names = [i.name for i in spec.description.input]
        out_names = [o.name for o in spec.description.output]
        if len(in_names) != len(options.inputs) or len(out_names) != len(options.outputs):
            raise CompileFailed(f"coreml validation: package has {len(in_names)} inputs / {len(out_names)} outputs, "
                                f"source has {len(options.inputs)} / {len(options.outputs)}")
        for old, t in zip(in_names, options.inputs):
            if old != t.name:
                ct.utils.rename_feature(spec, old, t.name, rename_outputs=False)
        for old, t in zip(out_names, options.outputs):
            if old != t.name:
                ct.utils.rename_feature(spec, old, t.name, rename_inputs=False)
        model = ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True)

        inputs = []
        for feat, t in zip(spec.description.input, options.inputs):
            arr = feat.type.multiArrayType
            shape = [int(d) for d in arr.shape]
            ranges = [(int(r.lowerBound), int(r.upperBound)) for r in arr.shapeRange.sizeRanges]
            dims = [(-1 if (ranges and ranges[i][0] != ranges[i][1]) else shape[i]) for i in range(len(shape))]
            fixed_ok = len(dims) == len(t.shape) and all(s == -1 or d == -1 or s == d for s, d in zip(t.shape, dims))
            if not fixed_ok:
                raise CompileFailed(f"coreml validation: input '{t.name}' shape {dims} does not match source {list(t.shape)}")
            inputs.append({"name": feat.name, "shape": dims, "source_shape": list(t.shape)})
        outputs = []
        for shape, t in zip(out_shapes, options.outputs):
            if len(shape) != len(t.shape) or any(s != -1 and d != -1 and s != d for s, d in zip(t.shape, shape)):
                raise CompileFailed(f"coreml validation: output '{t.name}' shape {shape} does not match source {list(t.shape)}")
            outputs.append({"name": t.name, "shape": shape, "source_shape": list(t.shape)})

        compression = options.extra.get("coreml_weights")
        if compression:
            model = _compress(model, str(compression))
        artifact = workdir / PACKAGE
        model.save(str(artifact))
        size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
        validation = {"passed": True, "precision": options.precision, "inputs": inputs, "outputs": outputs,
                      "ops": dict(sorted(ops.items())), "op_count": sum(ops.values()), **weights,
                      "weight_compression": compression or None, "package_bytes": size,
                      "coremltools": ct.__version__}
        (workdir / VALIDATION).write_text(json.dumps(validation, indent=2))
        return artifact

    def describe(self, artifact: Path) -> dict:
        """What compile validated (shown in the attempt's details)."""
        path = Path(artifact).parent / VALIDATION
        try:
            return {"coreml_validation": json.loads(path.read_text())}
        except (OSError, ValueError):
            return {}

    def load(self, artifact: Path, options: CompileOptions) -> CoreMLRunner:
        ok, why = prediction_supported()
        if not ok:
            v = self.describe(artifact).get("coreml_validation", {})
            summary = (f"package compiled and validated ({v.get('op_count')} MIL ops, "
                       f"{v.get('weights_checked')}/{v.get('weights_total')} weights equal to the source, "
                       f"inputs/outputs match)") if v.get("passed") else "package compiled"
            raise BackendUnavailable(f"{why}; {summary}: {artifact}")
        import coremltools as ct

        model = ct.models.MLModel(str(artifact), compute_units=ct.ComputeUnit[options.extra.get("compute_units", "ALL")])
        return CoreMLRunner(model, [t.name for t in options.inputs], [t.name for t in options.outputs])


def _compress(model, how: str):
    import coremltools.optimize.coreml as cto

    if how == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric"))
        return cto.linear_quantize_weights(model, config=config)
    if how == "palettize4":
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=4))
        return cto.palettize_weights(model, config=config)
    raise CompileFailed(f"coreml: unknown coreml_weights '{how}' (int8 or palettize4)")
