"""Canary and shadow versions of one model, their live comparison with the stable version, and the
guard that rolls a failing canary back.

A model's rollout comes from its config.yaml (`rollout:`) or from `POST /v2/repository/models/{m}/rollout`
(set / promote / cancel). Only unversioned requests are routed; `/versions/{v}/infer` always goes to v.

- stable: the version unversioned requests go to; `rollout.stable`, else the highest READY version that
  is neither the canary nor the shadow.
- canary {version, weight}: a request goes to the canary when the hash of its v2 `id` falls below the
  weight (a client's retries, sent with the same id, land on the same version); a request without an
  id is split at random. A share (`compare`) of the canary's requests is also run on the stable
  version, off the request path, to measure their disagreement on the same inputs.
- shadow {version, sample}: a copy of a sampled share of the stable version's requests is run on the
  shadow off the request path; its answer is compared, never returned.
- guard: the canary's error rate, p99 latency, disagreement and live accuracy over the last `window`
  seconds; when one breaks its bound the canary is set to weight 0, the event is logged and counted
  (kiln_rollout_rollbacks_total) and the rollout's state says why.

Parts: `split_point` (the deterministic split), `disagreements` (one comparison), `VersionWindow`
(live statistics of one version), `guard_verdict` (the policy), `Router` (one model's routing state),
`Rollouts` (every model's router, config sync and the API operations). Everything that reads or
writes the windows runs on the event loop; a router's state is one value, replaced on each change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydantic import ValidationError

from . import metrics
from .config import ModelConfig, RolloutGuardSpec, RolloutSpec, format_validation_error
from .errors import InvalidInput, NotFound
from .model import ModelVersion

log = logging.getLogger("kiln.rollout")

# Copies (shadow requests, canary comparisons) in flight at once per model; beyond it they are
# dropped and counted, so a slow shadow can never hold more than this much memory.
MAX_COPIES = 256
# The guard looks at its windows at most this often (a p99 over the window costs O(window)).
GUARD_EVERY_S = 0.2
ERROR_OUTCOMES = frozenset({"server_error", "timeout", "rejected"})

LiveAccuracy = Callable[[str, str], "float | None"]


def no_live_accuracy(model: str, version: str) -> float | None:
    """The hook `min_live_accuracy` reads: live accuracy from feedback labels (service/monitor) once
    that is wired in; None means "not known", and the bound is then not judged."""
    return None


def split_point(request_id: str | None) -> float:
    """Where a request falls in [0, 1): fixed by its id, random without one."""
    if not request_id:
        return random.random()
    digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def compare_mode(spec: RolloutSpec, config: ModelConfig) -> str:
    if spec.compare != "auto":
        return spec.compare
    return "top1" if (config.labels or config.accuracy) else "relative"


def disagreements(baseline: dict[str, np.ndarray], candidate: dict[str, np.ndarray], mode: str, rtol: float,
                  batched: bool) -> tuple[int, int]:
    """(rows compared, rows that disagree) between two versions' outputs for the same inputs. A row
    disagrees when any output does: a different top-1 class (mode top1, outputs with a class axis),
    else a relative error max|a - b| / max|a| above rtol (a = the baseline); a shape mismatch or a
    missing output disagrees on every row."""
    names = list(baseline)
    first = np.asarray(baseline[names[0]]) if names else np.zeros(1)
    rows = int(first.shape[0]) if batched and first.ndim else 1
    bad = np.zeros(rows, dtype=bool)
    for name in names:
        a = np.asarray(baseline[name])
        b = candidate.get(name)
        if b is None or np.asarray(b).shape != a.shape:
            bad[:] = True
            continue
        b = np.asarray(b)
        a2, b2 = a.reshape(rows, -1), b.reshape(rows, -1)
        if a.dtype.kind not in "fiub":
            bad |= (a2 != b2).any(axis=1)
        elif mode == "top1" and a.ndim >= (2 if batched else 1) and a.shape[-1] > 1:
            ca = a.reshape(rows, -1, a.shape[-1]).argmax(axis=-1)
            cb = b.reshape(rows, -1, b.shape[-1]).argmax(axis=-1)
            bad |= (ca != cb).any(axis=1)
        else:
            a64, b64 = a2.astype(np.float64), b2.astype(np.float64)
            scale = np.maximum(np.abs(a64).max(axis=1), np.finfo(np.float64).tiny)
            bad |= np.abs(a64 - b64).max(axis=1) / scale > rtol
    return rows, int(bad.sum())


@dataclass(frozen=True)
class WindowSummary:
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    compared_requests: int
    compared_rows: int
    disagreeing_rows: int

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def disagreement(self) -> float | None:
        return self.disagreeing_rows / self.compared_rows if self.compared_rows else None

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 6),
                "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "compared_requests": self.compared_requests,
                "compared_rows": self.compared_rows, "disagreeing_rows": self.disagreeing_rows,
                "disagreement": None if self.disagreement is None else round(self.disagreement, 6)}


# Latency buckets of the windows: 1 µs to ~100 s, each 5 % wider than the one before, so a window's
# p50/p99 is within 5 % (reported as the bucket's upper bound: never below the true value).
LATENCY_BOUNDS = [1e-6 * 1.05 ** i for i in range(int(np.log(1e8) / np.log(1.05)) + 2)]


class _Slot:
    """One slice of a window: request counts, a latency histogram and comparison counts."""

    __slots__ = ("bad", "compared", "errors", "hist", "requests", "rows", "start")

    def __init__(self, start: float):
        self.start = start
        self.requests = self.errors = self.compared = self.rows = self.bad = 0
        self.hist = np.zeros(len(LATENCY_BOUNDS) + 1, dtype=np.int64)


class VersionWindow:
    """One version's requests and comparisons over the last `window_s` seconds, in slices of a tenth
    of the window (at most 1 s): O(1) per request, O(slices) per summary, whatever the traffic."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.slice_s = min(1.0, window_s / 10)
        self.slots: deque[_Slot] = deque()

    def _slot(self, now: float) -> _Slot:
        slots = self.slots
        if not slots or now >= slots[-1].start + self.slice_s:
            slots.append(_Slot(now - (now % self.slice_s)))
        return slots[-1]

    def add_request(self, now: float, error: bool, seconds: float) -> None:
        slot = self._slot(now)
        slot.requests += 1
        slot.errors += error
        slot.hist[bisect_left(LATENCY_BOUNDS, seconds)] += 1

    def add_comparison(self, now: float, rows: int, bad: int) -> None:
        slot = self._slot(now)
        slot.compared += 1
        slot.rows += rows
        slot.bad += bad

    def summary(self, now: float) -> WindowSummary:
        slots = self.slots
        while slots and slots[0].start + self.slice_s <= now - self.window_s:
            slots.popleft()
        live = list(slots)
        n = sum(s.requests for s in live)
        p50 = p99 = None
        if n:
            cum = np.cumsum(np.sum([s.hist for s in live], axis=0))
            bounds = LATENCY_BOUNDS + [float("inf")]
            p50, p99 = (round(bounds[int(np.searchsorted(cum, q * n))] * 1000, 3) for q in (0.5, 0.99))
        return WindowSummary(n, sum(s.errors for s in live), p50, p99, sum(s.compared for s in live),
                             sum(s.rows for s in live), sum(s.bad for s in live))


