"""``kiln optimize distill``: knowledge distillation of any student factory from any teacher.

Loss (Hinton et al.): ``alpha * CE(student, y) + (1 - alpha) * KL(softmax(t/T) || softmax(s/T)) * T²``
(the KL of the teacher's softened distribution from the student's, scaled by T² so the soft-target
gradients keep their magnitude; alpha 0.7 and T 4 by default).

The teacher is any MODEL the toolkit can run (torch, ``.pt2`` or ONNX): its outputs on the training and
validation splits come once from the one FP32 reference (``backends.reference``). The student is a
``path/to/file.py:factory``. Training is the one loop (``optimize.train``), early-stopped on the
validation split — the held-out split is never used to choose anything, only reported. Without labels
the loss is the KL term alone.
"""

from __future__ import annotations

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


def parse_student_spec(spec: str, student_args: list[str] | None = None):
    """``--student``: ``path/to/file.py:factory`` (+ ``--student-arg key=value``), or for the bundled DigitsCNN
    an architecture ``W1,W2[:HIDDEN]`` — a factory too (``optimize/digits.py:DigitsCNN``)."""
    from pathlib import Path

    from .source import Factory, is_factory_spec, parse_model_args

    if is_factory_spec(spec):
        path_s, _, fn = spec.rpartition(":")
        return Factory(Path(path_s), fn, parse_model_args(student_args))
    arch = parse_student(spec)
    return Factory(Path(__file__).with_name("digits.py"), "DigitsCNN", {**arch, **parse_model_args(student_args)})


@dataclass
class StudentResult:
    model: Any
    student: str
    student_args: dict
    alpha: float
    temperature: float
    loss: str
    epochs_run: int
    best_epoch: int
    teacher_metric: float  # the teacher (FP32 reference) on the held-out split
    student_metric: float  # the distilled student (torch) on the held-out split
    baseline_metric: float | None = None  # the same student trained without the teacher
    params_teacher: int | None = None
    params_student: int = 0

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "model"}


def distill_workload(w, student, *, alpha: float = 0.7, temperature: float = 4.0, epochs: int = 60, lr: float = 3e-3,
                     seed: int = 0, patience: int = 10, progress: bool = True, compare: bool = True) -> StudentResult:
    """Distil the workload's model (the teacher: torch or ONNX — its outputs come from the one FP32 reference) into
    ``student`` (a Factory). Loss (optimize.train): alpha·CE + (1−alpha)·KL·T² with labels, KL alone without."""
    from . import train
    from .source import count_params

    validate(alpha, temperature, epochs, patience, 0.15)
    use_labels = w.splits.train.labels is not None and w.metric.needs_labels
    t_train, t_val = w.reference_outputs("train"), w.reference_outputs("val")
    module = student.build(seed=seed) if student.function == "DigitsCNN" else student.build()
    fitted = train.fit(module, w.splits.train, w.splits.val, epochs=epochs, lr=lr, seed=seed, classifier=w.classifier,
                       teacher_train=t_train, teacher_val=t_val, use_labels=use_labels, alpha=alpha,
                       temperature=temperature, progress=progress, desc="distill", patience=patience)
    res = StudentResult(module, student.spec, student.kwargs, alpha, temperature, fitted.loss, fitted.epochs_run,
                        fitted.best_epoch, w.baseline(), w.evaluate_module(module),
                        params_teacher=count_params(w.model.module) if w.model.module is not None else None,
                        params_student=count_params(module))
    if compare and use_labels:
        base = student.build(seed=seed) if student.function == "DigitsCNN" else student.build()
        train.fit(base, w.splits.train, w.splits.val, epochs=epochs, lr=lr, seed=seed, classifier=w.classifier,
                  use_labels=True, progress=progress, desc="baseline (no teacher)", patience=patience)
        res.baseline_metric = w.evaluate_module(base)
    return res
