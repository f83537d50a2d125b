"""``kiln optimize report``: every technique on the user's model, measured on every backend, with a verdict.

Rows: the original; L1 unstructured pruning (50%); channel pruning (DepGraph, 30%) — both need the torch
model; INT8 static (each backend's own recipe, the user's calibration split); INT8 dynamic (ONNX Runtime,
for MatMul-heavy models: more MACs in MatMul/Gemm than in Conv); FP16 (each backend that builds it);
distillation (with ``--student``); search (with ``--space``). Each row: size of the servable ONNX (INT8
static: the backend's artifact), parameters, MACs (batch 1), p50 at batch 1 and batch N on every backend
(``backends.timing``), the metric on the compiled artifact (the worst backend), and a verdict:

- *rejected: metric* when the metric drops by more than ``--max-drop`` (its own unit) on any backend;
- *rejected: not faster on any backend* when no backend/batch cell is ``min_speedup``× faster than the
  original (and by more than the original's run-to-run noise in that cell);
- *kept* otherwise — its model folder (``OUT/models/<row>/``, targeting the backend where it is fastest)
  is servable and passes Kiln's parity and accuracy gates.

Outputs: ``OUT/report.md``, ``OUT/report.json``, ``OUT/report.png`` (latency vs metric, Pareto front).
"""

from __future__ import annotations

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
    precision: str = "fp32"  # of the compile: fp32 source, or int8/fp16 through each backend's recipe
    sources: dict = field(default_factory=dict)  # fmt -> Path
    module: object = None  # torch module of a new fp32 source (written as the row's folder)
    only_backends: list | None = None
    folder: str | None = None
    size_bytes: int | None = None
    params: int | None = None
    macs: int | None = None
    details: dict = field(default_factory=dict)
    measurements: dict = field(default_factory=dict)  # backend -> Measurement.as_dict()
    metric: float | None = None
    verdict: str = ""
    kept: bool | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "module"}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "openvino", "nncf", "torch-pruning", "ai-edge-litert", "litert-torch",
                 "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "-"
    return out


def _structure(row: Row, onnx_path: Path | None) -> None:
    from .analyze import analyze_onnx

    if onnx_path is not None and Path(onnx_path).exists():
        a = analyze_onnx(Path(onnx_path))
        row.size_bytes, row.params, row.macs = Path(onnx_path).stat().st_size, a.params, a.macs


def matmul_heavy(onnx_path: Path) -> bool:
    from .analyze import analyze_onnx

    a = analyze_onnx(onnx_path)
    mm = sum(la.macs for la in a.layers if la.op in ("MatMul", "Gemm"))
    conv = sum(la.macs for la in a.layers if la.op.startswith("Conv"))
    return mm > conv