def guard_verdict(guard: RolloutGuardSpec, s: WindowSummary, live_accuracy: float | None) -> tuple[str, str] | None:
    """(bound, why) for the first bound the canary breaks over the window, else None."""
    over = f"over the last {guard.window:g} s"
    if s.requests >= guard.min_requests:
        if guard.max_error_rate is not None and s.error_rate > guard.max_error_rate:
            return "max_error_rate", (f"error rate {s.error_rate:.4f} ({s.errors}/{s.requests} requests {over}) "
                                      f"> max_error_rate {guard.max_error_rate}")
        if guard.max_p99_ms is not None and s.p99_ms is not None and s.p99_ms > guard.max_p99_ms:
            return "max_p99_ms", f"p99 latency {s.p99_ms:.3f} ms ({s.requests} requests {over}) > max_p99_ms {guard.max_p99_ms}"
    if (guard.max_disagreement is not None and s.compared_requests >= guard.min_requests
            and s.disagreement is not None and s.disagreement > guard.max_disagreement):
        return "max_disagreement", (f"disagreement with the stable version {s.disagreement:.4f} ({s.disagreeing_rows}/"
                                    f"{s.compared_rows} rows {over}) > max_disagreement {guard.max_disagreement}")
    if guard.min_live_accuracy is not None and live_accuracy is not None and live_accuracy < guard.min_live_accuracy:
        return "min_live_accuracy", f"live accuracy {live_accuracy:.4f} < min_live_accuracy {guard.min_live_accuracy}"
    return None


