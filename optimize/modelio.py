"""Model inputs and outputs of the optimization toolkit.

- :func:`resolve` turns a user's MODEL argument (a model folder, ``model.onnx`` or ``model.pt2``) into a
  :class:`ModelSource`, validating that the files exist and parse.
- :func:`load_module` rebuilds a trainable :class:`optimize.digits.DigitsCNN` from a source's weights
  (``.pt2`` state dict or ONNX initializers) and checks it reproduces the source's outputs.
- :func:`load_calibration` reads and validates an ``.npz`` of calibration inputs against the input spec.
- :func:`write_model_folder` writes an output that ``kiln serve --repo`` can serve:
  ``OUT/1/model.onnx`` (+ ``OUT/1/model.pt2``), ``OUT/config.yaml``, ``OUT/data/{calib,eval}.npz`` and
  ``OUT/optimize.json`` (what was done, measured numbers, the command).

torch is imported inside functions only.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OptimizeError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "model_repo" / "digits-cnn"
DATA_SEED = 0  # the split seed of the default model: its eval set is held out from this training set


@dataclass
class TensorSpec:
    name: str
    shape: list  # ints, -1 for dynamic
    dtype: str = "float32"


@dataclass
class ModelSource:
    """A model given on the command line, resolved to its files."""

    arg: str
    onnx: Path | None = None
    pt2: Path | None = None
    folder: Path | None = None
    calib: Path | None = None
    eval: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.folder is not None:
            return self.folder.name
        p = self.onnx or self.pt2
        return p.parent.parent.name if p.parent.name.isdigit() else p.stem

    @property
    def primary(self) -> Path:
        return self.onnx or self.pt2  # type: ignore[return-value]


def _version_dir(folder: Path) -> Path | None:
    versions = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for v in reversed(versions):
        if (v / "model.onnx").exists() or (v / "model.pt2").exists():
            return v
    return None


def _check_onnx_file(path: Path) -> None:
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise OptimizeError(f"{path}: not a valid ONNX model ({type(err).__name__})") from None


def _check_pt2_file(path: Path) -> None:
    import zipfile

    if not zipfile.is_zipfile(path):
        raise OptimizeError(f"{path}: not a valid .pt2 file (expected a torch.export archive)")


def resolve(arg: str | Path, *, need: str | None = None) -> ModelSource:
    """Resolve MODEL (folder, .onnx or .pt2). ``need='onnx'|'pt2'`` requires that format (or a sibling of it)."""
    path = Path(arg)
    if not path.exists():
        raise OptimizeError(f"{path}: no such file or directory")
    src = ModelSource(arg=str(arg))
    if path.is_dir():
        vdir = _version_dir(path)
        if vdir is None:
            raise OptimizeError(f"{path}: not a model folder (expected <folder>/<version>/model.onnx or model.pt2)")
        src.folder = path
        src.onnx = vdir / "model.onnx" if (vdir / "model.onnx").exists() else None
        src.pt2 = vdir / "model.pt2" if (vdir / "model.pt2").exists() else None
        cfg = path / "config.yaml"
        if cfg.exists():
            import yaml

            try:
                src.config = yaml.safe_load(cfg.read_text()) or {}
            except yaml.YAMLError as err:
                raise OptimizeError(f"{cfg}: invalid YAML ({str(err).splitlines()[0]})") from None
        for key in ("calib", "eval"):
            f = path / "data" / f"{key}.npz"
            if f.exists():
                setattr(src, key, f)
    elif path.suffix == ".onnx":
        src.onnx = path
        sib = path.with_suffix(".pt2")
        src.pt2 = sib if sib.exists() else None
    elif path.suffix == ".pt2":
        src.pt2 = path
        sib = path.with_suffix(".onnx")
        src.onnx = sib if sib.exists() else None
    else:
        raise OptimizeError(f"{path}: unsupported model format '{path.suffix or path.name}' (expected .onnx, .pt2 or a model folder)")
    if src.folder is None and src.primary.parent.name.isdigit():  # <folder>/<version>/model.onnx: use its data
        folder = src.primary.parent.parent
        for key in ("calib", "eval"):
            f = folder / "data" / f"{key}.npz"
            if f.exists():
                setattr(src, key, f)
    if src.onnx:
        _check_onnx_file(src.onnx)
    if src.pt2:
        _check_pt2_file(src.pt2)
    if need == "pt2" and src.pt2 is None and src.onnx is None:
        raise OptimizeError(f"{path}: no model.pt2 or model.onnx")
    return src


# --------------------------------------------------------------------------- input spec


def input_spec(src: ModelSource) -> TensorSpec:
    """The (single) input of the model: name, shape (-1 for dynamic dims), numpy dtype."""
    if src.onnx is not None:
        import onnx

        proto = onnx.load(str(src.onnx), load_external_data=False)
        inits = {i.name for i in proto.graph.initializer}
        inputs = [i for i in proto.graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise OptimizeError(f"{src.onnx}: the toolkit handles single-input models; this one has {len(inputs)} inputs")
        t = inputs[0].type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        return TensorSpec(inputs[0].name, shape, dtype)
    ep = load_exported(src.pt2)
    specs = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(specs) != 1:
        raise OptimizeError(f"{src.pt2}: the toolkit handles single-input models; this one has {len(specs)} inputs")
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == specs[0].arg.name)
    val = node.meta["val"]
    shape = [int(d) if isinstance(d, int) or str(d).isdigit() else -1 for d in val.shape]
    return TensorSpec("input", shape, str(val.dtype).replace("torch.", ""))


def load_exported(path: Path):
    import torch

    from .build_default_model import _quiet

    try:
        with _quiet():
            return torch.export.load(str(path))
    except Exception as err:
        raise OptimizeError(f"{path}: not a loadable .pt2 ExportedProgram ({type(err).__name__}: {str(err)[:120]})") from None


# --------------------------------------------------------------------------- data


def load_npz(path: str | Path, spec: TensorSpec, *, what: str = "calibration", need_labels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an ``.npz`` of inputs (key = the input name, or ``input``) and optional ``label``; validate against ``spec``."""
    p = Path(path)
    if not p.exists():
        raise OptimizeError(f"{p}: {what} file not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:
        raise OptimizeError(f"{p}: not a readable .npz file ({type(err).__name__})") from None
    key = spec.name if spec.name in data else ("input" if "input" in data else None)
    if key is None:
        raise OptimizeError(f"{p}: no array named '{spec.name}' (the model's input) or 'input'; found {sorted(data)}")
    x = data[key]
    if x.dtype != np.dtype(spec.dtype):
        raise OptimizeError(f"{p}: '{key}' is {x.dtype}, the model's input '{spec.name}' is {spec.dtype}")
    want = spec.shape[1:]
    if x.ndim != len(spec.shape) or any(w != -1 and w != g for w, g in zip(want, x.shape[1:])):
        raise OptimizeError(f"{p}: '{key}' has shape {list(x.shape)}, the model's input '{spec.name}' is {spec.shape}")
    if len(x) == 0:
        raise OptimizeError(f"{p}: '{key}' is empty")
    y = data.get("label")
    if need_labels and y is None:
        raise OptimizeError(f"{p}: no 'label' array (needed to measure accuracy)")
    if y is not None and len(y) != len(x):
        raise OptimizeError(f"{p}: {len(x)} inputs but {len(y)} labels")
    return np.ascontiguousarray(x), y


def load_calibration(src: ModelSource, calib: str | Path | None, spec: TensorSpec | None = None) -> np.ndarray:
    path = calib or src.calib
    if path is None:
        raise OptimizeError(f"{src.arg}: no calibration data: pass --calib FILE.npz (a model folder's data/calib.npz is used by default)")
    x, _ = load_npz(path, spec or input_spec(src))
    return x


def eval_data(src: ModelSource | None):
    """Held-out (x, y): the model folder's data/eval.npz, or the digits eval split."""
    if src is not None and src.eval is not None:
        return load_npz(src.eval, input_spec(src), what="evaluation", need_labels=True)
    from . import digits

    s = digits.load_splits(DATA_SEED)
    return s.x_eval, s.y_eval


# --------------------------------------------------------------------------- torch module


def _weights(src: ModelSource) -> dict[str, np.ndarray]:
    if src.pt2 is not None:
        ep = load_exported(src.pt2)
        return {k: v.detach().numpy() for k, v in ep.state_dict.items()}
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src.onnx))
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def digits_config_from_weights(w: dict[str, np.ndarray]) -> dict[str, Any]:
    """Infer ``DigitsCNN`` constructor arguments from parameter names and shapes."""
    conv = sorted((int(m.group(1)), k) for k in w if (m := re.fullmatch(r"features\.(\d+)\.weight", k)))
    lin = sorted((int(m.group(1)), k) for k in w if (m := re.fullmatch(r"classifier\.(\d+)\.weight", k)))
    if not conv or not lin or len(lin) > 2 or any(w[k].ndim != 4 for _, k in conv):
        raise OptimizeError("not a DigitsCNN-family model (expected features.N.weight conv and classifier.N.weight linear parameters)")
    widths = [int(w[k].shape[0]) for _, k in conv]
    idx = [i for i, _ in conv]
    pools = [b for b in range(len(idx) - 1) if idx[b + 1] - idx[b] == 3]  # conv, relu, pool
    in_ch = int(w[conv[0][1]].shape[1])
    flat = int(w[lin[0][1]].shape[1])
    side2 = flat // widths[-1]
    side = int(round(side2**0.5))
    image = 8
    n_pools = 0
    while image >> n_pools > side:
        n_pools += 1
    if len(pools) < n_pools:
        pools.append(len(widths) - 1)
    hidden = int(w[lin[0][1]].shape[0]) if len(lin) == 2 else 0
    dropout_gap = len(lin) == 2 and lin[1][0] - lin[0][0] == 3
    return {
        "widths": tuple(widths), "hidden": hidden, "pool_after": tuple(pools), "in_channels": in_ch,
        "image_size": image, "num_classes": int(w[lin[-1][1]].shape[0]), "dropout": 0.1 if dropout_gap else 0.0,
    }


