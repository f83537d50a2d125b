"""Config validation names the file and field; `kiln compile` works without a server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.config import load_config
from service.errors import ConfigError
from tests.kiln_server import DEFAULT_REPO, ROOT, start_server


@pytest.mark.parametrize("text,field", [
    ("backend: onnxruntime\nprecision: int4\n", "precision"),
    ("verify: {atol: -1}\n", "verify.atol"),
    ("max_batch_size: 8\ninputs: [{name: x, datatype: FP32, shape: [1, 3]}]\n", "(top level)"),
    ("inputs: [{name: x, datatype: FLOAT, shape: [-1, 3]}]\n", "inputs.0.datatype"),
    ("instances: 0\n", "instances"),
    ("unknown_key: 1\n", "unknown_key"),
    ("fallback: ['openvino:int4']\n", "fallback"),
])
def test_invalid_config_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert f"field '{field}'" in str(err.value)


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("backend: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_default_configs_validate():
    from backends import backend_names

    configs = sorted(DEFAULT_REPO.glob("*/config.yaml"))
    assert configs, f"no config.yaml under {DEFAULT_REPO}"
    for cfg in configs:
        config = load_config(cfg)
        assert config.backend in (*backend_names(), "auto"), f"{cfg}: unknown backend {config.backend}"


def test_invalid_config_model_is_failed_with_reason_and_others_serve(tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_REPO / "digits-cnn", repo / "digits-cnn")
    (repo / "bad").mkdir()
    (repo / "bad" / "config.yaml").write_text("precision: int4\n")
    srv = start_server(repo, log_dir=tmp_path)
    try:
        r = httpx.get(srv.url + "/v2/models/bad/ready")
        assert r.status_code == 503
        assert "config.yaml: field 'precision'" in r.json()["error"]
        assert httpx.get(srv.url + "/v2/models/digits-cnn/ready").status_code == 200
    finally:
        srv.stop()


def _kiln(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_kiln_compile_prints_artifact_parity_and_latency(tmp_path, backend):
    r = _kiln("compile", str(DEFAULT_REPO / "digits-cnn"), "--backend", backend, "--cache-dir", str(tmp_path),
              "--runs", "20")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "READY" in out and backend in out
    assert "parity logits" in out and "pass" in out
    assert "p50 latency, batch 1" in out and "p50 latency, batch 32" in out
    # The artifact row names the cache folder the build went to (rich may wrap the path over lines).
    squashed = out.replace("\n", "").replace("│", "").replace(" ", "")
    assert "artifact" in out and f"{tmp_path}/" in squashed


def test_kiln_compile_bad_config_exits_2(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text("instances: zero\n")
    r = _kiln("compile", str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 2
    assert "field 'instances'" in r.stdout + r.stderr


def test_help_explains_commands():
    r = _kiln("--help")
    assert r.returncode == 0
    for cmd in ("serve", "compile"):
        assert cmd in r.stdout
    r = _kiln("serve", "--help")
    assert "KILN_MODEL_REPO" in r.stdout
