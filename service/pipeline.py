"""One build attempt of a model version: compile (or take the artifact the folder holds) → gates →
warm-up, returned as an immutable `AttemptResult`. The model version (service/model.py) keeps its
state and the attempt it chose; `backend: auto` (service/auto.py) runs attempts without serving them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backends import BackendUnavailable, CompileFailed, CompileOptions, Runner, TensorInfo, get_backend
from backends.hw import choose_recipe
from backends.reference import Reference
from backends.signature import SourceFacts

from . import metrics
from .cache import CacheResult, CompileCache, compile_key
from .config import ModelConfig
from .verify import (Golden, OutputParity, ParityResult, compare, load_npz_inputs, resolve_golden, run_batched,
                     tolerance, top1)

log = logging.getLogger("kiln.model")

UNVERIFIED_HINT = "give verify.samples or verify.shapes"


class GateFailed(Exception):
    """An attempt that did not pass compile or a gate; the message is the reason users see."""


class _Unavailable(GateFailed):
    """The backend, or the hardware it needs, is missing here (status "unavailable", not "failed")."""


@dataclass(frozen=True)
class AttemptResult:
    backend: str
    precision: str
    status: str  # ok | failed | unavailable
    reason: str = ""
    cache: str = ""
    compile_seconds: float = 0.0
    artifact: Path | None = None
    parity: ParityResult | None = None
    # "verified", or "unverified (<why>; give verify.samples or verify.shapes)".
    parity_verdict: str = ""
    accuracy: dict[str, Any] | None = None
    # Backend findings (e.g. Core ML structural validation), the parity tolerance rule.
    details: dict[str, Any] = field(default_factory=dict)
    # The golden inputs the gates and the warm-up ran (ok attempts only).
    golden: Golden | None = field(default=None, repr=False, compare=False)
    # Loaded runners (ok attempts only): one per instance, and how to build a fresh one.
    runners: tuple[Runner, ...] = field(default=(), repr=False, compare=False)
    new_runner: Callable[[], Runner] | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def parity_max_abs_error(self) -> float | None:
        if self.parity is None or not self.parity.outputs:
            return None
        return max(o.max_abs_error for o in self.parity.outputs)

    def to_dict(self) -> dict[str, Any]:
        """What metadata, /config and the CLI show (no runners)."""
        return {"backend": self.backend, "precision": self.precision, "status": self.status,
                "reason": self.reason, "cache": self.cache, "compile_seconds": self.compile_seconds,
                "parity": self.parity_verdict, "parity_max_abs_error": self.parity_max_abs_error,
                "accuracy": self.accuracy["compiled"] if self.accuracy else None, "details": self.details}

    def close(self) -> None:
        for r in self.runners:
            try:
                r.close()
            except Exception:  # closing must not fail an unload
                log.exception("closing a %s runner failed", self.backend)


class _OutputNames:
    """Maps a runner's output names onto the signature's by position when a converter renamed them."""

    def __init__(self, runner: Runner, names: list[str]):
        self.runner = runner
        self.names = names

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner.infer(inputs)
        if set(out) == set(self.names) or len(out) != len(self.names):
            return out
        return dict(zip(self.names, out.values()))

    def close(self) -> None:
        self.runner.close()


def resolve(path: str, model_dir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (model_dir / p)


@dataclass
class BuildContext:
    """What every attempt of one model version shares: read once, before the first attempt."""

    name: str
    version: str
    model_dir: Path
    config: ModelConfig
    sources: dict[str, Path]
    cache: CompileCache
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    facts: SourceFacts
    reference: Reference | None
    # Golden sets checked against the reference; None when there is no reference (artifact only).
    golden: Golden | None

    @property
    def where(self) -> str:
        return str(self.model_dir / "config.yaml")

    @property
    def batch(self) -> int:
        return min(self.config.max_batch_size or 4, 4)

    def reference_probe(self):
        names = [o.name for o in self.outputs]
        ref = self.reference
        return lambda inp: dict(zip(names, ref.infer(inp).values()))


def make_golden(ctx: BuildContext) -> Golden:
    """Golden sets from the config's samples, or its hints, or inferred sizes, checked by the reference."""
    spec = ctx.config.verify
    samples = load_npz_inputs(resolve(spec.samples, ctx.model_dir), ctx.inputs, spec.max_samples) \
        if spec.samples else None
    golden = resolve_golden(ctx.inputs, ctx.facts, spec, ctx.batch, ctx.reference_probe(), ctx.where, samples,
                            batch_limit=ctx.config.max_batch_size)
    for line in golden.skipped:
        log.info("model %s v%s: the reference cannot run %s: skipped as a golden input", ctx.name, ctx.version, line)
    if golden.verified:
        log.info("model %s v%s: golden inputs (%s): %s", ctx.name, ctx.version, golden.sets[0].origin,
                 "; ".join(s.describe() for s in golden.sets))
    return golden


