"""``kiln optimize search``: hardware-aware search over a factory's keyword arguments.

``--space width=16,32,64 --space depth=2,3,4`` spans a grid of ``factory(**model_args, **point)``
candidates. Each is trained briefly (the one training loop, ``optimize.train``) on the user's training
split, exported, compiled for the target backend and timed there exactly as it would be served
(``backends.timing``); its metric is measured on the compiled artifact over the validation split (the
held-out split is never used to choose, only reported for the winner). Result: the Pareto front
(latency ↓, metric better) and the best candidate whose p50 is within ``--budget-ms``; the winner is
trained for ``final_epochs`` and written as a servable model folder.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OptimizeError, StepFailed


@dataclass
class Candidate:
    kwargs: dict[str, Any]
    params: int = 0
    macs: int = 0
    val_metric: float = float("nan")
    p50_ms: float = float("nan")
    spread_ms: float = float("nan")
    train_s: float = 0.0
    pareto: bool = False
    within_budget: bool = False
    reason: str = ""

    @property
    def name(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.kwargs.items()) or "(defaults)"

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["name"] = self.name
        return d


@dataclass
class SearchResult:
    backend: str
    budget_ms: float
    batch: int
    metric: str
    higher_is_better: bool
    candidates: list[Candidate]
    best: Candidate | None
    eval_metric: float | None = None  # of the final (longer-trained) winner on the held-out split (torch module)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    model: object = None

    @property
    def pareto(self) -> list[Candidate]:
        return sorted((c for c in self.candidates if c.pareto), key=lambda c: c.p50_ms)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "budget_ms": self.budget_ms, "batch": self.batch, "metric": self.metric,
                "higher_is_better": self.higher_is_better, "candidates": [c.as_dict() for c in self.candidates],
                "pareto": [c.name for c in self.pareto], "best": self.best.as_dict() if self.best else None,
                "eval_metric": self.eval_metric, "seconds": self.seconds, "notes": self.notes}


def parse_space(items: list[str] | None) -> dict[str, list]:
    """``key=v1,v2,...`` (values read as YAML: ``16``, ``0.5``, ``relu``, ``[8,16]``) -> {key: [values]}."""
    import yaml

    space: dict[str, list] = {}
    for item in items or []:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier() or not values.strip():
            raise OptimizeError(f"--space must be key=v1,v2,... with a Python identifier as key, got '{item}'")
        try:
            parsed = yaml.safe_load(f"[{values}]")
        except yaml.YAMLError:
            raise OptimizeError(f"--space {item}: values must be comma-separated numbers, words or [lists]") from None
        if key in space:
            raise OptimizeError(f"--space {key} given twice")
        space[key] = parsed
    return space


def grid(space: dict[str, list], max_candidates: int | None = None) -> list[dict]:
    points = [dict(zip(space, combo)) for combo in itertools.product(*space.values())] if space else [{}]
    if max_candidates and max_candidates < len(points):
        # Spread the subset over the grid (first to last), deterministically.
        idx = np.unique(np.linspace(0, len(points) - 1, max_candidates).round().astype(int))
        points = [points[i] for i in idx]
    return points


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def pareto_front(cands: list[Candidate], higher_is_better: bool = True) -> None:
    ok = [c for c in cands if not c.reason]
    for c in ok:
        c.pareto = not any(
            o.p50_ms <= c.p50_ms and not _better(c.val_metric, o.val_metric, higher_is_better)
            and (o.p50_ms < c.p50_ms or _better(o.val_metric, c.val_metric, higher_is_better))
            for o in ok if o is not c
        )


def select_best(cands: list[Candidate], budget_ms: float, higher_is_better: bool = True) -> Candidate | None:
    """The best-metric measured candidate with p50 ≤ budget (ties: the faster); marks ``within_budget``."""
    for c in cands:
        c.within_budget = not c.reason and c.p50_ms <= budget_ms
    under = [c for c in cands if c.within_budget]
    sign = 1 if higher_is_better else -1
    return max(under, key=lambda c: (round(sign * c.val_metric, 6), -c.p50_ms)) if under else None


def validate(budget_ms: float, batch: int, epochs: int, max_candidates: int | None) -> None:
    if not budget_ms > 0:
        raise OptimizeError(f"--budget-ms must be > 0, got {budget_ms}")
    if batch < 1 or batch > 32:
        raise OptimizeError(f"--batch must be between 1 and 32, got {batch}")
    if not 1 <= epochs <= 500:
        raise OptimizeError(f"--epochs must be between 1 and 500, got {epochs}")
    if max_candidates is not None and max_candidates < 1:
        raise OptimizeError(f"--max-candidates must be ≥ 1, got {max_candidates}")


def _train(module, w, epochs: int, lr: float, seed: int, progress: bool, desc: str):
    from . import train

    use_labels = w.metric.needs_labels and w.splits.train.labels is not None
    return train.fit(module, w.splits.train, w.splits.val, epochs=epochs, lr=lr, seed=seed, classifier=w.classifier,
                     teacher_train=None if use_labels else w.reference_outputs("train"),
                     teacher_val=None if use_labels else w.reference_outputs("val"), use_labels=use_labels,
                     progress=progress, desc=desc)


def search(w, space: dict[str, list], backend: str, budget_ms: float, *, batch: int = 1, epochs: int = 12,
           final_epochs: int = 30, lr: float = 3e-3, seed: int = 0, runs: int = 200, max_candidates: int | None = None,
           progress: bool = True) -> SearchResult:
    """Search the factory of the workload's model (see the module docstring)."""
    from backends import get_backend
    from backends.timing import time_runner

    from .analyze import analyze_onnx
    from .bench import check_backend, compile_artifact
    from .source import count_params, export_module

    factory = w.model.factory
    if factory is None:
        raise OptimizeError(f"search builds new models from a factory: give MODEL as path/to/file.py:factory (got {w.model.arg})")
    check_backend(backend)
    validate(budget_ms, batch, epochs, max_candidates)
    ok, why = get_backend(backend).available()
    if not ok:
        raise StepFailed(f"{backend}: not available here ({why})")
    t_start = time.perf_counter()
    cands = [Candidate(p) for p in grid(space, max_candidates)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cands), desc=f"search on {backend}", unit="cand", leave=False)
    with tempfile.TemporaryDirectory(prefix="kiln-search-") as tmp:
        for i, c in enumerate(cands):
            wd = Path(tmp) / f"c{i}"
            try:
                module = factory.build(**c.kwargs)
                c.params = count_params(module)
                t0 = time.perf_counter()
                _train(module, w, epochs, lr, seed, False, c.name)
                c.train_s = round(time.perf_counter() - t0, 2)
                sources = export_module(module, w.splits.train.head(8).inputs, wd, output_names=[t.name for t in w.outputs])
                c.macs = analyze_onnx(sources["onnx"]).macs
                be, artifact, options, _ = compile_artifact(backend, sources, "fp32", wd / "artifact")
                runner = be.load(artifact, options)
                try:
                    c.val_metric = w.evaluate(runner, "val")
                    t = time_runner(runner, w.splits.calib.inputs, batch, runs)
                    c.p50_ms, c.spread_ms = t.median_ms, t.spread_ms
                finally:
                    runner.close()
            except (StepFailed, OptimizeError) as err:
                c.reason = str(err)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cand=c.name, val=f"{c.val_metric:.3f}", ms=f"{c.p50_ms:.4f}")
    if bar is not None:
        bar.close()
    higher = w.metric.higher_is_better
    pareto_front(cands, higher)
    best = select_best(cands, budget_ms, higher)
    result = SearchResult(backend, budget_ms, batch, w.metric.name, higher, cands, best)
    if best is not None:
        module = factory.build(**best.kwargs)
        _train(module, w, final_epochs, lr, seed, progress, f"train {best.name}")
        result.model = module
        result.eval_metric = w.evaluate_module(module)
    else:
        fastest = min((c for c in cands if not c.reason), key=lambda c: c.p50_ms, default=None)
        result.notes.append(f"no candidate within {budget_ms} ms at batch {batch}"
                            + (f"; the fastest is {fastest.name} at {fastest.p50_ms:.4f} ms" if fastest else ""))
    result.seconds = round(time.perf_counter() - t_start, 1)
    return result


