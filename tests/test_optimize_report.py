"""`kiln optimize report` on a user's model (factory + data): every row measured, verdicts follow the numbers,
md/json/png written, and every kept row is a servable folder that passes Kiln's gates."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from tests.optimize_util import MLP, WINE, build_served, trained_weights  # noqa: E402

EXPECTED_ROWS = ["original", "l1-pruning", "channel-pruning", "int8-static", "int8-dynamic", "fp16", "distillation", "search"]


def test_report_rows_are_measured_with_verdicts_and_kept_rows_serve(tmp_path):
    from typer.testing import CliRunner

    from optimize.cli import app

    out = tmp_path / "report"
    weights = trained_weights(MLP, WINE, tmp_path / "mlp.pt", epochs=30, hidden=128)
    r = CliRunner().invoke(app, ["report", MLP, "--data", WINE, "--model-arg", "hidden=128", "--weights", str(weights),
                                 "--backends", "onnxruntime",
                                 "--student", MLP, "--student-arg", "hidden=16", "--space", "hidden=8,32", "--search-budget-ms", "5",
                                 "--quick", "--runs", "30", "--batch", "16", "--max-drop", "0.05", "--no-progress",
                                 "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads((out / "report.json").read_text())
    rows = {row["key"]: row for row in data["rows"]}
    assert list(rows) == EXPECTED_ROWS
    base = rows["original"]["metric"]
    noise = rows["original"]["measurements"]["onnxruntime"]["noise"]  # the original's run-to-run gap per batch
    for row in data["rows"]:
        m = row["measurements"]["onnxruntime"]
        assert m["ok"], (row["key"], m)
        assert m["p50_ms"]["1"] > 0 and m["p50_ms"]["16"] > 0, row["key"]
        assert 0 <= m["accuracy"] <= 1, row["key"]
        assert row["size_bytes"] > 0 and row["params"] > 0 and row["macs"] > 0, row["key"]
        assert row["command"].startswith(("kiln optimize ", "kiln serve")), row["key"]
        assert row["verdict"].startswith(("baseline", "kept:", "rejected:")), row["verdict"]
        if row["key"] == "original":
            continue
        if base - row["metric"] > 0.05 + 1e-9:  # the verdict follows the measurements
            assert row["verdict"].startswith("rejected: metric"), row
        elif not any(x <= 1 / max(1.10, 1 + noise[cell.split("@")[1]]) for cell, x in row["details"]["latency_ratio"].items()):
            assert row["verdict"].startswith("rejected: not faster on any backend"), row
        else:
            assert row["kept"] and row["folder"], row
    assert rows["l1-pruning"]["details"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rows["channel-pruning"]["params"] < rows["original"]["params"]
    assert rows["distillation"]["params"] < rows["original"]["params"]
    assert data["meta"]["workload"]["split"]["sizes"]["eval"] == 36
    md = (out / "report.md").read_text()
    assert "| technique |" in md and md.count("\n| ") >= len(EXPECTED_ROWS) + 1 and "Reproduce each row" in md
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    kept = [row for row in data["rows"] if row.get("kept") and row["key"] != "original"]
    for row in kept:  # every kept row serves and passes the gates
        mv = build_served(out / "models" / row["key"], tmp_path / "cache")
        assert mv.state == "READY", (row["key"], mv.reason)
        mv.close()
