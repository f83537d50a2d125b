"""Build Kiln's default model, ``model_repo/digits-cnn``, deterministically.

    python -m optimize.build_default_model [--out model_repo/digits-cnn] [--epochs 30] [--seed 0]

Trains :class:`optimize.digits.DigitsCNN` on scikit-learn's bundled digits, checks the
held-out top-1 accuracy (fails below ``--min-accuracy``), and writes::

    <out>/1/model.onnx        FP32, input "input" [-1,1,8,8] -> output "logits" [-1,10], one file
    <out>/1/model.pt2         torch.export ExportedProgram, dynamic batch
    <out>/data/calib.npz      keys input (128,1,8,8) float32, label (128,) int64 -- from the training split
    <out>/data/eval.npz       keys input (N,1,8,8) float32, label (N,) int64 -- held out
    <out>/README.md           spec and the accuracy measured by this run

Both exports are re-loaded (ONNX Runtime, ``torch.export.load``) and compared with the
trained model before anything is reported. The same arguments give the same bytes on the
same torch/onnx versions (the ``.npz`` files are written with fixed zip timestamps).
Does not write ``config.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "model_repo" / "digits-cnn"

# Training recipe of the default model (the README records the values actually used).
DEFAULTS = {"epochs": 30, "seed": 0, "lr": 3e-3, "batch_size": 64, "widths": (16, 32), "hidden": 64}
ONNX_OPSET = 18  # native opset of the torch.export-based exporter (17 goes through a version converter)
ONNX_ATOL = 1e-5
PT2_ATOL = 1e-6
MAX_FILE_BYTES = 1_000_000


class BuildError(RuntimeError):
    pass


def _fail(msg: str) -> None:
    raise BuildError(msg)


# --------------------------------------------------------------------------- writers


def save_npz_deterministic(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but byte-reproducible (fixed zip timestamps and order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compresslevel=9)
    path.write_bytes(buf.getvalue())


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints and warnings; they are replayed if the block fails."""
    import warnings

    out = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._export", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        sys.stderr.write(out.getvalue())
        raise
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_onnx(model, example, path: Path, metadata: dict[str, str]) -> None:
    """Export to a single-file ONNX model: input ``input`` / output ``logits``, dynamic batch dim ``batch``."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            input_names=["input"],
            output_names=["logits"],
            opset_version=ONNX_OPSET,
            external_data=False,
            optimize=True,
            verify=False,
        )
    proto = program.model_proto
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = "Kiln default model digits-cnn (built by optimize/build_default_model.py)"
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.DEFAULT or init.external_data:
            _fail(f"{path}: initializer {init.name} uses external data")
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(proto.SerializeToString())
    stale = path.with_name(path.name + ".data")
    if stale.exists():
        stale.unlink()


def export_pt2(model, example, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if example.shape[0] < 2:
        _fail("torch.export with a dynamic batch needs an example batch >= 2")
    with _quiet():
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, str(path))


# --------------------------------------------------------------------------- checks


def check_onnx(path: Path, x: np.ndarray, y: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Load in ONNX Runtime, check I/O spec, parity with ``reference`` at several batch sizes, and accuracy."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.DEFAULT:
            _fail(f"{path}: initializer {init.name} is stored outside the file")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    spec = [(inp.name, inp.type, inp.shape[1:]), (out.name, out.type, out.shape[1:])]
    want = [("input", "tensor(float)", [1, 8, 8]), ("logits", "tensor(float)", [10])]
    if spec != want or isinstance(inp.shape[0], int) or isinstance(out.shape[0], int):
        _fail(f"{path}: unexpected I/O spec {inp.name}{inp.shape} {inp.type} -> {out.name}{out.shape} {out.type}")
    err = 0.0
    for bs in (1, 2, 7, 32, len(x)):
        for start in range(0, len(x), bs):
            got = sess.run(["logits"], {"input": x[start : start + bs]})[0]
            err = max(err, float(np.abs(got - reference[start : start + bs]).max()))
            if bs < len(x) and start >= 3 * bs:
                break  # a few batches per size are enough; the full set runs once
    if err > ONNX_ATOL:
        _fail(f"{path}: ONNX Runtime differs from torch by {err:.3g} > {ONNX_ATOL}")
    acc = float((sess.run(["logits"], {"input": x})[0].argmax(1) == y).mean())
    return err, acc


def check_pt2(path: Path, x: np.ndarray, model) -> float:
    """Reload the ExportedProgram and compare it with the eager ``model`` batch for batch (same kernels)."""
    import torch

    with _quiet():
        module = torch.export.load(str(path)).module()
    err = 0.0
    with torch.no_grad():
        for bs in (1, 2, 7, len(x)):
            xb = torch.from_numpy(x[:bs])
            err = max(err, float((module(xb) - model(xb)).abs().max()))
    if err > PT2_ATOL:
        _fail(f"{path}: reloaded ExportedProgram differs from torch by {err:.3g} > {PT2_ATOL}")
    return err


# --------------------------------------------------------------------------- README


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_readme(out: Path, info: dict) -> None:
    files = ["1/model.onnx", "1/model.pt2", "data/calib.npz", "data/eval.npz"]
    rows = "\n".join(
        f"| `{f}` | {(out / f).stat().st_size:,} | `{_sha256(out / f)[:16]}` |" for f in files
    )
    text = f"""# digits-cnn — Kiln's default model

