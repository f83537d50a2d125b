"""Serve any real model: golden inputs that fit it, honest verdicts, existing artifacts.

One real server (tests/kiln_server.py) serves every model class of tests/serve_any_models.py on
onnxruntime, openvino and auto — without hints, with verify.values, with verify.shapes — plus
artifacts brought as they are (OpenVINO IR, .tflite, TensorRT .plan, Core ML .mlpackage), and
each backend's verdict is asserted: READY verified, READY unverified with its reason, or FAILED with
the reason that helps.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml

from backends import get_backend
from tests import serve_any_models as models
from tests.kiln_server import start_server

BACKENDS = ("onnxruntime", "openvino", "auto")
FAST_AUTO = {"runs": 5, "warmup": 1}
UNVERIFIED_HINT = "give verify.samples or verify.shapes"


def _source(repo: Path, name: str, build) -> Path:
    return build(repo / "_sources" / name / "1" / "model.onnx")


def _model(repo: Path, name: str, config: dict, files: dict[str, Path] | None = None) -> None:
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    if files:
        for target, src in files.items():
            dst = folder / "1" / target
            if src.is_dir():
                import shutil

                shutil.copytree(src, dst)
            else:
                dst.write_bytes(src.read_bytes())
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


def _per_backend(repo: Path, cls: str, source: str, extra: dict | None = None, suffix: str = "") -> None:
    for backend in BACKENDS:
        cfg = {"backend": backend, "source": f"../_sources/{source}", "auto": FAST_AUTO, **(extra or {})}
        _model(repo, f"{cls}{suffix}-{backend}", cfg)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Artifacts built elsewhere, as users bring them: an OpenVINO IR of the pooling CNN, a .tflite
    (and the ONNX export of the same torch module), a Core ML package, a TensorRT plan where possible."""
    import openvino as ov

    out = tmp_path_factory.mktemp("artifacts")
    cnn = models.pooling_cnn(out / "cnn.onnx")
    ov.save_model(ov.convert_model(str(cnn)), str(out / "model.xml"), compress_to_fp16=False)
    built = {"cnn_onnx": cnn, "xml": out / "model.xml", "bin": out / "model.bin"}

    import os

    import torch

    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    import litert_torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).eval()
    example = torch.randn(2, 6)
    litert_torch.convert(module, (example,)).export(str(out / "model.tflite"))
    torch.onnx.export(module, (example,), str(out / "linear.onnx"), input_names=["x"], output_names=["y"],
                      dynamo=False)
    built.update(tflite=out / "model.tflite", linear_onnx=out / "linear.onnx")

    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))])
    def relu(x):
        return mb.relu(x=x, name="y")

    ct.convert(relu, convert_to="mlprogram").save(str(out / "model.mlpackage"))
    built["mlpackage"] = out / "model.mlpackage"

    trt = get_backend("tensorrt")
    if trt.available()[0]:  # a real engine from the backend's own build
        from backends import CompileOptions
        from backends.signature import onnx_signature

        ins, outs = onnx_signature(built["linear_onnx"])
        built["plan"] = trt.compile(built["linear_onnx"], CompileOptions(inputs=ins, outputs=outs), out)
    else:  # no runtime or GPU here: the plan's bytes never get read
        (out / "model.plan").write_bytes(b"not an engine: this machine cannot build one")
        built["plan"] = out / "model.plan"
    return built


