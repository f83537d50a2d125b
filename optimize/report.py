"""``kiln optimize report``: run the technique pipeline on a model and measure every result.

Rows: the original, weight (L1 unstructured) pruning, channel pruning, INT8 static (each backend's
own recipe) and dynamic (ONNX Runtime), distillation into a half-width student, architecture search,
and combinations (channel pruning + INT8, distillation + INT8). Every row is measured here, on this
machine: size of the servable ONNX (bytes, % of original, and gzip-compressed bytes — what sparsity
saves on the wire), p50 latency at batch 1 and 32 on every backend (ratio to the original on the same
backend and batch), held-out top-1 (worst backend; % of the original kept), and a verdict:

- *rejected (accuracy)* when it loses more than ``max_drop`` of top-1 on any backend;
- *rejected (not faster)* when no backend/batch cell is at least ``min_speedup``× faster than the original;
- *kept* otherwise, naming where it is faster.

Each row's model is written as a servable model folder under ``OUT/models/<row>/`` and its row
carries the command that reproduces it. Outputs: ``OUT/report.md``, ``OUT/report.json``, ``OUT/report.png``.
"""

from __future__ import annotations

import gzip
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OptimizeError


@dataclass
class Row:
    key: str
    title: str
    technique: str
    command: str
    precision: str = "fp32"  # fp32 source, or int8 through each backend's recipe
    sources: dict = field(default_factory=dict)  # fmt -> Path
    only_backends: list | None = None
    folder: str | None = None
    size_bytes: int | None = None
    gz_bytes: int | None = None
    params: int | None = None
    details: dict = field(default_factory=dict)
    measurements: dict = field(default_factory=dict)  # backend -> Measurement.as_dict()
    accuracy: float | None = None
    verdict: str = ""
    kept: bool | None = None


def _q(p) -> str:
    return shlex.quote(str(p))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "openvino", "nncf", "torch-pruning", "ai-edge-litert", "litert-torch",
                 "scikit-learn", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "-"
    return out


def _size(row: Row, onnx_path: Path | None) -> None:
    if onnx_path is not None and Path(onnx_path).exists():
        data = Path(onnx_path).read_bytes()
        row.size_bytes = len(data)
        row.gz_bytes = len(gzip.compress(data, compresslevel=9, mtime=0))