def combine_parity(results: list[ParityResult], shapes: list[str]) -> ParityResult:
    """One verdict over every golden set: worst error per output; the first failure's reason, with
    the input shapes it ran."""
    worst: dict[str, OutputParity] = {}
    for r in results:
        for o in r.outputs:
            w = worst.get(o.output)
            worst[o.output] = OutputParity(o.output, max(o.max_abs_error, w.max_abs_error if w else 0.0),
                                           max(o.max_rel_error, w.max_rel_error if w else 0.0),
                                           o.passed and (w.passed if w else True))
    failed = next(((r, s) for r, s in zip(results, shapes) if not r.passed), None)
    reason = f"{failed[0].reason} (inputs {failed[1]})" if failed else ""
    return ParityResult(passed=failed is None, samples=sum(r.samples for r in results), atol=results[0].atol,
                        rtol=results[0].rtol, outputs=list(worst.values()), reason=reason, inputs=shapes)


class Pipeline:
    """Runs attempts for one model version. `on_state(state, backend, precision)` reports progress."""

    def __init__(self, ctx: BuildContext, on_state: Callable[[str, str, str], None]):
        self.ctx = ctx
        self.on_state = on_state

    def run(self, backend: str, precision: str, serve: bool) -> AttemptResult:
        """One attempt; never raises. serve=False stops after the gates (the caller times the runner
        and closes the result)."""
        facts: dict[str, Any] = {"details": {}}
        runners: list[Runner] = []
        try:
            return self._attempt(backend, precision, serve, facts, runners)
        except (_Unavailable, BackendUnavailable) as err:
            status, reason = "unavailable", str(err)
        except (GateFailed, CompileFailed) as err:  # their messages say what failed and why
            status, reason = "failed", str(err)
        except Exception as err:
            status, reason = "failed", f"{type(err).__name__}: {err}"
        log.warning("model %s v%s: %s/%s %s: %s", self.ctx.name, self.ctx.version, backend, precision, status, reason)
        for r in runners:  # a failed attempt keeps what it found, not its runners
            try:
                r.close()
            except Exception:
                log.exception("closing a %s runner failed", backend)
        return AttemptResult(backend, precision, status, reason, **facts)

    # -- the steps ------------------------------------------------------------------------------
    def compile_options(self, precision: str, backend: str) -> CompileOptions:
        ctx = self.ctx
        calibration = None
        extra = dict(ctx.config.backend_options)
        if precision == "int8":
            # The backend's static recipe for this CPU (what `kiln optimize` runs), under the config's
            # own options: e.g. ONNX Runtime's 7-bit weights where u8 x s8 sums saturate (no VNNI).
            try:
                extra = {**choose_recipe(backend, "static").extra, **extra}
            except ValueError:  # no static recipe: the backend's own int8 defaults
                pass
            spec = ctx.config.verify
            if spec.samples:
                calibration = load_npz_inputs(resolve(spec.samples, ctx.model_dir), ctx.inputs, None)
            elif ctx.golden is not None and ctx.golden.sets:
                calibration = ctx.golden.sets[0].inputs
        return CompileOptions(precision=precision, max_batch_size=ctx.config.max_batch_size, inputs=ctx.inputs,
                              outputs=ctx.outputs, calibration=calibration, extra=extra)

    def _attempt(self, name: str, precision: str, serve: bool, facts: dict[str, Any],
                 runners: list[Runner]) -> AttemptResult:
        ctx = self.ctx
        try:
            backend = get_backend(name)
        except KeyError as err:
            raise GateFailed(str(err.args[0])) from None
        ok, why = backend.available()
        if not ok:
            raise _Unavailable(f"{name} unavailable: {why}")
        artifact_fmt = next((f for f in backend.artifact_formats if f in ctx.sources), None)
        source_fmt = next((f for f in backend.source_formats if f in ctx.sources), None)
        if artifact_fmt is None and source_fmt is None:
            takes = "/".join((*backend.source_formats, *backend.artifact_formats))
            raise GateFailed(f"{name} builds from {takes}; version {ctx.version} has only {'/'.join(ctx.sources)}")
        if artifact_fmt is None:
            if precision not in backend.precisions:
                raise GateFailed(f"{name} does not build precision {precision} "
                                 f"(it builds {', '.join(backend.precisions)})")
            if (precision in ("fp16", "int8") and not ctx.config.accuracy
                    and precision not in ctx.config.verify.precisions):
                raise GateFailed(f"{precision} is lossy: it needs an accuracy gate (config accuracy.dataset) or "
                                 f"explicit parity tolerances (config verify.precisions.{precision})")
        options = self.compile_options(precision, name)
        names = [o.name for o in ctx.outputs]

        key = None
        self.on_state("COMPILING", name, precision)
        if artifact_fmt is not None:
            artifact = ctx.sources[artifact_fmt]
            facts["cache"] = "artifact"
            log.info("model %s v%s: serving the %s artifact %s as it is (no conversion)", ctx.name, ctx.version,
                     artifact_fmt, artifact)
            load = backend.load_artifact
        else:
            source = ctx.sources[source_fmt]
            key = compile_key(source, backend.name, backend.version(), options.cache_fields(), options.calibration)
            info = {"model": ctx.name, "version": ctx.version, "backend": backend.name,
                    "backend_version": backend.version(), "precision": precision, "source": source.name}
            res: CacheResult = ctx.cache.get_or_build(key, lambda wd: backend.compile(source, options, wd), info)
            metrics.CACHE.labels(res.result).inc()
            facts["cache"], facts["compile_seconds"] = res.result, round(res.seconds, 3)
            artifact = res.artifact
            if res.result == "hit":
                log.info("model %s v%s: compile cache hit %s (%s)", ctx.name, ctx.version, key[:12], artifact)
            else:
                metrics.COMPILE_SECONDS.labels(ctx.name, ctx.version, backend.name).observe(res.seconds)
                log.info("model %s v%s: compiled with %s/%s in %.2fs (cache %s) -> %s", ctx.name, ctx.version,
                         backend.name, precision, res.seconds, res.result, artifact)
            load = backend.load
        facts["artifact"] = artifact
        facts["details"].update(backend.describe(artifact))

        self.on_state("VERIFYING", name, precision)
        try:
            runner = _OutputNames(load(artifact, options), names)
        except BackendUnavailable as err:  # e.g. Core ML on Linux: compiled and validated, cannot predict
            raise _Unavailable(str(err)) from None
        runners.append(runner)

        parity, verdict, golden = self._parity_gate(backend, precision, artifact_fmt, source_fmt, options, runner,
                                                    facts)
        accuracy = self._accuracy_gate(runner, facts) if ctx.config.accuracy else None
        if not ctx.config.accuracy and precision != "fp32" and artifact_fmt is None:
            log.warning("model %s v%s: %s/%s is lossy and the config has no accuracy gate: only parity "
                        "(verify.precisions.%s) checks it", ctx.name, ctx.version, name, precision, precision)
        if key is not None:
            ctx.cache.update_manifest(key, parity=parity.to_dict() if parity else None, accuracy=accuracy)
        done = {"backend": name, "precision": precision, "status": "ok", "cache": facts.get("cache", ""),
                "compile_seconds": facts.get("compile_seconds", 0.0), "artifact": artifact, "parity": parity,
                "parity_verdict": verdict, "accuracy": accuracy, "details": facts["details"], "golden": golden}
        if not serve:
            return AttemptResult(**done, runners=(runner,))

        self.on_state("WARMING", name, precision)
        sample = golden.warm_sample(ctx.config.max_batch_size > 0) if golden else None
        if sample is not None:
            for _ in range(3):
                runner.infer(sample)

        def new_runner() -> Runner:
            return _OutputNames(load(artifact, options), names)

        for _ in range(ctx.config.instances - 1):
            extra = new_runner()
            runners.append(extra)
            if sample is not None:
                extra.infer(sample)
        return AttemptResult(**done, runners=tuple(runners), new_runner=new_runner)

    def _parity_gate(self, backend, precision: str, artifact_fmt: str | None, source_fmt: str | None,
                     options: CompileOptions, runner: Runner, facts: dict[str, Any]):
        """(parity result or None, verdict, the golden sets used). Raises GateFailed."""
        ctx = self.ctx
        spec = ctx.config.verify
        if ctx.golden is None:
            # An artifact with no source beside it: nothing to compare with. Find inputs it runs, for
            # the warm-up and to say what was checked.
            golden = resolve_golden(ctx.inputs, ctx.facts, spec, ctx.batch, runner.infer, ctx.where,
                                    record=False, batch_limit=ctx.config.max_batch_size)
            runs = f"it runs {golden.sets[0].describe()}" if golden.sets else golden.unverified
            verdict = (f"unverified (no source model beside {Path(facts['artifact']).name} to compare with: "
                       f"served as given; {runs})")
            self._mark_unverified(verdict)
            return None, verdict, golden
        golden = ctx.golden
        if not golden.verified:
            is_reference = (ctx.reference is not None and artifact_fmt is None
                            and backend.is_reference(source_fmt, options))
            verdict = f"unverified ({golden.unverified}; {UNVERIFIED_HINT})"
            if not (is_reference or not spec.required):
                raise GateFailed(f"parity unverified: {golden.unverified}; {UNVERIFIED_HINT} "
                                 f"(or verify.required: false to serve it unverified)")
            self._mark_unverified(verdict)
            return None, verdict, golden
        results, shapes = [], []
        atol = rtol = rule = None
        for gs, expected in zip(golden.sets, golden.expected):
            actual = run_batched(runner.infer, gs.inputs, ctx.config.max_batch_size)
            if atol is None:
                atol, rtol, rule = tolerance(spec, precision, expected)
            results.append(compare(actual, expected, atol, rtol, len(next(iter(gs.inputs.values()))) if gs.inputs
                                   else 1))
            shapes.append(gs.describe())
        facts["details"]["parity_tolerance"] = {"atol": atol, "rtol": rtol, "rule": rule}
        parity = combine_parity(results, shapes)
        facts["parity"] = parity
        for out in parity.outputs:
            metrics.PARITY.labels(ctx.name, ctx.version, out.output).set(out.max_abs_error)
        if not parity.passed:
            facts["parity_verdict"] = "failed"
            raise GateFailed(f"parity gate failed: {parity.reason}")
        metrics.PARITY_VERIFIED.labels(ctx.name, ctx.version).set(1)
        return parity, "verified", golden

    def _mark_unverified(self, verdict: str) -> None:
        ctx = self.ctx
        metrics.PARITY_VERIFIED.labels(ctx.name, ctx.version).set(0)
        log.warning("model %s v%s: parity %s", ctx.name, ctx.version, verdict)

    def _accuracy_gate(self, runner: Runner, facts: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        spec = ctx.config.accuracy
        path = resolve(spec.dataset, ctx.model_dir)
        data = load_npz_inputs(path, ctx.inputs)
        with np.load(path) as f:
            if spec.label_key not in f:
                raise GateFailed(f"accuracy dataset {path} has no '{spec.label_key}' array")
            labels = f[spec.label_key]
        batch = ctx.config.max_batch_size
        names = [o.name for o in ctx.outputs]
        got = top1(run_batched(runner.infer, data, batch)[names[0]], labels)
        ref = None
        if ctx.reference is not None:
            ref = top1(next(iter(run_batched(ctx.reference.infer, data, batch).values())), labels)
        accuracy = {"metric": spec.metric, "reference": round(ref, 6) if ref is not None else None,
                    "compiled": round(got, 6), "drop": round(ref - got, 6) if ref is not None else None,
                    "max_drop": spec.max_drop, "samples": len(labels)}
        facts["accuracy"] = accuracy
        log.info("model %s v%s: accuracy %.4f (reference %s)", ctx.name, ctx.version, got,
                 f"{ref:.4f}" if ref is not None else "none: no source")
        if ref is not None and ref - got > spec.max_drop + 1e-9:
            raise GateFailed(f"accuracy gate failed: top1 {got:.4f} vs reference {ref:.4f} "
                             f"(drop {ref - got:.4f} > max_drop {spec.max_drop})")
        if spec.min_accuracy is not None and got < spec.min_accuracy:
            raise GateFailed(f"accuracy gate failed: top1 {got:.4f} < min_accuracy {spec.min_accuracy}")
        return accuracy