@dataclass(frozen=True)
class RolloutState:
    """One model's rollout as a value: what was asked, by whom, and what became of it."""

    spec: RolloutSpec
    origin: str                 # config | api
    status: str = "active"      # active | rolled_back | promoted | cancelled
    reason: str = ""
    weight: float = 0.0         # the canary's weight now (0 after a rollback)
    since: float = 0.0          # time.time() of the change

    @classmethod
    def of(cls, spec: RolloutSpec, origin: str, status: str = "active", reason: str = "") -> RolloutState:
        return cls(spec, origin, status, reason, spec.canary.weight if spec.canary else 0.0, time.time())


class Router:
    """One model's routing: the stable version, the canary split, the shadow and comparison copies,
    the windows and the guard."""

    def __init__(self, rollouts: Rollouts, name: str, state: RolloutState):
        self.rollouts = rollouts
        self.repo = rollouts.repo
        self.name = name
        self.state = state
        self.windows: dict[str, VersionWindow] = {}
        self.copies = 0
        self._next_check = 0.0
        self._published: set[tuple[str, str, str]] = set()

    # -- routing (event loop, per request) ---------------------------------------------------------
    def _side_versions(self) -> set[str]:
        spec = self.state.spec
        return {str(p.version) for p in (spec.canary, spec.shadow) if p is not None}

    def stable(self) -> ModelVersion:
        versions = self.repo.models.get(self.name)
        if not versions:
            raise NotFound(f"unknown model '{self.name}'")
        pinned = self.state.spec.stable
        if pinned is not None:
            mv = versions.get(str(pinned))
            if mv is not None and mv.ready:
                return mv
        side = self._side_versions()
        ready = [mv for v, mv in versions.items() if mv.ready and v not in side]
        if ready:
            return max(ready, key=lambda mv: int(mv.version))
        return self.repo.get(self.name)

    def _version(self, number: int | None) -> ModelVersion | None:
        if number is None:
            return None
        mv = self.repo.models.get(self.name, {}).get(str(number))
        return mv if mv is not None and mv.ready else None

    def route(self, request_id: str | None, stable: ModelVersion) -> ModelVersion:
        state = self.state
        canary = state.spec.canary
        if canary is None or state.weight <= 0.0:
            return stable
        mv = self._version(canary.version)
        if mv is None or mv is stable:
            return stable
        return mv if split_point(request_id) < state.weight else stable

    def observe(self, mv: ModelVersion, outcome: str, seconds: float) -> None:
        now = time.monotonic()
        self._window(mv.version).add_request(now, outcome in ERROR_OUTCOMES, seconds)
        if now >= self._next_check:
            self.check(now)

    def _window(self, version: str) -> VersionWindow:
        w = self.windows.get(version)
        guard = self.state.spec.guard
        window_s = guard.window if guard else RolloutGuardSpec().window
        if w is None or w.window_s != window_s:
            w = self.windows[version] = VersionWindow(window_s)
        return w

    def after(self, served: ModelVersion, stable: ModelVersion, inputs: dict[str, np.ndarray],
              outputs: dict[str, np.ndarray]) -> None:
        """A request answered: copy it to the shadow, or (served by the canary) to the stable version."""
        spec = self.state.spec
        if served is stable:
            shadow = spec.shadow
            if shadow is not None and (shadow.sample >= 1.0 or random.random() < shadow.sample):
                target = self._version(shadow.version)
                if target is not None and target is not served:
                    self._copy(target, inputs, baseline=served, baseline_outputs=outputs, record_on_target=True)
        elif spec.canary is not None and str(spec.canary.version) == served.version:
            c = spec.canary.compare
            if c > 0 and (c >= 1.0 or random.random() < c) and stable.ready:
                self._copy(stable, inputs, baseline=stable, candidate=served, candidate_outputs=outputs)

    def _copy(self, target: ModelVersion, inputs: dict[str, np.ndarray], *, baseline: ModelVersion,
              baseline_outputs: dict | None = None, candidate: ModelVersion | None = None,
              candidate_outputs: dict | None = None, record_on_target: bool = False) -> None:
        compared = candidate if candidate is not None else target
        if self.copies >= MAX_COPIES:
            metrics.SHADOW_REQUESTS.labels(self.name, target.version, "dropped").inc()
            return
        self.copies += 1
        target.inflight += 1  # before the task starts: a drain of the target waits for it
        copy = {k: np.array(v, copy=True) for k, v in inputs.items()}  # the request's memory is reused
        asyncio.get_running_loop().create_task(self._run_copy(
            target, copy, baseline, baseline_outputs, compared, candidate_outputs, record_on_target))

    async def _run_copy(self, target, inputs, baseline, baseline_outputs, compared, candidate_outputs,
                        record_on_target) -> None:
        start = time.perf_counter()
        outcome = "server_error"
        try:
            result, _, _ = await target.enqueue(inputs)
            outcome = "success"
        except Exception as err:  # noqa: BLE001 - a copy's failure of any kind is counted, never seen by a client
            log.debug("model %s: copy to v%s failed: %s", self.name, target.version, err)
            result = None
        finally:
            target.inflight -= 1
            self.copies -= 1
        metrics.SHADOW_REQUESTS.labels(self.name, target.version, "success" if result is not None else "error").inc()
        now = time.monotonic()
        if record_on_target:
            self._window(target.version).add_request(now, outcome != "success", time.perf_counter() - start)
        if result is None:
            return
        base_out = baseline_outputs if baseline_outputs is not None else result
        cand_out = candidate_outputs if candidate_outputs is not None else result
        spec = self.state.spec
        rows, bad = disagreements(base_out, cand_out, compare_mode(spec, compared.config), spec.rtol,
                                  compared.config.max_batch_size > 0)
        self._window(compared.version).add_comparison(now, rows, bad)
        metrics.COMPARED_ROWS.labels(self.name, compared.version, baseline.version).inc(rows)
        if bad:
            metrics.DISAGREEING_ROWS.labels(self.name, compared.version, baseline.version).inc(bad)
        if now >= self._next_check:
            self.check(now)

    # -- guard ------------------------------------------------------------------------------------
    def check(self, now: float | None = None) -> None:
        """Publish the windows' gauges and judge the canary against its guard."""
        now = time.monotonic() if now is None else now
        self._next_check = now + GUARD_EVERY_S
        state = self.state
        try:
            baseline = self.stable().version
        except NotFound:
            return
        for version, w in list(self.windows.items()):
            s = w.summary(now)
            metrics.WINDOW_ERROR_RATE.labels(self.name, version).set(s.error_rate)
            if s.p99_ms is not None:
                metrics.WINDOW_P99.labels(self.name, version).set(s.p99_ms / 1000)
            if s.disagreement is not None:
                metrics.VERSION_DISAGREEMENT.labels(self.name, version, baseline).set(s.disagreement)
        canary, guard = state.spec.canary, state.spec.guard
        if canary is None or guard is None or state.weight <= 0 or state.status != "active":
            return
        window = self.windows.get(str(canary.version))
        if window is None:
            return
        live = self.rollouts.live_accuracy(self.name, str(canary.version))
        verdict = guard_verdict(guard, window.summary(now), live)
        if verdict is None:
            return
        bound, why = verdict
        reason = f"rolled back by the guard: canary v{canary.version} {why}"
        self.state = replace(state, weight=0.0, status="rolled_back", reason=reason, since=time.time())
        metrics.ROLLBACKS.labels(self.name, str(canary.version), bound).inc()
        log.warning("model %s: %s", self.name, reason)
        self.publish()

    # -- state ------------------------------------------------------------------------------------
    def publish(self) -> None:
        """kiln_rollout_weight for the versions this rollout routes to."""
        state = self.state
        series: set[tuple[str, str, str]] = set()
        try:
            stable = self.stable().version
        except NotFound:
            stable = None
        canary_ready = state.spec.canary is not None and self._version(state.spec.canary.version) is not None
        weight = state.weight if canary_ready else 0.0
        values = {}
        if stable is not None:
            values[(self.name, stable, "stable")] = 1.0 - weight
        if state.spec.canary is not None:
            values[(self.name, str(state.spec.canary.version), "canary")] = weight
        if state.spec.shadow is not None:
            values[(self.name, str(state.spec.shadow.version), "shadow")] = state.spec.shadow.sample
        for labels, value in values.items():
            metrics.ROLLOUT_WEIGHT.labels(*labels).set(value)
            series.add(labels)
        guard = state.spec.guard
        if state.spec.canary is not None and guard is not None:  # rollbacks read 0, not "no data"
            for bound in ("max_error_rate", "max_p99_ms", "max_disagreement", "min_live_accuracy"):
                if getattr(guard, bound) is not None:
                    metrics.ROLLBACKS.labels(self.name, str(state.spec.canary.version), bound)
        for labels in self._published - series:
            try:
                metrics.ROLLOUT_WEIGHT.remove(*labels)
            except KeyError:
                pass
        self._published = series

    def unpublish(self) -> None:
        for labels in self._published:
            try:
                metrics.ROLLOUT_WEIGHT.remove(*labels)
            except KeyError:
                pass
        self._published = set()
        self.forget(set(self.windows))

    def forget(self, versions: set[str]) -> None:
        """Drop the windows and window gauges of versions that are no longer loaded."""
        for version in versions:
            self.windows.pop(version, None)
            for gauge in (metrics.WINDOW_ERROR_RATE, metrics.WINDOW_P99, metrics.VERSION_DISAGREEMENT):
                for labels in list(gauge._metrics):  # noqa: SLF001 (prometheus-client has no public listing)
                    if labels[0] == self.name and labels[1] == version:
                        gauge.remove(*labels)

    def describe(self) -> dict[str, Any]:
        state = self.state
        now = time.monotonic()
        try:
            stable = self.stable().version
        except NotFound:
            stable = None
        spec = state.spec
        notes = []
        loaded = self.repo.models.get(self.name, {})
        for role, part in (("canary", spec.canary), ("shadow", spec.shadow)):
            if part is not None and self._version(part.version) is None:
                mv = loaded.get(str(part.version))
                notes.append(f"{role} version {part.version} is " + (f"{mv.state}" + (f": {mv.reason}" if mv.reason else "")
                                                                     if mv else "not loaded") + ": it gets no requests")
        if spec.guard and spec.guard.min_live_accuracy is not None and spec.canary is not None \
                and self.rollouts.live_accuracy(self.name, str(spec.canary.version)) is None:
            notes.append("min_live_accuracy: no live accuracy for the canary yet (feedback monitoring), not judged")
        return {
            "model": self.name,
            "status": state.status,
            "reason": state.reason,
            "origin": state.origin,
            "stable_version": stable,
            "canary_weight": state.weight,
            "rollout": spec.model_dump(exclude_none=True),
            "notes": notes,
            "versions": {v: w.summary(now).to_dict() for v, w in sorted(self.windows.items())},
        }