def load_module(src: ModelSource, *, check: bool = True):
    """A trainable ``DigitsCNN`` with the source's weights; checked against the source's own outputs."""
    import torch

    from . import digits

    if src.pt2 is None and src.onnx is None:
        raise OptimizeError(f"{src.arg}: no model.pt2 or model.onnx")
    w = _weights(src)
    cfg = digits_config_from_weights(w)
    try:
        model = digits.DigitsCNN(**cfg)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in w.items() if k.startswith(("features.", "classifier."))})
    except Exception as err:
        raise OptimizeError(f"{src.primary}: weights do not fit a DigitsCNN{cfg['widths']} ({str(err).splitlines()[0][:120]})") from None
    model.eval()
    if check:
        x = np.random.default_rng(0).random((4, cfg["in_channels"], cfg["image_size"], cfg["image_size"]), dtype=np.float32)
        ref = reference_logits(src, x)
        got = digits.predict_logits(model, x)
        if ref.shape != got.shape or float(np.abs(ref - got).max()) > 1e-4:
            raise OptimizeError(f"{src.primary}: could not rebuild the network as a DigitsCNN (outputs differ); prune/distill need a DigitsCNN-family model")
    return model


def reference_logits(src: ModelSource, x: np.ndarray) -> np.ndarray:
    """Outputs of the source itself: ONNX Runtime on the ONNX file, else the ExportedProgram."""
    if src.onnx is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(src.onnx), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0]
    import torch

    with torch.no_grad():
        return load_exported(src.pt2).module()(torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------- exports / output folder


def export(model, onnx_path: Path | None, pt2_path: Path | None, metadata: dict[str, str] | None = None) -> None:
    """Export a torch module to ONNX (input ``input``, output ``logits``, dynamic batch) and/or ``.pt2``."""
    import torch

    from .build_default_model import export_onnx, export_pt2

    model.eval()
    cfg = getattr(model, "config", {"in_channels": 1, "image_size": 8})
    example = torch.zeros(2, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    if onnx_path is not None:
        export_onnx(model, example, onnx_path, metadata or {})
    if pt2_path is not None:
        export_pt2(model, example, pt2_path)


def _yaml_config(backend: str, precision: str, max_drop: float, comment: str, backend_options: dict | None) -> str:
    lines = [f"# {line}" for line in comment.splitlines()] + [
        f"backend: {backend}",
        f"precision: {precision}",
    ]
    if backend != "onnxruntime":
        lines.append("fallback: [onnxruntime]" if precision == "fp32" else f"fallback: [{backend}:fp32, onnxruntime]")
    lines += [
        "max_batch_size: 32",
        "dynamic_batching: {max_queue_delay_ms: 2, preferred_batch_sizes: [8, 16, 32], max_queue_size: 1024}",
        "instances: 1",
        "verify: {atol: 1.0e-4, rtol: 1.0e-3, samples: data/calib.npz}" if precision == "fp32"
        else "verify: {atol: 0.5, rtol: 0.5, samples: data/calib.npz}  # int8: the accuracy gate is the real check",
        f"accuracy: {{dataset: data/eval.npz, metric: top1, max_drop: {max_drop}}}",
    ]
    if backend_options:
        lines.append("backend_options: " + json.dumps(backend_options))
    return "\n".join(lines) + "\n"


def write_model_folder(
    out: Path,
    *,
    src: ModelSource | None,
    model=None,
    onnx_file: Path | None = None,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    max_drop: float = 0.01,
    info: dict[str, Any] | None = None,
    comment: str = "written by kiln optimize",
    backend_options: dict | None = None,
) -> Path:
    """Write a servable model folder. ``model`` (torch) is exported to ONNX + .pt2; ``onnx_file`` is copied as is."""
    from . import digits
    from .build_default_model import save_npz_deterministic

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptimizeError(f"{out}: exists and is not a folder")
    vdir = out / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    for stale in ("model.onnx", "model.pt2"):
        (vdir / stale).unlink(missing_ok=True)
    meta = {"kiln.built_by": (info or {}).get("command", "kiln optimize")}
    if model is not None:
        export(model, vdir / "model.onnx", vdir / "model.pt2", meta)
    elif onnx_file is not None:
        shutil.copyfile(onnx_file, vdir / "model.onnx")
    else:
        raise ValueError("write_model_folder needs model or onnx_file")
    data = out / "data"
    data.mkdir(exist_ok=True)
    for key in ("calib", "eval"):
        have = getattr(src, key, None) if src is not None else None
        target = data / f"{key}.npz"
        if have is not None:
            if Path(have).resolve() != target.resolve():
                shutil.copyfile(have, target)
        elif not target.exists():
            s = digits.load_splits(DATA_SEED)
            x, y = (s.x_calib, s.y_calib) if key == "calib" else (s.x_eval, s.y_eval)
            save_npz_deterministic(target, input=x, label=y)
    (out / "config.yaml").write_text(_yaml_config(backend, precision, max_drop, comment, backend_options))
    if info is not None:
        (out / "optimize.json").write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default)


def file_size(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.exists():
            total += p.stat().st_size
    return total


# --------------------------------------------------------------------------- output folder of any workload


def _gate_yaml(w, backend: str, precision: str, max_drop: float, comment: str, backend_options: dict | None,
               has_gate: bool, lossy_atol: float | None) -> str:
    lines = [f"# {line}" for line in comment.splitlines()] + [f"backend: {backend}", f"precision: {precision}"]
    if backend != "onnxruntime":
        lines.append("fallback: [onnxruntime]" if precision == "fp32" else f"fallback: [{backend}:fp32, onnxruntime]")
    lines += [
        "max_batch_size: 32",
        "dynamic_batching: {max_queue_delay_ms: 2, preferred_batch_sizes: [8, 16, 32], max_queue_size: 1024}",
        "instances: 1",
    ]
    verify = "verify: {atol: 1.0e-4, rtol: 1.0e-3, samples: data/calib.npz"
    if precision != "fp32" and not has_gate:
        # No top-1 gate can express a regression metric: the lossy build's parity tolerance is what was measured here.
        verify += f", precisions: {{{precision}: {{atol: {lossy_atol:.6g}, rtol: 0.1}}}}"
    lines.append(verify + "}")
    if has_gate:
        lines.append(f"accuracy: {{dataset: data/eval.npz, metric: top1, max_drop: {max_drop}}}")
    if backend_options:
        lines.append("backend_options: " + json.dumps(backend_options))
    return "\n".join(lines) + "\n"


def write_workload_folder(out: Path, w, *, module=None, sources: dict[str, Path] | None = None, backend: str = "onnxruntime",
                          precision: str = "fp32", max_drop: float = 0.01, info: dict[str, Any] | None = None,
                          comment: str = "written by kiln optimize", backend_options: dict | None = None,
                          lossy_atol: float | None = None) -> Path:
    """A servable folder for any workload: ``1/model.onnx`` (+ ``.pt2``), ``data/calib.npz`` (the model's input
    names: the parity samples and the INT8 calibration the server uses), ``data/eval.npz`` (+ ``label`` for the
    server's top-1 gate: the data's labels, or the original's predictions under ``agreement``), config.yaml
    and optimize.json (what was done, the split, the metric, the numbers, the command)."""
    from .build_default_model import save_npz_deterministic
    from .source import export_module

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptimizeError(f"{out}: exists and is not a folder")
    vdir = out / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    for stale in ("model.onnx", "model.pt2"):
        (vdir / stale).unlink(missing_ok=True)
    meta = {"kiln.built_by": (info or {}).get("command", "kiln optimize")}
    if module is not None:
        export_module(module, w.splits.train.head(8).inputs, vdir, output_names=[t.name for t in w.outputs], metadata=meta)
    elif sources:
        for fmt, path in sources.items():
            if path is not None:
                shutil.copyfile(path, vdir / f"model.{fmt}")
    else:
        raise ValueError("write_workload_folder needs module or sources")
    labels = w.gate_labels()
    save_npz_deterministic(out / "data" / "calib.npz", **w.splits.calib.inputs)
    ev = dict(w.splits.eval.inputs)
    if labels is not None:
        ev["label"] = labels
    save_npz_deterministic(out / "data" / "eval.npz", **ev)
    if precision != "fp32" and labels is None and lossy_atol is None:
        raise OptimizeError("a lossy build of a model without a top-1 gate needs a measured parity tolerance")
    (out / "config.yaml").write_text(_gate_yaml(w, backend, precision, max_drop, comment, backend_options,
                                                labels is not None, lossy_atol))
    record = {**(info or {}), "workload": w.record()}
    (out / "optimize.json").write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    return out