A small convolutional network that classifies 8×8 grey images of handwritten digits (0–9).
It is trained on scikit-learn's bundled `load_digits` data set (1,797 images, no download needed)
and is the model Kiln serves out of the box.

**Held-out top-1 accuracy: {info['acc']:.4f}** ({info['n_correct']}/{info['n_eval']} correct on `data/eval.npz`;
ONNX Runtime on `1/model.onnx`: {info['ort_acc']:.4f}). Measured by the run that wrote this file.

## How it was built

From the repository root, with the `torch` extra installed:

```
{info['command']}
```

The script is deterministic: the same arguments give the same weights, the same accuracy and
(for the same torch/onnx versions) the same bytes. It writes every file below, including this README,
and fails without writing the README if the accuracy is below {info['min_acc']}.

- Data: `load_digits()`, pixels divided by 16 → float32 in [0, 1], layout (N, 1, 8, 8).
  Stratified split with seed {info['seed']}: {info['n_eval']} images held out for evaluation (20%),
  {info['n_train']} for training; the calibration set is {info['n_calib']} images drawn (stratified) from the training set.
- Model: `optimize.digits.DigitsCNN(widths={info['widths']}, hidden={info['hidden']})` —
  {info['arch']}; {info['params']:,} parameters, no batch norm.
- Training: Adam, lr {info['lr']}, batch {info['batch_size']}, {info['epochs']} epochs, cross-entropy,
  seed {info['seed']}, 1 intra-op thread, `torch.use_deterministic_algorithms(True)`.
- Exports: `torch.onnx.export(dynamo=True, opset {ONNX_OPSET})` with a dynamic batch dimension, weights
  inside the single file; `torch.export.export` (example batch 2, dynamic batch) + `torch.export.save`.
  Both are re-loaded and checked against the trained model: ONNX Runtime max abs error {info['ort_err']:.1e}
  (limit {ONNX_ATOL:g}), reloaded `.pt2` max abs error {info['pt2_err']:.1e} (limit {PT2_ATOL:g}).
- Built with torch {info['torch']}, onnx {info['onnx']}, onnxruntime {info['ort']}, scikit-learn {info['sklearn']}.

## Interface

| | name | datatype | shape | meaning |
|---|---|---|---|---|
| input | `input` | FP32 | [-1, 1, 8, 8] | image batch, pixel values / 16 (range [0, 1]) |
| output | `logits` | FP32 | [-1, 10] | unnormalised class scores; `argmax` over the last axis is the digit |

Preprocessing: the raw `load_digits` pixels are integers 0–16; divide by 16. No mean/std normalisation.
The batch dimension is dynamic in both exports (any batch ≥ 1).

## Files

| file | bytes | sha256 (first 16) |
|---|---|---|
{rows}

- `1/model.onnx`: the serving source (ONNX is the interchange format); ONNX Runtime FP32 CPU on it is the parity reference.
- `1/model.pt2`: the same network as a `torch.export` ExportedProgram (`torch.export.load(path).module()`), for
  backends that convert from PyTorch (litert-torch, Core ML, OpenVINO).
- `data/calib.npz`: keys `input` (float32 ({info['n_calib']}, 1, 8, 8)) and `label` (int64) — golden/calibration inputs
  (INT8 calibration, parity checks). Drawn from the training split.
- `data/eval.npz`: keys `input` (float32 ({info['n_eval']}, 1, 8, 8)) and `label` (int64) — the held-out set used for
  the accuracy above and for accuracy gates.

