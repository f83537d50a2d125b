"""Hardware-aware search: latencies measured on the backend, the winner respects the budget, Pareto front is sane."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")

from tests.optimize_util import splits  # noqa: E402


@pytest.fixture(scope="module")
def searched():
    from optimize import search

    return search.search(splits(), "onnxruntime", 10.0, epochs=4, final_epochs=5, runs=60, max_candidates=5, progress=False)


def test_candidates_are_measured_and_front_is_pareto(searched):
    cands = searched.candidates
    assert len(cands) == 5
    for c in cands:
        assert not c.reason and math.isfinite(c.p50_ms) and c.p50_ms > 0 and 0 < c.val_top1 <= 1 and c.params > 0
    front = searched.pareto
    assert front
    for c in front:  # nothing dominates a front member
        assert not any(o.p50_ms < c.p50_ms and o.val_top1 > c.val_top1 for o in cands)
    for c in cands:
        if not c.pareto:  # everything off the front is dominated
            assert any(o.p50_ms <= c.p50_ms and o.val_top1 >= c.val_top1 for o in front)


def test_best_respects_budget(searched):
    from optimize.search import select_best

    assert searched.best is not None and searched.best.p50_ms <= 10.0
    lat = sorted(c.p50_ms for c in searched.candidates)
    budget = lat[len(lat) // 2]  # a budget only some candidates meet
    best = select_best(searched.candidates, budget)
    assert best is not None and best.p50_ms <= budget
    under = [c for c in searched.candidates if c.p50_ms <= budget]
    assert best.val_top1 == max(c.val_top1 for c in under)
    assert select_best(searched.candidates, lat[0] / 2) is None


def test_search_cli_writes_the_winner_and_fails_cleanly_without_one(tmp_path):
    from typer.testing import CliRunner

    from optimize.cli import app

    run = CliRunner()
    out = tmp_path / "winner"
    args = ["search", "--backend", "onnxruntime", "--epochs", "2", "--final-epochs", "2", "--max-candidates", "2",
            "--runs", "30", "--no-progress"]
    r = run.invoke(app, args + ["--budget-ms", "5", "--out", str(out), "--json", str(tmp_path / "s.json")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["best"]["p50_ms"] <= 5 and (out / "1" / "model.onnx").exists()
    r = run.invoke(app, args + ["--budget-ms", "0.000001", "--out", str(tmp_path / "none")], catch_exceptions=False)
    assert r.exit_code == 1 and r.stderr.strip().startswith("error: no candidate within"), r.output
    assert len(r.stderr.strip().splitlines()) == 1