class Rollouts:
    """Every model's router: kept in step with the models' configs, changed through the API."""

    def __init__(self, repo, live_accuracy: LiveAccuracy = no_live_accuracy):
        self.repo = repo
        self.live_accuracy = live_accuracy
        self._routers: dict[str, Router] = {}
        self._config_specs: dict[str, RolloutSpec | None] = {}
        repo.listeners.append(self.sync)

    def router(self, name: str) -> Router | None:
        return self._routers.get(name)

    # -- the models' configs (repository listener: after any change of a model's versions) ---------
    def sync(self, name: str) -> None:
        versions = self.repo.models.get(name)
        if not versions:
            router = self._routers.pop(name, None)
            if router is not None:
                router.unpublish()
            self._config_specs.pop(name, None)
            return
        config = max(versions.values(), key=lambda mv: int(mv.version)).config
        spec = config.rollout
        router = self._routers.get(name)
        if router is not None:
            router.forget(set(router.windows) - set(versions))
        if name in self._config_specs and self._config_specs[name] == spec:
            if router is not None:
                router.publish()  # the stable version may have changed
            return
        self._config_specs[name] = spec
        if spec is None:
            router = self._routers.get(name)
            if router is not None and router.state.origin == "config":
                router.unpublish()
                del self._routers[name]
            return
        log.info("model %s: rollout from config.yaml: %s", name, spec.model_dump(exclude_none=True))
        self._install(name, RolloutState.of(spec, "config"))

    def _install(self, name: str, state: RolloutState) -> Router:
        router = self._routers.get(name)
        if router is None:
            router = self._routers[name] = Router(self, name, state)
        else:
            router.state = state
            router.windows = {}  # a new rollout is judged on its own requests only
        router.publish()
        return router

    # -- the API --------------------------------------------------------------------------------
    def describe(self, name: str) -> dict[str, Any]:
        if name not in self.repo.models:
            raise NotFound(f"model '{name}' is not loaded")
        router = self._routers.get(name)
        if router is None:
            return {"model": name, "status": "none", "reason": "", "rollout": {},
                    "stable_version": self.repo.get(name).version}
        return router.describe()

    def apply(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """`{"action": "set", "canary": …, "shadow": …, "guard": …}`, `{"action": "promote"}`, `{"action": "cancel"}`."""
        versions = self.repo.models.get(name)
        if not versions:
            raise NotFound(f"model '{name}' is not loaded")
        body = dict(body)
        action = body.pop("action", "set")
        if action == "set":
            spec = self._parse(name, body)
            for role, number in (("canary", spec.canary and spec.canary.version),
                                 ("shadow", spec.shadow and spec.shadow.version), ("stable", spec.stable)):
                if number is not None and str(number) not in versions:
                    raise InvalidInput(f"rollout of '{name}': {role} version {number} is not loaded (loaded: "
                                       f"{', '.join(versions)}); the model's version_policy decides which versions load")
            state = RolloutState.of(spec, "api")
            log.info("model %s: rollout set: %s", name, spec.model_dump(exclude_none=True))
        elif body:
            raise InvalidInput(f"rollout action '{action}' takes no other fields (got {', '.join(body)})")
        elif action == "promote":
            state = self._promoted(name, versions)
        elif action == "cancel":
            router = self._routers.get(name)
            if router is None:
                raise InvalidInput(f"model '{name}' has no rollout to cancel")
            stable = router.stable()
            state = RolloutState.of(RolloutSpec(stable=int(stable.version)), "api", "cancelled",
                                    f"cancelled: unversioned requests go to v{stable.version}")
            log.info("model %s: rollout cancelled; v%s serves", name, stable.version)
        else:
            raise InvalidInput(f"unknown rollout action '{action}' (set, promote or cancel)")
        return self._install(name, state).describe()

    def _promoted(self, name: str, versions: dict[str, ModelVersion]) -> RolloutState:
        router = self._routers.get(name)
        canary = router.state.spec.canary if router else None
        if canary is None:
            raise InvalidInput(f"model '{name}' has no canary to promote")
        mv = versions.get(str(canary.version))
        if mv is None or not mv.ready:
            raise InvalidInput(f"canary version {canary.version} of '{name}' is not READY: it cannot be promoted")
        highest = max(int(v) for v in versions)
        # The highest version is what unversioned requests get anyway: no pin, so later versions
        # (poll mode) take over as usual.
        spec = RolloutSpec(stable=None if canary.version == highest else canary.version)
        log.info("model %s: canary v%s promoted: it takes every unversioned request", name, canary.version)
        return RolloutState.of(spec, "api", "promoted", f"promoted v{canary.version}")

    @staticmethod
    def _parse(name: str, body: dict[str, Any]) -> RolloutSpec:
        if "rollout" in body and len(body) == 1 and isinstance(body["rollout"], dict):
            body = body["rollout"]
        try:
            return RolloutSpec.model_validate(body)
        except ValidationError as err:
            raise InvalidInput(format_validation_error(f"rollout of '{name}'", err)) from None
