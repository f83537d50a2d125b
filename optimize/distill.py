"""``kiln optimize distill``: knowledge distillation of a DigitsCNN student from any teacher.

Loss (Hinton et al.): ``alpha * CE(student, y) + (1 - alpha) * KL(softmax(t/T) || softmax(s/T)) * T²``
(the KL of the teacher's softened distribution from the student's, scaled by T² so the soft-target
gradients keep their magnitude; alpha 0.7 and T 4 by default).

The teacher is any model the toolkit can run (``.pt2`` through torch, ONNX through ONNX Runtime); its
logits on the training set are computed once. A validation split is carved (stratified) from the
training data for early stopping — the held-out eval split is never used to choose anything, only
reported. The best-validation weights are restored at the end.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import OptimizeError


@dataclass
class DistillResult:
    model: Any
    student_config: dict
    alpha: float
    temperature: float
    epochs_run: int
    best_epoch: int
    val_top1: float
    eval_top1: float
    teacher_eval_top1: float
    baseline: dict | None = None  # same student, same schedule, CE only
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "model"}
        return d


def parse_student(spec: str) -> dict:
    """``"8,16:32"`` -> widths (8, 16), hidden 32; ``"8,16"`` -> hidden 0 (linear classifier)."""
    m = re.fullmatch(r"\s*(\d+(?:\s*,\s*\d+)*)\s*(?::\s*(\d+))?\s*", spec or "")
    if not m:
        raise OptimizeError(f"--student must be a model path or an architecture 'W1,W2[:HIDDEN]' (e.g. 8,16:32), got '{spec}'")
    widths = tuple(int(w) for w in m.group(1).split(","))
    hidden = int(m.group(2) or 0)
    if any(w < 1 or w > 1024 for w in widths) or len(widths) > 6 or hidden > 4096:
        raise OptimizeError(f"--student: widths must be 1..1024 (at most 6 blocks) and hidden ≤ 4096, got '{spec}'")
    return {"widths": widths, "hidden": hidden}


def validate(alpha: float, temperature: float, epochs: int, patience: int, val_fraction: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise OptimizeError(f"--alpha must be in [0, 1], got {alpha}")
    if not 0.0 < temperature <= 100.0:
        raise OptimizeError(f"--temperature must be in (0, 100], got {temperature}")
    if not 1 <= epochs <= 1000:
        raise OptimizeError(f"--epochs must be between 1 and 1000, got {epochs}")
    if patience < 1:
        raise OptimizeError(f"--patience must be ≥ 1, got {patience}")
    if not 0.05 <= val_fraction <= 0.5:
        raise OptimizeError(f"--val-fraction must be in [0.05, 0.5], got {val_fraction}")


def carve_validation(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, va = train_test_split(idx, test_size=fraction, stratify=y, random_state=seed)
    tr, va = np.sort(tr), np.sort(va)
    return (x[tr], y[tr]), (x[va], y[va])


def kd_loss(alpha: float, temperature: float):
    import torch.nn.functional as F

    def loss(student_logits, teacher_logits, y):
        ce = F.cross_entropy(student_logits, y)
        kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                      reduction="batchmean", log_target=True)
        return alpha * ce + (1.0 - alpha) * kl * temperature**2

    return loss


def fit(student, train_xy, val_xy, *, epochs: int, lr: float, seed: int, patience: int, progress: bool,
        loss_fn=None, desc: str = "train", eval_xy=None):
    """Train with early stopping on validation top-1; restore the best weights. Returns (model, history, best_epoch, best_val)."""
    from . import digits

    best = {"val": -1.0, "epoch": -1, "state": None}
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc=desc, unit="epoch", leave=False)

    def callback(epoch, model, logs):
        val = digits.evaluate(model, *val_xy)
        logs = {**logs, "val_top1": val}
        history.append({"epoch": epoch, **{k: round(float(v), 5) for k, v in logs.items()}})
        if val > best["val"]:
            best.update(val=val, epoch=epoch, state=copy.deepcopy(model.state_dict()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", val=f"{val:.4f}", best=f"{best['val']:.4f}@{best['epoch']}")
        model.train()
        return epoch - best["epoch"] < patience  # False stops training

    try:
        digits.train(student, train_xy, epochs=epochs, lr=lr, seed=seed, progress=False, loss_fn=loss_fn, callback=callback)
    finally:
        if bar is not None:
            bar.close()
    student.load_state_dict(best["state"])
    student.eval()
    return student, history, best["epoch"], best["val"]


def teacher_fn(src):
    """A function numpy (N,1,8,8) -> teacher logits (torch tensor); torch on .pt2, ONNX Runtime on ONNX."""
    import torch

    if src.pt2 is not None:
        from .modelio import load_exported

        module = load_exported(src.pt2).module()

        def run(x: np.ndarray):
            with torch.no_grad():
                return module(torch.from_numpy(np.ascontiguousarray(x))).detach()

        return run
    import onnxruntime as ort

    sess = ort.InferenceSession(str(src.onnx), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: np.ascontiguousarray(x)})[0])


def distill(teacher_src, student_spec: dict | Any, splits, *, alpha: float = 0.7, temperature: float = 4.0, epochs: int = 60,
            lr: float = 3e-3, seed: int = 0, patience: int = 10, val_fraction: float = 0.15, progress: bool = True,
            compare: bool = True, x_eval=None, y_eval=None) -> DistillResult:
    import torch

    from . import digits

    validate(alpha, temperature, epochs, patience, val_fraction)
    x_eval = splits.x_eval if x_eval is None else x_eval
    y_eval = splits.y_eval if y_eval is None else y_eval
    (xt, yt), (xv, yv) = carve_validation(splits.x_train, splits.y_train, val_fraction, seed)
    run_teacher = teacher_fn(teacher_src)
    t_train = run_teacher(xt).float()
    teacher_eval = float((run_teacher(x_eval).numpy().argmax(1) == y_eval).mean())
    if t_train.shape != (len(xt), digits.NUM_CLASSES):
        raise OptimizeError(f"teacher outputs {tuple(t_train.shape)}, expected (N, {digits.NUM_CLASSES}) logits")

    xt_t = torch.from_numpy(xt)
    base_loss = kd_loss(alpha, temperature)

    def loss_fn(logits, xb, yb):  # the teacher runs on the same mini-batch (cheap next to the student's backward)
        return base_loss(logits, run_teacher(xb.numpy()).float(), yb)

    def make_student():
        if isinstance(student_spec, dict):
            return digits.DigitsCNN(**student_spec, seed=seed)
        return copy.deepcopy(student_spec)

    student, history, best_epoch, best_val = fit(make_student(), (xt_t, torch.from_numpy(yt)), (xv, yv), epochs=epochs, lr=lr,
                                                 seed=seed, patience=patience, progress=progress, loss_fn=loss_fn, desc="distill")
    result = DistillResult(
        model=student, student_config=dict(student.config), alpha=alpha, temperature=temperature, epochs_run=len(history),
        best_epoch=best_epoch, val_top1=best_val, eval_top1=digits.evaluate(student, x_eval, y_eval),
        teacher_eval_top1=teacher_eval, history=history,
    )
    if compare:
        base, bh, be, bv = fit(make_student(), (xt_t, torch.from_numpy(yt)), (xv, yv), epochs=epochs, lr=lr, seed=seed,
                               patience=patience, progress=progress, desc="baseline (no teacher)")
        result.baseline = {"val_top1": bv, "eval_top1": digits.evaluate(base, x_eval, y_eval), "best_epoch": be,
                           "epochs_run": len(bh)}
    return result
