"""One served model version: the startup pipeline (compile → verify → warm) and inference.

States: LOADING → COMPILING → VERIFYING → WARMING → READY, or FAILED with a reason. Each entry of
the fallback chain is an attempt; every attempt and why it failed is kept for the metadata.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backends import BackendUnavailable, CompileOptions, Runner, TensorInfo, get_backend
from backends.datatypes import V2_TO_TRITON
from backends.reference import Reference
from backends.signature import read_signature

from . import metrics
from .batcher import Batcher, BatchPolicy
from .cache import CacheResult, CompileCache, compile_key
from .config import ModelConfig, TensorSpec
from .errors import InvalidInput, KilnError, Unavailable
from .stats import ExecutionStats
from .verify import (ParityResult, compare, generate_inputs, load_npz_inputs, run_batched, tolerance,
                     top1)

log = logging.getLogger("kiln.model")

PLATFORMS = {
    "onnxruntime": "onnxruntime_onnx",
    "openvino": "openvino",
    "litert": "tflite",
    "coreml": "coreml",
    "tensorrt": "tensorrt_plan",
}


class GateFailed(Exception):
    """An attempt that did not pass compile or a gate; the message is the reason users see."""


class InferenceFailed(KilnError):
    status = 500
    outcome = "server_error"


@dataclass
class Attempt:
    backend: str
    precision: str
    status: str = "pending"  # ok | failed | unavailable
    reason: str = ""
    cache: str = ""
    compile_seconds: float = 0.0
    parity_max_abs_error: float | None = None
    accuracy: float | None = None
    # Backend findings (e.g. Core ML structural validation), parity tolerance rule, auto timings.
    details: dict[str, Any] = field(default_factory=dict)


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


def _to_info(specs: list[TensorSpec]) -> list[TensorInfo]:
    return [TensorInfo(s.name, s.datatype, tuple(s.shape)) for s in specs]


def _resolve(path: str, model_dir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (model_dir / p)


class ModelVersion:
    def __init__(self, name: str, version: str, model_dir: Path, config: ModelConfig,
                 sources: dict[str, Path], cache: CompileCache):
        self.name = name
        self.version = version
        self.model_dir = model_dir
        self.config = config
        self.sources = sources
        self.cache = cache
        self.state = "LOADING"
        self.reason = ""
        self.backend = config.backend
        self.precision = config.precision
        self.inputs: list[TensorInfo] = _to_info(config.inputs) if config.inputs else []
        self.outputs: list[TensorInfo] = _to_info(config.outputs) if config.outputs else []
        self.parity: ParityResult | None = None
        self.accuracy: dict[str, Any] | None = None
        self.attempts: list[Attempt] = []
        self.cache_result: str = ""
        self.artifact: Path | None = None
        self.labels: list[str] | None = None
        # backend: auto: the decision (candidates, timings, rejections, reused or measured).
        self.auto: dict[str, Any] | None = None
        self._all_runners: list[Runner] = []
        self._batcher: Batcher | None = None
        self.executions = ExecutionStats()  # model calls by batch size (statistics extension)
        self._set_state("LOADING")

    # -- state ---------------------------------------------------------------------------------
    def _set_state(self, state: str, reason: str = "") -> None:
        self.state = state
        self.reason = reason
        metrics.set_model_state(self.name, self.version, self.backend, self.precision, state)
        if state == "FAILED":
            log.error("model %s v%s FAILED: %s", self.name, self.version, reason)
        else:
            log.info("model %s v%s %s (%s, %s)", self.name, self.version, state, self.backend, self.precision)

    def fail(self, reason: str) -> None:
        self._set_state("FAILED", reason)

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    # -- startup pipeline ----------------------------------------------------------------------
    def candidates(self) -> list[tuple[str, str]]:
        out = [(self.config.backend, self.config.precision)]
        for entry in self.config.fallback:
            head, _, precision = entry.partition(":")
            if head in ("fp32", "fp16", "int8") and not precision:
                out.append((self.config.backend, head))
            else:
                out.append((head, precision or self.config.precision))
        seen: list[tuple[str, str]] = []
        return [c for c in out if not (c in seen or seen.append(c))]

    def build(self) -> None:
        """Compile, verify and warm up; ends READY or FAILED (never raises)."""
        try:
            if not self.sources:
                raise GateFailed(f"no model source (model.onnx or model.pt2) in version folder {self.version}")
            src_in, src_out = read_signature(self.sources)
            self.inputs = self.inputs or src_in
            self.outputs = self.outputs or src_out
            if self.config.labels:
                self.labels = _resolve(self.config.labels, self.model_dir).read_text().splitlines()
            reference = Reference(self.sources)
        except GateFailed as err:
            return self.fail(str(err))
        except Exception as err:  # a broken source must not take the server down
            return self.fail(f"cannot read model source: {type(err).__name__}: {err}")
        if self.config.backend == "auto":
            from .auto import build_auto

            try:
                order = build_auto(self, reference)
            except Exception as err:  # never take the server down
                log.exception("model %s v%s: auto selection failed", self.name, self.version)
                return self.fail(f"backend auto: {type(err).__name__}: {err}")
            if not order:
                return self.fail("backend auto: no candidate passed: " + "; ".join(
                    f"{c['backend']}/{c['precision']}: {c['reason']}" for c in (self.auto or {}).get("candidates", [])))
        else:
            order = self.candidates()
        if self.serve_first(order, reference):
            return
        reasons = "; ".join(f"{a.backend}/{a.precision}: {a.reason}" for a in self.attempts)
        self.fail(reasons if len(self.attempts) > 1 else self.attempts[0].reason)

    def serve_first(self, order: list[tuple[str, str]], reference: Reference) -> bool:
        """Try each (backend, precision) in order; the first that passes every gate serves (READY)."""
        for backend, precision in order:
            attempt = self.try_attempt(backend, precision, reference, serve=True)
            self.attempts.append(attempt)
            if attempt.status == "ok":
                self._set_state("READY")
                return True
        return False

    def try_attempt(self, backend: str, precision: str, reference: Reference, serve: bool) -> Attempt:
        """One attempt; never raises. serve=False stops after the gates, its runner kept in _all_runners
        (the caller times and closes it)."""
        attempt = Attempt(backend, precision)
        self.backend, self.precision = backend, precision
        try:
            self._attempt(attempt, reference, serve=serve)
            attempt.status = "ok"
            return attempt
        except GateFailed as err:
            attempt.status = attempt.status if attempt.status != "pending" else "failed"
            attempt.reason = str(err)
        except BackendUnavailable as err:
            attempt.status, attempt.reason = "unavailable", str(err)
        except Exception as err:
            attempt.status, attempt.reason = "failed", f"{type(err).__name__}: {err}"
        log.warning("model %s v%s: %s/%s %s: %s", self.name, self.version, backend, precision,
                    attempt.status, attempt.reason)
        self._close_runners()
        return attempt

    def compile_options(self, precision: str) -> CompileOptions:
        calibration = None
        if precision == "int8":
            calibration = self.golden_inputs(limit=None)
        return CompileOptions(
            precision=precision,
            max_batch_size=self.config.max_batch_size,
            inputs=self.inputs,
            outputs=self.outputs,
            calibration=calibration,
            extra=dict(self.config.backend_options),
        )

    def golden_inputs(self, limit: int | None) -> dict[str, np.ndarray]:
        if self.config.verify.samples:
            return load_npz_inputs(_resolve(self.config.verify.samples, self.model_dir), self.inputs, limit)
        batch = min(self.config.max_batch_size or 4, 4)
        return generate_inputs(self.inputs, batch=batch)

    def _attempt(self, attempt: Attempt, reference: Reference, serve: bool = True) -> None:
        try:
            backend = get_backend(attempt.backend)
        except KeyError as err:
            raise GateFailed(str(err.args[0])) from None
        ok, why = backend.available()
        if not ok:
            attempt.status = "unavailable"
            raise GateFailed(f"{attempt.backend} unavailable: {why}")
        fmt = next((f for f in backend.source_formats if f in self.sources), None)
        if fmt is None:
            raise GateFailed(f"{attempt.backend} compiles from {'/'.join(backend.source_formats)}; "
                             f"version {self.version} has only {'/'.join(self.sources)}")
        if attempt.precision not in backend.precisions:
            raise GateFailed(f"{attempt.backend} does not build precision {attempt.precision} "
                             f"(it builds {', '.join(backend.precisions)})")
        if (attempt.precision in ("fp16", "int8") and not self.config.accuracy
                and attempt.precision not in self.config.verify.precisions):
            raise GateFailed(f"{attempt.precision} is lossy: it needs an accuracy gate (config accuracy.dataset) or "
                             f"explicit parity tolerances (config verify.precisions.{attempt.precision})")
        options = self.compile_options(attempt.precision)
        source = self.sources[fmt]

        self._set_state("COMPILING")
        key = compile_key(source, backend.name, backend.version(), options.cache_fields(), options.calibration)
        info = {"model": self.name, "version": self.version, "backend": backend.name,
                "backend_version": backend.version(), "precision": attempt.precision, "source": source.name}
        res: CacheResult = self.cache.get_or_build(key, lambda wd: backend.compile(source, options, wd), info)
        metrics.CACHE.labels(res.result).inc()
        attempt.cache, attempt.compile_seconds = res.result, round(res.seconds, 3)
        self.cache_result, self.artifact = res.result, res.artifact
        if res.result == "hit":
            log.info("model %s v%s: compile cache hit %s (%s)", self.name, self.version, key[:12], res.artifact)
        else:
            metrics.COMPILE_SECONDS.labels(self.name, self.version, backend.name).observe(res.seconds)
            log.info("model %s v%s: compiled with %s/%s in %.2fs (cache %s) -> %s", self.name, self.version,
                     backend.name, attempt.precision, res.seconds, res.result, res.artifact)

        if hasattr(backend, "describe"):
            attempt.details.update(backend.describe(res.artifact))

        self._set_state("VERIFYING")
        names = [o.name for o in self.outputs]
        try:
            loaded = backend.load(res.artifact, options)
        except BackendUnavailable as err:  # e.g. Core ML on Linux: compiled and validated, cannot predict
            attempt.status = "unavailable"
            raise GateFailed(str(err)) from None
        runner = _OutputNames(loaded, names)
        self._all_runners.append(runner)
        golden = self.golden_inputs(self.config.verify.max_samples)
        batch = self.config.max_batch_size
        expected = dict(zip(names, run_batched(reference.infer, golden, batch).values()))
        actual = run_batched(runner.infer, golden, batch)
        samples = len(next(iter(golden.values())))
        atol, rtol, rule = tolerance(self.config.verify, attempt.precision, expected)
        attempt.details["parity_tolerance"] = {"atol": atol, "rtol": rtol, "rule": rule}
        self.parity = compare(actual, expected, atol, rtol, samples)
        attempt.parity_max_abs_error = max((o.max_abs_error for o in self.parity.outputs), default=0.0)
        for out in self.parity.outputs:
            metrics.PARITY.labels(self.name, self.version, out.output).set(out.max_abs_error)
        if not self.parity.passed:
            raise GateFailed(f"parity gate failed: {self.parity.reason}")
        self.accuracy = None
        if self.config.accuracy:
            try:
                self._accuracy_gate(runner, reference, names)
            finally:
                attempt.accuracy = self.accuracy["compiled"] if self.accuracy else None
        elif attempt.precision != "fp32":
            log.warning("model %s v%s: %s/%s is lossy and the config has no accuracy gate: only parity "
                        "(verify.precisions.%s) checks it", self.name, self.version, backend.name, attempt.precision,
                        attempt.precision)
        self.cache.update_manifest(key, parity=self.parity.to_dict(), accuracy=self.accuracy)
        if not serve:
            return

        self._set_state("WARMING")
        one = {k: v[:1] for k, v in golden.items()} if batch > 0 else golden
        for _ in range(3):
            runner.infer(one)
        def new_runner() -> _OutputNames:
            return _OutputNames(backend.load(res.artifact, options), names)

        for _ in range(self.config.instances - 1):
            extra = new_runner()
            extra.infer(one)
            self._all_runners.append(extra)
        self._start_inference(one, new_runner)

    def _accuracy_gate(self, runner: Runner, reference: Reference, names: list[str]) -> None:
        spec = self.config.accuracy
        path = _resolve(spec.dataset, self.model_dir)
        data = load_npz_inputs(path, self.inputs)
        with np.load(path) as f:
            if spec.label_key not in f:
                raise GateFailed(f"accuracy dataset {path} has no '{spec.label_key}' array")
            labels = f[spec.label_key]
        batch = self.config.max_batch_size
        ref = top1(next(iter(run_batched(reference.infer, data, batch).values())), labels)
        got = top1(run_batched(runner.infer, data, batch)[names[0]], labels)
        self.accuracy = {"metric": spec.metric, "reference": round(ref, 6), "compiled": round(got, 6),
                         "drop": round(ref - got, 6), "max_drop": spec.max_drop, "samples": int(len(labels))}
        log.info("model %s v%s: accuracy %.4f (reference %.4f)", self.name, self.version, got, ref)
        if ref - got > spec.max_drop + 1e-9:
            raise GateFailed(f"accuracy gate failed: top1 {got:.4f} vs reference {ref:.4f} "
                             f"(drop {ref - got:.4f} > max_drop {spec.max_drop})")
        if spec.min_accuracy is not None and got < spec.min_accuracy:
            raise GateFailed(f"accuracy gate failed: top1 {got:.4f} < min_accuracy {spec.min_accuracy}")

    # -- inference -----------------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.state != "READY":
            detail = f": {self.reason}" if self.reason else ""
            raise Unavailable(f"model '{self.name}' version {self.version} is not ready ({self.state}){detail}")

    def validate(self, inputs: dict[str, np.ndarray], datatypes: dict[str, str]) -> None:
        """Every input present, known, of the right datatype and shape (400 otherwise)."""
        expected = {t.name: t for t in self.inputs}
        unknown = [n for n in inputs if n not in expected]
        if unknown:
            raise InvalidInput(f"unknown input '{unknown[0]}' for model '{self.name}' "
                               f"(expected {', '.join(expected)})")
        missing = [n for n in expected if n not in inputs]
        if missing:
            raise InvalidInput(f"missing input '{missing[0]}' for model '{self.name}'")
        batch = None
        for name, arr in inputs.items():
            spec = expected[name]
            if datatypes[name] != spec.datatype:
                raise InvalidInput(f"input '{name}': datatype {datatypes[name]} does not match the model's "
                                   f"{spec.datatype}")
            if arr.ndim != len(spec.shape) or any(d != -1 and d != a for d, a in zip(spec.shape, arr.shape)):
                raise InvalidInput(f"input '{name}': shape {list(arr.shape)} does not match the model's "
                                   f"{list(spec.shape)}")
            if self.config.max_batch_size > 0:
                if arr.shape[0] > self.config.max_batch_size:
                    raise InvalidInput(f"input '{name}': batch {arr.shape[0]} exceeds max_batch_size "
                                       f"{self.config.max_batch_size}")
                if batch is not None and arr.shape[0] != batch:
                    raise InvalidInput("inputs disagree on the batch dimension")
                batch = arr.shape[0]

    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def batch_policy(self) -> BatchPolicy:
        db = self.config.dynamic_batching
        if db is None or self.config.max_batch_size <= 0:
            return BatchPolicy(max_queue_size=db.max_queue_size if db else 1024)
        return BatchPolicy(self.config.max_batch_size, db.max_queue_delay_ms / 1000.0,
                           tuple(db.preferred_batch_sizes), db.max_queue_size)

    def _start_inference(self, sample: dict[str, np.ndarray], new_runner=None) -> None:
        """One runner thread per instance behind the dynamic batcher; seed its cost curve.
        `new_runner` rebuilds a runner that keeps failing (a crashed session, a poisoned state)."""
        self._batcher = Batcher(self.name, self.version, list(self._all_runners), self.batch_policy(),
                                rebuild=new_runner, on_batch=self.executions.record)
        self._batcher.calibrate(sample)

    def staging(self, nbytes: int) -> np.ndarray | None:
        """Batcher memory to receive an input tensor into (Batcher.staging), or None."""
        batcher = self._batcher
        return batcher.staging(nbytes) if batcher is not None else None

    def enqueue(self, inputs: dict[str, np.ndarray]) -> asyncio.Future:
        """Into the batcher; the future resolves to (outputs, queue seconds, compute seconds)."""
        batcher = self._batcher
        if batcher is None:
            raise Unavailable(f"model '{self.name}' version {self.version} is not ready ({self.state})")
        return batcher.enqueue(inputs)

    def _close_runners(self) -> None:
        runners = list(self._all_runners)
        if self._batcher is not None:
            # The batcher may have swapped in fresh runners for failing ones: close those too.
            runners += [w.runner for w in self._batcher.workers if w.runner not in runners]
            self._batcher.close()
            self._batcher = None
        for r in runners:
            try:
                r.close()
            except Exception:  # closing must not fail an unload
                log.exception("closing a runner of %s failed", self.name)
        self._all_runners = []

    def close(self) -> None:
        self._close_runners()
        metrics.forget_model(self.name, self.version)

    # -- metadata ------------------------------------------------------------------------------
    def _tensor(self, t: TensorInfo) -> dict[str, Any]:
        return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}

    def parameters(self) -> dict[str, Any]:
        """Flat v2 $parameters: scalars only."""
        p: dict[str, Any] = {"state": self.state, "backend": self.backend, "precision": self.precision}
        if self.reason:
            p["reason"] = self.reason
        if self.cache_result:
            p["cache"] = self.cache_result
        if self.parity:
            p["parity_passed"] = self.parity.passed
            p["parity_max_abs_error"] = max((o.max_abs_error for o in self.parity.outputs), default=0.0)
            p["parity_max_rel_error"] = max((o.max_rel_error for o in self.parity.outputs), default=0.0)
        if self.accuracy:
            p["accuracy"] = self.accuracy["compiled"]
            p["accuracy_reference"] = self.accuracy["reference"]
        if self.attempts:
            p["attempts"] = json.dumps([vars(a) for a in self.attempts], default=str)
        if self.auto:
            p["auto"] = json.dumps(self.auto, default=str)
        return p

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": versions,
            "platform": PLATFORMS.get(self.backend, self.backend),
            "inputs": [self._tensor(t) for t in self.inputs],
            "outputs": [self._tensor(t) for t in self.outputs],
            "parameters": self.parameters(),
        }

    def triton_config(self) -> dict[str, Any]:
        """Triton's ModelConfig JSON (what tritonclient.get_model_config and perf_analyzer read)."""
        batching = self.config.max_batch_size > 0

        def tensors(items: list[TensorInfo]) -> list[dict[str, Any]]:
            return [{"name": t.name, "data_type": V2_TO_TRITON.get(t.datatype, t.datatype),
                     "dims": list(t.shape[1:] if batching else t.shape)} for t in items]

        cfg: dict[str, Any] = {
            "name": self.name,
            "platform": PLATFORMS.get(self.backend, self.backend),
            "backend": self.backend,
            "max_batch_size": self.config.max_batch_size,
            "input": tensors(self.inputs),
            "output": tensors(self.outputs),
            "instance_group": [{"name": self.name, "count": self.config.instances, "kind": "KIND_CPU"}],
            "version_policy": {"latest": {"num_versions": self.config.version_policy.latest or 1}},
            "parameters": {k: {"string_value": str(v)} for k, v in self.parameters().items()},
            "kiln": {
                "state": self.state,
                "reason": self.reason,
                "backend": self.backend,
                "precision": self.precision,
                "cache": self.cache_result,
                "artifact": str(self.artifact) if self.artifact else None,
                "parity": self.parity.to_dict() if self.parity else None,
                "accuracy": self.accuracy,
                "attempts": [vars(a) for a in self.attempts],
                "auto": self.auto,
            },
        }
        if self.config.dynamic_batching and batching:
            db = self.config.dynamic_batching
            cfg["dynamic_batching"] = {
                "max_queue_delay_microseconds": int(db.max_queue_delay_ms * 1000),
                "preferred_batch_size": db.preferred_batch_sizes,
            }
        return cfg
