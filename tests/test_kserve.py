"""Kiln as a KServe serving runtime: the manifests validate against KServe's CRD schemas (strict on
unknown fields), the runtime's container args parse with Kiln's own CLI, and `kiln serve` started with
exactly those args on a folder laid out as KServe's storage initializer lays it serves the model over
HTTP and gRPC."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from typer.main import get_command

from service.cli import app
from service.config import parse_config
from service.kserve import resolve_model_dir
from tests.kiln_server import DEFAULT_REPO, ROOT, Server, free_port

KSERVE = ROOT / "deploy" / "kserve"
SCHEMAS = Path(__file__).resolve().parent / "data" / "kserve"
MANIFESTS = sorted([*KSERVE.glob("*.yaml"), *(KSERVE / "examples").glob("*.yaml")])
FORMATS = {"onnx", "openvino", "tflite", "tensorrt", "pytorch", "kiln"}

# metadata is `type: object` in every CRD: the ObjectMeta fields a manifest may set here.
OBJECT_META = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(schema):
    """An openAPIV3Schema as a JSON schema that refuses unknown fields (openapi2jsonschema --strict)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validator(kind: str) -> jsonschema.Draft7Validator:
    crd = json.loads(gzip.decompress((SCHEMAS / f"{kind}.schema.json.gz").read_bytes()))
    schema = strict(crd["schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": f"{crd['group']}/{crd['version']}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return jsonschema.Draft7Validator(schema)


def test_schema_data_matches_the_shared_crds():
    """The copied schemas are the CRDs' own (when ../shared is there to compare with)."""
    shared = ROOT.parent / "shared" / "kserve"
    if not shared.is_dir():
        shared = Path("/work/shared/kserve")
    if not shared.is_dir():
        pytest.skip("../shared/kserve is not on this machine")
    for name in ("servingruntimes", "clusterservingruntimes", "inferenceservices"):
        crd = yaml.safe_load((shared / f"serving.kserve.io_{name}.yaml").read_text())
        kind = crd["spec"]["names"]["kind"]
        ours = json.loads(gzip.decompress((SCHEMAS / f"{kind}.schema.json.gz").read_bytes()))
        served = next(v for v in crd["spec"]["versions"] if v.get("storage"))
        assert ours["schema"] == served["schema"]["openAPIV3Schema"] and ours["version"] == served["name"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_its_crd(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        errors = sorted(validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_validation_is_strict():
    doc = yaml.safe_load((KSERVE / "clusterservingruntime.yaml").read_text())
    v = validator("ClusterServingRuntime")
    assert not list(v.iter_errors(doc))
    typo = json.loads(json.dumps(doc))
    typo["spec"]["supportedModelFormat"] = typo["spec"].pop("supportedModelFormats")
    assert any("supportedModelFormat" in e.message for e in v.iter_errors(typo))
    nested = json.loads(json.dumps(doc))
    nested["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    assert list(v.iter_errors(nested))


@pytest.mark.parametrize("name", ["clusterservingruntime.yaml", "servingruntime.yaml"])
def test_runtime_follows_kserve_conventions(name):
    doc = yaml.safe_load((KSERVE / name).read_text())
    spec = doc["spec"]
    assert {f["name"] for f in spec["supportedModelFormats"]} == FORMATS
    assert all(f.get("autoSelect") and f.get("priority", 0) >= 1 for f in spec["supportedModelFormats"])
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert "--model_dir=/mnt/models" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http1": 8080, "h2c": 9000}
    assert f"--http_port={ports['http1']}" in container["args"] and f"--grpc_port={ports['h2c']}" in container["args"]
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(ports["http1"])
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    # The image's user (Dockerfile) is the one the runtime runs as.
    assert f"ARG KILN_UID={sc['runAsUser']}" in (ROOT / "Dockerfile").read_text()


def test_examples_cover_every_format_and_their_configs_load():
    formats = set()
    for path in (KSERVE / "examples").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        model = doc["spec"]["predictor"]["model"]
        formats.add(model["modelFormat"]["name"])
        assert model["runtime"] == "kserve-kiln" and model["storageUri"]
    assert formats == FORMATS
    # The Kiln config the kiln-config example documents is a valid Kiln config.
    text = (KSERVE / "examples" / "kiln-config.yaml").read_text()
    block = text.split("#   config.yaml:\n", 1)[1].split("apiVersion:", 1)[0]
    config = yaml.safe_load("\n".join(line[6:] for line in block.splitlines()))
    cfg = parse_config(config, Path("kiln-config.yaml"))
    assert cfg.backend == "auto" and cfg.max_batch_size == 32 and cfg.instances == 2


def runtime_args(name: str = "clusterservingruntime.yaml") -> list[str]:
    return yaml.safe_load((KSERVE / name).read_text())["spec"]["containers"][0]["args"]


def test_runtime_args_parse_with_kilns_cli():
    serve = get_command(app).commands["serve"]
    args = [a.replace("{{.Name}}", "digits") for a in runtime_args()]
    params = serve.make_context("serve", args).params
    assert params["model_dir"] == Path("/mnt/models") and params["model_name"] == "digits"
    assert params["port"] == 8080 and params["grpc_port"] == 9000 and params["host"] == "0.0.0.0"
    # Kiln's own spellings are the same options.
    own = serve.make_context("serve", ["--model-dir", "/m", "--http-port", "1", "--grpc-port", "0"]).params
    assert own["model_dir"] == Path("/m") and own["port"] == 1 and own["grpc_port"] == 0


# -- the storage initializer's layouts ----------------------------------------------------------------
def _digits_files(dest: Path) -> None:
    """model.onnx + config.yaml + the data its config names, flat: a model's folder in a bucket."""
    dest.mkdir(parents=True)
    shutil.copy(DEFAULT_REPO / "digits-cnn" / "1" / "model.onnx", dest / "model.onnx")
    shutil.copy(DEFAULT_REPO / "digits-cnn" / "config.yaml", dest / "config.yaml")
    shutil.copytree(DEFAULT_REPO / "digits-cnn" / "data", dest / "data")


def _served(root: Path) -> dict[str, list[str]]:
    return {d.name: sorted(p.name for p in (d / "1").iterdir()) for d in root.iterdir() if (d / "1").exists()}


def test_layouts(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(DEFAULT_REPO / "digits-cnn" / "1" / "model.onnx", bare / "digits.onnx")
    root, _ = resolve_model_dir(bare / "digits.onnx", "m1", tmp_path)
    assert _served(root) == {"m1": ["model.onnx"]}
    root, _ = resolve_model_dir(bare, "m2", tmp_path)  # the folder holding one bare file
    assert _served(root) == {"m2": ["model.onnx"]}
    _digits_files(tmp_path / "files")
    root, _ = resolve_model_dir(tmp_path / "files", "m3", tmp_path)
    assert _served(root) == {"m3": ["model.onnx"]}
    assert (root / "m3" / "config.yaml").read_text() == (tmp_path / "files" / "config.yaml").read_text()
    assert (root / "m3" / "data" / "eval.npz").is_file()
    root, _ = resolve_model_dir(DEFAULT_REPO / "digits-cnn", "m4", tmp_path)  # a model folder with versions
    assert _served(root) == {"m4": ["model.onnx", "model.pt2"]}
    root, found = resolve_model_dir(DEFAULT_REPO, "ignored", tmp_path)
    assert root == DEFAULT_REPO and found == "model repository"
    for bad, needle in ((tmp_path / "none", "does not exist"), (tmp_path / "files" / "config.yaml", "cannot serve"),
                        (tmp_path / "files" / "data", "holds no model")):
        with pytest.raises(ValueError, match=needle):
            resolve_model_dir(bad, "x", tmp_path)


def _digits_ir(dest: Path, stem: str = "digits") -> None:
    """An OpenVINO IR of the digits CNN under a bucket's own file names (OVMS users bring these)."""
    import openvino as ov

    dest.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(DEFAULT_REPO / "digits-cnn" / "1" / "model.onnx")), str(dest / f"{stem}.xml"),
                  compress_to_fp16=False)


def test_layouts_with_built_artifacts(tmp_path):
    ir = tmp_path / "ir"
    _digits_ir(ir)
    (ir / "config.yaml").write_text("backend: openvino\n")
    root, found = resolve_model_dir(ir, "a1", tmp_path)  # the IR's folder
    assert _served(root) == {"a1": ["model.bin", "model.xml"]} and "digits.xml" in found
    assert (root / "a1" / "config.yaml").is_file() and not (root / "a1" / "digits.bin").exists()
    root, _ = resolve_model_dir(ir / "digits.xml", "a2", tmp_path)  # the storageUri named the .xml
    assert _served(root) == {"a2": ["model.bin", "model.xml"]}
    assert (root / "a2" / "1" / "model.bin").read_bytes() == (ir / "digits.bin").read_bytes()
    shutil.copy(DEFAULT_REPO / "digits-cnn" / "1" / "model.onnx", ir / "digits.onnx")  # the source beside it
    root, _ = resolve_model_dir(ir, "a3", tmp_path)
    assert _served(root) == {"a3": ["model.bin", "model.onnx", "model.xml"]}
    for suffix in (".tflite", ".plan"):
        f = tmp_path / f"net{suffix}"
        f.write_bytes(b"flatbuffer or engine bytes")
        root, _ = resolve_model_dir(f, "a4", tmp_path)
        assert _served(root) == {"a4": [f"model{suffix}"]}
    pkg = tmp_path / "pkgdir" / "net.mlpackage"
    pkg.mkdir(parents=True)
    root, _ = resolve_model_dir(pkg, "a5", tmp_path)  # a Core ML package is a folder
    assert _served(root) == {"a5": ["model.mlpackage"]}
    (ir / "digits.bin").rename(ir / "weights.bin")
    with pytest.raises(ValueError, match="needs digits.bin beside it"):
        resolve_model_dir(ir / "digits.xml", "x", tmp_path)
    shutil.copy(ir / "digits.onnx", ir / "other.onnx")
    with pytest.raises(ValueError, match="2 .onnx model files"):
        resolve_model_dir(ir, "x", tmp_path)


def serve_with_runtime_args(mnt: Path, name: str, tmp_path: Path) -> Server:
    """`kiln serve` with the runtime's args verbatim, but for what KServe substitutes ({{.Name}}),
    the mount point and the two ports (this machine is shared: 8080 and 9000 may be taken); ready."""
    http_port, grpc_port = free_port(), free_port()
    args = [a.replace("{{.Name}}", name).replace("/mnt/models", str(mnt))
            .replace("=8080", f"={http_port}").replace("=9000", f"={grpc_port}") for a in runtime_args()]
    log_path = tmp_path / "kiln.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILN_CACHE_DIR": str(tmp_path / "cache")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", *args], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    srv = Server(proc, http_port, log_path, tmp_path / "cache", mnt, args, grpc_port)
    try:
        srv.wait_ready()
    except BaseException:
        srv.stop()
        raise
    return srv


def test_serve_an_openvino_ir_with_its_source_from_the_runtimes_args(tmp_path):
    """An OVMS-style bucket (a bare IR plus the ONNX it came from): served as the artifact and
    verified against the source, over HTTP and gRPC."""
    mnt = tmp_path / "mnt" / "models"
    _digits_ir(mnt, "resnetish")
    shutil.copy(DEFAULT_REPO / "digits-cnn" / "1" / "model.onnx", mnt / "resnetish.onnx")
    (mnt / "config.yaml").write_text("backend: openvino\n")  # with a source beside it the default is onnxruntime
    srv = serve_with_runtime_args(mnt, "ir-isvc", tmp_path)
    try:
        hc = httpclient.InferenceServerClient(srv.address)
        p = hc.get_model_metadata("ir-isvc")["parameters"]
        assert p["backend"] == "openvino" and p["cache"] == "artifact" and p["parity_passed"] is True, p
        x = np.load(DEFAULT_REPO / "digits-cnn" / "data" / "eval.npz")["input"][:4]
        gc = grpcclient.InferenceServerClient(srv.grpc_address)
        gin = grpcclient.InferInput("input", list(x.shape), "FP32")
        gin.set_data_from_numpy(x)
        got = gc.infer("ir-isvc", [gin]).as_numpy("logits")
        gc.close()
        hc.close()
        import onnxruntime as ort

        sess = ort.InferenceSession(str(mnt / "resnetish.onnx"), providers=["CPUExecutionProvider"])
        want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(got, want, atol=1e-4)
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_serve_with_the_runtimes_args_on_a_storage_initializer_layout(tmp_path):
    mnt = tmp_path / "mnt" / "models"
    _digits_files(mnt)
    srv = serve_with_runtime_args(mnt, "digits-isvc", tmp_path)
    try:
        x = np.load(mnt / "data" / "eval.npz")["input"][:8]
        hc = httpclient.InferenceServerClient(srv.address)
        hin = httpclient.InferInput("input", list(x.shape), "FP32")
        hin.set_data_from_numpy(x, binary_data=True)
        want = hc.infer("digits-isvc", [hin]).as_numpy("logits")
        assert hc.get_model_metadata("digits-isvc")["parameters"]["parity_passed"] is True
        hc.close()
        gc = grpcclient.InferenceServerClient(srv.grpc_address)
        assert gc.is_model_ready("digits-isvc")
        gin = grpcclient.InferInput("input", list(x.shape), "FP32")
        gin.set_data_from_numpy(x)
        np.testing.assert_array_equal(gc.infer("digits-isvc", [gin]).as_numpy("logits"), want)
        gc.close()
        assert want.shape == (8, 10)
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