@pytest.fixture(scope="module")
def srv(tmp_path_factory, artifacts):
    repo = tmp_path_factory.mktemp("repo")
    _source(repo, "cnn", models.pooling_cnn)
    _source(repo, "audio", models.windowed_audio)
    _source(repo, "token", models.token_model)
    _source(repo, "control", models.control_flow)
    _source(repo, "det", models.unsupported_op)

    _per_backend(repo, "cnn", "cnn")  # inferred: 224 px
    _per_backend(repo, "cnn", "cnn", {"max_batch_size": 4, "verify": {"shapes": {
        "x": [[2, 3, 48, 320], [1, 3, 64, 64]]}}}, "-shapes")
    _per_backend(repo, "audio", "audio")  # nothing the reference runs without a sample rate
    _per_backend(repo, "audio", "audio", {"verify": {"values": {"sr": 16000, "state": 0}}}, "-values")
    _per_backend(repo, "audio", "audio", {"verify": {"shapes": {"input": [1, 1024], "state": [2, 1, 16]},
                                                     "values": {"sr": 16000}}}, "-shapes")
    _model(repo, "audio-optional-openvino", {"backend": "openvino", "source": "../_sources/audio",
                                             "verify": {"required": False}})
    _per_backend(repo, "token", "token")
    _per_backend(repo, "control", "control")
    _per_backend(repo, "det", "det")

    _model(repo, "ir-beside-onnx", {"backend": "openvino"},
           {"model.onnx": artifacts["cnn_onnx"], "model.xml": artifacts["xml"], "model.bin": artifacts["bin"]})
    _model(repo, "ir-only", {}, {"model.xml": artifacts["xml"], "model.bin": artifacts["bin"]})
    _model(repo, "tflite-beside-onnx", {"backend": "litert"},
           {"model.onnx": artifacts["linear_onnx"], "model.tflite": artifacts["tflite"]})
    _model(repo, "tflite-only", {}, {"model.tflite": artifacts["tflite"]})
    _model(repo, "plan-only", {}, {"model.plan": artifacts["plan"]})
    _model(repo, "mlpackage-only", {}, {"model.mlpackage": artifacts["mlpackage"]})

    log_dir = tmp_path_factory.mktemp("logs")
    server = start_server(repo, log_dir=log_dir, timeout=300)
    yield server
    server.stop()


