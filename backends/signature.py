"""The signature (inputs, outputs) of a model source, read one way for the server and the toolkit."""

from __future__ import annotations

from pathlib import Path

from .base import TensorInfo
from .datatypes import ONNX_TO_V2, v2_datatype


def _onnx_dims(tensor_type) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim)


def onnx_signature(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    import onnx

    # Structure only: do not pull large weights into memory.
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def info(values) -> list[TensorInfo]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            tt = v.type.tensor_type
            out.append(TensorInfo(v.name, ONNX_TO_V2.get(tt.elem_type, "BYTES"), _onnx_dims(tt)))
        return out

    return info(model.graph.input), info(model.graph.output)


def pt2_signature(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    import torch

    ep = torch.export.load(str(path))
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}

    def info(name: str, val) -> TensorInfo:
        dims = tuple(int(d) if isinstance(d, int) else -1 for d in val.shape)
        return TensorInfo(name, v2_datatype(torch.empty((), dtype=val.dtype).numpy().dtype), dims)

    inputs = [
        info(spec.arg.name, placeholders[spec.arg.name].meta["val"])
        for spec in ep.graph_signature.input_specs
        if spec.kind.name == "USER_INPUT"
    ]
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outputs = [info(f"output_{i}", node.meta["val"]) for i, node in enumerate(out_node.args[0])]
    return inputs, outputs


def read_signature(sources: dict[str, Path]) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """ONNX is the interchange format: read it when present, else the torch.export program."""
    if "onnx" in sources:
        return onnx_signature(sources["onnx"])
    if "pt2" in sources:
        return pt2_signature(sources["pt2"])
    raise FileNotFoundError("no model source (model.onnx or model.pt2)")