def build_rows(w, out: Path, *, backends: list[str], epochs: int, seed: int, student, space, search_budget_ms: float,
               search_backend: str, quick: bool, progress: bool, log) -> list[Row]:
    from . import distill, prune, quantize
    from . import search as srch
    from .source import export_module

    work = out / "work"
    m = shlex.quote(w.model.arg)
    rows: list[Row] = []
    r = Row("original", "original", "none", f"kiln optimize analyze {m}", sources=dict(w.model.sources))
    _structure(r, w.model.sources.get("onnx"))
    rows.append(r)

    def add_module_row(key: str, title: str, technique: str, command: str, module, details: dict) -> None:
        srcs = export_module(module, w.splits.train.head(8).inputs, work / key, output_names=[t.name for t in w.outputs])
        row = Row(key, title, technique, command, sources=srcs, module=module, details=details)
        _structure(row, srcs["onnx"])
        rows.append(row)

    if w.model.module is not None:
        for method, amount, key in (("l1-unstructured", 0.5, "l1-pruning"), ("channel", 0.3, "channel-pruning")):
            log(f"{method} pruning ({amount:.0%}), fine-tune {epochs} epochs")
            res = prune.prune_workload(w, method, amount, finetune_epochs=epochs, seed=seed, progress=progress)
            add_module_row(key, f"{'L1 unstructured' if method == 'l1-unstructured' else 'channel'} pruning ({amount:.0%})",
                           "prune", f"kiln optimize prune {m} --method {method} --amount {amount} --finetune-epochs {epochs}",
                           res.module, {"sparsity": round(res.sparsity, 4), "kept_whole": res.kept_whole,
                                        "params_before": res.params_before})
    else:
        log("pruning skipped: the model is ONNX-only (give path/to/file.py:factory or a .pt2 for the torch-side techniques)")

    r = Row("int8-static", "INT8 static (each backend's recipe)", "quantize",
            f"kiln optimize quantize {m} --backend BACKEND --mode static", precision="int8", sources=dict(w.model.sources))
    _structure(r, w.model.sources.get("onnx"))
    rows.append(r)
    if "onnx" in w.model.sources and "onnxruntime" in backends and matmul_heavy(w.model.sources["onnx"]):
        log("INT8 dynamic (ONNX Runtime quantize_dynamic: the model is MatMul-heavy)")
        q = quantize.dynamic_int8(w.model.sources["onnx"], work / "int8-dynamic" / "model.onnx")
        r = Row("int8-dynamic", "INT8 dynamic (ONNX Runtime)", "quantize",
                f"kiln optimize quantize {m} --backend onnxruntime --mode dynamic", sources={"onnx": q},
                only_backends=["onnxruntime"])
        _structure(r, q)
        rows.append(r)
    r = Row("fp16", "FP16 (each backend that builds it)", "fp16", f"kiln serve (config precision: fp16) of {m}",
            precision="fp16", sources=dict(w.model.sources))
    _structure(r, w.model.sources.get("onnx"))
    rows.append(r)

    if student:
        log(f"distillation into {student.spec} {student.kwargs or ''}")
        dr = distill.distill_workload(w, student, epochs=epochs * 3, patience=max(5, epochs), seed=seed, progress=progress,
                                      compare=not quick)
        add_module_row("distillation", f"distillation (student {Path(student.spec).name} {student.kwargs or ''}, α 0.7, T 4)",
                       "distill", f"kiln optimize distill --teacher {m} --student {shlex.quote(student.spec)}", dr.model,
                       {"teacher_metric": dr.teacher_metric, "student_metric_torch": dr.student_metric,
                        "without_teacher_torch": dr.baseline_metric})
    if space:
        log(f"search over {space} on {search_backend} (budget {search_budget_ms:.4f} ms at batch 1)")
        sr = srch.search(w, space, search_backend, search_budget_ms, epochs=max(2, epochs // 2), final_epochs=epochs * 2,
                         seed=seed, runs=60 if quick else 200, progress=progress)
        srch.plot(sr, out / "search.png")
        cmd = f"kiln optimize search {m} " + " ".join(f"--space {k}={','.join(map(str, v))}" for k, v in space.items()) + \
              f" --budget-ms {search_budget_ms:.4f} --backend {search_backend}"
        if sr.best is not None:
            add_module_row("search", f"search (best ≤ {search_budget_ms:.4f} ms on {search_backend}: {sr.best.name})", "search",
                           cmd, sr.model, {"pareto": [c.name for c in sr.pareto], "candidates": len(sr.candidates)})
        else:
            r = Row("search", "search", "search", cmd, details={"notes": sr.notes})
            r.verdict, r.kept = f"rejected: {'; '.join(sr.notes)}", False
            rows.append(r)
    return rows


def measure_rows(w, rows: list[Row], backends: list[str], *, batch: int, runs: int, out: Path, progress: bool, log) -> None:
    from .bench import measure

    for r in rows:
        if r.verdict and not r.sources:
            continue
        for b in backends:
            if r.only_backends and b not in r.only_backends:
                continue
            log(f"measure {r.key} on {b} ({r.precision})")
            parity: dict[str, float] = {}

            def evaluate(runner, parity=parity):
                if r.precision != "fp32":  # a lossy build of the original: its error decides the written tolerance
                    parity["max_abs_error"] = w.parity_error(runner)
                return w.evaluate(runner)

            mm = measure(b, r.sources, precision=r.precision, inputs=w.splits.eval.inputs, evaluate=evaluate,
                         calibration=w.splits.calib.inputs if r.precision == "int8" else None, batches=(1, batch),
                         runs=runs, io=(w.inputs, w.outputs), workdir=out / "work" / r.key / b, progress=progress)
            r.measurements[b] = {**mm.as_dict(), **({"parity_max_abs_error": parity["max_abs_error"]} if parity else {})}
            if r.precision == "int8" and mm.ok and b == "onnxruntime":
                r.details["onnxruntime_int8_bytes"] = mm.artifact_bytes


def verdicts(w, rows: list[Row], max_drop: float, min_speedup: float) -> None:
    metric = w.metric
    base = rows[0]
    ok_base = [m for m in base.measurements.values() if m.get("ok")]
    base.metric = ok_base[0]["accuracy"] if ok_base else None
    base.verdict, base.kept = "baseline", True
    for r in rows[1:]:
        ok = [m for m in r.measurements.values() if m.get("ok")]
        if not ok:
            if not r.verdict:
                reasons = "; ".join(m.get("reason", "") for m in r.measurements.values()) or "nothing measured"
                r.verdict, r.kept = f"rejected: could not be measured here ({reasons})", False
            continue
        worst = max(ok, key=lambda m: metric.drop(base.metric, m["accuracy"]))
        r.metric = worst["accuracy"]
        drop = metric.drop(base.metric, r.metric)
        ratios = []
        for m in ok:
            bm = base.measurements.get(m["backend"], {})
            for bs, ms in m["p50_ms"].items():
                ref = bm.get("p50_ms", {}).get(bs)
                if ref:
                    ratios.append((ms / ref, m["backend"], bs))
        r.details["latency_ratio"] = {f"{b}@{bs}": round(x, 3) for x, b, bs in ratios}
        if drop > max_drop + 1e-9:
            r.verdict, r.kept = (f"rejected: metric ({metric.name} {r.metric:.4f} vs {base.metric:.4f} on {worst['backend']}: "
                                 f"drop {drop:.4f} > --max-drop {max_drop})"), False
            continue
        noise = {(b, bs): base.measurements.get(b, {}).get("noise", {}).get(bs, 0.0) for _, b, bs in ratios}
        fast = sorted((x, b, bs) for x, b, bs in ratios if x <= 1.0 / max(min_speedup, 1.0 + noise[(b, bs)]))
        if not fast:
            best = min(ratios, default=None)
            where = f"best {best[1]} batch {best[2]}: {best[0]:.2f}× the original's latency" if best else "no latency"
            r.verdict, r.kept = f"rejected: not faster on any backend ({where}; needs ≥ {min_speedup:.2f}×)", False
            continue
        r.details["fastest_backend"] = fast[0][1]
        cells = ", ".join(f"{1 / x:.2f}× at batch {bs} on {b}" for x, b, bs in fast[:3])
        r.verdict, r.kept = f"kept: faster ({cells}), {metric.name} drop {drop:.4f}", True


def write_kept(w, rows: list[Row], out: Path, max_drop: float) -> None:
    """Every kept row becomes a servable folder targeting the backend where it is fastest."""
    from backends import hw

    from . import modelio

    for r in rows[1:]:
        if not r.kept:
            continue
        folder = out / "models" / r.key
        backend = r.details.get("fastest_backend", "onnxruntime")
        info = {"command": r.command, "technique": r.technique, "measurements": r.measurements, "verdict": r.verdict}
        if r.module is not None:
            modelio.write_workload_folder(folder, w, module=r.module, max_drop=max_drop, info=info, backend=backend,
                                          comment=f"{r.title}: kept by kiln optimize report")
        elif r.precision == "fp32":
            modelio.write_workload_folder(folder, w, sources=r.sources, max_drop=max_drop, info=info, backend=backend,
                                          comment=f"{r.title}: kept by kiln optimize report")
        else:
            m = r.measurements[backend]
            extra = hw.choose_recipe(backend, "static").extra if r.precision == "int8" else None
            tol = 2 * m.get("parity_max_abs_error", 0.0) + 1e-6
            modelio.write_workload_folder(folder, w, sources=dict(w.model.sources), backend=backend, precision=r.precision,
                                          max_drop=max_drop, info=info, backend_options=extra or None, lossy_atol=tol,
                                          comment=f"{r.title} on {backend}: kept by kiln optimize report")
        r.folder = str(folder)


# --------------------------------------------------------------------------- output


def _fmt_ms(m: dict, batch: str, base: dict | None) -> str:
    if not m or not m.get("ok"):
        return "n/a"
    ms = m["p50_ms"].get(batch)
    if ms is None:
        return "n/a"
    ref = (base or {}).get("p50_ms", {}).get(batch) if base and base.get("ok") else None
    return f"{ms:.3f} ({ms / ref:.2f})" if ref else f"{ms:.3f}"


def markdown(w, rows: list[Row], backends: list[str], meta: dict) -> str:
    bn = str(meta["batch"])
    lines = [f"# Optimization report: `{meta['model']}`", "",
             f"Generated by `{meta['command']}` on {meta['date']} in {meta['seconds']:.0f} s.", "",
             f"- CPU: {meta['cpu_summary']}; OS: {meta['os']}",
             "- " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             "- INT8 recipes on this CPU: " + "; ".join(f"**{b}**: {r}" for b, r in meta["int8_recipes"].items()),
             f"- Data: {meta['split']}", f"- Metric: {w.metric.describe()} on the compiled artifact (worst backend); "
             f"--max-drop {meta['max_drop']} in its unit", "",
             f"Latency: p50 ms of single in-process calls (`backends.timing`), ratio to the original on the same backend "
             f"and batch in parentheses (< 1 = faster). Kept: some cell ≥ {meta['min_speedup']:.2f}× faster (and beyond the "
             f"original's run-to-run noise) and the metric within --max-drop.", ""]
    head = ["technique", "size bytes", "params", "MACs"]
    for b in backends:
        head += [f"{b} b1", f"{b} b{bn}"]
    head += [w.metric.name, "verdict"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    base = rows[0]
    for r in rows:
        cells = [r.title, f"{r.size_bytes:,}" if r.size_bytes else "n/a", f"{r.params:,}" if r.params else "n/a",
                 f"{r.macs:,}" if r.macs else "n/a"]
        for b in backends:
            m = r.measurements.get(b, {})
            bm = base.measurements.get(b) if r is not base else None
            cells += [_fmt_ms(m, "1", bm), _fmt_ms(m, bn, bm)]
        cells += [f"{r.metric:.4f}" if r.metric is not None else "n/a", r.verdict]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Reproduce each row", ""]
    for r in rows:
        lines.append(f"- **{r.title}**: `{r.command}`" + (f" → `{r.folder}` (servable)" if r.folder else ""))
    notes = []
    for r in rows:
        for b, m in r.measurements.items():
            if not m.get("ok"):
                notes.append(f"- {r.title} on {b}: {m.get('reason')}")
    if notes:
        lines += ["", "## Not measured", ""] + notes
    if meta.get("plot"):
        lines += ["", f"![latency vs {w.metric.name}]({Path(meta['plot']).name})"]
    return "\n".join(lines) + "\n"


def plot(w, rows: list[Row], backends: list[str], path: Path, batch: str) -> Path:
    """Latency (batch 1 and N) vs metric per backend, the Pareto front of each backend joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, bs in zip(axes, ("1", batch)):
        for bi, b in enumerate(backends):
            pts = [(r.measurements[b]["p50_ms"][bs], r.measurements[b]["accuracy"], r.key) for r in rows
                   if r.measurements.get(b, {}).get("ok") and bs in r.measurements[b]["p50_ms"]]
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=b, c=f"C{bi}")
            for x, y, k in pts:
                ax.annotate(k, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            front, best = [], None
            sign = 1 if w.metric.higher_is_better else -1
            for x, y, _ in sorted(pts):
                if best is None or sign * y > best:
                    front.append((x, y))
                    best = sign * y
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", c=f"C{bi}", alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel(f"p50 ms at batch {bs}")
        ax.set_ylabel(w.metric.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("latency vs metric (dashed: Pareto front per backend)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def run_report(w, out: Path, *, backends: list[str] | None = None, max_drop: float = 0.01, min_speedup: float = 1.10,
               quick: bool = False, student: str | None = None, student_args: list[str] | None = None,
               space: list[str] | None = None, search_budget_ms: float | None = None, batch: int = 32, epochs: int = 10,
               runs: int | None = None, seed: int = 0, progress: bool = True, command: str = "", log=print) -> dict:
    from backends import get_backend, hw

    from . import modelio
    from . import search as srch
    from .bench import available_backends, check_backend, measure
    from .distill import parse_student_spec

    if max_drop < 0:
        raise OptimizeError(f"--max-drop must be ≥ 0, got {max_drop}")
    if not min_speedup >= 1.0:
        raise OptimizeError(f"--min-speedup must be ≥ 1.0, got {min_speedup}")
    if runs is not None and runs < 10:
        raise OptimizeError(f"--runs must be ≥ 10, got {runs}")
    if not 2 <= batch <= 256:
        raise OptimizeError(f"--batch must be between 2 and 256, got {batch}")
    student_f = parse_student_spec(student, student_args) if student else None
    grid_space = srch.parse_space(space) if space else None
    if grid_space and w.model.factory is None:
        raise OptimizeError("--space searches a factory's keyword arguments: give MODEL as path/to/file.py:factory")
    for b in backends or []:
        check_backend(b)
    avail = available_backends()
    if backends:
        missing = [b for b in backends if b not in avail]
        if missing:
            raise OptimizeError(f"backend(s) not available on this machine: {', '.join(missing)} (available: {', '.join(avail)})")
    else:
        backends = avail
    t0 = time.perf_counter()
    runs = runs or (60 if quick else 300)
    epochs = min(epochs, 3) if quick else epochs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    search_backend = "onnxruntime" if "onnxruntime" in backends else backends[0]

    def measure_original() -> dict:
        return {b: measure(b, w.model.sources, inputs=w.splits.eval.inputs, evaluate=w.evaluate, batches=(1, batch),
                           runs=runs, io=(w.inputs, w.outputs), progress=progress).as_dict() for b in backends}

    log(f"measure the original on {', '.join(backends)}")
    base_meas = measure_original()
    if search_budget_ms is None:
        b1 = base_meas[search_backend].get("p50_ms", {}).get("1")
        search_budget_ms = round((b1 or 1.0) / min_speedup, 4)
    rows = build_rows(w, out, backends=backends, epochs=epochs, seed=seed, student=student_f, space=grid_space,
                      search_budget_ms=search_budget_ms, search_backend=search_backend, quick=quick, progress=progress, log=log)
    rows[0].measurements = base_meas
    measure_rows(w, rows[1:], backends, batch=batch, runs=runs, out=out, progress=progress, log=log)
    # The original again, last: its reference latency is the faster of the two runs, the gap is the noise.
    log("measure the original again (reference = the faster run; the gap = noise)")
    for b, again in measure_original().items():
        first = base_meas[b]
        if not (first.get("ok") and again.get("ok")):
            continue
        noise = {}
        for bs, ms in list(first["p50_ms"].items()):
            ms2 = again["p50_ms"].get(bs, ms)
            noise[bs] = round(abs(ms - ms2) / min(ms, ms2), 4)
            first["p50_ms"][bs] = min(ms, ms2)
        first["noise"] = noise
    verdicts(w, rows, max_drop, min_speedup)
    write_kept(w, rows, out, max_drop)
    cpu = hw.detect()
    meta = {
        "model": w.model.arg, "command": command or f"kiln optimize report {w.model.arg}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu.as_dict(), "cpu_summary": cpu.summary(),
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})", "versions": versions(),
        "backend_versions": {b: get_backend(b).version() for b in backends},
        "int8_recipes": {b: f"{(rc := hw.choose_recipe(b, 'static', cpu)).name} — {rc.reason}" for b in backends},
        "max_drop": max_drop, "min_speedup": min_speedup, "runs": runs, "quick": quick, "batch": batch,
        "search_budget_ms": search_budget_ms, "backends": backends, "workload": w.record(),
        "split": ", ".join(f"{k} {v}" for k, v in w.splits.record()["sizes"].items()) + f" (seed {w.splits.how.get('seed')})",
    }
    meta["plot"] = str(plot(w, rows, backends, out / "report.png", str(batch)))
    meta["seconds"] = time.perf_counter() - t0
    md = markdown(w, rows, backends, meta)
    (out / "report.md").write_text(md, encoding="utf-8")
    data = {"meta": meta, "rows": [r.as_dict() for r in rows]}
    (out / "report.json").write_text(modelio.dumps(data) + "\n", encoding="utf-8")
    return {"markdown": md, "data": data, "rows": rows, "backends": backends, "out": str(out)}


__all__ = ["run_report", "Row"]
