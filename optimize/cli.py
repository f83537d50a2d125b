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


# --------------------------------------------------------------------------- MODEL / DATA / METRIC options

MODEL_HELP = ("A model folder, model.onnx, model.pt2, or path/to/file.py:factory (a function returning a torch.nn.Module; "
              "see --weights and --model-arg).")
WEIGHTS = typer.Option(None, "--weights", help="A state dict (torch.save) loaded into the factory's module.")
MODEL_ARG = typer.Option(None, "--model-arg", help="key=value passed to the factory (repeatable; values read as YAML).")
DATA = typer.Option(None, "--data", help="An .npz (arrays named after the model's inputs, optional 'labels'), an image folder "
                    "with class sub-folders, or path/to/file.py:function returning (inputs, labels). Split once, seeded, into "
                    "calibration / fine-tune / validation / held-out evaluation (recorded in optimize.json).")
CALIB = typer.Option(None, "--calib", help="Calibration data given apart (same forms as --data; with --eval).")
TRAIN = typer.Option(None, "--train", help="Fine-tuning data given apart (with --eval; validation = 15% of it).")
EVAL = typer.Option(None, "--eval", help="Held-out evaluation data given apart (everything is measured on it).")
IMAGE_SIZE = typer.Option(224, "--image-size", help="Image folder: images resized to SIZE x SIZE.")
MEAN = typer.Option(None, "--mean", help="Image folder: per-channel mean, comma-separated (default ImageNet's).")
STD = typer.Option(None, "--std", help="Image folder: per-channel std, comma-separated (default ImageNet's).")
METRIC = typer.Option(None, "--metric", help="top1 | top5 | mse | mae | agreement | path/to/file.py:function(outputs, labels) "
                      "-> float. Default: top1 for labeled classifiers, mse for labeled regression, agreement without labels. "
                      "Always measured on the compiled backend artifact.")
HIB = typer.Option(None, "--higher-is-better/--lower-is-better", help="Direction of a file.py:function metric.")
SEED = typer.Option(0, "--seed", help="Seed of the data split and of training.")


