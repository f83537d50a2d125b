"""`kiln` command line: serve a model repository, compile one model."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
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
    port: Optional[int] = typer.Option(None, "--port", "--http-port", "--http_port",
                                       help="HTTP port (env KILN_HTTP_PORT; default 8000)."),
    grpc_port: Optional[int] = typer.Option(None, "--grpc-port", "--grpc_port",
                                            help="gRPC port, inference.GRPCInferenceService + grpc.health.v1 "
                                                 "(env KILN_GRPC_PORT; default 8001; 0 = off)."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", "--model_dir",
                                             help="KServe's convention: a repository, one model folder, or one model "
                                                  "file (+ config.yaml), e.g. /mnt/models. Instead of --repo."),
    model_name: Optional[str] = typer.Option(None, "--model-name", "--model_name",
                                             help="Name of the single model under --model-dir (default 'model')."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Compile cache (env KILN_CACHE_DIR; default ~/.cache/kiln)."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated models to load (default: all)."),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="debug, info, warning (env KILN_LOG_LEVEL)."),
    log_format: Optional[str] = typer.Option(None, "--log-format", help="text or json (env KILN_LOG_FORMAT)."),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="TLS certificate, PEM (env KILN_SSL_CERTFILE)."),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="TLS private key, PEM (env KILN_SSL_KEYFILE)."),
    auth_tokens_file: Optional[Path] = typer.Option(None, "--auth-tokens-file",
                                                    help="Bearer tokens file (env KILN_AUTH_TOKENS_FILE)."),
    monitor_sample_rate: Optional[float] = typer.Option(
        None, "--monitor-sample-rate", min=0.0, max=1.0,
        help="Share of requests captured for monitoring (env KILN_MONITOR_SAMPLE_RATE; default 0.01; a model's "
             "monitor.sample_rate overrides it). See docs/monitoring.md."),
    model_control_mode: Optional[str] = typer.Option(
        None, "--model-control-mode", help="How models change while serving (env KILN_MODEL_CONTROL_MODE; Triton's "
        "names): explicit (default: load all at startup, POST /v2/repository/models/{m}/load|unload), poll (rescan "
        "the repository every --repository-poll-secs and rebuild only what changed; a new version serves once "
        "READY), none (load once; load/unload refused)."),
    repository_poll_secs: Optional[float] = typer.Option(
        None, "--repository-poll-secs", help="Seconds between repository scans in poll mode (env "
        "KILN_REPOSITORY_POLL_SECS; default 15)."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, envvar="KILN_WORKERS",
                                help="Worker processes sharing the port (env KILN_WORKERS). Each loads every model; "
                                     "/metrics merges them (prometheus-client multiprocess mode)."),
):
    """Serve every model of the repository over HTTP (v2 REST) and gRPC (inference.GRPCInferenceService,
    grpc.health.v1). Models compile (or come from the cache) and pass their parity gate before the
    server reports ready on /v2/health/ready. KServe's flags (--model_dir, --model_name, --http_port,
    --grpc_port) are accepted as they are."""
    from . import logs
    from .guard import wrap
    from .settings import HttpLimits
    from .lifecycle import serve as serve_until_signalled

    if model_dir is not None:
        if repo is not None:
            console.print("[red]--repo and --model_dir are two ways to name the models: give one[/red]")
            raise typer.Exit(2)
        from .kserve import resolve_model_dir

        try:
            repo, found = resolve_model_dir(model_dir, model_name)
        except ValueError as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(2)
        print(f"--model_dir {model_dir}: {found}", file=sys.stderr)
    overrides = {k: v for k, v in dict(model_repo=repo, http_host=host, http_port=port, grpc_port=grpc_port,
                                       cache_dir=cache_dir,
                                       models=models, log_level=log_level, log_format=log_format,
                                       ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                                       auth_tokens_file=auth_tokens_file,
                                       monitor_sample_rate=monitor_sample_rate, model_control_mode=model_control_mode,
                                       repository_poll_secs=repository_poll_secs).items() if v is not None}
    if model_control_mode is not None and model_control_mode not in ("none", "poll", "explicit"):
        raise typer.BadParameter(f"'{model_control_mode}' is not one of none, poll, explicit",
                                 param_hint="--model-control-mode")
    settings = Settings(**overrides)
    logs.setup(settings.log_level, settings.log_format)
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        logging.getLogger("kiln").error("TLS needs both --ssl-certfile and --ssl-keyfile")
        raise typer.Exit(2)
    try:  # fail fast on a bad tokens file (each worker reads it again)
        guarded = wrap(None, settings)
    except ValueError as err:
        logging.getLogger("kiln").error("%s", err)
        raise typer.Exit(2)
    logging.getLogger("kiln").info("serving %s on %s://%s:%d%s (cache %s, %d worker%s)", settings.model_repo,
                                   "https" if settings.ssl_certfile else "http", settings.http_host,
                                   settings.http_port, f", gRPC :{settings.grpc_port}" if settings.grpc_port else "",
                                   settings.cache_dir, workers, "s" if workers > 1 else "")
    # Graceful shutdown (service/lifecycle.py): SIGTERM → readiness false, new requests 503, in-flight
    # requests finish (KILN_SHUTDOWN_GRACE_S) → exit 0. Auth, request ids, logs: service/guard.py.
    options = dict(host=settings.http_host, port=settings.http_port, log_level=settings.log_level,
                   grace_s=settings.shutdown_grace_s, log_config=logs.uvicorn_log_config(settings.log_level),
                   ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
                   ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
                   http_limits=HttpLimits.from_settings(settings))
    if workers == 1:
        from .app import create_app

        guarded.app = create_app(settings)
        raise typer.Exit(serve_until_signalled(guarded, **options))
    # Several processes: the workers rebuild the settings from KILN_* variables and write their
    # metrics to PROMETHEUS_MULTIPROC_DIR (a fresh temporary folder unless one is given).
    for key, value in overrides.items():
        os.environ[f"KILN_{key.upper()}"] = str(value)
    prom_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if prom_dir:
        Path(prom_dir).mkdir(parents=True, exist_ok=True)
        for stale in Path(prom_dir).glob("*.db"):
            stale.unlink()
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="kiln-metrics-")
    raise typer.Exit(serve_until_signalled("service.app:create_app_from_env", workers=workers, **options))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context):
    """HTTP throughput benchmark (from a source checkout): `kiln bench [--models mlp] [--peers] [--quick]`.
    Same as `python -m bench.http`; see docs/throughput.md."""
    try:
        from bench.http import main as bench_main
    except ImportError:
        console.print("[red]kiln bench runs from a source checkout (the bench/ folder is not installed)[/red]")
        raise typer.Exit(2)
    raise typer.Exit(bench_main(list(ctx.args)))


@app.command()
def compile(
    model_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="A model folder (config.yaml + version folders)."),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Backend to compile with (default: the config's); "
                                          "'auto' picks the fastest that passes; 'all' tries every backend x precision "
                                          "and prints one table."),
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
    if backend == "all":
        raise typer.Exit(_compile_all(repo, model_dir, runs, precision))
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
    """In-process p50 of the model's first runner (the same timing `backend: auto` uses). A model
    without a batch dimension is timed on its golden inputs as they are, in the batch-1 slot."""
    from .auto import time_runner

    if mv.state != "READY" or (mv.config.max_batch_size and batch > mv.config.max_batch_size):
        return None
    if mv.config.max_batch_size <= 0:
        if batch != 1:
            return None
        batch = 0
    golden = mv.golden_inputs()
    if golden is None or not mv.runners:
        return None
    return time_runner(mv.runners[0], golden, [batch], runs, warmup=10)[str(batch)]


def _artifact_bytes(mv) -> int | None:
    if not mv.artifact:
        return None
    entry = mv.cache.root / mv.artifact.relative_to(mv.cache.root).parts[0]
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file() and p.name != "manifest.json")


def _compile_all(repo, model_dir: Path, runs: int, only_precision: str | None) -> int:
    """Every registered backend x precision on the latest version: one table."""
    from backends import backend_names, get_backend

    rows = []
    for name in backend_names():
        backend = get_backend(name)
        for prec in ([only_precision] if only_precision else ["fp32", "fp16", "int8"]):
            mv = repo._versions_for(model_dir)[-1]  # noqa: SLF001
            row = {"backend": name, "precision": prec}
            rows.append(row)
            if prec not in backend.precisions:
                row["status"] = f"n/a: {name} builds {', '.join(backend.precisions)}"
                continue
            if mv.state == "FAILED":
                row["status"] = f"failed: {mv.reason}"
                continue
            mv.config = mv.config.model_copy(update={"backend": name, "precision": prec, "fallback": []})
            mv.backend, mv.precision = name, prec
            with console.status(f"compiling {mv.name} v{mv.version} with {name}/{prec}"):
                mv.build()
            a = mv.attempts[-1] if mv.attempts else None
            if mv.ready:
                row["status"] = "ok"
            elif a is not None and a.status == "unavailable":
                row["status"] = "unavailable: " + a.reason.removeprefix(f"{name} unavailable: ")
            else:
                row["status"] = f"failed: {mv.reason}"
            if a is not None:
                row["parity"] = a.parity_max_abs_error
                row["accuracy"] = a.accuracy["compiled"] if a.accuracy else None
                row["compile_s"] = a.compile_seconds
                tol = a.details.get("parity_tolerance")
                row["atol"] = tol["atol"] if tol else None
            if mv.accuracy:
                row["ref"] = mv.accuracy["reference"]
            row["bytes"] = _artifact_bytes(mv)
            row["b1"] = _latency_ms(mv, 1, runs)
            row["b32"] = _latency_ms(mv, 32, runs)
            mv.close()
    ref = next((r["ref"] for r in rows if r.get("ref") is not None), None)
    table = Table(title=f"{model_dir.name}: every backend x precision (p50 = in-process median of {runs} calls)")
    for col in ("backend", "precision", "status", "parity max abs (atol)", "top1", "size", "p50 b1 ms", "p50 b32 ms"):
        table.add_column(col, overflow="fold")
    notes = []
    for r in rows:
        st = r["status"]
        if len(st) > 60:
            notes.append(f"[{len(notes) + 1}] {r['backend']}/{r['precision']}: {st}")
            st = st[:56].rstrip() + f"… [{len(notes)}]"
        style = "green" if st == "ok" else ("yellow" if st.startswith(("unavailable", "n/a")) else "red")
        parity = f"{r['parity']:.2e} ({r['atol']:.2g})" if r.get("parity") is not None else ""
        table.add_row(r["backend"], r["precision"], f"[{style}]{st}[/{style}]", parity,
                      f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "",
                      f"{r['bytes'] / 1024:.1f} KiB" if r.get("bytes") else "",
                      f"{r['b1']:.4f}" if r.get("b1") is not None else "",
                      f"{r['b32']:.4f}" if r.get("b32") is not None else "")
    wide = Console(width=max(console.width, 150))
    wide.print(table)
    for note in notes:
        wide.print(note, soft_wrap=True)
    if ref is not None:
        console.print(f"reference top1 (ONNX Runtime fp32 on the source): {ref:.4f}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def _print_result(mv, runs: int) -> bool:
    table = Table(title=f"{mv.name} v{mv.version}", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")  # paths are folded, never cut short with "…"
    table.add_row("state", f"[green]{mv.state}[/green]" if mv.ready else f"[red]{mv.state}[/red]")
    if mv.reason:
        table.add_row("reason", mv.reason)
    table.add_row("backend / precision", f"{mv.backend} / {mv.precision}")
    if mv.auto:
        choice = mv.auto.get("choice") or {}
        table.add_row("auto", f"{'reused cached decision' if mv.auto.get('reused') else 'measured'}: "
                      f"{choice.get('backend')}/{choice.get('precision')} (score {choice.get('score_ms')} ms)")
        for c in mv.auto.get("candidates", []):
            detail = c.get("rejected") or c.get("reason") or ""
            table.add_row(f"  {c['backend']}/{c['precision']}",
                          f"{c['status']} {c.get('latency_ms', '')} {detail}".strip())
    if len(mv.attempts) > 1:
        for a in mv.attempts:
            table.add_row(f"attempt {a.backend}/{a.precision}", f"{a.status} {a.reason}".strip())
    if mv.artifact:
        table.add_row("artifact", f"{mv.artifact} (cache {mv.cache_result})")
    if mv.parity_verdict and mv.parity_verdict != "verified":
        table.add_row("parity", mv.parity_verdict)
    if mv.parity:
        for o in mv.parity.outputs:
            table.add_row(f"parity {o.output}", f"max abs {o.max_abs_error:.3g}, max rel {o.max_rel_error:.3g} "
                          f"({'pass' if o.passed else 'FAIL'}, atol {mv.parity.atol:g}, rtol {mv.parity.rtol:g}, "
                          f"{mv.parity.samples} samples)")
        if mv.parity.inputs:
            table.add_row("parity inputs", "; ".join(mv.parity.inputs))
    if mv.accuracy:
        table.add_row("accuracy", f"{mv.accuracy['compiled']:.4f} (reference {mv.accuracy['reference']:.4f})")
    for batch in (1, 32):
        ms = _latency_ms(mv, batch, runs)
        if ms is not None:
            what = f"batch {batch}" if mv.config.max_batch_size > 0 else "golden inputs"
            table.add_row(f"p50 latency, {what}", f"{ms:.3f} ms (in-process, {runs} calls)")
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

from .monitor.cli import app as _monitor_app  # noqa: E402 (kiln monitor export | report)

app.add_typer(_monitor_app, name="monitor")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
