"""Prometheus metrics (names as in the design notes). Histograms, so percentiles aggregate across pods."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STATES = ("LOADING", "COMPILING", "VERIFYING", "WARMING", "READY", "FAILED")

REQUESTS = Counter(
    "kiln_inference_requests", "Inference requests by outcome (success, client_error, server_error, rejected)",
    ["model", "version", "outcome"],
)
SAMPLES = Counter("kiln_inference_samples", "Samples (batch rows) inferred", ["model", "version"])
DURATION = Histogram(
    "kiln_request_duration_seconds", "Request latency by phase (decode, queue, compute, encode, total)",
    ["model", "version", "phase"], buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("kiln_batch_size", "Executed batch sizes", ["model", "version"], buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("kiln_queue_depth", "Requests waiting for a runner", ["model", "version"])
INFLIGHT = Gauge("kiln_inflight_requests", "Inference requests being served", ["model"])
MODEL_STATE = Gauge(
    "kiln_model_state", "1 for the model's current state", ["model", "version", "backend", "precision", "state"]
)
COMPILE_SECONDS = Histogram(
    "kiln_compile_seconds", "Time to compile a model (cache misses only)", ["model", "version", "backend"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
CACHE = Counter("kiln_compile_cache", "Compile cache lookups (hit, miss, corrupt)", ["result"])
PARITY = Gauge("kiln_parity_max_abs_error", "Max abs error of the compiled model vs the source",
               ["model", "version", "output"])

for _result in ("hit", "miss", "corrupt"):
    CACHE.labels(_result)


def set_model_state(model: str, version: str, backend: str, precision: str, state: str) -> None:
    """Exactly one state series is 1 per model version; stale backend/precision series are dropped."""
    for labels in list(MODEL_STATE._metrics):  # noqa: SLF001 (prometheus-client has no public listing)
        if labels[0] == model and labels[1] == version and (labels[2], labels[3]) != (backend, precision):
            MODEL_STATE.remove(*labels)
    for s in STATES:
        MODEL_STATE.labels(model, version, backend, precision, s).set(1 if s == state else 0)


def forget_model(model: str, version: str) -> None:
    for metric in (MODEL_STATE, PARITY):
        for labels in list(metric._metrics):  # noqa: SLF001
            if labels[0] == model and labels[1] == version:
                metric.remove(*labels)


__all__ = ["REGISTRY"]
