"""The infer path's metrics are tallied and folded into prometheus-client in bulk
(service/metrics.py ModelMetrics): the folded series must equal one observe()/inc() per request."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from service import metrics


def _samples(text: str, **labels) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in labels)))] = s.value
    return out


def test_fold_equals_one_observe_per_request():
    rng = random.Random(7)
    model = f"fold-{rng.getrandbits(32)}"
    m = metrics.for_model(model, "1")
    ref = CollectorRegistry()
    ref_hist = Histogram("kiln_request_duration_seconds", "ref", ["model", "version", "phase", "protocol"],
                         buckets=metrics.LATENCY_BUCKETS, registry=ref)
    ref_req = Counter("kiln_inference_requests", "ref", ["model", "version", "outcome", "protocol"],
                      registry=ref)
    ref_rows = Counter("kiln_inference_samples", "ref", ["model", "version"], registry=ref)
    n = metrics.FLUSH_EVERY * 2 + 37  # folds on the way and leaves a partial tally for the scrape
    for _ in range(n):
        outcome = rng.choice(["success", "success", "success", "client_error", "timeout"])
        if outcome == "success":
            # Every bucket gets hits, exact bucket bounds included (observe counts v <= bound), and some
            # values beyond the last finite bound.
            phases = tuple(rng.choice([rng.uniform(0, 12), rng.choice(metrics.LATENCY_BUCKETS),
                                       10 ** rng.uniform(-6, 0)]) for _ in metrics.PHASES)
            rows = rng.randint(1, 8)
            for p, v in zip(metrics.PHASES, phases):
                ref_hist.labels(model, "1", p, "http").observe(v)
            ref_rows.labels(model, "1").inc(rows)
            m.record(outcome, rows, phases)
        else:
            m.record(outcome)
        ref_req.labels(model, "1", outcome, "http").inc()

    from prometheus_client import generate_latest

    got = _samples(metrics.exposition().decode(), model=model)
    want = _samples(generate_latest(ref).decode(), model=model)
    want = {k: v for k, v in want.items() if not k[0].endswith("_created")}
    assert want, "the reference registry has no samples"
    assert set(want) <= set(got), set(want) - set(got)
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-9 * max(1.0, abs(value)), (key, got[key], value)
    metrics.forget_model(model, "1")


def test_scrape_shows_the_current_in_flight_count_and_the_partial_tally():
    model = f"fold-inflight-{random.getrandbits(32)}"
    m = metrics.for_model(model, "1")
    m.enter()
    m.enter()
    m.leave()
    m.record("success", 3, (0.001,) * len(metrics.PHASES))
    got = _samples(metrics.exposition().decode(), model=model)
    assert got[("kiln_inflight_requests", ())] == 1.0
    assert got[("kiln_inference_samples_total", (("version", "1"),))] == 3.0
    got = _samples(metrics.exposition().decode(), model=model, protocol="http")
    assert got[("kiln_inference_requests_total", (("outcome", "success"), ("version", "1")))] == 1.0
    # Forgetting the model folds what it still holds.
    m.record("client_error")
    metrics.forget_model(model, "1")
    got = _samples(metrics.exposition().decode(), model=model, protocol="http")
    assert got[("kiln_inference_requests_total", (("outcome", "client_error"), ("version", "1")))] == 1.0