`config.yaml` (how Kiln builds and serves this model) is maintained separately.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- main


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m optimize.build_default_model"]
    out = Path(args.out).resolve()
    if out != DEFAULT_OUT:
        try:
            parts.append(f"--out {out.relative_to(REPO_ROOT)}")
        except ValueError:
            parts.append(f"--out {out}")
    parts += [f"--epochs {args.epochs}", f"--seed {args.seed}"]
    if args.lr != DEFAULTS["lr"]:
        parts.append(f"--lr {args.lr}")
    if args.batch_size != DEFAULTS["batch_size"]:
        parts.append(f"--batch-size {args.batch_size}")
    return " ".join(parts)


def build(args: argparse.Namespace) -> dict:
    import onnx
    import onnxruntime
    import sklearn
    import torch

    from optimize import digits

    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    splits = digits.load_splits(seed=args.seed)
    print(f"data: {splits.summary()}")

    model = digits.DigitsCNN(widths=DEFAULTS["widths"], hidden=DEFAULTS["hidden"], seed=args.seed)
    digits.train(
        model,
        splits,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    model.eval()
    ref = digits.predict_logits(model, splits.x_eval)
    n_correct = int((ref.argmax(1) == splits.y_eval).sum())
    acc = n_correct / len(splits.y_eval)
    print(f"held-out top-1 accuracy: {acc:.4f} ({n_correct}/{len(splits.y_eval)})")
    if acc < args.min_accuracy:
        _fail(f"held-out top-1 accuracy {acc:.4f} is below the required {args.min_accuracy}")

    onnx_path, pt2_path = out / "1" / "model.onnx", out / "1" / "model.pt2"
    example = torch.from_numpy(splits.x_calib[:2].copy())
    export_onnx(
        model,
        example,
        onnx_path,
        {
            "kiln.model": "digits-cnn",
            "kiln.preprocessing": "pixels / 16 -> float32 [0,1], NCHW (N,1,8,8)",
            "kiln.eval_top1": f"{acc:.4f}",
            "kiln.built_by": _command(args),
        },
    )
    export_pt2(model, example, pt2_path)
    save_npz_deterministic(out / "data" / "calib.npz", input=splits.x_calib, label=splits.y_calib)
    save_npz_deterministic(out / "data" / "eval.npz", input=splits.x_eval, label=splits.y_eval)

    ort_err, ort_acc = check_onnx(onnx_path, splits.x_eval, splits.y_eval, ref)
    pt2_err = check_pt2(pt2_path, splits.x_eval, model)
    print(f"onnx: onnxruntime max abs err {ort_err:.2e}, top-1 {ort_acc:.4f}; pt2: reloaded max abs err {pt2_err:.2e}")
    for f in ("calib", "eval"):
        with np.load(out / "data" / f"{f}.npz") as z:
            if sorted(z.files) != ["input", "label"] or z["input"].dtype != np.float32 or z["input"].shape[1:] != (1, 8, 8):
                _fail(f"data/{f}.npz: unexpected content {z.files}")

    cfg = model.config
    arch = " → ".join(
        [f"conv3×3({w})+ReLU" + ("+maxpool2" if i in cfg["pool_after"] else "") for i, w in enumerate(cfg["widths"])]
        + ([f"linear({cfg['hidden']})+ReLU"] if cfg["hidden"] else [])
        + [f"linear({cfg['num_classes']})"]
    )
    info = {
        "acc": acc, "n_correct": n_correct, "n_eval": len(splits.y_eval), "n_train": len(splits.y_train),
        "n_calib": len(splits.y_calib), "ort_acc": ort_acc, "ort_err": ort_err, "pt2_err": pt2_err,
        "command": _command(args), "min_acc": args.min_accuracy, "seed": args.seed, "epochs": args.epochs,
        "lr": args.lr, "batch_size": args.batch_size, "widths": cfg["widths"], "hidden": cfg["hidden"],
        "arch": arch, "params": digits.count_params(model), "torch": torch.__version__, "onnx": onnx.__version__,
        "ort": onnxruntime.__version__, "sklearn": sklearn.__version__,
    }
    write_readme(out, info)

    sizes = {}
    for p in sorted(q for q in out.rglob("*") if q.is_file() and q.name != "config.yaml"):
        sizes[str(p.relative_to(out))] = p.stat().st_size
        if p.stat().st_size > MAX_FILE_BYTES:
            _fail(f"{p} is {p.stat().st_size:,} bytes (limit {MAX_FILE_BYTES:,})")
    for name, size in sizes.items():
        print(f"  {out.name}/{name}: {size:,} bytes")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optimize.build_default_model", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="model directory (default: model_repo/digits-cnn)")
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--min-accuracy", type=float, default=0.95, help="fail below this held-out top-1 (default 0.95)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = ap.parse_args(argv)
    try:
        build(args)
    except BuildError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
