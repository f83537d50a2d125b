"""``kiln optimize search``: a small hardware-aware architecture search over the DigitsCNN family.

Every candidate (conv widths × depth × hidden width) is trained briefly (fixed seed) on the training
split minus a validation split carved from it; its accuracy is the validation top-1 (the held-out
eval split is never used to choose, only reported for the winner). Its latency is MEASURED on the
target backend exactly as it would be served: export → backend compile → load → warm → median of
single calls at the given batch size. The result is the Pareto front (latency ↓, accuracy ↑) and the
most accurate candidate whose p50 is within the budget (ties → the faster one); the winner is then
trained for ``final_epochs`` and written as a servable model folder.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import OptimizeError, StepFailed

WIDTHS = ((8,), (4, 8), (8, 16), (16, 32), (32, 64), (8, 16, 32))
HIDDEN = (0, 32, 64)


@dataclass
class Candidate:
    widths: tuple
    hidden: int
    params: int = 0
    macs: int = 0
    val_top1: float = 0.0
    p50_ms: float = float("nan")
    p50_ms_b32: float | None = None
    train_s: float = 0.0
    pareto: bool = False
    within_budget: bool = False
    reason: str = ""

    @property
    def name(self) -> str:
        return ",".join(map(str, self.widths)) + (f":{self.hidden}" if self.hidden else "")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        return d


@dataclass
class SearchResult:
    backend: str
    budget_ms: float
    batch: int
    candidates: list[Candidate]
    best: Candidate | None
    eval_top1: float | None = None  # of the final (longer-trained) winner, on the held-out split
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    model: object = None

    @property
    def pareto(self) -> list[Candidate]:
        return sorted((c for c in self.candidates if c.pareto), key=lambda c: c.p50_ms)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "budget_ms": self.budget_ms, "batch": self.batch,
                "candidates": [c.as_dict() for c in self.candidates], "pareto": [c.name for c in self.pareto],
                "best": self.best.as_dict() if self.best else None, "eval_top1": self.eval_top1,
                "seconds": self.seconds, "notes": self.notes}


def grid(max_candidates: int | None = None) -> list[tuple[tuple, int]]:
    cands = [(w, h) for w, h in itertools.product(WIDTHS, HIDDEN)]
    if max_candidates and max_candidates < len(cands):
        # Spread the subset over the grid (smallest to largest), deterministically.
        idx = np.unique(np.linspace(0, len(cands) - 1, max_candidates).round().astype(int))
        cands = [cands[i] for i in idx]
    return cands


def pareto_front(cands: list[Candidate]) -> None:
    ok = [c for c in cands if not c.reason]
    for c in ok:
        c.pareto = not any(
            (o.p50_ms <= c.p50_ms and o.val_top1 >= c.val_top1) and (o.p50_ms < c.p50_ms or o.val_top1 > c.val_top1)
            for o in ok if o is not c
        )


def select_best(cands: list[Candidate], budget_ms: float) -> Candidate | None:
    """The most accurate measured candidate with p50 ≤ budget (ties: the faster); marks ``within_budget``."""
    for c in cands:
        c.within_budget = not c.reason and c.p50_ms <= budget_ms
    under = [c for c in cands if c.within_budget]
    return max(under, key=lambda c: (round(c.val_top1, 6), -c.p50_ms)) if under else None


def validate(budget_ms: float, batch: int, epochs: int, max_candidates: int | None) -> None:
    if not budget_ms > 0:
        raise OptimizeError(f"--budget-ms must be > 0, got {budget_ms}")
    if batch < 1 or batch > 32:
        raise OptimizeError(f"--batch must be between 1 and 32, got {batch}")
    if not 1 <= epochs <= 500:
        raise OptimizeError(f"--epochs must be between 1 and 500, got {epochs}")
    if max_candidates is not None and max_candidates < 1:
        raise OptimizeError(f"--max-candidates must be ≥ 1, got {max_candidates}")


def search(splits, backend: str, budget_ms: float, *, batch: int = 1, epochs: int = 12, final_epochs: int = 30,
           lr: float = 3e-3, seed: int = 0, runs: int = 200, max_candidates: int | None = None,
           val_fraction: float = 0.15, progress: bool = True) -> SearchResult:
    from backends import get_backend

    from . import digits, modelio
    from .analyze import analyze_onnx
    from .bench import check_backend, compile_artifact, time_runner
    from .distill import carve_validation

    check_backend(backend)
    validate(budget_ms, batch, epochs, max_candidates)
    be = get_backend(backend)
    ok, why = be.available()
    if not ok:
        raise StepFailed(f"{backend}: not available here ({why})")
    t_start = time.perf_counter()
    (xt, yt), (xv, yv) = carve_validation(splits.x_train, splits.y_train, val_fraction, seed)
    cands = [Candidate(w, h) for w, h in grid(max_candidates)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cands), desc=f"search on {backend}", unit="cand", leave=False)
    with tempfile.TemporaryDirectory(prefix="kiln-search-") as tmp:
        for i, c in enumerate(cands):
            wd = Path(tmp) / f"c{i}"
            model = digits.DigitsCNN(c.widths, c.hidden, seed=seed)
            c.params = digits.count_params(model)
            t0 = time.perf_counter()
            digits.train(model, (xt, yt), epochs=epochs, lr=lr, seed=seed, progress=False)
            c.train_s = round(time.perf_counter() - t0, 2)
            c.val_top1 = digits.evaluate(model, xv, yv)
            fmt = be.source_formats[0]
            sources = {"onnx": wd / "model.onnx" if "onnx" in be.source_formats else None,
                       "pt2": wd / "model.pt2" if fmt == "pt2" or "onnx" not in be.source_formats else None}
            modelio.export(model, sources["onnx"], sources["pt2"])
            if sources["onnx"] is not None:
                c.macs = analyze_onnx(sources["onnx"]).macs
            try:
                src = modelio.ModelSource(arg=str(wd), onnx=sources["onnx"], pt2=sources["pt2"])
                from .bench import io_specs

                b, artifact, options, _ = compile_artifact(backend, sources, "fp32", wd / "artifact", io=io_specs(src))
                runner = b.load(artifact, options)
                c.p50_ms = time_runner(runner, "input", splits.x_calib, batch, runs)
                runner.close()
            except StepFailed as err:
                c.reason = str(err)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cand=c.name, val=f"{c.val_top1:.3f}", ms=f"{c.p50_ms:.4f}")  # noqa: E501
    if bar is not None:
        bar.close()
    pareto_front(cands)
    best = select_best(cands, budget_ms)
    result = SearchResult(backend, budget_ms, batch, cands, best)
    if best is not None:
        model = digits.DigitsCNN(best.widths, best.hidden, seed=seed)
        digits.train(model, splits, epochs=final_epochs, lr=lr, seed=seed, progress=progress)
        result.model = model
        result.eval_top1 = digits.evaluate(model, splits.x_eval, splits.y_eval)
    else:
        fastest = min((c for c in cands if not c.reason), key=lambda c: c.p50_ms, default=None)
        result.notes.append(f"no candidate within {budget_ms} ms at batch {batch}"
                            + (f"; the fastest is {fastest.name} at {fastest.p50_ms:.4f} ms" if fastest else ""))
    result.seconds = round(time.perf_counter() - t_start, 1)
    return result


def render(result: SearchResult, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"architecture search on {result.backend} (p50 at batch {result.batch}, budget {result.budget_ms} ms)")
    for col in ("candidate", "params", "MACs", "val top-1", "p50 ms", "Pareto", "≤ budget"):
        t.add_column(col, justify="left" if col == "candidate" else "right")
    for c in sorted(result.candidates, key=lambda c: (c.p50_ms if c.p50_ms == c.p50_ms else 1e9)):
        mark = "★ " if result.best is c else ""
        t.add_row(mark + c.name, f"{c.params:,}", f"{c.macs:,}" if c.macs else "", f"{c.val_top1:.4f}",
                  c.reason[:40] if c.reason else f"{c.p50_ms:.4f}", "yes" if c.pareto else "", "yes" if c.within_budget else "no")
    console.print(t)
    if result.best:
        console.print(f"best under {result.budget_ms} ms: [bold]{result.best.name}[/bold] (val top-1 {result.best.val_top1:.4f}, "
                      f"p50 {result.best.p50_ms:.4f} ms); after final training held-out top-1 {result.eval_top1:.4f}")
    for n in result.notes:
        console.print(n)
    console.print(f"search took {result.seconds} s")
