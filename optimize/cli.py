"""``kiln optimize ...``: analyze, prune, quantize, distill, search, report.

A typer app registered by ``service/cli.py``. Nothing heavy is imported at module level (torch,
onnx and the runtimes load inside each command), so ``kiln --help`` stays fast and the serving core
works without the torch extra. Bad input (missing file, wrong format, value out of range,
calibration data that does not match the model) prints one ``error: ...`` line and exits 2; a valid
request that cannot be carried out here (no recipe, no candidate under the budget) exits 1.
"""

from __future__ import annotations

import functools
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Optimize a model: analyze → prune / quantize / distill / search → measure (report). "
    "Needs the 'optimize' extra (torch, torch-pruning, nncf, ...).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _command() -> str:
    """The command line that reproduces this run (rebuilt from the parsed options when not run as `kiln`)."""
    import click

    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "kiln":
        return "kiln " + " ".join(shlex.quote(a) for a in argv[1:])
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return "kiln optimize"
    parts = ["kiln", "optimize", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            parts.append(shlex.quote(str(value)))
        elif value is None or value == param.default:
            continue
        elif isinstance(value, bool):
            flags = param.opts if value else (param.secondary_opts or param.opts)
            parts.append(flags[0])
        else:
            parts += [param.opts[0], shlex.quote(str(value))]
    return " ".join(parts)


def _fail(msg: str, code: int) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def guarded(fn):
    """Turn the toolkit's errors into one line on stderr and an exit code (2 bad input, 1 failed step)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import OptimizeError, StepFailed

        try:
            return fn(*args, **kwargs)
        except OptimizeError as err:
            _fail(str(err), 2)
        except StepFailed as err:
            _fail(str(err), 1)
        except ImportError as err:
            _fail(f"{err} (install the optimize extra: pip install 'kiln[optimize]')", 1)

    return wrapper


def _console():
    from rich.console import Console

    return Console()


def _default_out(src, suffix: str) -> Path:
    return Path("optimized") / f"{src.name}-{suffix}"


def _silence_libraries() -> None:
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("nncf", "torch", "torch_pruning", "onnxruntime", "openvino"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------- analyze


@app.command()
@guarded
def analyze(
    model: str = typer.Argument(..., help="A model folder, model.onnx or model.pt2."),
    fmt: Optional[str] = typer.Option(None, "--format", help="onnx or pt2 (default: the ONNX file when there is one)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the analysis as JSON."),
):
    """Parameters, MACs/FLOPs, activation memory, size on disk and a per-layer table."""
    from . import analyze as an
    from . import modelio
    from .errors import OptimizeError

    if fmt not in (None, "onnx", "pt2"):
        raise OptimizeError(f"--format must be onnx or pt2, got '{fmt}'")
    src = modelio.resolve(model)
    if fmt == "onnx" and src.onnx is None:
        raise OptimizeError(f"{model}: no ONNX file")
    if fmt == "pt2" and src.pt2 is None:
        raise OptimizeError(f"{model}: no .pt2 file")
    a = an.analyze(src, prefer=fmt)
    an.render(a, _console())
    if json_out:
        json_out.write_text(modelio.dumps(a.as_dict()) + "\n")


# --------------------------------------------------------------------------- prune


@app.command()
@guarded
def prune(
    model: str = typer.Argument(..., help="A DigitsCNN-family model: folder, model.pt2 or model.onnx."),
    method: str = typer.Option(..., "--method", help="l1-unstructured or channel."),
    amount: float = typer.Option(..., "--amount", help="Fraction of weights (unstructured) or channels (channel) to remove, in (0, 1)."),
    finetune_epochs: int = typer.Option(10, "--finetune-epochs", help="Fine-tuning epochs on the training split (0: none)."),
    lr: float = typer.Option(1e-3, "--lr", help="Fine-tuning learning rate."),
    round_to: Optional[int] = typer.Option(None, "--round-to", help="channel: keep channel counts a multiple of N (e.g. 16 for AVX-512 kernels)."),
    seed: int = typer.Option(0, "--seed"),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Accuracy gate written to config.yaml."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output model folder (default optimized/<model>-<method>)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Prune weights (L1 unstructured, made permanent) or whole channels (torch-pruning DepGraph), then fine-tune."""
    from . import digits, modelio
    from . import prune as pr

    pr.validate(method, amount, finetune_epochs, round_to)
    _silence_libraries()
    src = modelio.resolve(model)
    module = modelio.load_module(src)
    splits = digits.load_splits(modelio.DATA_SEED)
    x_eval, y_eval = modelio.eval_data(src)
    res = pr.prune_model(module, splits, method, amount, finetune_epochs, lr=lr, seed=seed, progress=progress,
                         x_eval=x_eval, y_eval=y_eval, round_to=round_to)
    out = out or _default_out(src, method)
    info = {"command": _command(), "technique": f"prune-{method}", **res.as_dict()}
    modelio.write_model_folder(out, src=src, model=res.model, max_drop=max_drop, info=info,
                               comment=f"{method} pruning ({amount}) of {src.arg}, written by kiln optimize prune")
    c = _console()
    c.print(f"[bold]{method}[/bold] pruning, amount {amount}: parameters {res.params_before:,} → {res.params_after:,}, "
            f"non-zero {res.nonzero_before:,} → {res.nonzero_after:,}, weight sparsity {res.sparsity:.1%}")
    c.print(f"held-out top-1: {res.acc_before:.4f} before, {res.acc_pruned:.4f} right after pruning, "
            f"{res.acc_after:.4f} after {finetune_epochs} fine-tuning epochs (drop {100 * (res.acc_before - res.acc_after):.1f} pt)")
    if method == "channel":
        c.print(f"new architecture: widths {res.model.config['widths']}, hidden {res.model.config['hidden']}")
    c.print(f"wrote {out}/ (1/model.onnx, 1/model.pt2, config.yaml) — serve with: kiln serve --repo {out.parent}")


# --------------------------------------------------------------------------- quantize


@app.command()
@guarded
def quantize(
    model: str = typer.Argument(..., help="A model folder, model.onnx or model.pt2."),
    backend: str = typer.Option("auto", "--backend", "-b", help="onnxruntime, openvino, litert, or auto (chosen from the CPU's ISA)."),
    mode: str = typer.Option("static", "--mode", help="static (calibrated; each backend's recipe) or dynamic (ONNX Runtime)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz with the input array (default: the folder's data/calib.npz)."),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Accuracy gate written to config.yaml."),
    runs: int = typer.Option(300, "--runs", help="Timed calls per latency figure."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output model folder (default optimized/<model>-int8-<backend>)."),
):
    """INT8 with the backend's recipe, chosen by what the CPU supports; measures fp32 vs int8 accuracy and latency."""
    from . import hw, modelio
    from . import quantize as q

    q.validate(backend, mode)
    if runs < 10:
        from .errors import OptimizeError

        raise OptimizeError(f"--runs must be ≥ 10, got {runs}")
    _silence_libraries()
    src = modelio.resolve(model)
    calib_x = None
    if mode == "static":
        calib_x = modelio.load_calibration(src, calib)
    elif calib is not None:
        modelio.load_calibration(src, calib)  # validate even if dynamic does not use it
    x_eval, y_eval = modelio.eval_data(src)
    cpu = hw.detect()
    out = out or _default_out(src, f"int8-{mode}-{backend}")
    res = q.quantize(src, backend, mode, calib_x, x_eval, y_eval, out=out, runs=runs, max_drop=max_drop, command=_command())
    c = _console()
    c.print(f"CPU: {cpu.summary()}")
    for n in res.notes:
        c.print(n)
    c.print(f"recipe: [bold]{res.recipe.name}[/bold]\n  why: {res.recipe.reason}")
    f, i = res.fp32, res.int8
    from rich.table import Table

    t = Table(title=f"{res.backend}: fp32 vs INT8 ({mode})")
    for col in ("", "top-1", "p50 b1 ms", "p50 b32 ms", "artifact bytes"):
        t.add_column(col, justify="right")
    for label, m in (("fp32", f), ("int8", i)):
        t.add_row(label, f"{m['accuracy']:.4f}" if m.get("accuracy") is not None else m.get("reason", "n/a")[:60],
                  f"{m['p50_ms'].get('1', float('nan')):.4f}" if m.get("ok") else "n/a",
                  f"{m['p50_ms'].get('32', float('nan')):.4f}" if m.get("ok") else "n/a",
                  f"{m['artifact_bytes']:,}" if m.get("artifact_bytes") else "n/a")
    c.print(t)
    if res.drop is not None:
        c.print(f"top-1 drop: {100 * res.drop:.2f} points" + ("" if res.drop <= max_drop else f" [red](> --max-drop {max_drop})[/red]"))
    c.print(f"wrote {out}/ — serve with: kiln serve --repo {out.parent}")


# --------------------------------------------------------------------------- distill


@app.command()
@guarded
def distill(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (folder, .pt2 or .onnx)."),
    student: str = typer.Option(..., "--student", help="Student architecture 'W1,W2[:HIDDEN]' (e.g. 8,16:32) or a DigitsCNN model path."),
    alpha: float = typer.Option(0.7, "--alpha", help="Weight of the hard-label cross-entropy (1 - alpha: the KL term)."),
    temperature: float = typer.Option(4.0, "--temperature", "-T", help="Softmax temperature of the KL term."),
    epochs: int = typer.Option(60, "--epochs", help="Maximum epochs."),
    patience: int = typer.Option(10, "--patience", help="Stop after this many epochs without a better validation top-1."),
    lr: float = typer.Option(3e-3, "--lr"),
    val_fraction: float = typer.Option(0.15, "--val-fraction", help="Validation split carved from the training data."),
    seed: int = typer.Option(0, "--seed"),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Also train the same student without the teacher."),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Accuracy gate written to config.yaml."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output model folder (default optimized/<teacher>-distilled)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Knowledge distillation: alpha·CE + (1−alpha)·KL(teacher/T ‖ student/T)·T², early stopping on validation top-1."""
    from . import digits, modelio
    from . import distill as kd

    kd.validate(alpha, temperature, epochs, patience, val_fraction)
    t_src = modelio.resolve(teacher)
    if Path(student).suffix in (".pt2", ".onnx") or Path(student).is_dir():
        student_spec = modelio.load_module(modelio.resolve(student))
    else:
        student_spec = kd.parse_student(student)
    _silence_libraries()
    splits = digits.load_splits(modelio.DATA_SEED)
    x_eval, y_eval = modelio.eval_data(t_src)
    res = kd.distill(t_src, student_spec, splits, alpha=alpha, temperature=temperature, epochs=epochs, lr=lr, seed=seed,
                     patience=patience, val_fraction=val_fraction, progress=progress, compare=compare, x_eval=x_eval, y_eval=y_eval)
    out = out or _default_out(t_src, "distilled")
    modelio.write_model_folder(out, src=t_src, model=res.model, max_drop=max_drop,
                               info={"command": _command(), "technique": "distill", **res.as_dict()},
                               comment=f"student distilled from {teacher}, written by kiln optimize distill")
    c = _console()
    c.print(f"student {res.student_config['widths']} hidden {res.student_config['hidden']} "
            f"({digits.count_params(res.model):,} params), α {alpha}, T {temperature}: best validation top-1 {res.val_top1:.4f} "
            f"at epoch {res.best_epoch + 1}/{res.epochs_run}")
    c.print(f"held-out top-1: teacher {res.teacher_eval_top1:.4f}, student with teacher {res.eval_top1:.4f}"
            + (f", same student without teacher {res.baseline['eval_top1']:.4f}" if res.baseline else ""))
    c.print(f"wrote {out}/ — serve with: kiln serve --repo {out.parent}")


# --------------------------------------------------------------------------- search


@app.command()
@guarded
def search(
    budget_ms: float = typer.Option(..., "--budget-ms", help="Latency budget: p50 in ms at --batch on --backend."),
    backend: str = typer.Option("onnxruntime", "--backend", "-b", help="Target backend the latency is measured on."),
    batch: int = typer.Option(1, "--batch", help="Batch size of the latency figure (1-32)."),
    epochs: int = typer.Option(12, "--epochs", help="Short training per candidate."),
    final_epochs: int = typer.Option(30, "--final-epochs", help="Training of the winner before it is written."),
    max_candidates: Optional[int] = typer.Option(None, "--max-candidates", help="Evaluate a spread subset of the grid."),
    runs: int = typer.Option(200, "--runs", help="Timed calls per candidate."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output model folder (default optimized/digits-search-<backend>)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every candidate as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Hardware-aware search over DigitsCNN widths/depths: latency measured on the backend, accuracy after short training."""
    from . import digits, modelio
    from . import search as s
    from .bench import check_backend
    from .errors import OptimizeError, StepFailed

    check_backend(backend)
    s.validate(budget_ms, batch, epochs, max_candidates)
    if not 1 <= final_epochs <= 500:
        raise OptimizeError(f"--final-epochs must be between 1 and 500, got {final_epochs}")
    if runs < 10:
        raise OptimizeError(f"--runs must be ≥ 10, got {runs}")
    _silence_libraries()
    splits = digits.load_splits(modelio.DATA_SEED)
    res = s.search(splits, backend, budget_ms, batch=batch, epochs=epochs, final_epochs=final_epochs, seed=seed, runs=runs,
                   max_candidates=max_candidates, progress=progress)
    s.render(res, _console())
    if json_out:
        json_out.write_text(modelio.dumps(res.as_dict()) + "\n")
    if res.best is None:
        raise StepFailed("; ".join(res.notes))
    out = out or Path("optimized") / f"digits-search-{backend}"
    modelio.write_model_folder(out, src=None, model=res.model, info={"command": _command(), "technique": "search", **res.as_dict()},
                               comment=f"architecture search winner ({res.best.name}) on {backend}, written by kiln optimize search")
    _console().print(f"wrote {out}/ — serve with: kiln serve --repo {out.parent}")


# --------------------------------------------------------------------------- report


@app.command()
@guarded
def report(
    model: str = typer.Argument(..., help="A DigitsCNN-family model folder (with 1/model.onnx)."),
    out: Path = typer.Option(Path("optimized/report"), "--out", help="Folder for report.md/json/png and every row's model."),
    backends: Optional[str] = typer.Option(None, "--backends", help="Comma-separated backends (default: every available one)."),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Reject rows losing more top-1 than this (fraction)."),
    min_speedup: float = typer.Option(1.10, "--min-speedup", help="'Measurably faster' means at least this speed-up in some cell."),
    search_budget_ms: Optional[float] = typer.Option(None, "--search-budget-ms", help="Default: the original's b1 p50 / min-speedup."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Timed calls per latency figure (default 300; 60 with --quick)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer epochs, candidates and timed calls (for tests/CI)."),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Run every technique on the model, measure each result on every backend, and write the verdict table."""
    from . import report as rp

    blist = [b.strip() for b in backends.split(",") if b.strip()] if backends else None
    _silence_libraries()
    c = _console()
    res = rp.run_report(model, out, backends=blist, max_drop=max_drop, min_speedup=min_speedup, quick=quick,
                        search_budget_ms=search_budget_ms, runs=runs, seed=seed, progress=progress, command=_command(),
                        log=lambda msg: c.print(f"[dim]· {msg}[/dim]"))
    from rich.markdown import Markdown

    c.print(Markdown(res["markdown"]))
    c.print(f"wrote {out}/report.md, report.json, report.png and models/<row>/")
