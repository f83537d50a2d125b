"""MODEL + DATA + METRIC, resolved once per command.

:func:`build` turns the command line into a :class:`Workload`: the model (torch module when there is
one, servable ONNX/.pt2 sources — a factory's module exported here), the seeded split, the metric,
and the targets the metric compares with (labels, or the original's outputs from the one FP32
reference, ``backends.reference.Reference``). :meth:`Workload.evaluate` measures any runner — a
compiled backend artifact — on the held-out split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import data as dt
from .errors import OptimizeError
from .metric import Metric, resolve_metric
from .source import Model, export_module, load_model, module_outputs


@dataclass
class DataArgs:
    data: str | None = None
    calib: str | None = None
    train: str | None = None
    eval: str | None = None
    image: dt.ImageOptions = field(default_factory=dt.ImageOptions)
    seed: int = 0


@dataclass
class Workload:
    model: Model
    splits: dt.Splits
    metric: Metric
    inputs: list  # backends TensorInfo
    outputs: list
    workdir: Path
    _reference: Any = None
    _targets: dict = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def classifier(self) -> bool:
        from .metric import is_classifier

        return is_classifier(self.reference_outputs("eval"), self.splits.eval.labels)

    def reference(self):
        from backends.reference import Reference

        if self._reference is None:
            self._reference = Reference(self.model.sources)
        return self._reference

    def reference_outputs(self, part: str) -> np.ndarray:
        """The original's first output on a split part (the one FP32 reference)."""
        from service.verify import run_batched

        key = ("ref", part)
        if key not in self._targets:
            outs = run_batched(self.reference().infer, getattr(self.splits, part).inputs, 64)
            self._targets[key] = next(iter(outs.values()))
        return self._targets[key]

    def target(self, part: str = "eval") -> np.ndarray:
        """What the metric compares outputs with: the labels, or the original's outputs (agreement)."""
        if self.metric.needs_labels:
            labels = getattr(self.splits, part).labels
            if labels is None:
                raise OptimizeError(f"--metric {self.metric.name} needs labels for the {part} split")
            return labels
        return self.reference_outputs(part)

    def score_outputs(self, outputs: np.ndarray, part: str = "eval") -> float:
        return self.metric(outputs, self.target(part))

    def evaluate(self, runner, part: str = "eval") -> float:
        """The metric of a runner (``runner.infer``: a compiled backend artifact) on a split part."""
        from service.verify import run_batched

        outs = run_batched(runner.infer, getattr(self.splits, part).inputs, 32)
        return self.score_outputs(next(iter(outs.values())), part)

    def parity_error(self, runner) -> float:
        """Largest |compiled − original| over the calibration rows' first output (a lossy build's tolerance)."""
        from service.verify import run_batched

        got = next(iter(run_batched(runner.infer, self.splits.calib.inputs, 32).values()))
        return float(np.abs(got.astype(np.float64) - self.reference_outputs("calib")).max())

    def evaluate_module(self, module, part: str = "eval") -> float:
        return self.score_outputs(module_outputs(module, getattr(self.splits, part).inputs)[0], part)

    def baseline(self, part: str = "eval") -> float:
        return self.score_outputs(self.reference_outputs(part), part)

    def gate_labels(self) -> np.ndarray | None:
        """Labels for the server's top-1 accuracy gate: the data's for top1/top5, the original's argmax for
        agreement on a classifier; None when the server's gate cannot express the metric (regression)."""
        if not self.classifier or self.metric.name not in ("top1", "agreement"):
            return None  # the server's gate is top-1: other metrics keep a measured parity tolerance instead
        if self.splits.eval.labels is not None and self.metric.needs_labels:
            return self.splits.eval.labels
        return self.reference_outputs("eval").argmax(1).astype(np.int64)

    def record(self) -> dict:
        return {"model": self.model.arg, "factory_args": self.model.factory.kwargs if self.model.factory else None,
                "inputs": [vars(t) for t in self.inputs], "outputs": [vars(t) for t in self.outputs],
                "split": self.splits.record(), "metric": self.metric.as_dict()}


def _load_parts(args: DataArgs, names: list[str]) -> dt.Splits | None:
    load = functools.partial(dt.load_data, input_names=names, images=args.image)
    if args.data is not None:
        if args.calib or args.train or args.eval:
            raise OptimizeError("give --data (split here) or --calib/--train/--eval (given apart), not both")
        return dt.split(load(args.data), seed=args.seed)
    if args.eval is not None:
        return dt.given_apart(load(args.calib, what="--calib") if args.calib else None,
                              load(args.train, what="--train") if args.train else None, load(args.eval, what="--eval"),
                              seed=args.seed)
    return None  # the model's default data; --calib/--train alone replace those parts of it (_override)


def _override(splits: dt.Splits, args: DataArgs, names: list[str]) -> dt.Splits:
    for key in ("calib", "train"):
        spec = getattr(args, key)
        if spec is not None:
            part = dt.load_data(spec, names, args.image, what=f"--{key}")
            if key == "train":
                given = dt.given_apart(None, part, splits.eval, seed=args.seed)
                splits.train, splits.val = given.train, given.val
            else:
                splits.calib = part
            splits.how[key] = part.origin
    return splits


def _folder_parts(model: Model, names: list[str]) -> dt.Splits | None:
    """A model folder written by kiln optimize carries data/calib.npz and data/eval.npz."""
    if model.folder is None:
        return None
    cal, ev = model.folder / "data" / "calib.npz", model.folder / "data" / "eval.npz"
    if not ev.exists():
        return None
    calib = dt.load_npz(cal, names) if cal.exists() else None
    evaluation = dt.load_npz(ev, names)
    return dt.given_apart(calib, calib, evaluation)


def build(model_arg: str, *, weights: Path | None = None, model_args: list[str] | None = None, data: DataArgs | None = None,
          metric: str | None = None, higher_is_better: bool | None = None, workdir: Path) -> Workload:
    data = data or DataArgs()
    model = load_model(model_arg, weights=weights, model_args=model_args)
    names = [t.name for t in model.signature()[0]] if model.sources else []
    splits = _load_parts(data, names)
    if splits is None and model.bundled_digits:
        splits = dt.digits_splits()
    if splits is None:
        splits = _folder_parts(model, names)
    if splits is not None and data.data is None and data.eval is None:
        splits = _override(splits, data, names)
    if splits is None:
        raise OptimizeError(f"{model_arg}: give the data to measure on: --data FILE.npz | IMAGE_FOLDER | file.py:function "
                            "(or --calib/--train/--eval); the bundled digits are only the bundled model's default")
    if names:
        dt.rename(splits, names)
    if model.factory is not None:
        _check_module_runs(model, splits.train)
        model.sources = export_module(model.module, splits.train.head(8).inputs, workdir / "source",
                                      metadata={"kiln.built_by": f"kiln optimize ({model.arg})"})
    inputs, outputs = model.signature()
    for part in (splits.calib, splits.train, splits.val, splits.eval):
        dt.check_against(part, inputs)
    w = Workload(model, splits, None, inputs, outputs, workdir)  # type: ignore[arg-type]
    sample = w.reference_outputs("eval")
    w.metric = resolve_metric(metric, labels=splits.eval.labels, sample_outputs=sample, higher_is_better=higher_is_better)
    w.baseline()  # fail now, not after an hour of training, when the metric returns no number
    return w


def _check_module_runs(model: Model, part: dt.Data) -> None:
    try:
        module_outputs(model.module, part.head(2).inputs)
    except Exception as err:
        shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in part.inputs.items())
        raise OptimizeError(f"the data ({shapes}) does not fit {model.arg}: {type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}") from None
