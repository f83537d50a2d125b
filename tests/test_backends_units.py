"""Backend pieces without the server: LiteRT's static-batch buckets, lossy parity tolerances, config."""

from __future__ import annotations

import numpy as np
import pytest

from backends import CompileOptions, get_backend
from service.config import parse_config
from service.errors import ConfigError
from backends.signature import onnx_signature
from service.verify import tolerance
from tests.test_backends_serve import DIGITS


def test_litert_static_buckets_serve_every_batch_size(tmp_path, source_predictions_small):
    """LiteRT converts static shapes: one .tflite per bucket; any batch 1..max (and beyond, chunked)
    gives the source's outputs."""
    x, ref = source_predictions_small
    ins, outs = onnx_signature(DIGITS / "1" / "model.onnx")
    backend = get_backend("litert")
    ok, why = backend.available()
    assert ok, why
    opts = CompileOptions(precision="fp32", max_batch_size=8, inputs=ins, outputs=outs,
                          extra={"batch_sizes": [1, 8]})
    artifact = backend.compile(DIGITS / "1" / "model.pt2", opts, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.tflite")) == ["model_b1.tflite", "model_b8.tflite"]
    runner = backend.load(artifact, opts)
    for n in (1, 2, 7, 8, 9, 20):
        got = next(iter(runner.infer({"input": x[:n]}).values()))
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, ref[:n], atol=1e-4, rtol=1e-3)
    runner.close()


@pytest.fixture(scope="module")
def source_predictions_small():
    import onnxruntime as ort

    with np.load(DIGITS / "data" / "eval.npz") as f:
        x = f["input"][:20]
    sess = ort.InferenceSession(str(DIGITS / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return x, sess.run(None, {"input": x})[0]


def test_lossy_tolerance_rule():
    spec = parse_config({"verify": {"atol": 1e-4, "rtol": 1e-3,
                                    "precisions": {"fp16": {"atol": 0.5, "rtol": 0.05}}}}, None).verify
    expected = {"logits": np.array([[-3.0, 20.0]], np.float32)}
    assert tolerance(spec, "fp32", expected) == (1e-4, 1e-3, "verify")
    assert tolerance(spec, "fp16", expected)[:2] == (0.5, 0.05)
    atol, rtol, rule = tolerance(spec, "int8", expected)
    assert atol == pytest.approx(2.0) and rtol == 0.1 and rule.startswith("int8 default")


def test_config_rejects_bad_auto_and_precision_entries():
    with pytest.raises(ConfigError, match="auto.candidates"):
        parse_config({"backend": "auto", "auto": {"candidates": ["openvino:int4"]}}, "config.yaml")
    with pytest.raises(ConfigError, match="verify.precisions"):
        parse_config({"verify": {"precisions": {"fp32": {"atol": 1}}}}, "config.yaml")
    cfg = parse_config({"backend": "auto", "auto": {"candidates": ["openvino:int8", "litert"]}}, "config.yaml")
    assert cfg.auto.candidates == ["openvino:int8", "litert"]


def test_tensorrt_and_coreml_availability_are_plain_reasons():
    from tests import machine

    ok, why = get_backend("tensorrt").available()
    assert ok == machine.tensorrt()[0]
    if ok:
        assert why.startswith("tensorrt ") and "compute capability" in why
    else:
        assert machine.tensorrt_missing(why) and "Traceback" not in why
    ok, why = get_backend("coreml").available()
    assert ok
    if machine.coreml_predicts()[0]:
        assert "compile and validate only" not in why
    else:
        assert "compile and validate only" in why and "needs macOS" in why


def test_kiln_compile_backend_all_prints_one_table(tmp_path):
    """`kiln compile MODEL --backend all`: one row per backend x precision with a status (fp32 only here,
    to keep it short; the full table is in docs/backends.md)."""
    import subprocess
    import sys

    from tests.kiln_server import ROOT

    import yaml

    from tests.test_backends_serve import COMMON

    model = tmp_path / "digits"
    model.mkdir()
    # Two LiteRT buckets instead of the default four keep the conversion short.
    (model / "config.yaml").write_text(yaml.safe_dump({**COMMON, "backend_options": {"batch_sizes": [1, 32]}}))
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "compile", str(model), "--backend", "all", "--precision", "fp32",
         "--runs", "5", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "every backend x precision" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines()
            if line.startswith("│") and line.split("│")[2].strip() == "fp32"}
    assert set(rows) == {"onnxruntime", "openvino", "litert", "coreml", "tensorrt"}
    for name in ("onnxruntime", "openvino", "litert"):
        assert "│ ok " in rows[name] and "0.9806" in rows[name]
    from tests import machine

    if machine.coreml_predicts()[0]:
        assert "│ ok " in rows["coreml"]
    else:
        assert "unavailable: Core ML prediction needs macOS" in rows["coreml"]
    trt_ok, trt_why = machine.tensorrt()
    if trt_ok:
        assert "│ ok " in rows["tensorrt"]
    else:
        assert "unavailable: " in rows["tensorrt"] and machine.tensorrt_missing(rows["tensorrt"])
    assert "LiteRT-Torch Convert" not in out  # converter progress stays off stdout


def test_lossy_build_without_accuracy_gate_is_refused(tmp_path):
    from service.cache import CompileCache
    from service.config import parse_config
    from service.model import ModelVersion
    from service.source import find_sources

    cfg = parse_config({"backend": "onnxruntime", "precision": "int8", "fallback": ["fp32"], "max_batch_size": 32,
                        "verify": {"samples": str(DIGITS / "data" / "calib.npz")}}, "config.yaml")
    mv = ModelVersion("d", "1", tmp_path, cfg, find_sources(DIGITS / "1"), CompileCache(tmp_path / "cache"))
    mv.build()
    try:
        assert mv.state == "READY" and mv.precision == "fp32"
        assert mv.attempts[0].status == "failed"
        assert "int8 is lossy: it needs an accuracy gate" in mv.attempts[0].reason
        assert mv.attempts[0].cache == ""  # refused before compiling
    finally:
        mv.close()
