"""Hardware-aware search over a factory's kwargs: latencies measured on the backend, the winner respects the budget,
the Pareto front is sane, and the winner is a servable folder."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")

from tests.optimize_util import MLP, WINE, build_served  # noqa: E402


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from optimize import search, workload

    w = workload.build(MLP, data=workload.DataArgs(data=WINE), workdir=tmp_path_factory.mktemp("w"))
    space = search.parse_space(["hidden=4,16,64", "depth=1,2"])
    return search.search(w, space, "onnxruntime", 10.0, epochs=4, final_epochs=5, runs=40, max_candidates=5, progress=False)


def test_space_parsing_and_grid():
    from optimize import search
    from optimize.errors import OptimizeError

    space = search.parse_space(["width=16,32,64", "depth=2,3", "act=relu,gelu", "widths=[8,16],[16,32]"])
    assert space == {"width": [16, 32, 64], "depth": [2, 3], "act": ["relu", "gelu"], "widths": [[8, 16], [16, 32]]}
    assert len(search.grid(space)) == 3 * 2 * 2 * 2
    assert search.grid(space, 4)[0] == {"width": 16, "depth": 2, "act": "relu", "widths": [8, 16]}
    with pytest.raises(OptimizeError, match="--space"):
        search.parse_space(["width"])


def test_candidates_are_measured_and_front_is_pareto(searched):
    cands = searched.candidates
    assert len(cands) == 5 and len({c.name for c in cands}) == 5
    for c in cands:
        assert not c.reason and math.isfinite(c.p50_ms) and c.p50_ms > 0 and 0 < c.val_metric <= 1 and c.params > 0
        assert c.macs > 0
    assert searched.metric == "top1"
    front = searched.pareto
    assert front
    for c in front:  # nothing dominates a front member
        assert not any(o.p50_ms < c.p50_ms and o.val_metric > c.val_metric for o in cands)
    for c in cands:
        if not c.pareto:  # everything off the front is dominated
            assert any(o.p50_ms <= c.p50_ms and o.val_metric >= c.val_metric for o in front)


def test_best_respects_budget(searched):
    from optimize.search import select_best

    assert searched.best is not None and searched.best.p50_ms <= 10.0
    lat = sorted(c.p50_ms for c in searched.candidates)
    budget = lat[len(lat) // 2]  # a budget only some candidates meet
    best = select_best(searched.candidates, budget)
    assert best is not None and best.p50_ms <= budget
    under = [c for c in searched.candidates if c.p50_ms <= budget]
    assert best.val_metric == max(c.val_metric for c in under)
    assert select_best(searched.candidates, lat[0] / 2) is None


def test_search_cli_writes_a_servable_winner_and_fails_cleanly_without_one(tmp_path):
    from typer.testing import CliRunner

    from optimize.cli import app

    run = CliRunner()
    out = tmp_path / "winner"
    args = ["search", MLP, "--data", WINE, "--space", "hidden=8,32", "--space", "depth=1,2", "--backend", "onnxruntime",
            "--epochs", "3", "--final-epochs", "20", "--max-candidates", "3", "--runs", "30", "--no-progress"]
    r = run.invoke(app, args + ["--budget-ms", "5", "--out", str(out), "--json", str(tmp_path / "s.json"),
                                "--png", str(tmp_path / "s.png")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["best"]["p50_ms"] <= 5 and (out / "1" / "model.onnx").exists()
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    mv = build_served(out, tmp_path / "cache")
    assert mv.state == "READY", mv.reason
    mv.close()
    r = run.invoke(app, args + ["--budget-ms", "0.000001", "--out", str(tmp_path / "none")], catch_exceptions=False)
    assert r.exit_code == 1 and r.stderr.strip().startswith("error: no candidate within"), r.output
    assert len(r.stderr.strip().splitlines()) == 1