def plot(result: SearchResult, path: Path) -> Path:
    """Latency vs metric of every candidate, the Pareto front joined, the budget drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in result.candidates if not c.reason]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([c.p50_ms for c in ok], [c.val_metric for c in ok], c="grey", label="candidates")
    front = result.pareto
    ax.plot([c.p50_ms for c in front], [c.val_metric for c in front], "o-", c="C1", label="Pareto front")
    for c in ok:
        ax.annotate(c.name, (c.p50_ms, c.val_metric), fontsize=6)
    ax.axvline(result.budget_ms, ls="--", c="C3", label=f"budget {result.budget_ms} ms")
    ax.set_xlabel(f"p50 ms at batch {result.batch} on {result.backend}")
    ax.set_ylabel(f"validation {result.metric}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(result: SearchResult, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"architecture search on {result.backend} (p50 at batch {result.batch}, budget {result.budget_ms} ms)")
    for col in ("candidate", "params", "MACs", f"val {result.metric}", "p50 ms", "Pareto", "≤ budget"):
        t.add_column(col, justify="left" if col == "candidate" else "right")
    for c in sorted(result.candidates, key=lambda c: (c.p50_ms if c.p50_ms == c.p50_ms else 1e9)):
        mark = "★ " if result.best is c else ""
        t.add_row(mark + c.name, f"{c.params:,}", f"{c.macs:,}" if c.macs else "", f"{c.val_metric:.4f}",
                  c.reason[:40] if c.reason else f"{c.p50_ms:.4f}", "yes" if c.pareto else "", "yes" if c.within_budget else "no")
    console.print(t)
    if result.best:
        console.print(f"best under {result.budget_ms} ms: [bold]{result.best.name}[/bold] (val {result.metric} "
                      f"{result.best.val_metric:.4f} compiled, p50 {result.best.p50_ms:.4f} ms); after final training held-out "
                      f"{result.metric} {result.eval_metric:.4f} (torch; the written folder's gate measures it compiled)")
    for n in result.notes:
        console.print(n)
    console.print(f"search took {result.seconds} s")
