"""Bring your own model: networks that are not DigitsCNN, given as file.py:factory + --data, through every
technique; the outputs are served by Kiln and pass its gates; bad input is one `error:` line and exit 2.

Models (tests/byom_models.py, tiny widths, each pre-trained briefly so the metric means something): a
ResNet-style CNN (BatchNorm, skips), a MobileNetV2-style net (depthwise, inverted residuals, hardswish,
squeeze-excite), a transformer-encoder classifier over token sequences, and MLPs on scikit-learn's wine.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
from typer.testing import CliRunner  # noqa: E402

from optimize.cli import app  # noqa: E402
from tests.optimize_util import MLP, MODELS_PY, WINE, build_served, trained_weights  # noqa: E402

RESNET, MOBILENET, TRANSFORMER = (f"{MODELS_PY}:{n}" for n in ("resnet", "mobilenet", "transformer"))
DIGITS, TOKENS = f"{MODELS_PY}:digits_data", f"{MODELS_PY}:tokens_data"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args] + ["--no-progress"] * (args[0] != "analyze"),
                              catch_exceptions=False)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def served(folder, tmp_path):
    mv = build_served(folder, tmp_path / "cache")
    try:
        assert mv.state == "READY", (folder, mv.reason)
        return mv.accuracy, mv.precision, mv.backend
    finally:
        mv.close()


def backends_here() -> list[str]:
    from optimize.bench import available_backends

    return [b for b in ("onnxruntime", "openvino", "litert") if b in available_backends()]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    return {
        "resnet": trained_weights(RESNET, DIGITS, d / "resnet.pt", epochs=3),
        "mobilenet": trained_weights(MOBILENET, DIGITS, d / "mobilenet.pt", epochs=3),
        "transformer": trained_weights(TRANSFORMER, TOKENS, d / "transformer.pt", epochs=15),
        "mlp": trained_weights(MLP, WINE, d / "mlp.pt", epochs=30),
    }


# --------------------------------------------------------------------------- ResNet-style CNN


def test_resnet_analyze_and_channel_pruning_serves(weights, tmp_path):
    r = ok(invoke("analyze", RESNET, "--weights", weights["resnet"], "--data", DIGITS, "--json", tmp_path / "a.json"))
    a = json.loads((tmp_path / "a.json").read_text())
    from optimize.source import count_params, load_model

    params = count_params(load_model(RESNET).module)
    assert a["params"] - params <= 2 * 16 + 2 * 32 + 2 * 16  # ONNX folds BatchNorm; the rest are the same weights
    assert a["macs"] > 0 and "Conv" in r.output
    out = tmp_path / "resnet-channel"
    ok(invoke("prune", RESNET, "--weights", weights["resnet"], "--data", DIGITS, "--method", "channel", "--amount", "0.5",
              "--finetune-epochs", "2", "--out", out))
    info = json.loads((out / "optimize.json").read_text())
    assert info["kept_whole"] == ["fc"]  # the output layer is found and kept
    assert info["params_after"] < 0.45 * info["params_before"]
    assert info["workload"]["split"]["sizes"] == {"calib": 180, "train": 1078, "val": 180, "eval": 359}
    assert info["workload"]["split"]["seed"] == 0
    acc, _, _ = served(out, tmp_path)
    assert acc["compiled"] == pytest.approx(info["metric_after"], abs=1e-6)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "litert"])
def test_resnet_static_int8_on_each_backend_serves(backend, weights, tmp_path):
    if backend not in backends_here():
        pytest.skip(f"{backend} does not run here")
    out = tmp_path / f"resnet-int8-{backend}"
    # A briefly trained 8x8 ResNet: ONNX Runtime and LiteRT lose ≤ 3 points here, OpenVINO's NNCF preset ~9.
    ok(invoke("quantize", RESNET, "--weights", weights["resnet"], "--data", DIGITS, "-b", backend, "--runs", "20",
              "--max-drop", "0.12", "--out", out))
    info = json.loads((out / "optimize.json").read_text())
    assert info["int8"]["ok"] and info["metric_drop"] <= 0.12, info
    acc, precision, be = served(out, tmp_path)
    assert be == backend and precision == ("fp32" if backend == "onnxruntime" else "int8")  # ORT: the QDQ graph is the source
    assert acc["drop"] <= 0.12 and acc["compiled"] == pytest.approx(info["int8"]["accuracy"], abs=0.02)


# --------------------------------------------------------------------------- MobileNetV2-style


def test_mobilenet_l1_pruning_serves_and_channel_pruning_keeps_depthwise(weights, tmp_path):
    out = tmp_path / "mobilenet-l1"
    ok(invoke("prune", MOBILENET, "--weights", weights["mobilenet"], "--data", DIGITS, "--method", "l1-unstructured",
              "--amount", "0.5", "--finetune-epochs", "1", "--out", out))
    info = json.loads((out / "optimize.json").read_text())
    assert info["sparsity"] == pytest.approx(0.5, abs=0.01) and info["params_after"] == info["params_before"]
    served(out, tmp_path)

    from torch import nn

    from optimize import prune, workload

    w = workload.build(MOBILENET, weights=weights["mobilenet"], data=workload.DataArgs(data=DIGITS), workdir=tmp_path / "w")
    res = prune.prune_workload(w, "channel", 0.5, finetune_epochs=0, progress=False, ignore=["features.0"])
    convs = [m for m in res.module.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert res.module.features[0].out_channels == w.model.module.features[0].out_channels  # --ignore kept it
    assert res.params_after < res.params_before
    assert "classifier" in res.kept_whole and "features.0" in res.kept_whole


def test_distill_onnx_teacher_into_mobilenet_student(weights, tmp_path):
    """The teacher is ONNX-only (a ResNet exported here), the data an .npz, the student a factory."""
    from optimize import workload

    w = workload.build(RESNET, weights=weights["resnet"], data=workload.DataArgs(data=DIGITS), workdir=tmp_path / "w")
    import shutil

    teacher = shutil.copyfile(w.model.sources["onnx"], tmp_path / "resnet.onnx")  # ONNX only: no .pt2 beside it
    (x, y) = (w.splits.train.inputs["image"], w.splits.train.labels)
    np.savez(tmp_path / "digits.npz", image=np.concatenate([x, w.splits.eval.inputs["image"]]),
             labels=np.concatenate([y, w.splits.eval.labels]))
    out = tmp_path / "student"
    ok(invoke("distill", "--teacher", teacher, "--student", MOBILENET, "--student-arg", "width=4", "--student-arg", "stages=2",
              "--data", tmp_path / "digits.npz", "--epochs", "3", "--out", out))
    info = json.loads((out / "optimize.json").read_text())
    assert info["params_teacher"] is None and info["params_student"] > 0  # ONNX teacher: no torch module needed
    assert "CE" in info["loss"] and "KL" in info["loss"] and info["baseline_metric"] is not None
    assert info["student_args"] == {"width": 4, "stages": 2}
    served(out, tmp_path)


# --------------------------------------------------------------------------- transformer encoder


def test_transformer_channel_pruning_keeps_heads_consistent_and_serves(weights, tmp_path):
    out = tmp_path / "transformer-channel"
    ok(invoke("prune", TRANSFORMER, "--weights", weights["transformer"], "--data", TOKENS, "--method", "channel",
              "--amount", "0.5", "--finetune-epochs", "3", "--out", out))
    info = json.loads((out / "optimize.json").read_text())
    assert info["params_after"] < info["params_before"] and info["kept_whole"] == ["head"]
    assert info["workload"]["inputs"][0]["datatype"] == "INT64"
    from optimize.modelio import load_exported

    ep = load_exported(out / "1" / "model.pt2")
    state = ep.state_dict
    inproj = [v for k, v in state.items() if k.endswith("in_proj_weight")][0]
    dim = inproj.shape[1]
    assert dim % 4 == 0 and inproj.shape[0] == 3 * dim  # the embedding stays a multiple of the 4 heads
    hidden = [v for k, v in state.items() if k.endswith("mlp.0.weight")][0]
    assert hidden.shape[0] == 32  # the MLP's 64 hidden features lost half (torch-pruning 1.6.1 keeps nn.MHA's embed dim)
    served(out, tmp_path)


def test_transformer_dynamic_int8_and_static_int8_serve(weights, tmp_path):
    out = tmp_path / "transformer-dyn"
    ok(invoke("quantize", TRANSFORMER, "--weights", weights["transformer"], "--data", TOKENS, "-b", "onnxruntime",
              "--mode", "dynamic", "--runs", "20", "--max-drop", "0.03", "--out", out))
    import onnx

    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(out / "1" / "model.onnx")).graph.node}
    served(out, tmp_path)
    backend = "openvino" if "openvino" in backends_here() else "onnxruntime"  # the per-backend sweep is the ResNet's
    out = tmp_path / f"transformer-int8-{backend}"
    ok(invoke("quantize", TRANSFORMER, "--weights", weights["transformer"], "--data", TOKENS, "-b", backend,
              "--runs", "20", "--max-drop", "0.05", "--out", out))
    served(out, tmp_path)


def test_transformer_search_over_factory_kwargs(weights, tmp_path):
    out = tmp_path / "transformer-search"
    ok(invoke("search", TRANSFORMER, "--data", TOKENS, "--space", "dim=16,32", "--space", "depth=1,2", "--max-candidates", "3",
              "--epochs", "3", "--final-epochs", "5", "--runs", "20", "--budget-ms", "50", "--json", tmp_path / "s.json",
              "--out", out))
    data = json.loads((tmp_path / "s.json").read_text())
    assert len(data["candidates"]) == 3 and data["best"]["name"].startswith("dim=")
    served(out, tmp_path)


# --------------------------------------------------------------------------- MLP (tabular), data forms, metrics


def test_mlp_agreement_without_labels_image_folder_and_custom_metric(weights, tmp_path):
    from optimize import workload

    w = workload.build(MLP, weights=weights["mlp"], data=workload.DataArgs(data=WINE), workdir=tmp_path / "w")
    np.savez(tmp_path / "unlabeled.npz", features=np.concatenate([w.splits.train.inputs["features"], w.splits.eval.inputs["features"]]))
    out = tmp_path / "mlp-int8-agreement"
    ok(invoke("quantize", MLP, "--weights", weights["mlp"], "--data", tmp_path / "unlabeled.npz", "-b", "onnxruntime",
              "--metric", "agreement", "--runs", "20", "--max-drop", "0.05", "--out", out))
    info = json.loads((out / "optimize.json").read_text())
    assert info["workload"]["metric"] == {"name": "agreement", "higher_is_better": True, "needs_labels": False}
    assert info["fp32"]["accuracy"] == 1.0  # the original agrees with itself
    acc, _, _ = served(out, tmp_path)  # the gate's labels are the original's predictions
    assert acc["reference"] == 1.0

    metric_py = tmp_path / "metrics.py"
    metric_py.write_text("import numpy as np\n"
                         "def balanced(outputs, labels):\n"
                         "    pred = outputs.argmax(1)\n"
                         "    return float(np.mean([(pred[labels == c] == c).mean() for c in np.unique(labels)]))\n"
                         "def nothing(outputs, labels):\n    return None\n")
    out = tmp_path / "mlp-l1-custom"
    ok(invoke("prune", MLP, "--weights", weights["mlp"], "--data", WINE, "--method", "l1-unstructured", "--amount", "0.3",
              "--finetune-epochs", "3", "--metric", f"{metric_py}:balanced", "--higher-is-better", "--out", out))
    info = json.loads((out / "optimize.json").read_text())
    assert info["workload"]["metric"]["name"].endswith("metrics.py:balanced") and 0 < info["metric_after"] <= 1
    served(out, tmp_path)  # no top-1 gate for a custom metric: fp32 parity only
    r = invoke("prune", MLP, "--data", WINE, "--method", "channel", "--amount", "0.3", "--metric", f"{metric_py}:nothing",
               "--out", tmp_path / "x")
    assert_error(r, "returned None, not a finite number")


def test_image_folder_data_and_regression_mse(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(60):
        cls = tmp_path / "images" / f"c{d.target[i] % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 16).astype(np.uint8)).convert("RGB").save(cls / f"{i}.png")
    out = tmp_path / "resnet-rgb"
    ok(invoke("prune", RESNET, "--model-arg", "in_channels=3", "--model-arg", "num_classes=2", "--data", tmp_path / "images",
              "--image-size", "16", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--method", "l1-unstructured",
              "--amount", "0.3", "--finetune-epochs", "1", "--out", out))
    info = json.loads((out / "optimize.json").read_text())
    assert info["workload"]["inputs"][0]["shape"] == [-1, 3, 16, 16] and "c0, c1" in info["workload"]["split"]["data"]
    served(out, tmp_path)

    reg = f"{MODELS_PY}:wine_regression_data"
    out = tmp_path / "regression"
    ok(invoke("prune", MLP, "--model-arg", "features=12", "--model-arg", "num_classes=1", "--data", reg, "--method", "channel",
              "--amount", "0.5", "--finetune-epochs", "20", "--out", out))
    info = json.loads((out / "optimize.json").read_text())
    assert info["workload"]["metric"]["name"] == "mse" and info["metric_after"] < info["metric_before"]
    assert info["finetune"]["loss"] == "MSE"
    assert "accuracy:" not in (out / "config.yaml").read_text()  # a regression has no top-1 gate
    served(out, tmp_path)


# --------------------------------------------------------------------------- bad input


def assert_error(result, *fragments):
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for f in fragments:
        assert f in err, err


@pytest.fixture(scope="module")
def bad(tmp_path_factory, weights):
    from optimize import workload

    d = tmp_path_factory.mktemp("bad")
    w = workload.build(MLP, weights=weights["mlp"], data=workload.DataArgs(data=WINE), workdir=d / "w")
    x = w.splits.train.inputs["features"]
    np.savez(d / "names.npz", a=x, b=x)
    np.savez(d / "shape.npz", features=x[:, :12])
    np.savez(d / "dtype.npz", features=x.astype(np.float64))
    np.savez(d / "unlabeled.npz", features=x)
    import shutil

    return {"dir": d, "onnx": shutil.copyfile(w.model.sources["onnx"], d / "mlp.onnx")}  # ONNX only


@pytest.mark.parametrize("args, fragments", [
    (["prune", "{dir}/nope.py:mlp"], ["nope.py not found"]),
    (["prune", f"{MODELS_PY}:nothere"], ["has no function 'nothere'"]),
    (["prune", f"{MODELS_PY}:raises"], ["raised RuntimeError: this factory always fails"]),
    (["prune", f"{MODELS_PY}:not_a_module"], ["returned int, not a torch.nn.Module"]),
    (["prune", MLP, "--model-arg", "nonsense"], ["--model-arg must be key=value"]),
    (["prune", MLP, "--weights", "{resnet}"], ["do not fit the model"]),
    (["prune", MLP, "--data", "{dir}/names.npz"], ["does not fit", "a [", "b ["]),
    (["prune", MLP, "--data", "{dir}/shape.npz"], ["does not fit"]),
    (["quantize", "{onnx}", "--data", "{dir}/names.npz"], ["arrays ['a', 'b'] do not match the model's inputs ['features']"]),
    (["quantize", "{onnx}", "--data", "{dir}/shape.npz"], ["rows of shape [12]", "[-1, 13]"]),
    (["quantize", "{onnx}", "--data", "{dir}/dtype.npz"], ["is float64", "float32"]),
    (["quantize", "{onnx}", "--data", "{dir}/unlabeled.npz", "--metric", "top1"], ["needs labels", "agreement"]),
    (["quantize", "{onnx}"], ["give the data"]),
    (["quantize", "{onnx}", "--data", "{dir}/unlabeled.npz", "--metric", "f1"], ["--metric must be one of"]),
    (["prune", "{onnx}", "--data", "{dir}/unlabeled.npz"], ["needs the torch model", "file.py:factory"]),
    (["distill", "--teacher", MLP, "--student", f"{MODELS_PY}:raises", "--data", WINE], ["raised RuntimeError"]),
])
def test_bad_input_is_one_line_exit_2(args, fragments, bad, weights, tmp_path):
    args = [a.format(dir=bad["dir"], onnx=bad["onnx"], resnet=weights["resnet"]) for a in args]
    if args[0] == "prune":
        args += ["--method", "channel", "--amount", "0.3"]
        if "--data" not in args:
            args += ["--data", WINE]
    assert_error(invoke(*args, "--out", tmp_path / "out"), *fragments)
