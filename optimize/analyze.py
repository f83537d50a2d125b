"""``kiln optimize analyze``: parameters, MACs/FLOPs, activation memory, size on disk, per-layer table.

ONNX: shapes from ``onnx.shape_inference`` with the batch dimension fixed to 1; ``.pt2``: shapes from
running the ExportedProgram's graph on a batch-1 input (``torch.fx`` ``ShapeProp``). Per layer:
operator, output shape, parameters, MACs (multiply-accumulates; FLOPs = 2 × MACs) and output bytes.
Activation memory: the sum of all intermediate outputs (no reuse) and the largest single one, at batch 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .modelio import ModelSource


@dataclass
class Layer:
    name: str
    op: str
    out_shape: list[int]
    params: int = 0
    macs: int = 0
    out_bytes: int = 0


@dataclass
class Analysis:
    path: str
    format: str
    size_bytes: int
    params: int
    param_bytes: int
    macs: int
    activation_bytes: int
    peak_activation_bytes: int
    input: str
    layers: list[Layer] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def as_dict(self) -> dict:
        d = asdict(self)
        d["flops"] = self.flops
        return d


_QUANT_WEIGHT_OPS = ("DequantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear")


def _prod(xs) -> int:
    return int(np.prod(xs)) if len(xs) else 1


def analyze_onnx(path: Path) -> Analysis:
    import onnx
    from onnx import numpy_helper, shape_inference

    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in inits]
    for gi in graph_inputs:  # batch 1 for a concrete count
        for d in gi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    inferred = shape_inference.infer_shapes(proto, data_prop=True)
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, int] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        dtypes[vi.name] = t.elem_type
    for name, arr in inits.items():
        shapes[name] = list(arr.shape)

    # Quantized graphs: weights may sit behind DequantizeLinear; follow them back to the initializer.
    produced_by = {o: n for n in proto.graph.node for o in n.output}

    def weight_shape(name: str) -> list[int] | None:
        if name in inits:
            return list(inits[name].shape)
        node = produced_by.get(name)
        if node is not None and node.op_type in ("DequantizeLinear", "Cast", "Identity") and node.input:
            return weight_shape(node.input[0])
        return shapes.get(name)

    layers: list[Layer] = []
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        out = node.output[0] if node.output else ""
        oshape = shapes.get(out, [])
        op = node.op_type
        own = [n for n in node.input if n in inits and n not in seen]
        seen.update(own)
        if op in ("DequantizeLinear", "QuantizeLinear"):
            # Quantized graphs: a weight's DequantizeLinear holds the int8 weight (input 0); scales and
            # zero points are metadata, and the node's output is a weight, not an activation.
            params = int(inits[node.input[0]].size) if node.input[0] in own and inits[node.input[0]].size > 1 else 0
            if all(n in inits or not n for n in node.input):
                layers.append(Layer(node.name or f"{op}_{i}", op, oshape, params, 0, 0))
                continue
        else:
            params = sum(int(inits[n].size) for n in own if inits[n].dtype.kind == "f" or op in _QUANT_WEIGHT_OPS)
        macs = 0
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            widx = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}[op]
            ws = weight_shape(node.input[widx]) if len(node.input) > widx else None
            if ws and oshape:
                macs = _prod(oshape) * _prod(ws[1:])
        elif op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
            bidx = 3 if op == "QLinearMatMul" else 1
            bs = weight_shape(node.input[bidx]) if len(node.input) > bidx else None
            if bs and oshape:
                k = bs[0]
                if op == "Gemm":
                    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                    k = bs[1] if trans_b else bs[0]
                elif len(bs) >= 2:
                    k = bs[-2]
                macs = _prod(oshape) * k
        elem = 4
        if dtypes.get(out) in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8):
            elem = 1
        elif dtypes.get(out) in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            elem = 2
        if op in ("Constant",):
            continue
        layers.append(Layer(node.name or f"{op}_{i}", op, oshape, params, macs, _prod(oshape) * elem if oshape else 0))
    params_total = sum(lay.params for lay in layers)
    param_bytes = sum(int(a.nbytes) for a in inits.values())
    gi = graph_inputs[0] if graph_inputs else None
    input_desc = ""
    if gi is not None:
        orig = next(i for i in onnx.load(str(path), load_external_data=False).graph.input if i.name == gi.name)
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in orig.type.tensor_type.shape.dim]
        input_desc = f"{gi.name} {dims} {onnx.helper.tensor_dtype_to_np_dtype(gi.type.tensor_type.elem_type).name}"
    acts = [lay.out_bytes for lay in layers]
    return Analysis(str(path), "onnx", path.stat().st_size, params_total, param_bytes, sum(lay.macs for lay in layers),
                    sum(acts), max(acts, default=0), input_desc, layers)


def analyze_pt2(path: Path) -> Analysis:
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    from .modelio import load_exported

    ep = load_exported(path)
    gm = ep.module()
    user = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == user[0].arg.name)
    val = node.meta["val"]
    shape = [d if isinstance(d, int) else 1 for d in (int(s) if str(s).isdigit() else 1 for s in val.shape)]
    x = torch.zeros(shape, dtype=val.dtype)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    state = {k: v for k, v in ep.state_dict.items()}
    layers: list[Layer] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        tm = n.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            continue
        oshape = list(tm.shape)
        target = str(getattr(n.target, "__name__", n.target))
        op = target.split(".")[0]
        params, macs = 0, 0
        args = [a for a in n.args if isinstance(a, torch.fx.Node)]
        pshapes = []
        for a in args:
            if a.op == "get_attr":
                t = gm
                for part in str(a.target).split("."):
                    t = getattr(t, part)
                pshapes.append(list(t.shape))
                params += t.numel()
        if op in ("conv2d", "conv1d", "convolution") and len(pshapes) >= 1:
            macs = _prod(oshape) * _prod(pshapes[0][1:])
        elif op in ("linear", "addmm", "mm", "matmul") and pshapes:
            macs = _prod(oshape) * pshapes[0][-1]
        elem = torch.empty((), dtype=tm.dtype).element_size()
        layers.append(Layer(n.name, op, oshape, params, macs, _prod(oshape) * elem))
    params_total = sum(v.numel() for v in state.values())
    param_bytes = sum(v.numel() * v.element_size() for v in state.values())
    acts = [lay.out_bytes for lay in layers]
    dims = [str(s) for s in val.shape]
    return Analysis(str(path), "pt2", path.stat().st_size, params_total, param_bytes, sum(lay.macs for lay in layers),
                    sum(acts), max(acts, default=0), f"input [{', '.join(dims)}] {str(val.dtype).replace('torch.', '')}", layers)


def analyze(src: ModelSource, prefer: str | None = None) -> Analysis:
    if prefer == "pt2" and src.pt2 is not None:
        return analyze_pt2(src.pt2)
    if src.onnx is not None and prefer != "pt2":
        return analyze_onnx(src.onnx)
    return analyze_pt2(src.pt2)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(a: Analysis, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    summary = Table(title=escape(f"{a.path} ({a.format})"), show_header=False)
    summary.add_row("input", escape(a.input))
    summary.add_row("parameters", f"{a.params:,} ({human_bytes(a.param_bytes)} of weights)")
    summary.add_row("MACs / FLOPs (batch 1)", f"{a.macs:,} / {a.flops:,}")
    summary.add_row("activation memory (batch 1)", f"{human_bytes(a.activation_bytes)} total, {human_bytes(a.peak_activation_bytes)} largest")
    summary.add_row("size on disk", f"{a.size_bytes:,} bytes")
    console.print(summary)
    t = Table(title="per layer (batch 1)")
    for col in ("#", "layer", "op", "output", "params", "MACs", "% MACs", "output bytes"):
        t.add_column(col, justify="right" if col in ("#", "params", "MACs", "% MACs", "output bytes") else "left",
                     no_wrap=col in ("output", "op"), overflow="fold")
    for i, lay in enumerate(a.layers):
        pct = f"{100 * lay.macs / a.macs:.1f}" if a.macs and lay.macs else ""
        t.add_row(str(i), escape(lay.name), escape(lay.op), escape(str(lay.out_shape)), f"{lay.params:,}" if lay.params else "",
                  f"{lay.macs:,}" if lay.macs else "", pct, f"{lay.out_bytes:,}")
    console.print(t)