def _workload(model: str, weights, model_arg, data, calib, train, eval_, image_size, mean, std, metric, hib, seed):
    """MODEL + DATA + METRIC (optimize.workload.build), with a work folder that lives for the command."""
    import atexit
    import shutil
    import tempfile

    from . import data as dt
    from . import workload as wl

    if image_size < 8 or image_size > 4096:
        from .errors import OptimizeError

        raise OptimizeError(f"--image-size must be between 8 and 4096, got {image_size}")
    img = dt.ImageOptions(image_size, dt.parse_floats(mean, "--mean") or dt.ImageOptions.mean,
                          dt.parse_floats(std, "--std") or dt.ImageOptions.std)
    work = Path(tempfile.mkdtemp(prefix="kiln-optimize-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return wl.build(model, weights=weights, model_args=model_arg,
                    data=wl.DataArgs(data, calib and str(calib), train and str(train), eval_ and str(eval_), img, seed),
                    metric=metric, higher_is_better=hib, workdir=work)


def _show_workload(w, c) -> None:
    rec = w.splits.record()
    c.print(f"model {w.model.arg}: inputs {', '.join(f'{t.name} {list(t.shape)} {t.datatype}' for t in w.inputs)}; "
            f"data {rec.get('data') or rec.get('eval')}: " + ", ".join(f"{k} {v}" for k, v in rec["sizes"].items())
            + f"; metric {w.metric.describe()}, original {w.baseline():.4f}")


# --------------------------------------------------------------------------- analyze


@app.command()
@guarded
def analyze(
    model: str = typer.Argument(..., help=MODEL_HELP),
    fmt: Optional[str] = typer.Option(None, "--format", help="onnx or pt2 (default: the ONNX file when there is one)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the analysis as JSON."),
    weights: Optional[Path] = WEIGHTS, model_arg: Optional[list[str]] = MODEL_ARG, data: Optional[str] = DATA,
    image_size: int = IMAGE_SIZE, mean: Optional[str] = MEAN, std: Optional[str] = STD,
):
    """Parameters, MACs/FLOPs, activation memory, size on disk and a per-layer table.

    A factory is exported first, with input shapes taken from --data."""
    from . import analyze as an
    from . import modelio
    from .errors import OptimizeError
    from .source import is_factory_spec

    if fmt not in (None, "onnx", "pt2"):
        raise OptimizeError(f"--format must be onnx or pt2, got '{fmt}'")
    if is_factory_spec(model):
        if data is None:
            raise OptimizeError(f"{model}: a factory needs --data to know its input shapes")
        _silence_libraries()
        w = _workload(model, weights, model_arg, data, None, None, None, image_size, mean, std, None, None, 0)
        src = modelio.ModelSource(arg=model, onnx=w.model.sources["onnx"], pt2=w.model.sources["pt2"])
    else:
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
    model: str = typer.Argument(..., help=MODEL_HELP + " Needs the torch model (factory or .pt2)."),
    method: str = typer.Option(..., "--method", help="l1-unstructured or channel."),
    amount: float = typer.Option(..., "--amount", help="Fraction of weights (unstructured) or channels (channel) to remove, in (0, 1)."),
    finetune_epochs: int = typer.Option(10, "--finetune-epochs", help="Fine-tuning epochs on the training split (0: none)."),
    lr: float = typer.Option(1e-3, "--lr", help="Fine-tuning learning rate."),
    round_to: Optional[int] = typer.Option(None, "--round-to", help="channel: keep channel counts a multiple of N (e.g. 16 for AVX-512 kernels)."),
    ignore: Optional[list[str]] = typer.Option(None, "--ignore", help="channel: a layer (qualified module name) that keeps its width (repeatable). The output layer always does."),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Metric gate written to config.yaml, in the metric's unit."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output model folder (default optimized/<model>-<method>)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    weights: Optional[Path] = WEIGHTS, model_arg: Optional[list[str]] = MODEL_ARG, data: Optional[str] = DATA,
    calib: Optional[str] = CALIB, train: Optional[str] = TRAIN, eval_: Optional[str] = EVAL, image_size: int = IMAGE_SIZE,
    mean: Optional[str] = MEAN, std: Optional[str] = STD, metric: Optional[str] = METRIC, hib: Optional[bool] = HIB,
    seed: int = SEED,
):
    """Prune weights (L1 unstructured on every Conv/Linear, made permanent) or whole channels (torch-pruning DepGraph on any
    module), then fine-tune (labels, or the original as teacher without them)."""
    from . import modelio
    from . import prune as pr
    from .source import load_model

    pr.validate(method, amount, finetune_epochs, round_to)
    _silence_libraries()
    from .source import is_factory_spec

    if not is_factory_spec(model):
        load_model(model).need_module(f"{method} pruning")  # fail in one line before loading data
    w = _workload(model, weights, model_arg, data, calib, train, eval_, image_size, mean, std, metric, hib, seed)
    w.model.need_module(f"{method} pruning")
    c = _console()
    _show_workload(w, c)
    res = pr.prune_workload(w, method, amount, finetune_epochs=finetune_epochs, lr=lr, seed=seed, ignore=ignore,
                            round_to=round_to, progress=progress)
    out = out or Path("optimized") / f"{w.model.name}-{method}"
    modelio.write_workload_folder(out, w, module=res.module, max_drop=max_drop,
                                  info={"command": _command(), "technique": f"prune-{method}", **res.as_dict()},
                                  comment=f"{method} pruning ({amount}) of {model}, written by kiln optimize prune")
    c.print(f"[bold]{method}[/bold] pruning, amount {amount}: parameters {res.params_before:,} → {res.params_after:,}, "
            f"weight sparsity {res.sparsity:.1%}" + (f"; kept whole: {', '.join(res.kept_whole)}" if res.kept_whole else ""))
    c.print(f"held-out {w.metric.name}: {res.metric_before:.4f} original, {res.metric_pruned:.4f} right after pruning, "
            f"{res.metric_after:.4f} after {finetune_epochs} fine-tuning epochs")
    c.print(f"wrote {out}/ (1/model.onnx, 1/model.pt2, config.yaml, data/) — serve with: kiln serve --repo {out.parent}")


# --------------------------------------------------------------------------- quantize


