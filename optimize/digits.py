"""The digits task: data splits, a small CNN family, and deterministic train/evaluate helpers.

Kiln's default model (``model_repo/digits-cnn``) is built from this module by
``python -m optimize.build_default_model``; pruning, distillation and architecture
search reuse the same pieces.

Data: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images, 10 classes; no
download). Preprocessing is ``pixels / 16`` -> float32 in [0, 1], layout (N, 1, 8, 8).

Part of the ``torch`` extra: torch and scikit-learn are imported here, never by the
serving core.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "NUM_CLASSES",
    "INPUT_SHAPE",
    "DigitsSplits",
    "load_splits",
    "DigitsCNN",
    "train",
    "evaluate",
    "predict_logits",
    "count_params",
]

NUM_CLASSES = 10
INPUT_SHAPE = (1, 8, 8)  # per sample (C, H, W)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EpochCallback = Callable[[int, nn.Module, dict[str, float]], Any]
ArrayLike = np.ndarray | torch.Tensor


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DigitsSplits:
    """Deterministic splits of the digits data. Images float32 (N,1,8,8) in [0,1]; labels int64 (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray  # a stratified subset of the training set (calibration / golden inputs)
    y_calib: np.ndarray
    x_eval: np.ndarray  # held out: never used for training
    y_eval: np.ndarray

    def summary(self) -> str:
        return f"train={len(self.y_train)} calib={len(self.y_calib)} (from train) eval={len(self.y_eval)} (held out)"


def load_splits(seed: int = 0, eval_fraction: float = 0.2, calib_size: int = 128) -> DigitsSplits:
    """Load scikit-learn's bundled digits and split them deterministically.

    eval: a stratified ``eval_fraction`` held out; train: the rest; calib: ``calib_size``
    samples drawn (stratified) from train. The same ``seed`` always gives the same arrays.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / np.float32(16.0)).reshape(-1, *INPUT_SHAPE)
    y = data.target.astype(np.int64)
    idx = np.arange(len(y))
    idx_train, idx_eval = train_test_split(idx, test_size=eval_fraction, stratify=y, random_state=seed)
    idx_calib, _ = train_test_split(idx_train, train_size=calib_size, stratify=y[idx_train], random_state=seed)
    # Keep a stable, sorted order inside each split (independent of sklearn's shuffling order).
    idx_train, idx_eval, idx_calib = np.sort(idx_train), np.sort(idx_eval), np.sort(idx_calib)

    def take(i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(x[i]), np.ascontiguousarray(y[i])

    x_train, y_train = take(idx_train)
    x_calib, y_calib = take(idx_calib)
    x_eval, y_eval = take(idx_eval)
    return DigitsSplits(x_train, y_train, x_calib, y_calib, x_eval, y_eval)


# --------------------------------------------------------------------------- model


def _default_pools(n_blocks: int) -> tuple[int, ...]:
    """Blocks followed by a 2x2 max-pool: two pools (8x8 -> 2x2), after the middle and the last block."""
    if n_blocks <= 0:
        return ()
    if n_blocks == 1:
        return (0,)
    return tuple(sorted({math.ceil(n_blocks / 2) - 1, n_blocks - 1}))


class DigitsCNN(nn.Module):
    """A small CNN family for (N, 1, 8, 8) images -> (N, 10) logits.

    ``widths``: output channels of each conv block (conv3x3, padding 1, bias, ReLU; no batch norm).
    ``pool_after``: indices of blocks followed by a 2x2 max-pool (default: two pools, 8x8 -> 2x2).
    ``hidden``: width of the hidden linear layer (ReLU); 0 or None -> linear classifier only.
    ``seed``: when given, parameters are initialised from this seed without touching the global RNG.

    Layers live in two ``nn.Sequential`` (``features``, ``classifier``) so pruning tools can walk
    them; ``config`` holds the constructor arguments so a variant can be rebuilt (``DigitsCNN(**m.config)``).
    Exports cleanly with ``torch.export`` (dynamic batch) and ``torch.onnx``.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32),
        hidden: int | None = 64,
        *,
        pool_after: Sequence[int] | None = None,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if any(w <= 0 for w in widths):
            raise ValueError(f"widths must be positive, got {widths}")
        pools = tuple(sorted(set(_default_pools(len(widths)) if pool_after is None else (int(i) for i in pool_after))))
        if any(i < 0 or i >= len(widths) for i in pools):
            raise ValueError(f"pool_after indices {pools} out of range for {len(widths)} blocks")
        side = image_size
        for _ in pools:
            if side < 2:
                raise ValueError(f"too many pools for a {image_size}x{image_size} input: {pools}")
            side //= 2
        self.config: dict[str, Any] = {
            "widths": widths,
            "hidden": int(hidden or 0),
            "pool_after": pools,
            "in_channels": in_channels,
            "image_size": image_size,
            "num_classes": num_classes,
            "dropout": float(dropout),
        }

        def build() -> None:
            layers: list[nn.Module] = []
            c = in_channels
            for i, w in enumerate(widths):
                layers += [nn.Conv2d(c, w, kernel_size=3, padding=1), nn.ReLU()]
                if i in pools:
                    layers.append(nn.MaxPool2d(2))
                c = w
            self.features = nn.Sequential(*layers)
            flat = c * side * side if widths else in_channels * image_size * image_size
            head: list[nn.Module] = [nn.Flatten()]
            if hidden:
                head += [nn.Linear(flat, int(hidden)), nn.ReLU()]
                if dropout:
                    head.append(nn.Dropout(dropout))
                head.append(nn.Linear(int(hidden), num_classes))
            else:
                if dropout:
                    head.append(nn.Dropout(dropout))
                head.append(nn.Linear(flat, num_classes))
            self.classifier = nn.Sequential(*head)

        if seed is None:
            build()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def extra_repr(self) -> str:
        c = self.config
        return f"widths={c['widths']}, hidden={c['hidden']}, pool_after={c['pool_after']}"


