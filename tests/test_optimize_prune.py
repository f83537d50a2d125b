"""Pruning on the real digits model: stated sparsity / fewer parameters, accuracy within the limit, servable output."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from tests.optimize_util import MODEL, build_served, default_workload  # noqa: E402

MAX_DROP = 0.01  # accuracy limit after fine-tuning (1 point of top-1)


def test_l1_unstructured_has_stated_sparsity_and_keeps_accuracy():
    from optimize import prune

    w = default_workload()
    model = w.model.module
    res = prune.prune_workload(w, "l1-unstructured", 0.5, finetune_epochs=8, progress=False)
    assert res.sparsity == pytest.approx(prune.expected_sparsity(model, 0.5), abs=1e-6)
    assert res.sparsity == pytest.approx(0.5, abs=0.005)
    assert res.params_after == res.params_before  # dense tensors: zeros, not fewer parameters
    # permanent: no masks or *_orig parameters left, zeros survived fine-tuning
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in res.module.named_parameters())
    assert not any(name.endswith("_mask") for name, _ in res.module.named_buffers())
    assert prune.weight_sparsity(res.module)[0] == pytest.approx(res.sparsity)
    assert res.metric_before - res.metric_after <= MAX_DROP, res.as_dict()
    assert default_workload().model.module is model and prune.weight_sparsity(model)[0] == 0.0  # the input is untouched


def test_channel_pruning_removes_channels_and_keeps_accuracy(tmp_path):
    from typer.testing import CliRunner

    from optimize.cli import app

    out = tmp_path / "digits-channel"
    result = CliRunner().invoke(app, ["prune", str(MODEL), "--method", "channel", "--amount", "0.3", "--finetune-epochs", "10",
                                      "--no-progress", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "optimize.json").read_text())
    assert info["params_after"] < 0.6 * info["params_before"], info
    assert info["metric_before"] - info["metric_after"] <= MAX_DROP, info
    assert info["kept_whole"] == ["classifier.3"] and info["workload"]["metric"]["name"] == "top1"
    # the written model really is smaller and servable as it is
    from optimize import modelio

    src = modelio.resolve(out)
    rebuilt = modelio.load_module(src)  # checks ONNX/pt2 reproduce the pruned network
    assert sum(p.numel() for p in rebuilt.parameters()) == info["params_after"]
    assert rebuilt.config["widths"] == (11, 22) and rebuilt.config["hidden"] == 44
    mv = build_served(out, tmp_path / "cache")
    assert mv.state == "READY", mv.reason
    assert mv.accuracy["compiled"] == pytest.approx(info["metric_after"], abs=1e-5)
    mv.close()
    # and `kiln serve --repo` serves it over HTTP as it is
    import urllib.request

    import numpy as np

    from tests.kiln_server import start_server

    srv = start_server(tmp_path, tmp_path / "cache", log_dir=tmp_path)
    try:
        with np.load(MODEL / "data" / "eval.npz") as f:
            x, y = f["input"][:16], f["label"][:16]
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                       "data": x.ravel().tolist()}]}).encode()
        url = f"http://127.0.0.1:{srv.port}/v2/models/digits-channel/infer"
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as r:
            logits = np.array(json.loads(r.read())["outputs"][0]["data"], np.float32).reshape(16, 10)
        assert (logits.argmax(1) == y).mean() >= 0.9
    finally:
        srv.stop()


def test_depgraph_keeps_residual_and_concat_consistent():
    """Coupled channels (residual add, concat) are pruned together, so the pruned network still runs."""
    from torch import nn

    from optimize.prune import channel_prune_any

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1)
            self.a = nn.Conv2d(16, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 8, 1)
            self.c = nn.Conv2d(16, 8, 1)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = h + torch.relu(self.a(h))  # residual: stem and a must lose the same channels
            h = torch.cat([self.b(h), self.c(h)], dim=1)  # concat feeds the head
            return self.head(h.mean((2, 3)))

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 1, 8, 8)
    before = sum(p.numel() for p in model.parameters())
    _, kept = channel_prune_any(model, (x,), 0.5)
    assert kept == ["head"]  # the output layer keeps its width
    assert model(x).shape == (2, 10)
    assert model.stem.out_channels == model.a.out_channels == 8
    assert model.b.out_channels + model.c.out_channels == model.head.in_features
    assert sum(p.numel() for p in model.parameters()) < 0.5 * before
