"""Benchmark models, built in code into an ignored folder (bench/.work/repo), never committed.

- mlp: 784-256-128-10 MLP (random weights), ONNX built with onnx.helper (no torch needed).
- resnet: a ResNet-style CNN at 3x224x224 (random weights), exported with torch.onnx.export.
- digits-cnn: the project's default model, linked from model_repo/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work"

MLP_CONFIG = """\
backend: onnxruntime
max_batch_size: 64
dynamic_batching: {{max_queue_delay_ms: 2, preferred_batch_sizes: [8, 16, 32], max_queue_size: 4096}}
instances: {instances}
verify: {{atol: 1.0e-4, rtol: 1.0e-3}}
"""

RESNET_CONFIG = """\
backend: onnxruntime
max_batch_size: 32
dynamic_batching: {{max_queue_delay_ms: 5, preferred_batch_sizes: [8, 16, 32], max_queue_size: 1024}}
instances: {instances}
verify: {{atol: 1.0e-3, rtol: 1.0e-2}}
"""


def mlp_onnx(path: Path, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [784, 256, 128, 10]
    nodes, inits = [], []
    prev = "input"
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = "logits" if i == len(dims) - 2 else f"h{i}"
        mm = f"mm{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [mm]))
        if out == "logits":
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [out]))
        else:
            nodes.append(helper.make_node("Add", [mm, f"b{i}"], [f"a{i}"]))
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 784])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def resnet_onnx(path: Path, seed: int = 0) -> Path:
    """ResNet-style: stem conv/pool, 4 stages of basic residual blocks (1 block each), GAP, FC-1000."""
    import torch
    from torch import nn

    from tests.byom_models import BasicBlock as Block  # the toolkit tests' residual block: one definition

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 7, 2, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            self.stages = nn.Sequential(Block(32, 32, 1), Block(32, 64, 2), Block(64, 128, 2), Block(128, 256, 2))
            self.fc = nn.Linear(256, 1000)

        def forward(self, x):
            x = self.stages(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    net = Net().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, 224, 224)
    torch.onnx.export(net, (example,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def build_repo(names: list[str], instances: int = 1, root: Path | None = None) -> Path:
    """A model repository holding the named bench models; sources are rebuilt only when missing."""
    repo = root or (WORK / f"repo-i{instances}")
    src = WORK / "sources"
    for name in names:
        d = repo / name
        d.mkdir(parents=True, exist_ok=True)
        if name == "mlp":
            onnx_path = src / "mlp.onnx"
            if not onnx_path.exists():
                mlp_onnx(onnx_path)
            (d / "config.yaml").write_text(MLP_CONFIG.format(instances=instances))
        elif name == "resnet":
            onnx_path = src / "resnet.onnx"
            if not onnx_path.exists():
                resnet_onnx(onnx_path)
            (d / "config.yaml").write_text(RESNET_CONFIG.format(instances=instances))
        elif name in ("resnet-nobatch", "mlp-nobatch"):
            base = name.split("-")[0]
            onnx_path = src / f"{base}.onnx"
            if not onnx_path.exists():
                (mlp_onnx if base == "mlp" else resnet_onnx)(onnx_path)
            cfg = (MLP_CONFIG if base == "mlp" else RESNET_CONFIG).format(instances=instances)
            (d / "config.yaml").write_text("\n".join(l for l in cfg.splitlines() if "dynamic_batching" not in l) + "\n")
        elif name == "digits-cnn":
            if not (d / "1").exists():
                shutil.rmtree(d)
                shutil.copytree(ROOT / "model_repo" / "digits-cnn", d)
            continue
        else:
            raise ValueError(f"unknown bench model {name}")
        (d / "1").mkdir(exist_ok=True)
        target = d / "1" / "model.onnx"
        if not target.exists():
            shutil.copyfile(onnx_path, target)
    return repo


def source_path(name: str) -> Path:
    name = name.replace("-nobatch", "")
    if name == "digits-cnn":
        return ROOT / "model_repo" / "digits-cnn" / "1" / "model.onnx"
    return WORK / "sources" / f"{name}.onnx"


INPUT_SHAPES = {"mlp": (784,), "resnet": (3, 224, 224), "digits-cnn": (1, 8, 8)}
