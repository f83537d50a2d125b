"""Startup compile cache (hit on restart, rebuild on change or corruption) and failure isolation."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import yaml

from tests.kiln_server import DEFAULT_REPO, cache_entries, start_server
from tests.metrics_util import scrape, value


def make_repo(root: Path, broken: bool = False) -> Path:
    repo = root / "repo"
    shutil.copytree(DEFAULT_REPO / "digits-cnn", repo / "digits-cnn", ignore=shutil.ignore_patterns("*.pt2"))
    if broken:
        (repo / "broken" / "1").mkdir(parents=True)
        (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
        (repo / "broken" / "config.yaml").write_text("backend: onnxruntime\n")
    return repo


def test_restart_reuses_cache_and_change_rebuilds(tmp_path):
    repo, cache = make_repo(tmp_path), tmp_path / "cache"
    first = start_server(repo, cache, log_dir=tmp_path)
    try:
        m = scrape(first.url)
        assert value(m, "kiln_compile_cache_total", result="miss") == 1
        assert value(m, "kiln_compile_cache_total", result="hit") == 0
        assert value(m, "kiln_compile_seconds_count", model="digits-cnn") == 1
    finally:
        first.stop()
    assert len(cache_entries(cache)) == 1

    second = start_server(repo, cache, log_dir=tmp_path)
    try:
        m = scrape(second.url)
        assert value(m, "kiln_compile_cache_total", result="hit") == 1
        assert value(m, "kiln_compile_cache_total", result="miss") == 0
        assert "compile cache hit" in second.log()
        meta = httpx.get(second.url + "/v2/models/digits-cnn").json()
        assert meta["parameters"]["cache"] == "hit"
    finally:
        second.stop()

    # A config change that affects the artifact (backend options) gives a new key: rebuilt.
    cfg_path = repo / "digits-cnn" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["backend_options"] = {"threads": 2}
    cfg_path.write_text(yaml.safe_dump(cfg))
    third = start_server(repo, cache, log_dir=tmp_path)
    try:
        m = scrape(third.url)
        assert value(m, "kiln_compile_cache_total", result="miss") == 1
    finally:
        third.stop()
    assert len(cache_entries(cache)) == 2


def test_corrupted_cache_entry_is_detected_and_rebuilt(tmp_path):
    repo, cache = make_repo(tmp_path), tmp_path / "cache"
    srv = start_server(repo, cache, log_dir=tmp_path)
    srv.stop()
    (entry,) = cache_entries(cache)
    artifact = entry / "model.onnx"
    artifact.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])  # truncated
    srv = start_server(repo, cache, log_dir=tmp_path)
    try:
        m = scrape(srv.url)
        assert value(m, "kiln_compile_cache_total", result="corrupt") == 1
        assert "corrupted" in srv.log()
        assert httpx.get(srv.url + "/v2/models/digits-cnn/ready").status_code == 200
    finally:
        srv.stop()
    (entry,) = cache_entries(cache)
    assert (entry / "model.onnx").stat().st_size > 0


def test_broken_source_fails_while_other_model_serves(tmp_path):
    repo = make_repo(tmp_path, broken=True)
    srv = start_server(repo, tmp_path / "cache", log_dir=tmp_path)
    try:
        # Server readiness counts only models that did not fail.
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200
        r = httpx.get(srv.url + "/v2/models/broken/ready")
        assert r.status_code == 503
        assert "FAILED" in r.json()["error"]
        meta = httpx.get(srv.url + "/v2/models/broken").json()
        assert meta["parameters"]["state"] == "FAILED"
        assert "onnx" in meta["parameters"]["reason"].lower()
        r = httpx.post(srv.url + "/v2/models/broken/infer", content=b"{}")
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        ok = httpx.post(srv.url + "/v2/models/digits-cnn/infer", json={
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]})
        assert ok.status_code == 200
        assert "model broken v1 FAILED" in srv.log()
        m = scrape(srv.url)
        assert value(m, "kiln_model_state", model="broken", state="FAILED") == 1
        assert value(m, "kiln_model_state", model="digits-cnn", state="READY") == 1
    finally:
        srv.stop()


def test_parity_failure_is_failed_with_reason(tmp_path):
    """A tolerance OpenVINO cannot meet (exact equality) must fail the gate, visibly."""
    repo = make_repo(tmp_path)
    (repo / "strict").mkdir()
    (repo / "strict" / "config.yaml").write_text(
        "backend: openvino\nprecision: fp32\nsource: ../digits-cnn\nmax_batch_size: 32\n"
        "verify: {atol: 0.0, rtol: 0.0, samples: ../digits-cnn/data/calib.npz}\n"
    )
    srv = start_server(repo, tmp_path / "cache", log_dir=tmp_path)
    try:
        r = httpx.get(srv.url + "/v2/models/strict/ready")
        assert r.status_code == 503
        assert "parity gate failed" in r.json()["error"]
        meta = httpx.get(srv.url + "/v2/models/strict").json()["parameters"]
        assert meta["parity_passed"] is False and meta["parity_max_abs_error"] > 0
        m = scrape(srv.url)
        assert value(m, "kiln_parity_max_abs_error", model="strict") > 0
    finally:
        srv.stop()
