"""`kiln monitor`: read the capture store — export traffic for `kiln optimize`, report drift and live accuracy."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Captured traffic, feedback and drift of served models (docs/monitoring.md).",
                  no_args_is_help=True, add_completion=False)
console = Console()

STORE_HELP = ("Capture store folder (env KILN_MONITOR_DIR; default <KILN_CACHE_DIR>/monitor, the server's).")


def _open(store: Path | None):
    from ..settings import Settings
    from .store import CaptureStore

    settings = Settings()
    folder = store or settings.monitor_dir or (Path(settings.cache_dir) / "monitor")
    try:
        return CaptureStore(folder, settings.monitor_max_bytes, readonly=True)
    except FileNotFoundError as err:
        console.print(f"[red]{err}: has the server captured anything yet (monitor.sample_rate > 0)?[/red]")
        raise typer.Exit(2)


def export_samples(samples, labelled_only: bool) -> tuple[dict[str, np.ndarray], int, int]:
    """Captured samples → arrays: one per input name (rows concatenated), `output.<name>` per
    output, and `label` when every exported row has one. Returns (arrays, rows, labelled rows)."""
    inputs: dict[str, list] = {}
    outputs: dict[str, list] = {}
    labels: list = []
    rows = labelled = 0
    for s in samples:
        if labelled_only and s.label is None:
            continue
        n = len(next(iter(s.inputs.values())))
        for k, v in s.inputs.items():
            inputs.setdefault(k, []).append(v)
        for k, v in s.outputs.items():
            outputs.setdefault(k, []).append(v)
        if s.label is not None:
            labelled += n
            label = np.asarray(s.label)
            labels.append(label.reshape(n) if label.size == n else label.reshape(n, *label.shape[1:]))
        else:
            labels.append(None)
        rows += n
    arrays = {k: np.concatenate(v) for k, v in inputs.items()}
    arrays.update({f"output.{k}": np.concatenate(v) for k, v in outputs.items()})
    if labels and all(lab is not None for lab in labels):
        arrays["label"] = np.concatenate(labels)
    return arrays, rows, labelled


@app.command()
def export(
    model: str = typer.Argument(..., help="Model name."),
    out: Path = typer.Option(..., "--out", "-o", help="The .npz to write."),
    version: str | None = typer.Option(None, "--version", help="Only this version (default: all)."),
    labelled: bool = typer.Option(False, "--labelled", help="Only requests that received feedback (then 'label' "
                                  "is always written, and the file is an accuracy dataset)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many captured requests (oldest first)."),
    store: Path | None = typer.Option(None, "--store", help=STORE_HELP),
):
    """Write captured inputs (one array per input name), outputs (`output.<name>`) and joined labels
    (`label`, when every row has one) to an .npz, usable as `kiln optimize ... --calib/--data` and as a
    config's verify.samples / accuracy.dataset."""
    st = _open(store)
    try:
        arrays, rows, n_labelled = export_samples(st.samples(model, version, limit), labelled)
    finally:
        st.close()
    if not rows:
        console.print(f"[red]no captured samples of model '{model}'{f' version {version}' if version else ''}"
                      f"{' with feedback' if labelled else ''}[/red]")
        raise typer.Exit(1)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    console.print(f"wrote {out}: {rows} rows ({n_labelled} labelled); arrays: "
                  + ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in arrays.items()))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


@app.command()
def report(
    model: str = typer.Argument(..., help="Model name."),
    png: Path | None = typer.Option(None, "--png", help="Chart to write (default monitor-<model>.png)."),
    last: int = typer.Option(20, "--last", min=1, help="Rows of each history to print."),
    store: Path | None = typer.Option(None, "--store", help=STORE_HELP),
):
    """Print the drift and live-accuracy history of a model and chart it (PNG): the KS verdicts with
    their smallest p-value and largest statistic, and the live metric over time."""
    st = _open(store)
    try:
        drift, live = st.drift_history(model), st.live_history(model)
        captured = {v: n for m, v, n in st.models() if m == model}
    finally:
        st.close()
    if not drift and not live and not captured:
        console.print(f"[red]nothing recorded for model '{model}'[/red]")
        raise typer.Exit(1)
    console.print(f"model {model}: captured samples by version {captured or '{}'}; {len(drift)} drift evaluations, "
                  f"{len(live)} live-metric points")
    t = Table(title=f"{model}: drift (last {min(last, len(drift))} of {len(drift)} evaluations)")
    for col in ("time (UTC)", "version", "window rows", "drift", "min p-value", "threshold", "max KS", "max PSI",
                "drifted inputs"):
        t.add_column(col)
    for d in drift[-last:]:
        detail = d["detail"]
        t.add_row(_when(d["time"]), d["version"], str(d["rows"]), "[red]yes[/red]" if d["detected"] else "no",
                  f"{d['min_p_value']:.3g}", f"{detail.get('threshold', float('nan')):.3g}", f"{d['max_ks']:.3f}",
                  f"{d['max_psi']:.3f}", ", ".join(detail.get("drifted", [])[:6]))
    console.print(t)
    t = Table(title=f"{model}: live metric from feedback (last {min(last, len(live))} of {len(live)})")
    for col in ("time (UTC)", "version", "metric", "value", "labelled rows"):
        t.add_column(col)
    for row in live[-last:]:
        t.add_row(_when(row["time"]), row["version"], row["metric"], f"{row['value']:.4f}", str(row["n"]))
    console.print(t)
    path = png or Path(f"monitor-{model}.png")
    plot(model, drift, live, path)
    console.print(f"wrote {path}")


def plot(model: str, drift: list[dict], live: list[dict], path: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        console.print("[red]the chart needs matplotlib: pip install 'kiln[optimize]' (or matplotlib)[/red]")
        raise typer.Exit(2)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    t0 = min([d["time"] for d in drift] + [r["time"] for r in live] or [0.0])
    for ax in axes:
        ax.grid(alpha=0.3)
    for version in sorted({d["version"] for d in drift}):
        ds = [d for d in drift if d["version"] == version]
        x = [(d["time"] - t0) / 60 for d in ds]
        axes[0].semilogy(x, [max(d["min_p_value"], 1e-300) for d in ds], ".-", label=f"v{version} min KS p-value")
        thr = [d["detail"].get("threshold") for d in ds]
        axes[0].semilogy(x, thr, "--", color="grey", label="Bonferroni threshold" if version else None)
        axes[1].plot(x, [d["max_ks"] for d in ds], ".-", label=f"v{version} max KS")
        axes[1].plot(x, [d["max_psi"] for d in ds], ".-", label=f"v{version} max PSI")
        axes[1].fill_between(x, 0, 1, where=[bool(d["detected"]) for d in ds], color="red", alpha=0.1,
                             transform=axes[1].get_xaxis_transform(), label="drift detected")
    for version in sorted({r["version"] for r in live}):
        rs = [r for r in live if r["version"] == version]
        axes[2].plot([(r["time"] - t0) / 60 for r in rs], [r["value"] for r in rs], ".-",
                     label=f"v{version} {rs[0]['metric']}")
    axes[0].set_ylabel("p-value")
    axes[1].set_ylabel("statistic")
    axes[2].set_ylabel("live metric")
    axes[2].set_xlabel("minutes since the first record")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Kiln monitor: {model}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
