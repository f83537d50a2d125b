"""One served model version: its state, the attempt it serves, inference, and its metadata.

States: LOADING → COMPILING → VERIFYING → WARMING → READY, or FAILED with a reason; READY →
UNAVAILABLE when its batcher breaks (service/batcher.py). Each entry of the fallback chain is an
attempt (service/pipeline.py) returning an immutable result; every result and why it failed is kept
for the metadata, and the first that passes is served.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from backends import BackendUnavailable, Runner, TensorInfo, get_backend
from backends.datatypes import V2_TO_TRITON
from backends.reference import Reference
from backends.signature import read_facts, read_signature

from . import metrics
from .batcher import Batcher, BatchPolicy, Observer
from .cache import CompileCache
from .config import ModelConfig, TensorSpec
from .errors import InvalidInput, Unavailable
from .pipeline import AttemptResult, BuildContext, GateFailed, Pipeline, make_golden, resolve
from .source import compilable
from .stats import ExecutionStats
from .verify import Golden, GoldenError, ParityResult

log = logging.getLogger("kiln.model")


def _to_info(specs: list[TensorSpec]) -> list[TensorInfo]:
    return [TensorInfo(s.name, s.datatype, tuple(s.shape)) for s in specs]


def platform(backend: str) -> str:
    """Triton's platform name for a backend (what tritonclient and perf_analyzer show)."""
    try:
        return get_backend(backend).platform or backend
    except KeyError:
        return backend


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
        self.attempts: list[AttemptResult] = []
        # The attempt being served (READY), or None.
        self.chosen: AttemptResult | None = None
        self.labels: list[str] | None = None
        # backend: auto: the decision (candidates, timings, rejections, reused or measured).
        self.auto: dict[str, Any] | None = None
        self.pipeline: Pipeline | None = None
        # Requests using this version now (the infer route and rollout copies count them; drain waits).
        self.inflight = 0
        self._batcher: Batcher | None = None
        # The monitor that looked at this version (service/monitor/hub.py attach) and the observer it
        # gave its batcher: None when not monitored.
        self.monitor: Any = None
        self.observer: Observer | None = None
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

    def _progress(self, state: str, backend: str, precision: str) -> None:
        self.backend, self.precision = backend, precision
        self._set_state(state)

    def fail(self, reason: str) -> None:
        self._set_state("FAILED", reason)

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    # What the served attempt found; while none is served, what the last attempt found (a FAILED
    # model shows the parity that failed it).
    @property
    def shown(self) -> AttemptResult | None:
        return self.chosen or (self.attempts[-1] if self.attempts else None)

    @property
    def parity(self) -> ParityResult | None:
        return self.shown.parity if self.shown else None

    @property
    def parity_verdict(self) -> str:
        return self.shown.parity_verdict if self.shown else ""

    @property
    def accuracy(self) -> dict[str, Any] | None:
        return self.shown.accuracy if self.shown else None

    @property
    def artifact(self) -> Path | None:
        return self.shown.artifact if self.shown else None

    @property
    def cache_result(self) -> str:
        return self.shown.cache if self.shown else ""

    @property
    def runners(self) -> tuple[Runner, ...]:
        return self.chosen.runners if self.chosen else ()

    def golden_inputs(self) -> dict[str, np.ndarray] | None:
        """The first golden set (what the gates and warm-up ran), or None when there is none."""
        golden = self.chosen.golden if self.chosen else None
        return golden.sets[0].inputs if golden and golden.sets else None

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

    def _artifact_owner(self) -> str | None:
        """The backend that serves the artifact the folder holds, when the folder has no source and the
        config does not name a backend: a folder with only a model.xml is served by OpenVINO."""
        from backends import backend_names

        if compilable(self.sources) or "backend" in self.config.model_fields_set:
            return None
        for name in backend_names():
            try:
                if any(f in self.sources for f in get_backend(name).artifact_formats):
                    return name
            except Exception:  # a backend module that cannot import owns nothing here
                continue
        return None

    def _context(self) -> BuildContext:
        if not self.sources:
            raise GateFailed(f"no model source (model.onnx or model.pt2) or artifact (model.xml + model.bin, "
                             f"model.tflite, model.plan, model.mlpackage) in version folder {self.version}")
        src_in, src_out = read_signature(self.sources)
        self.inputs = self.inputs or src_in
        self.outputs = self.outputs or src_out
        if self.config.labels:
            self.labels = resolve(self.config.labels, self.model_dir).read_text().splitlines()
        sources = compilable(self.sources)
        reference, why = None, ""
        if sources:
            try:
                reference = Reference(sources)
            except Exception as err:  # e.g. an op ONNX Runtime lacks: another backend may still serve it
                why = f"the reference cannot load the source: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
                log.warning("model %s v%s: %s", self.name, self.version, why)
        ctx = BuildContext(self.name, self.version, self.model_dir, self.config, self.sources, self.cache,
                           self.inputs, self.outputs, read_facts(sources), reference, None)
        if reference is not None:
            ctx.golden = make_golden(ctx)
        elif why:
            ctx.golden = Golden((), (), why)
        return ctx

    def build(self) -> None:
        """Compile, verify and warm up; ends READY or FAILED (never raises)."""
        self._close_runners()
        self.attempts, self.chosen = [], None
        try:
            self.pipeline = Pipeline(self._context(), self._progress)
        except (GateFailed, GoldenError, BackendUnavailable) as err:
            return self.fail(str(err))
        except Exception as err:  # a broken source must not take the server down
            return self.fail(f"cannot read model source: {type(err).__name__}: {err}")
        owner = self._artifact_owner()
        if owner is not None:
            self.config = self.config.model_copy(update={"backend": owner})
        if self.config.backend == "auto":
            from .auto import build_auto

            try:
                order, self.auto = build_auto(self)
            except Exception as err:  # never take the server down
                log.exception("model %s v%s: auto selection failed", self.name, self.version)
                return self.fail(f"backend auto: {type(err).__name__}: {err}")
            if not order:
                return self.fail("backend auto: no candidate passed: " + "; ".join(
                    f"{c['backend']}/{c['precision']}: {c['reason']}" for c in (self.auto or {}).get("candidates", [])))
        else:
            order = self.candidates()
        if self.serve_first(order):
            return
        reasons = "; ".join(f"{a.backend}/{a.precision}: {a.reason}" for a in self.attempts)
        self.fail(reasons if len(self.attempts) > 1 else self.attempts[0].reason)

    def serve_first(self, order: list[tuple[str, str]]) -> bool:
        """Try each (backend, precision) in order; the first that passes every gate serves (READY)."""
        for backend, precision in order:
            attempt = self.pipeline.run(backend, precision, serve=True)
            self.attempts.append(attempt)
            if attempt.ok:
                self.chosen = attempt
                self.backend, self.precision = backend, precision
                try:
                    self._start_inference(attempt)
                except Exception as err:  # calibration runs the model: a failure is this attempt's
                    self._close_runners()
                    self.attempts[-1] = AttemptResult(backend, precision, "failed",
                                                      f"batcher calibration failed: {type(err).__name__}: {err}")
                    continue
                self._set_state("READY")
                return True
        return False

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
                if arr.shape[0] < 1:  # as Triton: a batch has at least one row (docs/hardening.md)
                    raise InvalidInput(f"input '{name}': batch size {arr.shape[0]}: inference request "
                                       f"batch-size must be >= 1 for '{self.name}'")
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

    def _start_inference(self, attempt: AttemptResult) -> None:
        """One runner thread per instance behind the dynamic batcher; seed its cost curve.
        The attempt's `new_runner` rebuilds a runner that keeps failing (a crashed session)."""
        self._batcher = Batcher(self.name, self.version, list(attempt.runners), self.batch_policy(),
                                rebuild=attempt.new_runner, on_batch=self.executions.record,
                                on_broken=self._batcher_broken)
        self._batcher.observer = self.observer
        sample = attempt.golden.warm_sample(self.config.max_batch_size > 0) if attempt.golden else None
        if sample is not None:
            self._batcher.calibrate(sample)

    def _batcher_broken(self, reason: str) -> None:
        """The batcher can no longer answer (service/batcher.py, health): not ready, with the reason,
        until the model is loaded again."""
        if self.state == "READY":
            self._set_state("UNAVAILABLE", reason)

    def staging(self, nbytes: int) -> np.ndarray | None:
        """Batcher memory to receive an input tensor into (Batcher.staging), or None."""
        batcher = self._batcher
        return batcher.staging(nbytes) if batcher is not None else None

    def enqueue(self, inputs: dict[str, np.ndarray], request_id: str | None = None,
                start: float = 0.0) -> asyncio.Future:
        """Into the batcher; the future resolves to (outputs, queue seconds, compute seconds).
        `request_id`, `start`: what the observer sees the request by (service/batcher.py)."""
        batcher = self._batcher
        if batcher is None:
            raise Unavailable(f"model '{self.name}' version {self.version} is not ready ({self.state})")
        return batcher.enqueue(inputs, request_id, start)

    def observe_with(self, monitor: Any, observer: Observer | None) -> None:
        """The monitor's observer for this version's batches (None: not monitored)."""
        self.monitor, self.observer = monitor, observer
        if self._batcher is not None:
            self._batcher.observer = observer

    def _close_runners(self) -> None:
        runners = list(self.runners)
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
        if self.chosen is not None:
            self.chosen = None

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
        if self.parity_verdict:
            p["parity"] = self.parity_verdict
        if self.parity:
            p["parity_passed"] = self.parity.passed
            p["parity_max_abs_error"] = max((o.max_abs_error for o in self.parity.outputs), default=0.0)
            p["parity_max_rel_error"] = max((o.max_rel_error for o in self.parity.outputs), default=0.0)
        if self.accuracy:
            p["accuracy"] = self.accuracy["compiled"]
            p["accuracy_reference"] = self.accuracy["reference"]
        if self.attempts:
            p["attempts"] = json.dumps([a.to_dict() for a in self.attempts], default=str)
        if self.auto:
            p["auto"] = json.dumps(self.auto, default=str)
        return p

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": versions,
            "platform": platform(self.backend),
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
            "platform": platform(self.backend),
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
                "parity_verdict": self.parity_verdict or None,
                "accuracy": self.accuracy,
                "attempts": [a.to_dict() for a in self.attempts],
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