def count_params(model: nn.Module) -> int:
    """Number of parameters (all, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- train / evaluate


def _as_tensor(a: ArrayLike, dtype: torch.dtype) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(dtype)


def _train_data(splits: DigitsSplits | tuple[ArrayLike, ArrayLike]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(splits, DigitsSplits):
        x, y = splits.x_train, splits.y_train
    else:
        x, y = splits
    return _as_tensor(x, torch.float32), _as_tensor(y, torch.int64)


def train(
    model: nn.Module,
    splits: DigitsSplits | tuple[ArrayLike, ArrayLike],
    epochs: int = 30,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    *,
    loss_fn: LossFn | None = None,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    callback: EpochCallback | None = None,
    eval_data: tuple[ArrayLike, ArrayLike] | None = None,
    num_threads: int = 1,
) -> nn.Module:
    """Train ``model`` in place with Adam and mini-batches; deterministic for a given ``seed``; returns ``model``.

    ``splits``: a :class:`DigitsSplits` (its train part is used) or an ``(x, y)`` pair.
    ``loss_fn(logits, x, y) -> scalar``: replaces cross-entropy, e.g. for distillation
    (``x`` is the input batch, so a teacher can be run on it inside the hook).
    ``optimizer``: replaces the default ``Adam(lr, weight_decay)`` (e.g. to train only some parameters).
    ``callback(epoch, model, logs)``: called after every epoch (logs: ``loss``, ``train_top1`` and, with
    ``eval_data``, ``eval_top1``), e.g. to re-apply pruning masks; returning ``False`` stops training.
    ``eval_data``: an ``(x, y)`` pair only reported in the progress bar / logs (never used to select anything).
    Runs with ``num_threads`` intra-op threads and deterministic algorithms; both settings are restored afterwards.
    """
    from tqdm.auto import tqdm

    x, y = _train_data(splits)
    n = len(y)
    if n == 0:
        raise ValueError("empty training set")
    loss_fn = loss_fn or (lambda logits, _x, target: nn.functional.cross_entropy(logits, target))

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.set_num_threads(num_threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(seed)  # dropout etc.
        gen = torch.Generator().manual_seed(seed)  # batch order
        opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            model.train()
            perm = torch.randperm(n, generator=gen)
            total_loss, correct = 0.0, 0
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                xb, yb = x[idx], y[idx]
                opt.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = loss_fn(logits, xb, yb)
                loss.backward()
                opt.step()
                total_loss += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == yb).sum())
            logs = {"loss": total_loss / n, "train_top1": correct / n}
            if eval_data is not None:
                logs["eval_top1"] = evaluate(model, *eval_data)
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
            if callback is not None and callback(epoch, model, logs) is False:
                break
        bar.close()
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_det_warn)
    model.eval()
    return model


@torch.no_grad()
def predict_logits(model: nn.Module, x: ArrayLike, batch_size: int = 512) -> np.ndarray:
    """Logits of ``model`` on ``x`` ((N,1,8,8) float32) in eval mode, as a float32 numpy array (N, 10)."""
    was_training = model.training
    model.eval()
    try:
        xt = _as_tensor(x, torch.float32)
        outs = [model(xt[i : i + batch_size]) for i in range(0, len(xt), batch_size)]
        return torch.cat(outs).numpy().astype(np.float32, copy=False) if outs else np.zeros((0, NUM_CLASSES), np.float32)
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, x: ArrayLike, y: ArrayLike, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` as a float in [0, 1]."""
    y_np = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if len(y_np) == 0:
        raise ValueError("empty evaluation set")
    pred = predict_logits(model, x, batch_size).argmax(axis=1)
    return float((pred == y_np).mean())
