"""MODEL for every ``kiln optimize`` command: a model folder, ``model.onnx``, ``model.pt2``, or
``path/to/file.py:factory`` (a function returning a ``torch.nn.Module``; ``--weights`` a state dict,
``--model-arg key=value`` its keyword arguments).

A :class:`Model` is what the techniques need: the torch module when there is one (a factory's, a
``.pt2``'s program, or the bundled DigitsCNN rebuilt from its weights), the servable sources
(``onnx``/``pt2`` paths; a factory's module is exported by :func:`export_module`), and the signature
read by ``backends.signature`` — the one reader the server uses too.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OptimizeError


@dataclass
class Factory:
    """How to build the module again (search and distillation build new ones from it)."""

    file: Path
    function: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"{self.file}:{self.function}"

    def build(self, **overrides):
        return call_factory(self, {**self.kwargs, **overrides})


@dataclass
class Model:
    arg: str
    name: str
    module: Any = None  # torch.nn.Module, or None for an ONNX-only source
    sources: dict[str, Path] = field(default_factory=dict)  # "onnx"/"pt2" -> path
    factory: Factory | None = None
    folder: Path | None = None  # a model folder given as MODEL (its data/ is the default data)
    bundled_digits: bool = False  # the bundled DigitsCNN family: digits are its default data

    def signature(self):
        from backends.signature import read_signature

        return read_signature(self.sources)

    def need_module(self, what: str):
        if self.module is None:
            raise OptimizeError(f"{what} needs the torch model; {self.arg} is ONNX-only: give it as path/to/file.py:factory "
                                "(--weights state_dict.pt, --model-arg key=value) or as a model.pt2")
        return self.module


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values read as YAML scalars/lists (``3``, ``0.5``, ``true``, ``[1, 2]``, ``relu``)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise OptimizeError(f"--model-arg must be key=value with a Python identifier as key, got '{item}'")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def is_factory_spec(arg: str) -> bool:
    path, sep, fn = str(arg).rpartition(":")
    return bool(sep) and path.endswith(".py") and fn.isidentifier()


def load_python_function(spec: str, what: str):
    """``path/to/file.py:function`` -> the function (the file is imported under a private module name)."""
    path_s, _, fn = spec.rpartition(":")
    path = Path(path_s)
    if not path.is_file():
        raise OptimizeError(f"{what} {spec}: {path} not found")
    mod_name = f"kiln_user_{abs(hash(str(path.resolve())))}"
    if mod_name in sys.modules:
        module = sys.modules[mod_name]
    else:
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:
            raise OptimizeError(f"{what} {spec}: importing {path} failed: {type(err).__name__}: {_first_line(err)}") from None
        sys.modules[mod_name] = module
    func = getattr(module, fn, None)
    if not callable(func):
        raise OptimizeError(f"{what} {spec}: {path} has no function '{fn}'")
    return func


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def call_factory(factory: Factory, kwargs: dict[str, Any]):
    from torch import nn

    func = load_python_function(factory.spec, "factory")
    try:
        module = func(**kwargs)
    except Exception as err:
        raise OptimizeError(f"factory {factory.spec}({_kwargs_text(kwargs)}) raised {type(err).__name__}: {_first_line(err)}") from None
    if not isinstance(module, nn.Module):
        raise OptimizeError(f"factory {factory.spec} returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def load_weights(module, weights: Path) -> None:
    import torch

    if not Path(weights).is_file():
        raise OptimizeError(f"--weights {weights}: file not found")
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as err:
        raise OptimizeError(f"--weights {weights}: not a readable torch state dict ({type(err).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise OptimizeError(f"--weights {weights}: expected a state dict, got {type(state).__name__}")
    try:
        module.load_state_dict(state, strict=True)
    except Exception as err:
        raise OptimizeError(f"--weights {weights} do not fit the model: {_first_line(err)}") from None


def load_model(arg: str, *, weights: Path | None = None, model_args: list[str] | None = None) -> Model:
    """Resolve MODEL. A factory's module is not exported yet (that needs example inputs: :func:`export_module`)."""
    from . import modelio

    if is_factory_spec(arg):
        path_s, _, fn = str(arg).rpartition(":")
        factory = Factory(Path(path_s), fn, parse_model_args(model_args))
        module = factory.build()
        if weights is not None:
            load_weights(module, weights)
        return Model(arg=str(arg), name=fn.replace("_", "-"), module=module, factory=factory)
    if model_args:
        raise OptimizeError("--model-arg is for a path/to/file.py:factory MODEL")
    src = modelio.resolve(arg)
    sources = {k: v for k, v in (("onnx", src.onnx), ("pt2", src.pt2)) if v is not None}
    model = Model(arg=str(arg), name=src.name, sources=sources, folder=src.folder)
    model.bundled_digits, model.module = _torch_module(src)
    if weights is not None:
        load_weights(model.need_module("--weights"), weights)
    return model


