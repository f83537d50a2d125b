"""Small ONNX models, built with onnx.helper, that reproduce the classes of real models a parity gate
with 4-pixel / 4-sample inputs got wrong (tests/test_serve_any_model.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

RNG = np.random.default_rng(0)


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr, name)


def _w(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _save(graph: onnx.GraphProto, path: Path, opset: int = 18, metadata: dict[str, str] | None = None) -> Path:
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def pooling_cnn(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Conv → 3× MaxPool/2 → Conv k4 → global pool → Gemm, dynamic H/W: runs only from 32 px up."""
    nodes = [
        h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"]),
        h.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("MaxPool", ["p1"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("MaxPool", ["p2"], ["p3"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Conv", ["p3", "w2"], ["c2"]),  # kernel 4: needs >= 4 px after /8
        h.make_node("GlobalAveragePool", ["c2"], ["g"]),
        h.make_node("Flatten", ["g"], ["f"]),
        h.make_node("Gemm", ["f", "wf", "bf"], ["logits"]),
    ]
    graph = h.make_graph(
        nodes, "pooling_cnn",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3, "height", "width"])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["batch", 2])],
        [_init("w1", _w(4, 3, 3, 3)), _init("w2", _w(6, 4, 4, 4)), _init("wf", _w(6, 2)),
         _init("bf", _w(2))])
    return _save(graph, path, metadata=metadata)


def windowed_audio(path: Path) -> Path:
    """Silero-VAD-like: a [batch, samples] signal, reflect-padded by 64 each side, framed into hops of
    sr/125 samples (16 kHz → 128; other rates do not reshape) and read by a 512-sample window; an int64
    scalar sample rate; a recurrent state [2, batch, 16] whose batch is dim 1."""
    nodes = [
        h.make_node("Pad", ["input", "pads"], ["padded"], mode="reflect"),  # needs samples > 64
        # the 512-sample window
        h.make_node("Unsqueeze", ["padded", "ax1"], ["p3"]),
        h.make_node("Conv", ["p3", "wwin"], ["win"], strides=[128]),  # needs samples + 128 >= 512
        h.make_node("ReduceMean", ["win", "ax2"], ["win_mean"], keepdims=0),
        # hops of sr / 125 samples
        h.make_node("Div", ["sr", "c125"], ["hop"]),
        h.make_node("Reshape", ["hop", "one"], ["hop1"]),
        h.make_node("Shape", ["input"], ["ishape"], end=1),
        h.make_node("Concat", ["ishape", "minus1", "hop1"], ["fshape"], axis=0),
        h.make_node("Reshape", ["padded", "fshape"], ["frames"], allowzero=1),
        h.make_node("MatMul", ["frames", "whop"], ["hf"]),  # hop must be 128
        h.make_node("ReduceMean", ["hf", "ax1"], ["hop_mean"], keepdims=0),
        # the state
        h.make_node("ReduceSum", ["state", "ax0"], ["ssum"], keepdims=0),
        h.make_node("Concat", ["win_mean", "hop_mean", "ssum"], ["feat"], axis=1),
        h.make_node("MatMul", ["feat", "wout"], ["z"]),
        h.make_node("Sigmoid", ["z"], ["prob"]),
        h.make_node("Tanh", ["state"], ["state_out"]),
    ]
    i64 = lambda name, v: _init(name, np.array(v, np.int64))
    graph = h.make_graph(
        nodes, "windowed_audio",
        [h.make_tensor_value_info("input", T.FLOAT, ["batch", "samples"]),
         h.make_tensor_value_info("sr", T.INT64, []),
         h.make_tensor_value_info("state", T.FLOAT, [2, "batch", 16])],
        [h.make_tensor_value_info("prob", T.FLOAT, ["batch", 1]),
         h.make_tensor_value_info("state_out", T.FLOAT, [2, "batch", 16])],
        [i64("pads", [0, 64, 0, 64]), i64("ax0", [0]), i64("ax1", [1]), i64("ax2", [2]), i64("c125", 125),
         i64("one", [1]), i64("minus1", [-1]), _init("wwin", _w(4, 1, 512, scale=0.05)),
         _init("whop", _w(128, 8, scale=0.1)), _init("wout", _w(28, 1))])
    return _save(graph, path)


