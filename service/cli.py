"""`kiln` command line: serve a model repository, compile one model."""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .settings import Settings

app = typer.Typer(
    help="Kiln: compile models through optimized backends, verify them against their source, and serve "
    "them over the Open Inference Protocol (KServe v2).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


@app.command()
def serve(
    repo: Optional[Path] = typer.Option(None, "--repo", help="Model repository (env KILN_MODEL_REPO; default ./model_repo)."),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (env KILN_HTTP_HOST; default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="HTTP port (env KILN_HTTP_PORT; default 8000)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Compile cache (env KILN_CACHE_DIR; default ~/.cache/kiln)."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated models to load (default: all)."),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="debug, info, warning (env KILN_LOG_LEVEL)."),
):
    """Serve every model of the repository. Models compile (or come from the cache) and pass their
    parity gate before the server reports ready on /v2/health/ready."""
    import uvicorn

    from .app import create_app

    overrides = {k: v for k, v in dict(model_repo=repo, http_host=host, http_port=port, cache_dir=cache_dir,
                                       models=models, log_level=log_level).items() if v is not None}
    settings = Settings(**overrides)
    setup_logging(settings.log_level)
    logging.getLogger("kiln").info("serving %s on http://%s:%d (cache %s)", settings.model_repo,
                                   settings.http_host, settings.http_port, settings.cache_dir)
    uvicorn.run(create_app(settings), host=settings.http_host, port=settings.http_port,
                log_level=settings.log_level.lower(), loop="uvloop", http="httptools", access_log=False)


@app.command()
def compile(
    model_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="A model folder (config.yaml + version folders)."),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Backend to compile with (default: the config's)."),
    precision: Optional[str] = typer.Option(None, "--precision", "-p", help="fp32, fp16 or int8 (default: the config's)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Compile cache (env KILN_CACHE_DIR)."),
    runs: int = typer.Option(200, help="Timed calls for the latency figure."),
):
    """Compile one model, run its gates and time it, without starting a server."""
    from .config import ConfigError, load_config
    from .repository import ModelRepository

    setup_logging("warning")
    overrides = {"cache_dir": cache_dir} if cache_dir else {}
    settings = Settings(**overrides)
    repo = ModelRepository(model_dir.parent, settings.cache_dir)
    cfg_path = model_dir / "config.yaml"
    try:
        if cfg_path.exists():
            load_config(cfg_path)
    except ConfigError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2)
    versions = repo._versions_for(model_dir)  # noqa: SLF001 (the CLI is the repository's own client)
    failed = False
    for mv in versions:
        if backend:
            mv.config = mv.config.model_copy(update={"backend": backend, "fallback": []})
            mv.backend = backend
        if precision:
            mv.config = mv.config.model_copy(update={"precision": precision})
            mv.precision = precision
        if mv.state != "FAILED":
            with console.status(f"compiling {mv.name} v{mv.version} with {mv.config.backend}/{mv.config.precision}"):
                mv.build()
        failed |= _print_result(mv, runs)
        mv.close()
    raise typer.Exit(1 if failed else 0)


def _latency_ms(mv, batch: int, runs: int) -> float | None:
    import numpy as np

    if mv.state != "READY":
        return None
    inputs = mv.golden_inputs(None)
    rows = len(next(iter(inputs.values())))
    if mv.config.max_batch_size and batch > mv.config.max_batch_size:
        return None
    idx = np.arange(batch) % rows
    sample = {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}
    runner = mv._all_runners[0]  # noqa: SLF001
    for _ in range(10):
        runner.infer(sample)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        runner.infer(sample)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _print_result(mv, runs: int) -> bool:
    table = Table(title=f"{mv.name} v{mv.version}", show_header=False)
    table.add_row("state", f"[green]{mv.state}[/green]" if mv.ready else f"[red]{mv.state}[/red]")
    if mv.reason:
        table.add_row("reason", mv.reason)
    table.add_row("backend / precision", f"{mv.backend} / {mv.precision}")
    if mv.artifact:
        table.add_row("artifact", f"{mv.artifact} (cache {mv.cache_result})")
    if mv.parity:
        for o in mv.parity.outputs:
            table.add_row(f"parity {o.output}", f"max abs {o.max_abs_error:.3g}, max rel {o.max_rel_error:.3g} "
                          f"({'pass' if o.passed else 'FAIL'}, atol {mv.parity.atol:g}, rtol {mv.parity.rtol:g}, "
                          f"{mv.parity.samples} samples)")
    if mv.accuracy:
        table.add_row("accuracy", f"{mv.accuracy['compiled']:.4f} (reference {mv.accuracy['reference']:.4f})")
    for batch in (1, 32):
        ms = _latency_ms(mv, batch, runs)
        if ms is not None:
            table.add_row(f"p50 latency, batch {batch}", f"{ms:.3f} ms (in-process, {runs} calls)")
    console.print(table)
    return mv.state != "READY"


def _register_optimize() -> None:
    """`kiln optimize ...` lives in the optimize package (torch extra); its CLI imports torch lazily."""
    try:
        from optimize.cli import app as optimize_app
    except ImportError:
        return
    app.add_typer(optimize_app, name="optimize")


_register_optimize()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
