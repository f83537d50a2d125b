"""`backend: auto` through the real server: it compiles and gates the candidates available here, times
them, serves the fastest, records the choice, timings and every rejection, and a restart reuses the
cached decision without re-measuring."""

from __future__ import annotations

import json

import httpx
import numpy as np
import yaml

from tests import machine
from tests.kiln_server import start_server
from tests.test_backends_serve import COMMON, DIGITS, infer_all

AUTO = {
    "backend": "auto",
    "auto": {
        "candidates": ["onnxruntime", "onnxruntime:int8", "openvino", "litert", "coreml", "tensorrt"],
        "batch_sizes": [1, 32],
        "runs": 15,
        "warmup": 3,
    },
    "backend_options": {"batch_sizes": [1, 32]},  # LiteRT: two static buckets keep the compile short
}


def test_auto_picks_fastest_and_restart_reuses_decision(tmp_path):
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    (repo / "digits-auto").mkdir(parents=True)
    (repo / "digits-auto" / "config.yaml").write_text(yaml.safe_dump({**COMMON, **AUTO}))

    first = start_server(repo, cache, log_dir=tmp_path, timeout=300)
    try:
        meta = httpx.get(first.url + "/v2/models/digits-auto").json()["parameters"]
        auto = json.loads(meta["auto"])
        log1 = first.log()
        with np.load(DIGITS / "data" / "eval.npz") as f:
            x = f["input"][:64]
        got = infer_all(first, "digits-auto", x, 32)
    finally:
        first.stop()
    assert meta["state"] == "READY" and auto["reused"] is False
    rows = {(c["backend"], c["precision"]): c for c in auto["candidates"]}
    assert set(rows) == {("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"),
                         ("litert", "fp32"), ("coreml", "fp32"), ("tensorrt", "fp32")}
    # Where the machine cannot run them: rejected without being served, each with its reason.
    if machine.coreml_predicts()[0]:
        assert rows[("coreml", "fp32")]["status"] == "ok", rows[("coreml", "fp32")]
    else:
        assert rows[("coreml", "fp32")]["status"] == "unavailable"
        assert "Core ML prediction needs macOS" in rows[("coreml", "fp32")]["reason"]
    trt_ok, trt_why = machine.tensorrt()
    if trt_ok:
        assert rows[("tensorrt", "fp32")]["status"] == "ok", rows[("tensorrt", "fp32")]
    else:
        assert rows[("tensorrt", "fp32")]["status"] == "unavailable"
        assert trt_why in rows[("tensorrt", "fp32")]["reason"] and machine.tensorrt_missing(trt_why)
    timed = [c for c in auto["candidates"] if c["status"] == "ok"]
    assert len(timed) >= 3
    for c in timed:
        assert set(c["latency_ms"]) == {"1", "32"} and c["score_ms"] > 0
    best = min(timed, key=lambda c: c["score_ms"])
    choice = auto["choice"]
    assert (choice["backend"], choice["precision"]) == (best["backend"], best["precision"])
    assert (meta["backend"], meta["precision"]) == (best["backend"], best["precision"])
    for c in timed:
        if c is not best:
            assert c["rejected"].startswith("slower: score")
    assert "auto: measuring" in log1 and "auto: chose" in log1
    assert got.shape == (64, 10)
    decisions = list((cache / "auto").glob("*.json"))
    assert len(decisions) == 1

    second = start_server(repo, cache, log_dir=tmp_path, timeout=300)
    try:
        meta2 = httpx.get(second.url + "/v2/models/digits-auto").json()["parameters"]
        log2 = second.log()
    finally:
        second.stop()
    auto2 = json.loads(meta2["auto"])
    assert auto2["reused"] is True and auto2["measured_at"] == auto["measured_at"]
    assert (meta2["backend"], meta2["precision"]) == (meta["backend"], meta["precision"])
    assert "reused cached decision" in log2 and "not re-measuring" in log2
    assert "auto: measuring" not in log2
    assert meta2["cache"] == "hit"  # the chosen artifact comes from the compile cache too
