"""Prometheus series of model monitoring: capture, feedback / live accuracy, drift.

Gauges carry a multiprocess mode so `kiln serve --workers N` merges them (service/metrics.py).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CAPTURE_SAMPLES = Counter(
    "kiln_capture_samples", "Traffic capture by result: stored, dropped (queue full), evicted (store cap), failed",
    ["model", "version", "result"])
CAPTURE_BYTES = Gauge("kiln_capture_bytes", "Bytes of captured tensors in the capture store, per model version",
                      ["model", "version"], multiprocess_mode="livemax")
CAPTURE_EVENTS = Counter("kiln_capture_events", "CloudEvents to the payload sink: sent, failed (after retries), dropped",
                         ["model", "version", "result"])
FEEDBACK = Counter("kiln_feedback", "Feedback labels by result: joined, late (joined after max_delay_s), unmatched",
                   ["model", "version", "result"])
LIVE_ACCURACY = Gauge("kiln_live_accuracy", "Top-1 accuracy of the last feedback window (classifiers)",
                      ["model", "version"], multiprocess_mode="livemostrecent")
LIVE_MAE = Gauge("kiln_live_mae", "Mean absolute error of the last feedback window (regressors)",
                 ["model", "version"], multiprocess_mode="livemostrecent")
LIVE_LABELS = Gauge("kiln_live_labels", "Labelled rows in the live-accuracy window", ["model", "version"],
                    multiprocess_mode="livemax")
LIVE_ACCURACY_MIN = Gauge("kiln_live_accuracy_min", "The config's accuracy.min_accuracy (the live-accuracy alert's bound)",
                          ["model", "version"], multiprocess_mode="livemax")
DRIFT_STATISTIC = Gauge("kiln_drift_statistic", "Drift statistic per input feature and test (ks, psi; chi2 and psi "
                        "for input=predicted_class)", ["model", "version", "input", "test"],
                        multiprocess_mode="livemostrecent")
DRIFT_P_VALUE = Gauge("kiln_drift_p_value", "Drift p-value per input feature and test (ks; chi2 for predicted_class)",
                      ["model", "version", "input", "test"], multiprocess_mode="livemostrecent")
DRIFT_DETECTED = Gauge("kiln_drift_detected", "1 when the last window drifted (Bonferroni-corrected KS, or the "
                       "predicted-class test)", ["model", "version"], multiprocess_mode="livemax")

_PER_MODEL = (CAPTURE_SAMPLES, CAPTURE_BYTES, CAPTURE_EVENTS, FEEDBACK, LIVE_ACCURACY, LIVE_MAE, LIVE_LABELS,
              LIVE_ACCURACY_MIN, DRIFT_STATISTIC, DRIFT_P_VALUE, DRIFT_DETECTED)


def forget(model: str, version: str) -> None:
    """Drop a model version's series (unloaded)."""
    for metric in _PER_MODEL:
        for labels in list(metric._metrics):
            if labels[0] == model and labels[1] == version:
                metric.remove(*labels)