def _torch_module(src) -> tuple[bool, Any]:
    """(is a DigitsCNN, module): the DigitsCNN rebuilt from the weights, else a .pt2's program, else None."""
    from . import modelio

    try:
        return True, modelio.load_module(src)
    except OptimizeError:
        pass
    if src.pt2 is not None:
        return False, modelio.load_exported(src.pt2).module()
    return False, None


def example_inputs(inputs: dict[str, np.ndarray], rows: int = 2) -> tuple:
    """A tuple of torch tensors (rows ≥ 2: torch.export needs a batch ≥ 2 for a dynamic batch dim)."""
    import torch

    from backends.timing import batch_of

    return tuple(torch.from_numpy(v) for v in batch_of(inputs, max(rows, 2)).values())


def module_outputs(module, inputs: dict[str, np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """Run a torch module on every row of ``inputs`` (positional args in input order), batched, no grad."""
    import torch

    n = len(next(iter(inputs.values())))
    outs: list[list[np.ndarray]] = []
    module.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            args = [torch.from_numpy(np.ascontiguousarray(v[i : i + batch])) for v in inputs.values()]
            res = module(*args)
            res = res if isinstance(res, (tuple, list)) else (res,)
            outs.append([r.detach().float().numpy() if r.is_floating_point() else r.numpy() for r in res])
    return [np.concatenate(parts) for parts in zip(*outs)]


def export_module(module, inputs: dict[str, np.ndarray], folder: Path, *, output_names: list[str] | None = None,
                  metadata: dict[str, str] | None = None) -> dict[str, Path]:
    """Export to ``folder/model.onnx`` and ``folder/model.pt2`` with a dynamic batch dimension.

    Input names are the data's array names; outputs are ``output`` (one) or ``output_<i>``.
    Exports a copy so tracing cannot touch the caller's module (pruning re-parametrisations, BN stats)."""
    import onnx
    import torch

    from .build_default_model import ONNX_OPSET, _quiet

    folder.mkdir(parents=True, exist_ok=True)
    module = copy.deepcopy(module).eval()
    example = example_inputs(inputs)
    n_out = len(module_outputs(module, {k: v[:2] for k, v in inputs.items()}))
    names = output_names or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = tuple({0: batch} for _ in example)
    onnx_path, pt2_path = folder / "model.onnx", folder / "model.pt2"
    try:
        with _quiet():
            ep = torch.export.export(module, example, dynamic_shapes=dynamic)
            torch.export.save(ep, str(pt2_path))
    except Exception as err:
        raise OptimizeError(f"torch.export of the model failed: {type(err).__name__}: {_first_line(err)}") from None
    try:
        with _quiet():
            program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=dynamic, input_names=list(inputs),
                                        output_names=names, opset_version=ONNX_OPSET, external_data=False, optimize=True,
                                        verify=False)
        proto = program.model_proto
    except Exception as err:
        raise OptimizeError(f"ONNX export of the model failed: {type(err).__name__}: {_first_line(err)}") from None
    del proto.metadata_props[:]
    if metadata:
        onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(onnx_path))
    return {"onnx": onnx_path, "pt2": pt2_path}


def count_params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