VOCAB = 6


def token_model(path: Path) -> Path:
    """ids [batch, sequence] → token embedding (VOCAB rows: ids must be below it; generic small ints are
    not) + position embedding (64 rows: sequences up to 64) → mean → Gemm."""
    nodes = [
        h.make_node("Cast", ["ids"], ["ids32"], to=T.INT32),
        h.make_node("Gather", ["emb", "ids32"], ["tok"]),
        h.make_node("Shape", ["ids"], ["len"], start=1, end=2),
        h.make_node("Squeeze", ["len"], ["len0"]),
        h.make_node("Range", ["zero", "len0", "step"], ["pos_ids"]),
        h.make_node("Gather", ["pos", "pos_ids"], ["posv"]),
        h.make_node("Add", ["tok", "posv"], ["e"]),
        h.make_node("ReduceMean", ["e", "ax1"], ["m"], keepdims=0),
        h.make_node("Gemm", ["m", "wf"], ["logits"]),
    ]
    graph = h.make_graph(
        nodes, "token_model",
        [h.make_tensor_value_info("ids", T.INT64, ["batch", "sequence"])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["batch", 3])],
        [_init("emb", _w(VOCAB, 8)), _init("pos", _w(64, 8)), _init("wf", _w(8, 3)),
         _init("zero", np.array(0, np.int64)), _init("step", np.array(1, np.int64)),
         _init("ax1", np.array([1], np.int64))])
    return _save(graph, path)


def control_flow(path: Path) -> Path:
    """A Loop (3 iterations accumulating x·w) and an If on the sign of the sum."""
    body = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["xw"]),
         h.make_node("Add", ["acc_in", "xw"], ["acc_out"]),
         h.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("acc_in", T.FLOAT, ["batch", 4])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("acc_out", T.FLOAT, ["batch", 4])])
    then_g = h.make_graph([h.make_node("Relu", ["acc"], ["t"])], "then", [],
                          [h.make_tensor_value_info("t", T.FLOAT, ["batch", 4])])
    else_g = h.make_graph([h.make_node("Neg", ["acc"], ["e"])], "else", [],
                          [h.make_tensor_value_info("e", T.FLOAT, ["batch", 4])])
    nodes = [
        h.make_node("Mul", ["x", "zero_f"], ["acc0"]),
        h.make_node("Loop", ["trips", "true", "acc0"], ["acc"], body=body),
        h.make_node("ReduceSum", ["acc"], ["total"], keepdims=0),
        h.make_node("Greater", ["total", "zero_f"], ["positive"]),
        h.make_node("If", ["positive"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    graph = h.make_graph(
        nodes, "control_flow",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", 4])],
        [_init("w", _w(4, 4)), _init("zero_f", np.array(0.0, np.float32)), _init("trips", np.array(3, np.int64)),
         _init("true", np.array(True))])
    return _save(graph, path)


def unsupported_op(path: Path) -> Path:
    """Det over [batch, 3, 3]: ONNX Runtime runs it, OpenVINO's ONNX frontend has no rule for it."""
    graph = h.make_graph(
        [h.make_node("Det", ["m"], ["d"])], "det",
        [h.make_tensor_value_info("m", T.FLOAT, ["batch", 3, 3])],
        [h.make_tensor_value_info("d", T.FLOAT, ["batch"])])
    return _save(graph, path)


def openvino_only_op(path: Path) -> Path:
    """org.openvinotoolkit.Swish: OpenVINO's ONNX frontend has it, ONNX Runtime (the reference) does not."""
    graph = h.make_graph(
        [h.make_node("Swish", ["x"], ["y"], domain="org.openvinotoolkit")], "swish",
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", 4])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("org.openvinotoolkit", 1)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
