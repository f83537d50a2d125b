"""INT8 on the real digits model through each backend's recipe: top-1 drop ≤ 1 point, servable output."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from tests.optimize_util import MODEL, build_served  # noqa: E402

MAX_DROP = 0.01


def _backends():
    from optimize.bench import available_backends

    return [b for b in ("onnxruntime", "openvino", "litert") if b in available_backends()]


@pytest.fixture(scope="module")
def data():
    from tests.optimize_util import default_workload

    return default_workload()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "litert"])
def test_static_int8_keeps_accuracy(backend, data, tmp_path):
    from optimize import quantize

    if backend not in _backends():
        pytest.skip(f"{backend} not available here")
    res = quantize.quantize(data, backend, "static", out=tmp_path / f"int8-{backend}", runs=30, progress=False)
    assert res.int8["ok"] and res.fp32["ok"], res.as_dict()
    assert res.drop is not None and res.drop <= MAX_DROP, res.as_dict()
    assert res.int8["artifact_bytes"] < res.fp32["artifact_bytes"], res.as_dict()  # int8 weights are smaller
    assert res.int8["p50_ms"]["1"] > 0 and res.int8["p50_ms"]["32"] > 0
    if backend == "onnxruntime":  # the written QDQ model analyzes like the original: same weights count and MACs
        from optimize import analyze, modelio

        a = analyze.analyze(modelio.resolve(tmp_path / "int8-onnxruntime"))
        assert (a.params, a.macs) == (13_706, 91_776)
        assert a.size_bytes < 0.6 * (MODEL / "1" / "model.onnx").stat().st_size


def test_dynamic_int8_onnxruntime_keeps_accuracy_and_serves(data, tmp_path):
    from typer.testing import CliRunner

    from optimize.cli import app

    out = tmp_path / "digits-int8-dynamic"
    r = CliRunner().invoke(app, ["quantize", str(MODEL), "--backend", "onnxruntime", "--mode", "dynamic", "--runs", "30",
                                 "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    info = json.loads((out / "optimize.json").read_text())
    assert info["metric_drop"] <= MAX_DROP, info
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "1" / "model.onnx")).graph.node}
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= ops or "MatMulInteger" in ops, ops
    mv = build_served(out, tmp_path / "cache")
    assert mv.state == "READY", mv.reason


def test_static_int8_folder_for_openvino_serves_with_int8(data, tmp_path):
    from typer.testing import CliRunner

    from optimize.cli import app

    if "openvino" not in _backends():
        pytest.skip("openvino not available")
    out = tmp_path / "digits-int8-ov"
    r = CliRunner().invoke(app, ["quantize", str(MODEL), "--backend", "openvino", "--mode", "static", "--calib",
                                 str(MODEL / "data" / "calib.npz"), "--runs", "30", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "recipe:" in r.output and "why:" in r.output
    mv = build_served(out, tmp_path / "cache")
    assert mv.state == "READY" and mv.precision == "int8" and mv.backend == "openvino", (mv.state, mv.reason, mv.attempts)
