"""METRIC: how "accurate" is measured, always on the compiled backend artifact's outputs.

``top1``/``top5`` (labels), ``mse``/``mae`` (labels), ``agreement`` (no labels: the original model's
outputs are the target — top-1 agreement for a classifier, relative L2 error otherwise), or
``path/to/file.py:function`` with ``function(outputs, labels) -> float`` (outputs: the model's first
output as a numpy array; labels: the data's labels, or the original's outputs when there are none).
``drop`` is in the metric's own unit, signed so that a positive drop is always worse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import OptimizeError

BUILTIN = ("top1", "top5", "mse", "mae", "agreement")


def is_classifier(outputs: np.ndarray, labels: np.ndarray | None) -> bool:
    """(N, C≥2) outputs, and integer labels when there are labels."""
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return False
    return labels is None or np.issubdtype(np.asarray(labels).dtype, np.integer)


def _topk(k: int):
    def fn(out: np.ndarray, labels: np.ndarray) -> float:
        out = out.reshape(len(out), -1)
        top = np.argsort(-out, axis=1)[:, : min(k, out.shape[1])]
        return float((top == np.asarray(labels).reshape(-1, 1)).any(axis=1).mean())

    return fn


def _mse(out, labels) -> float:
    return float(np.mean((out.reshape(labels.shape) - labels) ** 2))


def _mae(out, labels) -> float:
    return float(np.mean(np.abs(out.reshape(labels.shape) - labels)))


def _relative_error(out, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out.reshape(ref.shape) - ref) / max(np.linalg.norm(ref), 1e-12))


def _agreement(out, ref) -> float:
    return float((out.reshape(len(out), -1).argmax(1) == np.asarray(ref).reshape(len(ref), -1).argmax(1)).mean())


@dataclass
class Metric:
    name: str
    higher_is_better: bool
    needs_labels: bool  # False: compared with the original model's outputs (agreement)
    fn: Callable[[np.ndarray, np.ndarray], float]
    unit: str = ""

    def __call__(self, outputs: np.ndarray, target: np.ndarray) -> float:
        try:
            value = self.fn(outputs, target)
        except Exception as err:
            raise OptimizeError(f"--metric {self.name} failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}") from None
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(float(value)):
            raise OptimizeError(f"--metric {self.name} returned {value!r}, not a finite number")
        return float(value)

    def drop(self, before: float, after: float) -> float:
        """How much worse ``after`` is, in the metric's unit (negative = better)."""
        return before - after if self.higher_is_better else after - before

    def describe(self) -> str:
        return f"{self.name} ({'higher' if self.higher_is_better else 'lower'} is better)"

    def as_dict(self) -> dict:
        return {"name": self.name, "higher_is_better": self.higher_is_better, "needs_labels": self.needs_labels}


def resolve_metric(name: str | None, *, labels: np.ndarray | None, sample_outputs: np.ndarray,
                   higher_is_better: bool | None = None) -> Metric:
    """The metric by name; the default is top1 for a labeled classifier, mse for labeled regression, else agreement."""
    classifier = is_classifier(sample_outputs, labels)
    if name is None:
        name = ("top1" if classifier else "mse") if labels is not None else "agreement"
    if name in ("top1", "top5", "mse", "mae") and labels is None:
        raise OptimizeError(f"--metric {name} needs labels in the data ('labels' array, class sub-folders, or "
                            "(inputs, labels) from a function); use --metric agreement for unlabeled data")
    if name in ("top1", "top5") and not classifier:
        raise OptimizeError(f"--metric {name} needs a classifier: (N, classes) outputs and integer labels; "
                            f"got outputs {list(sample_outputs.shape)}")
    if name == "top1":
        m = Metric("top1", True, True, _topk(1))
    elif name == "top5":
        m = Metric("top5", True, True, _topk(5))
    elif name == "mse":
        m = Metric("mse", False, True, _mse)
    elif name == "mae":
        m = Metric("mae", False, True, _mae)
    elif name == "agreement":
        m = (Metric("agreement", True, False, _agreement, "top-1 agreement with the original") if classifier
             else Metric("agreement", False, False, _relative_error, "relative L2 error vs the original"))
    else:
        from .source import is_factory_spec, load_python_function

        if not is_factory_spec(name):
            raise OptimizeError(f"--metric must be one of {', '.join(BUILTIN)} or path/to/file.py:function, got '{name}'")
        m = Metric(name, True if higher_is_better is None else higher_is_better, labels is not None,
                   load_python_function(name, "--metric"))
        return m
    if higher_is_better is not None and higher_is_better != m.higher_is_better:
        raise OptimizeError(f"--metric {m.name} is {'higher' if m.higher_is_better else 'lower'}-is-better; "
                            "--higher-is-better/--lower-is-better are for a file.py:function metric")
    return m
