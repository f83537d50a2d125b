"""The signature (inputs, outputs) of a model source, read one way for the server and the toolkit."""

from __future__ import annotations

from dataclasses import dataclass, field
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


# -- existing artifacts (a version folder may hold a built model instead of, or beside, a source) ----

def openvino_ir_signature(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    import numpy as np
    import openvino as ov

    model = ov.Core().read_model(str(path))

    def info(ports) -> list[TensorInfo]:
        out = []
        for i, port in enumerate(ports):
            names = port.get_names()
            name = port.get_any_name() if names else f"output_{i}"
            dims = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
            out.append(TensorInfo(name, v2_datatype(np.dtype(port.get_element_type().to_dtype())), dims))
        return out

    return info(model.inputs), info(model.outputs)


def tflite_signature(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))

    def info(details) -> list[TensorInfo]:
        out = []
        for d in sorted(details, key=lambda d: d["index"]):
            sig = d.get("shape_signature")
            shape = sig if sig is not None and len(sig) == len(d["shape"]) else d["shape"]
            out.append(TensorInfo(d["name"], v2_datatype(np.dtype(d["dtype"])), tuple(int(x) for x in shape)))
        return out

    return info(it.get_input_details()), info(it.get_output_details())


def mlpackage_signature(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    kinds = {65568: "FP32", 65600: "FP64", 65552: "FP16", 131104: "INT32"}

    def info(features) -> list[TensorInfo]:
        out = []
        for f in features:
            arr = f.type.multiArrayType
            ranges = [(int(r.lowerBound), int(r.upperBound)) for r in arr.shapeRange.sizeRanges]
            dims = tuple(-1 if ranges and ranges[i][0] != ranges[i][1] else int(d) for i, d in enumerate(arr.shape))
            out.append(TensorInfo(f.name, kinds.get(int(arr.dataType), "FP32"), dims))
        return out

    return info(spec.description.input), info(spec.description.output)


def plan_signature(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    from .trt import engine_signature

    return engine_signature(path)


ARTIFACT_READERS = {
    "openvino_ir": openvino_ir_signature,
    "tflite": tflite_signature,
    "mlpackage": mlpackage_signature,
    "plan": plan_signature,
}


def read_signature(sources: dict[str, Path]) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """ONNX is the interchange format: read it when present, else the torch.export program, else the
    built artifact the folder holds (OpenVINO IR, .tflite, Core ML package, TensorRT plan)."""
    if "onnx" in sources:
        return onnx_signature(sources["onnx"])
    if "pt2" in sources:
        return pt2_signature(sources["pt2"])
    for fmt, reader in ARTIFACT_READERS.items():
        if fmt in sources:
            return reader(sources[fmt])
    raise FileNotFoundError("no model source (model.onnx or model.pt2) or artifact "
                            "(model.xml + model.bin, model.tflite, model.plan, model.mlpackage)")


# -- what a source says about its inputs, beyond the signature ---------------------------------------
# The parity gate needs inputs the model can actually run: the symbolic names of variable dims
# ("batch", "height", "sequence"), the model's metadata (an image size), and the ids an embedding
# accepts. Read once here, for the server's gate and the toolkit alike.

@dataclass(frozen=True)
class SourceFacts:
    # Per input: one entry per dim, the symbolic name of a variable dim ("batch") or None.
    dim_names: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    # The model's metadata_props (ONNX) as strings.
    metadata: dict[str, str] = field(default_factory=dict)
    # Per integer input: ids must be below this (the rows of an embedding table it indexes).
    upper_bounds: dict[str, int] = field(default_factory=dict)
    # Every op type in the graph, subgraphs included, as "domain.Op" for non-default domains.
    op_types: frozenset[str] = frozenset()


# Ops an integer input may pass through unchanged on its way to a Gather's indices.
_INDEX_PASSTHROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}


def _graph_nodes(graph):
    """Every node of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graph_nodes(g)


def onnx_op_type(node) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _index_bounds(graph, inputs: list[str]) -> dict[str, int]:
    """For each integer input that reaches a Gather's indices (through casts/reshapes), the size of
    the gathered initializer along the Gather axis: ids must stay below it."""
    sizes = {init.name: tuple(init.dims) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    bounds: dict[str, int] = {}
    for inp in inputs:
        frontier, seen = [inp], set()
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in consumers.get(name, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name \
                        and node.input[0] in sizes:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    dims = sizes[node.input[0]]
                    if dims:
                        size = int(dims[axis % len(dims)])
                        bounds[inp] = min(size, bounds.get(inp, size))
                elif node.op_type in _INDEX_PASSTHROUGH and node.input and node.input[0] == name:
                    frontier.extend(node.output)
    return bounds


def onnx_facts(path: Path) -> SourceFacts:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    dim_names: dict[str, tuple[str | None, ...]] = {}
    int_inputs = []
    for v in graph.input:
        if v.name in initializers:
            continue
        tt = v.type.tensor_type
        dim_names[v.name] = tuple(d.dim_param or None if not (d.HasField("dim_value") and d.dim_value > 0)
                                  else None for d in tt.shape.dim)
        if ONNX_TO_V2.get(tt.elem_type, "").startswith(("INT", "UINT")):
            int_inputs.append(v.name)
    return SourceFacts(
        dim_names=dim_names,
        metadata={p.key: p.value for p in model.metadata_props},
        upper_bounds=_index_bounds(graph, int_inputs),
        op_types=frozenset(onnx_op_type(n) for n in _graph_nodes(graph)),
    )


def read_facts(sources: dict[str, Path]) -> SourceFacts:
    """What the source says beyond its signature (ONNX only; other sources say nothing more)."""
    if "onnx" in sources:
        return onnx_facts(sources["onnx"])
    return SourceFacts()
