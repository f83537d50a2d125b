"""``kiln optimize prune``: L1 unstructured magnitude pruning and dependency-aware channel pruning, on any module.

- ``l1-unstructured``: ``torch.nn.utils.prune.l1_unstructured`` on every Conv/Linear weight (the
  output layer included) with the given ``amount``; fine-tuning keeps the masks (the pruning
  re-parametrisation multiplies ``weight_orig`` by ``weight_mask`` in every forward), then
  ``prune.remove`` makes it permanent. The tensors stay dense: the model has zeros, not fewer
  parameters, and dense kernels do not run faster.
- ``channel``: torch-pruning's ``MetaPruner`` on a ``DependencyGraph`` with L1-norm (magnitude)
  importance removes whole output channels/features (``amount`` of them in every prunable layer) and
  the matching inputs of whatever consumes them (flatten → linear, residual adds and concats stay
  consistent because DepGraph groups coupled layers; depthwise convs keep groups = channels;
  ``nn.MultiheadAttention`` keeps its embedding a multiple of the head count). The output layer(s) —
  found by a traced forward — and ``--ignore`` layers are never pruned. The result is the same module,
  smaller and dense, exported as it is.

Fine-tuning is ``optimize.train.finetune`` on the training split (the held-out split is only measured).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from .errors import OptimizeError

METHODS = ("l1-unstructured", "channel")


def validate(method: str, amount: float, finetune_epochs: int, round_to: int | None = None) -> None:
    if round_to is not None and not 1 <= round_to <= 256:
        raise OptimizeError(f"--round-to must be between 1 and 256, got {round_to}")
    if method not in METHODS:
        raise OptimizeError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    if not (0.0 < amount < 1.0):
        raise OptimizeError(f"--amount must be in (0, 1) (the fraction of weights or channels to remove), got {amount}")
    if finetune_epochs < 0 or finetune_epochs > 1000:
        raise OptimizeError(f"--finetune-epochs must be between 0 and 1000, got {finetune_epochs}")


def weight_sparsity(model) -> tuple[float, int, int]:
    """(zero fraction, nonzero, total) over the Conv2d/Linear weight tensors."""
    total = zeros = 0
    for _, m in prunable_layers(model):
        w = m.weight.detach()
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / max(total, 1), total - zeros, total


def count_nonzero(model) -> int:
    return sum(int((p.detach() != 0).sum()) for p in model.parameters())


def expected_sparsity(model, amount: float) -> float:
    """The zero fraction ``l1_unstructured(amount)`` gives per tensor (round(amount * numel) zeros each)."""
    total = pruned = 0
    for _, m in prunable_layers(model):
        n = m.weight.numel()
        total += n
        pruned += int(round(amount * n))
    return pruned / max(total, 1)




# --------------------------------------------------------------------------- any torch module


def prunable_layers(module):
    """Every Conv (1-3d) and Linear layer, by qualified name, but the output projection inside
    ``nn.MultiheadAttention`` (the attention reads its weight directly, never through its forward, so a
    pruning mask on it would not be applied)."""
    from torch import nn

    inside_mha = {id(m.out_proj) for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and id(m) not in inside_mha]


def output_layers(module, example: tuple) -> list[str]:
    """The Conv/Linear layers whose outputs are the model's outputs (they keep their width).

    Found by running ``example`` with forward hooks: a layer whose output tensor is (one of) the
    module's returned tensors, else the last Conv/Linear that ran."""
    import torch

    order: list[tuple[str, object]] = []  # (name, output tensor): the tensors are kept, so identity is safe
    hooks = []
    for name, m in prunable_layers(module):
        hooks.append(m.register_forward_hook(lambda mod, inp, out, name=name: order.append((name, out))))
    try:
        with torch.no_grad():
            out = module(*example)
    finally:
        for h in hooks:
            h.remove()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    direct = [n for n, t in order if any(t is o for o in outs)]
    return direct or ([order[-1][0]] if order else [])


def channel_prune_any(module, example: tuple, amount: float, *, ignore: list[str] | None = None,
                      round_to: int | None = None):
    """torch-pruning DepGraph channel pruning of any module, in place; returns (module, what was kept whole).

    The output layer(s) and ``ignore`` (qualified module names) keep their output width. Multi-head
    attention keeps its embedding divisible by the head count (``num_heads`` given to the pruner and the
    channel step rounded to it), so heads stay consistent; residual adds, concats and depthwise convs are
    kept consistent by DepGraph's coupled groups."""
    import math

    import torch_pruning as tp
    from torch import nn

    names = dict(module.named_modules())
    keep = output_layers(module, example)
    for n in ignore or []:
        if n not in names:
            raise OptimizeError(f"--ignore {n}: no such layer (layers: {', '.join(list(names)[1:12])}, ...)")
    keep_all = list(dict.fromkeys(keep + list(ignore or [])))
    mha = {m: m.num_heads for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
    if mha:
        step = math.lcm(*mha.values())
        round_to = step if round_to is None else math.lcm(round_to, step)
    pruner = tp.pruner.MetaPruner(
        module, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=amount,
        ignored_layers=[names[n] for n in keep_all], round_to=round_to, num_heads=mha,
    )
    pruner.step()
    return module, keep_all


@dataclass
class PruneResult:
    module: Any
    method: str
    amount: float
    params_before: int
    params_after: int
    sparsity: float
    metric_before: float  # the original (FP32 reference) on the held-out split
    metric_pruned: float  # the torch module right after pruning
    metric_after: float  # the torch module after fine-tuning
    finetune: dict | None
    kept_whole: list[str]

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "module"}


def prune_workload(w, method: str, amount: float, *, finetune_epochs: int, lr: float = 1e-3, seed: int = 0,
                   ignore: list[str] | None = None, round_to: int | None = None, progress: bool = True) -> PruneResult:
    """Prune a copy of the workload's torch module, fine-tune it on the training split (train.finetune)."""
    from . import train
    from .source import count_params, example_inputs

    validate(method, amount, finetune_epochs, round_to)
    module = copy.deepcopy(w.model.need_module(f"{method} pruning")).eval()
    params_before = count_params(module)
    kept: list[str] = []
    if method == "l1-unstructured":
        from torch.nn.utils import prune as tprune

        for _, m in prunable_layers(module):
            tprune.l1_unstructured(m, name="weight", amount=amount)
    else:
        try:
            module, kept = channel_prune_any(module, example_inputs(w.splits.train.head(2).inputs), amount, ignore=ignore,
                                             round_to=round_to)
        except OptimizeError:
            raise
        except Exception as err:
            from .errors import StepFailed

            raise StepFailed(f"channel pruning failed on this model: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    metric_pruned = w.evaluate_module(module)
    ft = train.finetune(module, w, epochs=finetune_epochs, lr=lr, seed=seed, progress=progress, desc=f"fine-tune ({method})")
    if method == "l1-unstructured":
        from torch.nn.utils import prune as tprune

        for _, m in prunable_layers(module):
            if tprune.is_pruned(m):
                tprune.remove(m, "weight")
    module.eval()
    return PruneResult(module, method, amount, params_before, count_params(module), weight_sparsity(module)[0],
                              w.baseline(), metric_pruned, w.evaluate_module(module), ft.as_dict() if ft else None, kept)
