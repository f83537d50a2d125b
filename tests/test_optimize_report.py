"""`kiln optimize report`: every row carries measured numbers and a verdict; md/json/png written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from tests.optimize_util import MODEL  # noqa: E402

EXPECTED_ROWS = ["original", "weight-pruning", "channel-pruning", "int8-static", "int8-dynamic", "distillation",
                 "architecture-search", "channel-pruning+int8", "distillation+int8"]


def test_report_rows_are_measured_with_verdicts(tmp_path):
    from optimize.report import run_report

    out = tmp_path / "report"
    res = run_report(str(MODEL), out, backends=["onnxruntime"], quick=True, runs=30, progress=False,
                     search_budget_ms=1.0, log=lambda *_: None)
    data = json.loads((out / "report.json").read_text())
    assert [r["key"] for r in data["rows"]] == EXPECTED_ROWS
    for r in data["rows"]:
        m = r["measurements"]["onnxruntime"]
        assert m["ok"], (r["key"], m)
        assert m["p50_ms"]["1"] > 0 and m["p50_ms"]["32"] > 0, r["key"]
        assert 0 < m["accuracy"] <= 1 and r["accuracy"] == m["accuracy"], r["key"]
        assert r["size_bytes"] > 0 and r["gz_bytes"] > 0 and r["params"] > 0, r["key"]
        assert r["command"].startswith("kiln optimize "), r["key"]
        assert r["verdict"].startswith(("baseline", "kept:", "rejected:")), r["verdict"]
        assert r["kept"] == r["verdict"].startswith(("baseline", "kept")), r["key"]
        if r["key"] != "original":
            assert "onnxruntime@1" in r["details"]["latency_ratio"], r["key"]
    rows = {r["key"]: r for r in data["rows"]}
    base = rows["original"]["accuracy"]
    for r in data["rows"]:  # the verdict follows the measurements
        if base - r["accuracy"] > 0.01 + 1e-9:
            assert r["verdict"].startswith("rejected: loses"), r
        elif r["key"] != "original" and min(r["details"]["latency_ratio"].values()) > 1 / 1.10:
            assert "not measurably faster" in r["verdict"], r
    assert rows["weight-pruning"]["details"]["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert rows["channel-pruning"]["params"] < rows["original"]["params"]
    meta = data["meta"]
    assert meta["cpu"]["model"] and meta["versions"]["onnxruntime"] and meta["backend_versions"]["onnxruntime"]
    md = (out / "report.md").read_text()
    assert "| technique |" in md and md.count("\n| ") >= len(EXPECTED_ROWS) + 1 and "Reproduce each row" in md
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for key in ("weight-pruning", "channel-pruning", "distillation", "architecture-search", "int8-dynamic"):
        folder = out / "models" / key
        assert (folder / "1" / "model.onnx").exists() and (folder / "config.yaml").exists(), key
    assert res["backends"] == ["onnxruntime"]