@app.command()
@guarded
def quantize(
    model: str = typer.Argument(..., help=MODEL_HELP),
    backend: str = typer.Option("auto", "--backend", "-b", help="onnxruntime, openvino, litert, or auto (chosen from the CPU's ISA)."),
    mode: str = typer.Option("static", "--mode", help="static (calibrated; each backend's recipe) or dynamic (ONNX Runtime; for MatMul-heavy models)."),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Metric gate written to config.yaml, in the metric's unit."),
    runs: int = typer.Option(300, "--runs", help="Timed calls per latency figure."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output model folder (default optimized/<model>-int8-<mode>-<backend>)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    weights: Optional[Path] = WEIGHTS, model_arg: Optional[list[str]] = MODEL_ARG, data: Optional[str] = DATA,
    calib: Optional[str] = CALIB, train: Optional[str] = TRAIN, eval_: Optional[str] = EVAL, image_size: int = IMAGE_SIZE,
    mean: Optional[str] = MEAN, std: Optional[str] = STD, metric: Optional[str] = METRIC, hib: Optional[bool] = HIB,
    seed: int = SEED,
):
    """INT8 with the backend's own recipe on the calibration split; fp32 vs INT8 metric (compiled) and latency."""
    from backends import hw

    from . import quantize as q
    from .errors import OptimizeError

    q.validate(backend, mode)
    if runs < 10:
        raise OptimizeError(f"--runs must be ≥ 10, got {runs}")
    _silence_libraries()
    w = _workload(model, weights, model_arg, data, calib, train, eval_, image_size, mean, std, metric, hib, seed)
    c = _console()
    _show_workload(w, c)
    cpu = hw.detect()
    out = out or Path("optimized") / f"{w.model.name}-int8-{mode}-{backend}"
    res = q.quantize(w, backend, mode, out=out, runs=runs, max_drop=max_drop, command=_command(), progress=progress)
    c.print(f"CPU: {cpu.summary()}")
    for n in res.notes:
        c.print(n)
    c.print(f"recipe: [bold]{res.recipe.name}[/bold]\n  why: {res.recipe.reason}")
    from rich.table import Table

    t = Table(title=f"{res.backend}: fp32 vs INT8 ({mode})")
    for col in ("", w.metric.name, "p50 b1 ms", "p50 b32 ms", "artifact bytes"):
        t.add_column(col, justify="right")
    for label, m in (("fp32", res.fp32), ("int8", res.int8)):
        t.add_row(label, f"{m['accuracy']:.4f}" if m.get("accuracy") is not None else m.get("reason", "n/a")[:60],
                  f"{m['p50_ms'].get('1', float('nan')):.4f}" if m.get("ok") else "n/a",
                  f"{m['p50_ms'].get('32', float('nan')):.4f}" if m.get("ok") else "n/a",
                  f"{m['artifact_bytes']:,}" if m.get("artifact_bytes") else "n/a")
    c.print(t)
    if res.drop is not None:
        c.print(f"{w.metric.name} drop: {res.drop:.4f}" + ("" if res.drop <= max_drop else f" [red](> --max-drop {max_drop})[/red]"))
    c.print(f"wrote {out}/ — serve with: kiln serve --repo {out.parent}")


# --------------------------------------------------------------------------- distill


@app.command()
@guarded
def distill(
    teacher: str = typer.Option(..., "--teacher", help="Teacher: " + MODEL_HELP + " (torch or ONNX)."),
    student: str = typer.Option(..., "--student", help="Student factory path/to/file.py:factory (or, for the bundled DigitsCNN, "
                                "an architecture 'W1,W2[:HIDDEN]')."),
    student_arg: Optional[list[str]] = typer.Option(None, "--student-arg", help="key=value passed to the student factory (repeatable)."),
    alpha: float = typer.Option(0.7, "--alpha", help="Weight of the hard-label loss (1 - alpha: the KL term; without labels KL alone)."),
    temperature: float = typer.Option(4.0, "--temperature", "-T", help="Softmax temperature of the KL term."),
    epochs: int = typer.Option(60, "--epochs", help="Maximum epochs."),
    patience: int = typer.Option(10, "--patience", help="Stop after this many epochs without a better validation loss."),
    lr: float = typer.Option(3e-3, "--lr"),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Also train the same student without the teacher."),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Metric gate written to config.yaml, in the metric's unit."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output model folder (default optimized/<teacher>-distilled)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    weights: Optional[Path] = WEIGHTS, model_arg: Optional[list[str]] = MODEL_ARG, data: Optional[str] = DATA,
    calib: Optional[str] = CALIB, train: Optional[str] = TRAIN, eval_: Optional[str] = EVAL, image_size: int = IMAGE_SIZE,
    mean: Optional[str] = MEAN, std: Optional[str] = STD, metric: Optional[str] = METRIC, hib: Optional[bool] = HIB,
    seed: int = SEED,
):
    """Knowledge distillation: alpha·CE + (1−alpha)·KL(teacher/T ‖ student/T)·T², early stopping on validation loss."""
    from . import distill as kd
    from . import modelio

    kd.validate(alpha, temperature, epochs, patience, 0.15)
    spec = kd.parse_student_spec(student, student_arg)
    _silence_libraries()
    w = _workload(teacher, weights, model_arg, data, calib, train, eval_, image_size, mean, std, metric, hib, seed)
    c = _console()
    _show_workload(w, c)
    res = kd.distill_workload(w, spec, alpha=alpha, temperature=temperature, epochs=epochs, lr=lr, seed=seed,
                              patience=patience, progress=progress, compare=compare)
    out = out or Path("optimized") / f"{w.model.name}-distilled"
    modelio.write_workload_folder(out, w, module=res.model, max_drop=max_drop,
                                  info={"command": _command(), "technique": "distill", **res.as_dict()},
                                  comment=f"student {student} distilled from {teacher}, written by kiln optimize distill")
    c.print(f"student {student} {spec.kwargs or ''} ({res.params_student:,} params), α {alpha}, T {temperature}, loss {res.loss}: "
            f"best validation epoch {res.best_epoch + 1}/{res.epochs_run}")
    c.print(f"held-out {w.metric.name}: teacher {res.teacher_metric:.4f}, student with teacher {res.student_metric:.4f}"
            + (f", same student without teacher {res.baseline_metric:.4f}" if res.baseline_metric is not None else ""))
    c.print(f"wrote {out}/ — serve with: kiln serve --repo {out.parent}")


# --------------------------------------------------------------------------- search


@app.command()
@guarded
def search(
    model: str = typer.Argument(..., help="path/to/file.py:factory whose keyword arguments are searched."),
    space: Optional[list[str]] = typer.Option(None, "--space", help="key=v1,v2,... a keyword argument and its values (repeatable; the grid is their product)."),
    budget_ms: float = typer.Option(..., "--budget-ms", help="Latency budget: p50 in ms at --batch on --backend."),
    backend: str = typer.Option("onnxruntime", "--backend", "-b", help="Target backend the latency is measured on."),
    batch: int = typer.Option(1, "--batch", help="Batch size of the latency figure (1-32)."),
    epochs: int = typer.Option(12, "--epochs", help="Short training per candidate."),
    final_epochs: int = typer.Option(30, "--final-epochs", help="Training of the winner before it is written."),
    max_candidates: Optional[int] = typer.Option(None, "--max-candidates", help="Evaluate a spread subset of the grid."),
    runs: int = typer.Option(200, "--runs", help="Timed calls per candidate."),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Metric gate written to config.yaml, in the metric's unit."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output model folder (default optimized/<factory>-search-<backend>)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every candidate as JSON."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also plot latency vs metric with the Pareto front."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    weights: Optional[Path] = WEIGHTS, model_arg: Optional[list[str]] = MODEL_ARG, data: Optional[str] = DATA,
    calib: Optional[str] = CALIB, train: Optional[str] = TRAIN, eval_: Optional[str] = EVAL, image_size: int = IMAGE_SIZE,
    mean: Optional[str] = MEAN, std: Optional[str] = STD, metric: Optional[str] = METRIC, hib: Optional[bool] = HIB,
    seed: int = SEED,
):
    """Hardware-aware search over a factory's keyword arguments: each candidate trained briefly, exported, timed on the
    backend, its metric measured compiled; Pareto front and the best under the budget."""
    from . import modelio
    from . import search as s
    from .bench import check_backend
    from .errors import OptimizeError, StepFailed

    check_backend(backend)
    s.validate(budget_ms, batch, epochs, max_candidates)
    grid_space = s.parse_space(space)
    if not 1 <= final_epochs <= 500:
        raise OptimizeError(f"--final-epochs must be between 1 and 500, got {final_epochs}")
    if runs < 10:
        raise OptimizeError(f"--runs must be ≥ 10, got {runs}")
    _silence_libraries()
    w = _workload(model, weights, model_arg, data, calib, train, eval_, image_size, mean, std, metric, hib, seed)
    c = _console()
    _show_workload(w, c)
    res = s.search(w, grid_space, backend, budget_ms, batch=batch, epochs=epochs, final_epochs=final_epochs, seed=seed,
                   runs=runs, max_candidates=max_candidates, progress=progress)
    s.render(res, c)
    if json_out:
        json_out.write_text(modelio.dumps(res.as_dict()) + "\n")
    if png:
        s.plot(res, png)
    if res.best is None:
        raise StepFailed("; ".join(res.notes))
    out = out or Path("optimized") / f"{w.model.name}-search-{backend}"
    modelio.write_workload_folder(out, w, module=res.model, max_drop=max_drop,
                                  info={"command": _command(), "technique": "search", **res.as_dict()},
                                  comment=f"architecture search winner ({res.best.name}) on {backend}, written by kiln optimize search")
    c.print(f"wrote {out}/ — serve with: kiln serve --repo {out.parent}")


# --------------------------------------------------------------------------- report


@app.command()
@guarded
def report(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(Path("optimized/report"), "--out", help="Folder for report.md/json/png and every row's model."),
    backends: Optional[str] = typer.Option(None, "--backends", help="Comma-separated backends (default: every available one)."),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Reject rows losing more than this, in the metric's unit."),
    min_speedup: float = typer.Option(1.10, "--min-speedup", help="'Measurably faster' means at least this speed-up in some cell."),
    student: Optional[str] = typer.Option(None, "--student", help="Distillation row: student path/to/file.py:factory."),
    student_arg: Optional[list[str]] = typer.Option(None, "--student-arg", help="key=value for the student factory (repeatable)."),
    space: Optional[list[str]] = typer.Option(None, "--space", help="Search row: key=v1,v2,... over the factory's kwargs (repeatable)."),
    search_budget_ms: Optional[float] = typer.Option(None, "--search-budget-ms", help="Default: the original's b1 p50 / min-speedup."),
    batch: int = typer.Option(32, "--batch", help="The larger batch size timed (besides 1)."),
    epochs: int = typer.Option(10, "--epochs", help="Fine-tuning epochs (pruning), training epochs (distillation, search winner)."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Timed calls per latency figure (default 300; 60 with --quick)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer epochs, candidates and timed calls (for tests/CI)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    weights: Optional[Path] = WEIGHTS, model_arg: Optional[list[str]] = MODEL_ARG, data: Optional[str] = DATA,
    calib: Optional[str] = CALIB, train: Optional[str] = TRAIN, eval_: Optional[str] = EVAL, image_size: int = IMAGE_SIZE,
    mean: Optional[str] = MEAN, std: Optional[str] = STD, metric: Optional[str] = METRIC, hib: Optional[bool] = HIB,
    seed: int = SEED,
):
    """Run every technique on the model, measure each result on every backend, and write the verdict table."""
    from . import report as rp

    from .bench import check_backend
    from .errors import OptimizeError

    blist = [b.strip() for b in backends.split(",") if b.strip()] if backends else None
    for b in blist or []:
        check_backend(b)
    if max_drop < 0:
        raise OptimizeError(f"--max-drop must be ≥ 0 (in the metric's unit), got {max_drop}")
    if not min_speedup >= 1.0:
        raise OptimizeError(f"--min-speedup must be ≥ 1.0, got {min_speedup}")
    _silence_libraries()
    c = _console()
    w = _workload(model, weights, model_arg, data, calib, train, eval_, image_size, mean, std, metric, hib, seed)
    _show_workload(w, c)
    res = rp.run_report(w, out, backends=blist, max_drop=max_drop, min_speedup=min_speedup, quick=quick,
                        student=student, student_args=student_arg, space=space, search_budget_ms=search_budget_ms,
                        batch=batch, epochs=epochs, runs=runs, seed=seed, progress=progress, command=_command(),
                        log=lambda msg: c.print(f"[dim]· {msg}[/dim]"))
    from rich.markdown import Markdown

    c.print(Markdown(res["markdown"]))
    c.print(f"wrote {out}/report.md, report.json, report.png and models/<row>/")