def build_rows(src, out: Path, *, module, splits, x_eval, y_eval, calib, quick: bool, seed: int, max_drop: float,
               search_backend: str, search_budget_ms: float | None, progress: bool, log) -> list[Row]:
    from . import digits, distill, modelio, prune, quantize, search

    models = out / "models"
    m = shlex.quote(src.arg)
    ft = 4 if quick else 10
    rows: list[Row] = []

    # original
    r = Row("original", "original", "none", f"kiln optimize analyze {m}", sources={"onnx": src.onnx, "pt2": src.pt2})
    r.params = digits.count_params(module)
    _size(r, src.onnx)
    rows.append(r)

    def pruned(name: str, label: str, method: str, amount: float, details) -> Row:
        """Prune `module` with `method`, fine-tune, write the folder and add its row."""
        result = prune.prune_model(module, splits, method, amount, ft, seed=seed, x_eval=x_eval, y_eval=y_eval)
        folder = models / name
        cmd = (f"kiln optimize prune {m} --method {method} --amount {amount} --finetune-epochs {ft} --seed {seed} "
               f"--out {_q(folder)}")
        modelio.write_model_folder(folder, src=src, model=result.model, max_drop=max_drop,
                                   info={"command": cmd, **result.as_dict()})
        row = Row(name, label, "prune", cmd, sources={"onnx": folder / "1/model.onnx", "pt2": folder / "1/model.pt2"},
                  folder=str(folder), params=result.params_after, details=details(result))
        _size(row, folder / "1/model.onnx")
        rows.append(row)
        return row

    amount_w = 0.5
    log("weight pruning (L1 unstructured 50%, fine-tune)")
    pruned("weight-pruning", f"weight pruning (L1 unstructured {amount_w:.0%})", "l1-unstructured", amount_w,
           lambda pr: {"sparsity": round(pr.sparsity, 4), "nonzero_params": pr.nonzero_after})
    amount_c = 0.3
    log(f"channel pruning (DepGraph, {amount_c:.0%} of channels, fine-tune)")
    channel = pruned("channel-pruning", f"channel pruning ({amount_c:.0%} of channels)", "channel", amount_c,
                     lambda cp: {"widths": list(cp.model.config["widths"]), "hidden": cp.model.config["hidden"]})

    # INT8 static: each backend's recipe on the original
    r = Row("int8-static", "INT8 static (each backend's recipe)", "quantize",
            f"kiln optimize quantize {m} --backend BACKEND --mode static --calib {_q(src.calib) if src.calib else 'CALIB.npz'} --out OUT",
            precision="int8", sources={"onnx": src.onnx, "pt2": src.pt2}, params=digits.count_params(module))
    rows.append(r)

    # INT8 dynamic (ONNX Runtime, ours)
    log("INT8 dynamic (ONNX Runtime quantize_dynamic)")
    fd = models / "int8-dynamic"
    qd = quantize.dynamic_int8(src.onnx, out / "work" / "int8-dynamic.onnx")
    cmd_d = f"kiln optimize quantize {m} --backend onnxruntime --mode dynamic --out {_q(fd)}"
    modelio.write_model_folder(fd, src=src, onnx_file=qd, max_drop=max_drop, info={"command": cmd_d, "technique": "int8-dynamic"},
                               comment="INT8 dynamic (ONNX Runtime quantize_dynamic) written by kiln optimize report")
    r = Row("int8-dynamic", "INT8 dynamic (ONNX Runtime)", "quantize", cmd_d, sources={"onnx": fd / "1/model.onnx"},
            only_backends=["onnxruntime"], folder=str(fd), params=digits.count_params(module))
    _size(r, fd / "1/model.onnx")
    rows.append(r)

    # distillation into a half-width student
    cfg = module.config
    student = {"widths": tuple(max(1, w // 2) for w in cfg["widths"]), "hidden": cfg["hidden"] // 2}
    spec = ",".join(map(str, student["widths"])) + (f":{student['hidden']}" if student["hidden"] else "")
    epochs = 25 if quick else 60
    log(f"distillation (student {spec}, {epochs} epochs max)")
    dr = distill.distill(src, student, splits, epochs=epochs, patience=10, seed=seed, progress=progress, compare=True,
                         x_eval=x_eval, y_eval=y_eval)
    fdist = models / "distillation"
    cmd_k = f"kiln optimize distill --teacher {m} --student {spec} --epochs {epochs} --seed {seed} --out {_q(fdist)}"
    modelio.write_model_folder(fdist, src=src, model=dr.model, max_drop=max_drop, info={"command": cmd_k, **dr.as_dict()})
    r = Row("distillation", f"distillation (student {spec}, α 0.7, T 4)", "distill", cmd_k,
            sources={"onnx": fdist / "1/model.onnx", "pt2": fdist / "1/model.pt2"}, folder=str(fdist),
            params=digits.count_params(dr.model),
            details={"student_without_teacher_top1": dr.baseline["eval_top1"] if dr.baseline else None,
                     "student_with_teacher_top1": dr.eval_top1, "val_top1": dr.val_top1, "best_epoch": dr.best_epoch})
    _size(r, fdist / "1/model.onnx")
    rows.append(r)

    # architecture search
    budget = search_budget_ms
    if budget is None:
        budget = 0.0  # filled in by the caller from the original's measured latency
    log(f"architecture search on {search_backend} (budget {budget:.4f} ms at batch 1)")
    sr = search.search(splits, search_backend, budget, batch=1, epochs=8 if quick else 12, final_epochs=15 if quick else 30,
                       seed=seed, runs=60 if quick else 200, max_candidates=4 if quick else None, progress=progress)
    fs = models / "architecture-search"
    cmd_s = (f"kiln optimize search --budget-ms {budget:.4f} --backend {search_backend} --seed {seed}"
             + (" --epochs 8 --final-epochs 15 --max-candidates 4" if quick else "") + f" --out {_q(fs)}")
    if sr.best is not None:
        modelio.write_model_folder(fs, src=src, model=sr.model, max_drop=max_drop, info={"command": cmd_s, **sr.as_dict()})
        r = Row("architecture-search", f"architecture search (best ≤ {budget:.4f} ms on {search_backend}: {sr.best.name})",
                "search", cmd_s, sources={"onnx": fs / "1/model.onnx", "pt2": fs / "1/model.pt2"}, folder=str(fs),
                params=sr.best.params, details={"pareto": [c.name for c in sr.pareto], "candidates": len(sr.candidates),
                                                "search_seconds": sr.seconds})
        _size(r, fs / "1/model.onnx")
    else:
        r = Row("architecture-search", "architecture search", "search", cmd_s, details={"notes": sr.notes})
        r.verdict, r.kept = f"rejected: {'; '.join(sr.notes)}", False
    rows.append(r)

    # combinations
    rows.append(Row("channel-pruning+int8", "channel pruning + INT8 static", "prune+quantize",
                    f"{channel.command} && kiln optimize quantize {_q(Path(channel.folder))} --backend BACKEND "
                    "--mode static --out OUT",
                    precision="int8", sources=dict(channel.sources), folder=channel.folder, params=channel.params))
    rows.append(Row("distillation+int8", "distillation + INT8 static", "distill+quantize",
                    f"{cmd_k} && kiln optimize quantize {_q(fdist)} --backend BACKEND --mode static --out OUT",
                    precision="int8", sources={"onnx": fdist / "1/model.onnx", "pt2": fdist / "1/model.pt2"},
                    folder=str(fdist), params=digits.count_params(dr.model)))
    return rows


def measure_rows(rows: list[Row], backends: list[str], *, x_eval, y_eval, calib, io, runs: int, out: Path, log) -> None:
    from .bench import measure

    for r in rows:
        if r.verdict and not r.sources:
            continue
        for b in backends:
            if r.only_backends and b not in r.only_backends:
                continue
            log(f"measure {r.key} on {b} ({r.precision})")
            wd = out / "work" / r.key / b
            mm = measure(b, r.sources, precision=r.precision, x_eval=x_eval, y_eval=y_eval,
                         calibration=calib if r.precision == "int8" else None, runs=runs, io=io, workdir=wd)
            r.measurements[b] = mm.as_dict()
            if r.precision == "int8" and b == "onnxruntime" and mm.ok:
                _size(r, wd / "model.onnx")  # the QDQ ONNX: the portable form of the int8 model


def verdicts(rows: list[Row], backends: list[str], max_drop: float, min_speedup: float) -> None:
    base = rows[0]
    base_acc = base.measurements.get("onnxruntime", {}).get("accuracy")
    if base_acc is None:
        base_acc = min((m["accuracy"] for m in base.measurements.values() if m.get("ok")), default=None)
    base.accuracy = base_acc
    base.verdict, base.kept = "baseline", True
    for r in rows[1:]:
        ok = [m for m in r.measurements.values() if m.get("ok")]
        if not ok:
            if not r.verdict:
                reasons = "; ".join(m.get("reason", "") for m in r.measurements.values()) or "nothing measured"
                r.verdict, r.kept = f"rejected: could not be measured here ({reasons})", False
            continue
        r.accuracy = min(m["accuracy"] for m in ok)
        worst_b = min(ok, key=lambda m: m["accuracy"])["backend"]
        drop = (base_acc - r.accuracy) if base_acc is not None else 0.0
        ratios = []
        for m in ok:
            bm = base.measurements.get(m["backend"], {})
            for batch, ms in m["p50_ms"].items():
                ref = bm.get("p50_ms", {}).get(batch)
                if ref:
                    ratios.append((ms / ref, m["backend"], batch))
        r.details["latency_ratio"] = {f"{b}@{bs}": round(x, 3) for x, b, bs in ratios}
        if drop > max_drop + 1e-9:
            r.verdict, r.kept = (f"rejected: loses {100 * drop:.1f} points of top-1 on {worst_b} (> --max-drop "
                                 f"{100 * max_drop:.1f})"), False
            continue
        noise = {(b, bs): base.measurements.get(b, {}).get("noise", {}).get(bs, 0.0) for _, b, bs in ratios}
        fast = sorted((x, b, bs) for x, b, bs in ratios if x <= 1.0 / max(min_speedup, 1.0 + noise[(b, bs)]))
        if not fast:
            best = min(ratios, default=None)
            where = (f"best cell {best[1]} batch {best[2]}: {best[0]:.2f}× the original's latency" if best
                     else "no latency measured")
            r.verdict, r.kept = (f"rejected: not measurably faster on this hardware ({where}; needs ≥ {min_speedup:.2f}× "
                                 f"speed-up and more than the run-to-run noise of the original)"), False
            continue
        cells = ", ".join(f"{1 / x:.2f}× at batch {bs} on {b}" for x, b, bs in fast[:3])
        slow = sorted(((x, b, bs) for x, b, bs in ratios if x >= min_speedup), reverse=True)
        slower = ("; slower: " + ", ".join(f"{x:.2f}× the latency at batch {bs} on {b}" for x, b, bs in slow[:3])) if slow else ""
        r.verdict, r.kept = f"kept: faster ({cells}), top-1 drop {100 * drop:.1f} pt{slower} — deploy where it is faster", True


# --------------------------------------------------------------------------- output


def _fmt_ms(m: dict, batch: str, base: dict | None) -> str:
    if not m or not m.get("ok"):
        return "n/a"
    ms = m["p50_ms"].get(batch)
    if ms is None:
        return "n/a"
    ref = (base or {}).get("p50_ms", {}).get(batch) if base and base.get("ok") else None
    return f"{ms:.4f} ({ms / ref:.2f})" if ref else f"{ms:.4f}"


def markdown(rows: list[Row], backends: list[str], meta: dict) -> str:
    base = rows[0]
    lines = [f"# Optimization report: `{meta['model']}`", "",
             f"Generated by `{meta['command']}` on {meta['date']} in {meta['seconds']:.0f} s.", "",
             "## Hardware and runtimes", "",
             f"- CPU: {meta['cpu_summary']}",
             f"- OS: {meta['os']}",
             "- " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             "- Backends: " + "; ".join(f"{b} ({v})" for b, v in meta["backend_versions"].items()),
             "- INT8 recipes on this CPU: " + "; ".join(f"**{b}**: {r}" for b, r in meta["int8_recipes"].items()),
             "",
             "## Results", "",
             f"Latency: p50 of single in-process `runner.infer` calls in ms (1 intra-op thread, warmed; the quietest of 3 blocks "
             f"of {meta['runs']} calls at batch 1, {max(meta['runs'] // 4, 20)} at batch 32), in parentheses the ratio to the original "
             f"on the same backend and batch (< 1 = faster). Size: the servable ONNX file (INT8 static rows: ONNX Runtime's QDQ "
             f"model); gzip: the same file compressed, which is where unstructured sparsity shows. Accuracy: held-out top-1 ({meta['n_eval']} images), the worst "
             f"backend for the row. The original is measured twice (first and last); its reference latency is the faster run and "
             f"the gap between the runs is the noise of that cell. Verdict: kept only if some cell is ≥ {meta['min_speedup']:.2f}× "
             f"faster than the original and faster by more than that cell's noise, and the top-1 drop is ≤ "
             f"{100 * meta['max_drop']:.1f} points.", ""]
    head = ["technique", "params", "size bytes (%)", "gzip bytes"]
    for b in backends:
        head += [f"{b} b1 ms", f"{b} b32 ms"]
    head += ["top-1 (% kept)", "verdict"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        size = f"{r.size_bytes:,} ({100 * r.size_bytes / base.size_bytes:.0f}%)" if r.size_bytes and base.size_bytes else "n/a"
        cells = [r.title, f"{r.params:,}" if r.params else "n/a", size, f"{r.gz_bytes:,}" if r.gz_bytes else "n/a"]
        for b in backends:
            m = r.measurements.get(b, {})
            bm = base.measurements.get(b) if r is not base else None
            cells += [_fmt_ms(m, "1", bm), _fmt_ms(m, "32", bm)]
        acc = f"{r.accuracy:.4f} ({100 * r.accuracy / base.accuracy:.1f}%)" if r.accuracy is not None and base.accuracy else "n/a"
        cells += [acc, r.verdict]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Reproduce each row", ""]
    for r in rows:
        lines.append(f"- **{r.title}**: `{r.command}`" + (f" → `{r.folder}`" if r.folder else ""))
    lines += ["", "## Notes", ""]
    for r in rows:
        notes = []
        for b, m in r.measurements.items():
            if not m.get("ok"):
                notes.append(f"{b}: {m.get('reason')}")
            elif r.precision == "int8" or len(r.measurements) > 1:
                notes.append(f"{b} top-1 {m['accuracy']:.4f}")
        if r is rows[0]:
            for b, m in r.measurements.items():
                if m.get("noise"):
                    notes.append(f"{b} run-to-run noise " + ", ".join(f"b{k} {100 * v:.0f}%" for k, v in m["noise"].items()))
        d = {k: v for k, v in r.details.items() if k != "latency_ratio"}
        if d:
            notes.append(", ".join(f"{k}={v}" for k, v in d.items()))
        if notes:
            lines.append(f"- {r.title}: " + "; ".join(notes))
    if meta.get("plot"):
        lines += ["", f"![size vs latency vs accuracy]({Path(meta['plot']).name})"]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], backends: list[str], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    markers = ["o", "s", "^", "D"]
    for ax, batch in zip(axes, ("1", "32")):
        for bi, b in enumerate(backends):
            xs, ys, cs, labels = [], [], [], []
            for r in rows:
                m = r.measurements.get(b, {})
                if not m.get("ok") or batch not in m["p50_ms"]:
                    continue
                size = m.get("artifact_bytes") if r.precision == "int8" else r.size_bytes
                xs.append((size or 0) / 1024)
                ys.append(m["p50_ms"][batch] * 1000)
                cs.append(100 * m["accuracy"])
                labels.append(r.key)
            if not xs:
                continue
            sc = ax.scatter(xs, ys, c=cs, cmap="viridis", vmin=90, vmax=100, marker=markers[bi % len(markers)], s=70,
                            edgecolors="black", label=b)
            for x, y, lab in zip(xs, ys, labels):
                ax.annotate(lab, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("model size (KiB; int8 rows: the backend's artifact)")
        ax.set_ylabel(f"p50 latency at batch {batch} (µs)")
        ax.set_title(f"batch {batch}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    try:
        fig.colorbar(sc, ax=axes, label="held-out top-1 (%)")
    except NameError:
        pass
    fig.suptitle("size vs latency vs accuracy (colour)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def run_report(model: str, out: Path, *, backends: list[str] | None = None, max_drop: float = 0.01, min_speedup: float = 1.10,
               quick: bool = False, search_budget_ms: float | None = None, runs: int | None = None, seed: int = 0,
               progress: bool = True, command: str = "", log=print) -> dict:
    from backends import get_backend

    from . import digits, hw, modelio
    from .bench import available_backends, check_backend, io_specs

    if not 0 <= max_drop <= 1:
        raise OptimizeError(f"--max-drop must be in [0, 1] (a fraction of top-1), got {max_drop}")
    if not min_speedup >= 1.0:
        raise OptimizeError(f"--min-speedup must be ≥ 1.0, got {min_speedup}")
    if runs is not None and runs < 10:
        raise OptimizeError(f"--runs must be ≥ 10, got {runs}")
    t0 = time.perf_counter()
    src = modelio.resolve(model)
    if src.onnx is None:
        raise OptimizeError(f"{model}: the report needs the model's ONNX file (model.onnx)")
    for b in backends or []:
        check_backend(b)
    avail = available_backends()
    if backends:
        missing = [b for b in backends if b not in avail]
        if missing:
            raise OptimizeError(f"backend(s) not available on this machine: {', '.join(missing)} (available: {', '.join(avail)})")
    else:
        backends = avail
    module = modelio.load_module(src)
    splits = digits.load_splits(modelio.DATA_SEED)
    x_eval, y_eval = modelio.eval_data(src)
    calib = modelio.load_calibration(src, None) if src.calib else splits.x_calib
    if src.calib is None:
        src.calib = None
    io = io_specs(src)
    runs = runs or (60 if quick else 300)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    search_backend = "onnxruntime" if "onnxruntime" in backends else backends[0]

    # The original first: its latency sets the default search budget.
    from .bench import measure

    log(f"measure the original on {', '.join(backends)}")
    base_meas = {b: measure(b, {"onnx": src.onnx, "pt2": src.pt2}, x_eval=x_eval, y_eval=y_eval, runs=runs, io=io).as_dict()
                 for b in backends}
    if search_budget_ms is None:
        b1 = base_meas[search_backend].get("p50_ms", {}).get("1")
        search_budget_ms = round((b1 or 1.0) / min_speedup, 4)
    rows = build_rows(src, out, module=module, splits=splits, x_eval=x_eval, y_eval=y_eval, calib=calib, quick=quick, seed=seed,
                      max_drop=max_drop, search_backend=search_backend, search_budget_ms=search_budget_ms, progress=progress,
                      log=log)
    rows[0].measurements = base_meas
    measure_rows(rows[1:], backends, x_eval=x_eval, y_eval=y_eval, calib=calib, io=io, runs=runs, out=out, log=log)
    # The original again, last: its reference latency is the faster of the two runs (a variant must beat the
    # original at its best), and the gap between the two runs is this machine's noise for that cell.
    log("measure the original again (reference = the faster run; the gap = noise)")
    for b in backends:
        again = measure(b, {"onnx": src.onnx, "pt2": src.pt2}, x_eval=x_eval, y_eval=y_eval, runs=runs, io=io).as_dict()
        first = base_meas[b]
        if not (first.get("ok") and again.get("ok")):
            continue
        noise = {}
        for batch, ms in list(first["p50_ms"].items()):
            ms2 = again["p50_ms"].get(batch, ms)
            noise[batch] = round(abs(ms - ms2) / min(ms, ms2), 4)
            first["p50_ms"][batch] = min(ms, ms2)
        first["p50_ms_runs"] = [dict(first["p50_ms"]), again["p50_ms"]]
        first["noise"] = noise
    verdicts(rows, backends, max_drop, min_speedup)

    cpu = hw.detect()
    meta = {
        "model": model, "command": command or f"kiln optimize report {model}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu.as_dict(), "cpu_summary": cpu.summary(), "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "versions": versions(), "backend_versions": {b: get_backend(b).version() for b in backends},
        "int8_recipes": {b: f"{(rc := hw.choose_recipe(b, 'static', cpu)).name} — {rc.reason}" for b in backends},
        "max_drop": max_drop, "min_speedup": min_speedup, "n_eval": int(len(y_eval)), "runs": runs, "quick": quick,
        "search_budget_ms": search_budget_ms, "backends": backends,
    }
    png = plot(rows, backends, out / "report.png")
    meta["plot"] = str(png) if png else None
    meta["seconds"] = time.perf_counter() - t0
    md = markdown(rows, backends, meta)
    (out / "report.md").write_text(md, encoding="utf-8")
    data = {"meta": meta, "rows": [{k: v for k, v in r.__dict__.items()} for r in rows]}
    (out / "report.json").write_text(modelio.dumps(data) + "\n", encoding="utf-8")
    return {"markdown": md, "data": data, "rows": rows, "backends": backends, "out": str(out)}


__all__ = ["run_report", "Row"]
