"""One training loop for every technique: fine-tuning after pruning, search candidates, distillation.

The loss follows from what the data has:
- integer labels and (N, classes) outputs: cross-entropy;
- float labels: MSE;
- no labels: the original model is the teacher (KL at temperature T on a classifier, MSE otherwise).
With a teacher *and* labels (distillation) it is the seed's ``alpha·CE + (1−alpha)·KL(t/T ‖ s/T)·T²``
(``alpha·MSE(labels) + (1−alpha)·MSE(teacher)`` for regression). Adam, seeded shuffling, the weights
of the best validation loss restored at the end. A tqdm bar per run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from .data import Data


@dataclass
class FitResult:
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    loss: str
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _kl(student, teacher, temperature: float):
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature**2


def make_loss(*, labels: np.ndarray | None, classifier: bool, teacher: bool, alpha: float = 0.7, temperature: float = 4.0):
    """(loss(out, y, t), description). ``y``: labels or None; ``t``: teacher outputs or None."""
    import torch.nn.functional as F

    if labels is None and not teacher:
        raise ValueError("training needs labels or a teacher")
    if labels is None:
        if classifier:
            return (lambda out, y, t: _kl(out, t, temperature)), f"KL to the teacher at T={temperature}"
        return (lambda out, y, t: F.mse_loss(out, t)), "MSE to the teacher's outputs"
    if classifier:
        if not teacher:
            return (lambda out, y, t: F.cross_entropy(out, y)), "cross-entropy"
        from .distill import kd_loss

        kd = kd_loss(alpha, temperature)
        return (lambda out, y, t: kd(out, t, y)), f"{alpha}·CE + {1 - alpha:g}·KL·T² (T={temperature})"
    if not teacher:
        return (lambda out, y, t: F.mse_loss(out.reshape(y.shape), y)), "MSE"
    return (lambda out, y, t: alpha * F.mse_loss(out.reshape(y.shape), y) + (1 - alpha) * F.mse_loss(out, t),
            f"{alpha}·MSE(labels) + {1 - alpha:g}·MSE(teacher)")


def fit(module, train: Data, val: Data, *, epochs: int, lr: float = 1e-3, seed: int = 0, classifier: bool,
        teacher_train: np.ndarray | None = None, teacher_val: np.ndarray | None = None, use_labels: bool = True,
        alpha: float = 0.7, temperature: float = 4.0, batch_size: int = 64, progress: bool = True,
        desc: str = "fine-tune", patience: int | None = None) -> FitResult:
    """Train ``module`` in place (see the module docstring); returns what happened."""
    import torch

    labels_tr = train.labels if use_labels else None
    labels_va = val.labels if use_labels else None
    loss_fn, loss_name = make_loss(labels=labels_tr, classifier=classifier, teacher=teacher_train is not None,
                                   alpha=alpha, temperature=temperature)

    def tensors(d: Data, labels, teacher):
        xs = [torch.from_numpy(v) for v in d.inputs.values()]
        y = None if labels is None else torch.from_numpy(np.asarray(labels, np.int64 if classifier else np.float32))
        t = None if teacher is None else torch.from_numpy(np.asarray(teacher, np.float32))
        return xs, y, t

    xs, y, t = tensors(train, labels_tr, teacher_train)
    vxs, vy, vt = tensors(val, labels_va, teacher_val)
    if teacher_train is not None and teacher_val is None:
        vt = None
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and friends
    threads = torch.get_num_threads()
    # One intra-op thread, as digits.train: small CI-sized steps lose more to thread hand-offs than they gain,
    # and on a shared machine a second spinning thread only steals time.
    torch.set_num_threads(1)
    n = len(train)
    best = {"loss": float("inf"), "epoch": -1, "state": copy.deepcopy(module.state_dict())}
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc=desc, unit="epoch", leave=False)

    def val_loss() -> float:
        module.eval()
        with torch.no_grad():
            out = module(*vxs)
            if vt is None and vy is None:
                return float("nan")
            return float(loss_fn(out, vy, vt if vt is not None else (out if teacher_train is not None else None)))

    try:
        for epoch in range(epochs):
            module.train()
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                if len(idx) < 2 and n > 1:  # BatchNorm needs two rows
                    continue
                out = module(*(x[idx] for x in xs))
                loss = loss_fn(out, None if y is None else y[idx], None if t is None else t[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss) * len(idx)
            vl = val_loss()
            history.append({"epoch": epoch, "loss": round(total / n, 6), "val_loss": round(vl, 6)})
            if not np.isnan(vl) and vl < best["loss"]:
                best.update(loss=vl, epoch=epoch, state=copy.deepcopy(module.state_dict()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / n:.4f}", val=f"{vl:.4f}")
            if patience and best["epoch"] >= 0 and epoch - best["epoch"] >= patience:
                break
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    if best["epoch"] >= 0:
        module.load_state_dict(best["state"])
    module.eval()
    return FitResult(len(history), best["epoch"], best["loss"], loss_name, history)


def finetune(module, w, *, epochs: int, lr: float = 1e-3, seed: int = 0, progress: bool = True, desc: str = "fine-tune"):
    """Fine-tune a derived module (pruned, searched) on the workload: labels when the metric uses them, else the
    original as teacher."""
    if epochs <= 0:
        return None
    use_labels = w.metric.needs_labels and w.splits.train.labels is not None
    teacher_tr = None if use_labels else w.reference_outputs("train")
    teacher_va = None if use_labels else w.reference_outputs("val")
    return fit(module, w.splits.train, w.splits.val, epochs=epochs, lr=lr, seed=seed, classifier=w.classifier,
               teacher_train=teacher_tr, teacher_val=teacher_va, use_labels=use_labels, progress=progress, desc=desc)
