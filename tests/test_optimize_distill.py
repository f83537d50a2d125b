"""Distillation on the real digits data: the student with the teacher beats the same student without it."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from tests.optimize_util import MODEL, splits  # noqa: E402


def test_kd_loss_is_the_documented_formula():
    import torch.nn.functional as F

    from optimize.distill import kd_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    alpha, T = 0.7, 4.0
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean()  # KL(teacher ‖ student)
    want = alpha * F.cross_entropy(s, y) + (1 - alpha) * kl * T**2
    assert kd_loss(alpha, T)(s, t, y).item() == pytest.approx(want.item(), rel=1e-5)
    assert kd_loss(1.0, T)(s, t, y).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert kd_loss(0.0, T)(s, s, y).item() == pytest.approx(0.0, abs=1e-6)  # student == teacher: no soft loss


def test_validation_split_is_carved_from_train_not_eval():
    import numpy as np

    from optimize.distill import carve_validation

    sp = splits()
    (xt, yt), (xv, yv) = carve_validation(sp.x_train, sp.y_train, 0.15, 0)
    assert len(xt) + len(xv) == len(sp.x_train) and abs(len(xv) - 0.15 * len(sp.x_train)) <= 1
    train_rows = {r.tobytes() for r in sp.x_train}
    assert all(r.tobytes() in train_rows for r in xv)
    assert set(np.unique(yv)) == set(range(10))  # stratified


def test_student_beats_same_student_without_teacher(tmp_path):
    from typer.testing import CliRunner

    from optimize.cli import app

    out = tmp_path / "student"
    r = CliRunner().invoke(app, ["distill", "--teacher", str(MODEL), "--student", "8,16:32", "--epochs", "40", "--patience", "8",
                                 "--no-progress", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    info = json.loads((out / "optimize.json").read_text())
    with_t, without_t = info["student_metric"], info["baseline_metric"]
    print(f"held-out top-1: teacher {info['teacher_metric']:.4f}, student+teacher {with_t:.4f}, "
          f"student alone {without_t:.4f} (same arch, seed, schedule, early stopping)")
    assert info["alpha"] == 0.7 and info["temperature"] == 4.0 and info["student"].endswith("digits.py:DigitsCNN")
    assert info["epochs_run"] <= 40 and 0 <= info["best_epoch"] < info["epochs_run"]
    assert with_t > without_t, f"distilled {with_t:.4f} vs alone {without_t:.4f}"
    assert (out / "1" / "model.onnx").exists() and (out / "1" / "model.pt2").exists() and (out / "config.yaml").exists()
