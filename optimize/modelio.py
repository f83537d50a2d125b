"""Model inputs and outputs of the optimization toolkit.

- :func:`resolve` turns a user's MODEL argument (a model folder, ``model.onnx`` or ``model.pt2``) into a
  :class:`ModelSource`, validating that the files exist and parse.
- :func:`load_module` rebuilds a trainable :class:`optimize.digits.DigitsCNN` from a source's weights
  (``.pt2`` state dict or ONNX initializers) and checks it reproduces the source's outputs.
- :func:`write_workload_folder` writes an output that ``kiln serve --repo`` can serve:
  ``OUT/1/model.onnx`` (+ ``OUT/1/model.pt2``), ``OUT/config.yaml``, ``OUT/data/{calib,eval}.npz`` and
  ``OUT/optimize.json`` (what was done, the split, the metric, measured numbers, the command).

Signatures, the FP32 reference and timing are ``backends.signature`` / ``backends.reference`` /
``backends.timing``, shared with the server.

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


def load_exported(path: Path):
    import torch

    from .build_default_model import _quiet

    try:
        with _quiet():
            return torch.export.load(str(path))
    except Exception as err:
        raise OptimizeError(f"{path}: not a loadable .pt2 ExportedProgram ({type(err).__name__}: {str(err)[:120]})") from None


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


def _input_name(src: ModelSource) -> str:
    from backends.signature import read_signature

    return read_signature({k: v for k, v in (("onnx", src.onnx), ("pt2", src.pt2)) if v is not None})[0][0].name


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
        from backends.reference import Reference

        ref = next(iter(Reference({k: v for k, v in (("onnx", src.onnx), ("pt2", src.pt2)) if v is not None}).infer(
            {_input_name(src): x}).values()))
        got = digits.predict_logits(model, x)
        if ref.shape != got.shape or float(np.abs(ref - got).max()) > 1e-4:
            raise OptimizeError(f"{src.primary}: could not rebuild the network as a DigitsCNN (outputs differ); prune/distill need a DigitsCNN-family model")
    return model


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
    if precision != "fp32" and lossy_atol is not None:
        # The lossy build's parity tolerance is what was measured here (twice the largest error on the calibration
        # rows); the metric (accuracy gate) is the real check where the server can express it.
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