def meta(srv, name: str) -> dict:
    r = httpx.get(f"{srv.url}/v2/models/{name}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["parameters"]


def kiln(srv, name: str) -> dict:
    r = httpx.get(f"{srv.url}/v2/models/{name}/config", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["kiln"]


def infer(srv, name: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    dt = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    body = {"inputs": [{"name": k, "datatype": dt[v.dtype], "shape": list(v.shape), "data": v.ravel().tolist()}
                       for k, v in arrays.items()]}
    r = httpx.post(f"{srv.url}/v2/models/{name}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


def onnx_reference(path: Path, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, arrays)


def assert_verified(p: dict, backend: str | None = None) -> None:
    assert p["state"] == "READY", p
    assert p["parity"] == "verified" and p["parity_passed"] is True, p
    if backend:
        assert p["backend"] == backend, p


# -- each model class on each backend -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_pooling_cnn_is_verified_at_224_inferred_from_its_dim_names(srv, backend):
    p = meta(srv, f"cnn-{backend}")
    assert_verified(p, None if backend == "auto" else backend)
    assert kiln(srv, f"cnn-{backend}")["parity"]["inputs"] == ["x[4, 3, 224, 224]"]
    x = np.random.default_rng(1).standard_normal((1, 3, 96, 96)).astype(np.float32)
    src = srv.repo / "_sources" / "cnn" / "1" / "model.onnx"
    np.testing.assert_allclose(infer(srv, f"cnn-{backend}", {"x": x})["logits"], onnx_reference(src, {"x": x})[0],
                               atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pooling_cnn_is_verified_at_every_configured_shape(srv, backend):
    p = meta(srv, f"cnn-shapes-{backend}")
    assert_verified(p)
    assert kiln(srv, f"cnn-shapes-{backend}")["parity"]["inputs"] == ["x[2, 3, 48, 320]", "x[1, 3, 64, 64]"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_audio_without_a_sample_rate_is_unverified_and_only_the_reference_build_serves(srv, backend):
    p = meta(srv, f"audio-{backend}")
    if backend == "openvino":
        assert p["state"] == "FAILED", p
        assert "parity unverified" in p["reason"] and UNVERIFIED_HINT in p["reason"], p
        assert "verify.required: false" in p["reason"]
        return
    # onnxruntime fp32 on the CPU is the reference itself; auto falls through to it.
    assert p["state"] == "READY" and p["backend"] == "onnxruntime", p
    assert p["parity"].startswith("unverified (the reference runs none of the inputs tried"), p
    assert UNVERIFIED_HINT in p["parity"] and "Reshape" in p["parity"], p
    assert kiln(srv, f"audio-{backend}")["parity_verdict"] == p["parity"]
    if backend == "auto":
        rows = {c["backend"]: c for c in json.loads(p["auto"])["candidates"]}
        assert rows["openvino"]["status"] == "failed" and "parity unverified" in rows["openvino"]["reason"]


def test_unverified_is_a_metric_and_a_warning(srv):
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    assert 'kiln_parity_verified{model="audio-onnxruntime",version="1"} 0.0' in text
    assert 'kiln_parity_verified{model="cnn-onnxruntime",version="1"} 1.0' in text
    assert "WARNING" in srv.log() and "audio-onnxruntime v1: parity unverified (" in srv.log()


def test_audio_unverified_serves_on_openvino_when_verification_is_optional(srv):
    p = meta(srv, "audio-optional-openvino")
    assert p["state"] == "READY" and p["backend"] == "openvino" and p["parity"].startswith("unverified ("), p


@pytest.mark.parametrize("backend", BACKENDS)
def test_audio_with_a_sample_rate_is_verified_at_the_512_window(srv, backend):
    p = meta(srv, f"audio-values-{backend}")
    assert_verified(p)
    # 16 samples cannot be reflect-padded by 64, 128 do not fill the 512 window: skipped, 512 verified.
    assert kiln(srv, f"audio-values-{backend}")["parity"]["inputs"] == ["input[4, 512], sr[], state[2, 4, 16]"]
    a = {"input": np.random.default_rng(2).standard_normal((2, 1024)).astype(np.float32),
         "sr": np.array(16000, np.int64), "state": np.zeros((2, 2, 16), np.float32)}
    got = infer(srv, f"audio-values-{backend}", a)
    np.testing.assert_allclose(got["prob"], onnx_reference(srv.repo / "_sources/audio/1/model.onnx", a)[0], atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_audio_with_shape_hints_is_verified_at_those_shapes(srv, backend):
    assert_verified(meta(srv, f"audio-shapes-{backend}"))
    assert kiln(srv, f"audio-shapes-{backend}")["parity"]["inputs"] == ["input[1, 1024], sr[], state[2, 1, 16]"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_ids_stay_below_the_embedding_vocabulary(srv, backend):
    assert_verified(meta(srv, f"token-{backend}"))
    assert kiln(srv, f"token-{backend}")["parity"]["inputs"] == ["ids[4, 16]"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_control_flow_is_verified_or_names_the_op(srv, backend):
    p = meta(srv, f"control-{backend}")
    if p["state"] == "READY":
        assert_verified(p)
    else:
        assert p["state"] == "FAILED" and ("Loop" in p["reason"] or "If" in p["reason"]), p


@pytest.mark.parametrize("backend", BACKENDS)
def test_unconvertible_op_is_named(srv, backend):
    p = meta(srv, f"det-{backend}")
    if backend == "openvino":
        assert p["state"] == "FAILED", p
        assert p["reason"] == "openvino cannot convert model.onnx: no conversion rule for op(s) Det", p
        return
    assert_verified(p, "onnxruntime")
    if backend == "auto":
        rows = {c["backend"]: c for c in json.loads(p["auto"])["candidates"]}
        assert "no conversion rule for op(s) Det" in rows["openvino"]["reason"]


def test_parity_failure_names_the_input_shapes():
    from service.pipeline import combine_parity
    from service.verify import compare

    ok = compare({"y": np.zeros(2)}, {"y": np.zeros(2)}, 1e-4, 0, 1)
    bad = compare({"y": np.ones(2)}, {"y": np.zeros(2)}, 1e-4, 0, 1)
    merged = combine_parity([ok, bad], ["x[1, 3]", "x[2, 3]"])
    assert not merged.passed and merged.reason.endswith("(inputs x[2, 3])")
    assert merged.outputs[0].max_abs_error == 1.0


# -- existing artifacts ---------------------------------------------------------------------------

def test_openvino_ir_beside_onnx_is_served_without_conversion_and_verified(srv):
    p = meta(srv, "ir-beside-onnx")
    assert_verified(p, "openvino")
    assert p["cache"] == "artifact" and kiln(srv, "ir-beside-onnx")["artifact"].endswith("/1/model.xml")


def test_openvino_ir_alone_is_served_and_says_what_was_not_verified(srv, artifacts):
    p = meta(srv, "ir-only")
    assert p["state"] == "READY" and p["backend"] == "openvino", p
    assert p["parity"].startswith("unverified (no source model beside model.xml to compare with"), p
    assert "it runs x[4, 3, 224, 224]" in p["parity"]
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(infer(srv, "ir-only", {"x": x})["logits"],
                               onnx_reference(artifacts["cnn_onnx"], {"x": x})[0], atol=1e-4)


def test_tflite_beside_onnx_is_verified(srv, artifacts):
    p = meta(srv, "tflite-beside-onnx")
    assert_verified(p, "litert")
    assert p["cache"] == "artifact"
    x = np.random.default_rng(4).standard_normal((2, 6)).astype(np.float32)
    got = next(iter(infer(srv, "tflite-beside-onnx", {"x": x}).values()))
    np.testing.assert_allclose(got, onnx_reference(artifacts["linear_onnx"], {"x": x})[0], atol=1e-4)


def test_tflite_alone_is_served_unverified(srv):
    p = meta(srv, "tflite-only")
    assert p["state"] == "READY" and p["backend"] == "litert", p
    assert p["parity"].startswith("unverified (no source model beside model.tflite"), p


def test_tensorrt_plan_is_served_where_tensorrt_runs_else_says_why(srv):
    p = meta(srv, "plan-only")
    ok, why = get_backend("tensorrt").available()
    if ok:
        assert p["state"] == "READY" and p["backend"] == "tensorrt", p
        assert p["parity"].startswith("unverified (no source model beside model.plan"), p
    else:
        assert p["state"] == "FAILED", p
        assert p["reason"].startswith("cannot read model.plan: ") and why in p["reason"], p


def test_coreml_package_is_served_on_macos_else_says_why(srv):
    from backends.coreml import prediction_supported

    p = meta(srv, "mlpackage-only")
    assert p["backend"] == "coreml", p
    if prediction_supported()[0]:
        assert p["state"] == "READY" and p["parity"].startswith("unverified (no source model beside"), p
    else:
        assert p["state"] == "FAILED" and "Core ML prediction needs macOS" in p["reason"], p
        attempts = json.loads(p["attempts"])
        assert attempts[0]["status"] == "unavailable" and attempts[0]["cache"] == "artifact"


# -- config hints are checked against the model ---------------------------------------------------

def test_hints_naming_a_missing_input_or_the_wrong_rank_fail_with_file_and_field(tmp_path):
    from service.cache import CompileCache
    from service.config import parse_config
    from service.model import ModelVersion
    from service.source import find_sources

    models.pooling_cnn(tmp_path / "1" / "model.onnx")
    for verify, field, text in [
        ({"shapes": {"image": [1, 3, 32, 32]}}, "verify.shapes.image", "the model has no input 'image'"),
        ({"shapes": {"x": [1, 3, 32]}}, "verify.shapes.x", "does not fit the model's [-1, 3, -1, -1]"),
        ({"shapes": {"x": [1, 4, 32, 32]}}, "verify.shapes.x", "does not fit"),
        ({"shapes": {"x": [1, 3, 8, 8]}}, "", "the reference cannot run the inputs verify.shapes gives"),
    ]:
        cfg = parse_config({"verify": verify}, tmp_path / "config.yaml")
        mv = ModelVersion("m", "1", tmp_path, cfg, find_sources(tmp_path / "1"), CompileCache(tmp_path / "cache"))
        mv.build()
        assert mv.state == "FAILED" and text in mv.reason, mv.reason
        if field:
            assert f"{tmp_path / 'config.yaml'}: field '{field}'" in mv.reason
        mv.close()


# -- what the source says ---------------------------------------------------------------------------

def test_source_facts_name_dims_vocabulary_metadata_and_subgraph_ops(tmp_path):
    from backends.signature import read_facts

    token = read_facts({"onnx": models.token_model(tmp_path / "t.onnx")})
    assert token.dim_names == {"ids": ("batch", "sequence")}
    assert token.upper_bounds == {"ids": models.VOCAB}  # through the Cast to int32
    audio = read_facts({"onnx": models.windowed_audio(tmp_path / "a.onnx")})
    assert audio.dim_names["state"] == (None, "batch", None) and audio.dim_names["sr"] == ()
    flow = read_facts({"onnx": models.control_flow(tmp_path / "c.onnx")})
    assert {"Loop", "If", "MatMul", "Relu", "Neg"} <= flow.op_types  # body and branch ops too
    cnn = read_facts({"onnx": models.pooling_cnn(tmp_path / "m.onnx", metadata={"input_shape": "3,48,320"})})
    assert cnn.metadata == {"input_shape": "3,48,320"}


def test_image_size_from_metadata_is_tried_first(tmp_path):
    from service.cache import CompileCache
    from service.config import parse_config
    from service.model import ModelVersion
    from service.source import find_sources

    models.pooling_cnn(tmp_path / "1" / "model.onnx", metadata={"input_shape": "3,48,320"})
    mv = ModelVersion("m", "1", tmp_path, parse_config({}, tmp_path / "config.yaml"), find_sources(tmp_path / "1"),
                      CompileCache(tmp_path / "cache"))
    mv.build()
    try:
        assert mv.state == "READY" and mv.parity_verdict == "verified", mv.reason
        assert mv.parity.inputs == ["x[4, 3, 48, 320]"]
    finally:
        mv.close()


def test_a_source_the_reference_cannot_load_is_unverified_not_unreadable(tmp_path):
    """ONNX Runtime cannot load an OpenVINO-only op: the model is not 'unreadable'; OpenVINO serves it
    when the config accepts an unverified build, and says why it will not otherwise."""
    from service.cache import CompileCache
    from service.config import parse_config
    from service.model import ModelVersion
    from service.source import find_sources

    models.openvino_only_op(tmp_path / "1" / "model.onnx")
    verdicts = {}
    for backend, verify in [("openvino", {}), ("openvino", {"required": False}), ("onnxruntime", {})]:
        cfg = parse_config({"backend": backend, "verify": verify}, tmp_path / "config.yaml")
        mv = ModelVersion("m", "1", tmp_path, cfg, find_sources(tmp_path / "1"), CompileCache(tmp_path / "cache"))
        mv.build()
        verdicts[(backend, bool(verify))] = (mv.state, mv.reason, mv.parity_verdict)
        if mv.ready:
            x = np.ones((2, 4), np.float32)
            got = mv.runners[0].infer({"x": x})["y"]
            np.testing.assert_allclose(got, x / (1 + np.exp(-x)), rtol=1e-5)
        mv.close()
    state, reason, _ = verdicts[("openvino", False)]
    assert state == "FAILED" and "parity unverified: the reference cannot load the source" in reason, reason
    state, _, verdict = verdicts[("openvino", True)]
    assert state == "READY" and verdict.startswith("unverified (the reference cannot load the source"), verdict
    state, reason, _ = verdicts[("onnxruntime", False)]
    assert state == "FAILED" and "Swish" in reason, reason


def test_a_failed_openvino_conversion_leaves_the_server_logging(srv):
    """ov.convert_model sets the root logger to ERROR and leaves it so when it fails; models loaded
    after the det-* ones (ir-*, tflite-*) must still log their INFO and WARNING lines."""
    log = srv.log()
    assert log.index("det-openvino v1 FAILED") < log.index("model ir-only v1 READY")
    assert "WARNING kiln.model: model tflite-only v1: parity unverified" in log
