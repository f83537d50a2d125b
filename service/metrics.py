"""Prometheus metrics (names as in the design notes). Histograms, so percentiles aggregate across pods."""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import deque
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# prometheus-client's multiprocess mode (several worker processes, `kiln serve --workers N`): each
# process writes its samples to files in PROMETHEUS_MULTIPROC_DIR and /metrics merges them.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STATES = ("LOADING", "COMPILING", "VERIFYING", "WARMING", "READY", "UNAVAILABLE", "FAILED")

REQUESTS = Counter(
    "kiln_inference_requests", "Inference requests by outcome (success, client_error, server_error, rejected)",
    ["model", "version", "outcome", "protocol"],
)
SAMPLES = Counter("kiln_inference_samples", "Samples (batch rows) inferred", ["model", "version"])
DURATION = Histogram(
    "kiln_request_duration_seconds", "Request latency by phase (decode, queue, compute, encode, total)",
    ["model", "version", "phase", "protocol"], buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("kiln_batch_size", "Executed batch sizes", ["model", "version"], buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("kiln_queue_depth", "Requests waiting in the batcher queue", ["model", "version"],
                    multiprocess_mode="livesum")
INFLIGHT = Gauge("kiln_inflight_requests", "Inference requests being served", ["model"], multiprocess_mode="livesum")
MODEL_STATE = Gauge(
    "kiln_model_state", "1 for the model's current state", ["model", "version", "backend", "precision", "state"],
    multiprocess_mode="livemax",
)
COMPILE_SECONDS = Histogram(
    "kiln_compile_seconds", "Time to compile a model (cache misses only)", ["model", "version", "backend"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
CACHE = Counter("kiln_compile_cache", "Compile cache lookups (hit, miss, corrupt)", ["result"])
PARITY = Gauge("kiln_parity_max_abs_error", "Max abs error of the compiled model vs the source",
               ["model", "version", "output"], multiprocess_mode="livemax")

PARITY_VERIFIED = Gauge("kiln_parity_verified", "1: the served build was compared with the source on golden "
                        "inputs; 0: it serves unverified (see the model's parity parameter)",
                        ["model", "version"], multiprocess_mode="livemax")

for _result in ("hit", "miss", "corrupt"):
    CACHE.labels(_result)


def set_model_state(model: str, version: str, backend: str, precision: str, state: str) -> None:
    """Exactly one state series is 1 per model version; stale backend/precision series are dropped."""
    for labels in list(MODEL_STATE._metrics):  # noqa: SLF001 (prometheus-client has no public listing)
        if labels[0] == model and labels[1] == version and (labels[2], labels[3]) != (backend, precision):
            MODEL_STATE.remove(*labels)
    for s in STATES:
        MODEL_STATE.labels(model, version, backend, precision, s).set(1 if s == state else 0)


PHASES = ("decode", "queue", "compute", "encode", "total")
PROTOCOLS = ("http", "grpc")  # the `protocol` label of the infer series: which transport served it

# Requests tallied before they are folded into prometheus-client (and at every scrape, see
# exposition). In multiprocess mode each request is folded at once: a scrape, served by any one
# worker, cannot fold another worker's tally.
FLUSH_EVERY = 256


class ModelMetrics:
    """The per-model series the infer path feeds. Requests are tallied in plain Python and folded
    into prometheus-client in bulk: its observe/inc calls (a lock and a bucket loop each, 14 per
    request) were ~7 µs of a ~50 µs request (`python -m bench.protocol`). Single event-loop thread
    per process; the tally is a deque, so a fold from another thread would not lose entries."""

    def __init__(self, model: str, version: str, protocol: str = "http"):
        self.inflight = INFLIGHT.labels(model)
        self.samples = SAMPLES.labels(model, version)
        self.phases = [DURATION.labels(model, version, p, protocol) for p in PHASES]
        self.active = 0  # requests inside the infer route now (the in-flight gauge, set when folded)
        self.totals = RequestTotals()  # the same tally, kept for the statistics extension (service/stats.py)
        self._requests: dict[str, Any] = {}
        self._key = (model, version)
        self._protocol = protocol
        self._done: deque = deque()
        self._flush_at = 1 if MULTIPROCESS else FLUSH_EVERY

    def enter(self) -> None:
        self.active += 1
        if MULTIPROCESS:
            self.inflight.inc()

    def leave(self) -> None:
        self.active -= 1
        if MULTIPROCESS:
            self.inflight.dec()

    def record(self, outcome: str, rows: int = 0, phases: tuple[float, ...] | None = None,
               failed_s: float | None = None) -> None:
        """One finished request: its outcome, and for a success its rows and seconds per phase
        (PHASES order); for a failure, optionally the seconds it took (statistics only)."""
        done = self._done
        done.append((outcome, rows, phases if phases is not None else failed_s))
        if len(done) >= self._flush_at:
            self.flush()

    def flush(self) -> None:
        """Fold the tally into the prometheus-client series: the same buckets, sums and counts as
        one observe()/inc() per request (tests/test_metrics_fold.py compares the two)."""
        if not MULTIPROCESS:  # one gauge per model, fed by each protocol's tally
            self.inflight.set(sum(m.active for k, m in list(_children.items()) if k[0] == self._key[0]))
        done = self._done
        n = len(done)
        if not n:
            return
        bounds = self.phases[0]._upper_bounds  # noqa: SLF001
        counts = [[0] * len(bounds) for _ in PHASES]
        sums = [0.0] * len(PHASES)
        outcomes: dict[str, int] = {}
        rows = 0
        failed, failed_s = 0, 0.0
        for _ in range(n):
            outcome, r, phases = done.popleft()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            rows += r
            if type(phases) is tuple:
                for i, v in enumerate(phases):
                    counts[i][bisect_left(bounds, v)] += 1  # observe(): the first bucket with v <= bound
                    sums[i] += v
            elif outcome != "success":
                failed += 1
                failed_s += phases or 0.0
        self.totals.add(outcomes.get("success", 0), rows, sums, failed, failed_s)
        for child, per_bucket, total in zip(self.phases, counts, sums):
            if any(per_bucket):
                child._sum.inc(total)  # noqa: SLF001 (prometheus-client has no bulk observe)
                for bucket, c in zip(child._buckets, per_bucket):  # noqa: SLF001
                    if c:
                        bucket.inc(c)
        if rows:
            self.samples.inc(rows)
        for outcome, c in outcomes.items():
            self.request(outcome).inc(c)

    def request(self, outcome: str):
        child = self._requests.get(outcome)
        if child is None:
            child = self._requests[outcome] = REQUESTS.labels(*self._key, outcome, self._protocol)
        return child


class RequestTotals:
    """Cumulative request counts and seconds per phase, as Triton's statistics extension reports
    them (service/stats.py); folded from the same tally as the Prometheus series."""

    __slots__ = ("failed", "failed_s", "rows", "seconds", "success")

    def __init__(self) -> None:
        self.success = self.rows = self.failed = 0
        self.seconds = [0.0] * len(PHASES)
        self.failed_s = 0.0

    def add(self, success: int, rows: int, seconds: list[float], failed: int, failed_s: float) -> None:
        self.success += success
        self.rows += rows
        self.seconds = [a + b for a, b in zip(self.seconds, seconds)]
        self.failed += failed
        self.failed_s += failed_s


_children: dict[tuple[str, str, str], ModelMetrics] = {}


def for_model(model: str, version: str, protocol: str = "http") -> ModelMetrics:
    m = _children.get((model, version, protocol))
    if m is None:
        m = _children[(model, version, protocol)] = ModelMetrics(model, version, protocol)
    return m


def request_totals(model: str, version: str) -> RequestTotals:
    """This process's totals for one model version, over every protocol (folded first)."""
    out = RequestTotals()
    for (name, ver, _), m in list(_children.items()):
        if name == model and ver == version:
            m.flush()
            t = m.totals
            out.add(t.success, t.rows, t.seconds, t.failed, t.failed_s)
    return out


def exposition() -> bytes:
    """The text exposition for /metrics; merges every worker's files in multiprocess mode."""
    from prometheus_client import generate_latest

    for m in list(_children.values()):
        m.flush()
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def mark_process_dead() -> None:
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


# Called with (model, version) when a model version is unloaded (service/monitor drops its series).
FORGET_HOOKS: list = []


def forget_model(model: str, version: str) -> None:
    for hook in list(FORGET_HOOKS):
        hook(model, version)
    for key in [k for k in _children if k[:2] == (model, version)]:
        _children.pop(key).flush()
    for metric in (MODEL_STATE, PARITY, PARITY_VERIFIED):
        for labels in list(metric._metrics):  # noqa: SLF001
            if labels[0] == model and labels[1] == version:
                metric.remove(*labels)


__all__ = ["REGISTRY"]

# -- model updates: repository polling and rollouts (service/poll.py, service/rollout.py) ----------
REPOSITORY_POLLS = Counter("kiln_repository_polls", "Scans of the model repository (--model-control-mode poll)")
REPOSITORY_CHANGES = Counter(
    "kiln_repository_changes", "Changes a repository poll applied (added, changed, config, rollout, removed, "
    "superseded, refused)", ["change"],
)
ROLLOUT_WEIGHT = Gauge(
    "kiln_rollout_weight", "Share of the model's unversioned requests each version gets (role stable or canary; "
    "for a shadow, the share of requests copied to it)", ["model", "version", "role"], multiprocess_mode="livemax",
)
VERSION_DISAGREEMENT = Gauge(
    "kiln_version_disagreement", "Share of compared rows on which this version disagrees with the baseline "
    "version on the same inputs, over the rollout guard's window", ["model", "version", "baseline"],
    multiprocess_mode="livemax",
)
COMPARED_ROWS = Counter(
    "kiln_version_compared_rows", "Rows run on both this version and the baseline version (canary or shadow)",
    ["model", "version", "baseline"],
)
DISAGREEING_ROWS = Counter(
    "kiln_version_disagreeing_rows", "Compared rows whose answers disagree (top-1, or relative error above rtol)",
    ["model", "version", "baseline"],
)
SHADOW_REQUESTS = Counter(
    "kiln_rollout_copies", "Requests copied off the request path to a shadow version or, for a canary's "
    "comparison, to the stable version, by outcome (success, error, dropped)", ["model", "version", "outcome"],
)
ROLLBACKS = Counter("kiln_rollout_rollbacks", "Canaries the rollout guard set to weight 0, by the bound they broke",
                    ["model", "version", "bound"])
WINDOW_ERROR_RATE = Gauge("kiln_rollout_window_error_rate", "Server errors and timeouts / requests over the rollout "
                          "guard's window", ["model", "version"], multiprocess_mode="livemax")
WINDOW_P99 = Gauge("kiln_rollout_window_p99_seconds", "p99 request latency over the rollout guard's window",
                   ["model", "version"], multiprocess_mode="livemax")
