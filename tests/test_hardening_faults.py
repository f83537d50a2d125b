"""Fault injection: a backend that throws at run time, a corrupted cache, a broken source, a
read-only cache — each ends as docs/hardening.md says, and the other models keep serving."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import orjson
import pytest

from tests.hardening_util import add_digits, add_faulty, digits_body
from tests.kiln_server import cache_entries, start_server
from tests.metrics_util import scrape, value


def _faulty_body(x: float) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [x] * 4}]})


def test_backend_error_at_run_time_is_500_for_that_request_only(tmp_path):
    repo = tmp_path / "repo"
    add_digits(repo)
    add_faulty(repo)
    srv = start_server(repo, log_dir=tmp_path)
    try:
        before = scrape(srv.url)
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            assert http.post("/v2/models/faulty/infer", content=_faulty_body(3.0)).status_code == 200
            for _ in range(3):
                r = http.post("/v2/models/faulty/infer", content=_faulty_body(1e6))  # index out of bounds in ORT
                assert r.status_code == 500, r.text
                assert set(r.json()) == {"error"} and "failed during inference" in r.json()["error"]
            # The runner survived: the same model and the others still answer.
            assert http.post("/v2/models/faulty/infer", content=_faulty_body(2.0)).status_code == 200
            assert http.post("/v2/models/digits-cnn/infer", content=digits_body()).status_code == 200
            assert http.get("/v2/models/faulty/ready").status_code == 200
            assert http.get("/v2/health/ready").status_code == 200
        after = scrape(srv.url)

        def delta(**labels):
            return value(after, "kiln_inference_requests_total", **labels) - value(
                before, "kiln_inference_requests_total", **labels)

        assert delta(model="faulty", outcome="server_error") == 3
        assert delta(model="faulty", outcome="success") == 2
        assert "failed during inference" in srv.log() or "-> 500" in srv.log()
    finally:
        assert srv.stop() == 0


def test_truncated_artifact_and_manifest_are_rebuilt(tmp_path):
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    add_digits(repo)
    assert start_server(repo, cache, log_dir=tmp_path).stop() == 0
    (entry,) = cache_entries(cache)

    def rebuilt_and_serving() -> None:
        srv = start_server(repo, cache, log_dir=tmp_path)
        try:
            assert value(scrape(srv.url), "kiln_compile_cache_total", result="corrupt") == 1
            assert httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=digits_body()).status_code == 200
        finally:
            assert srv.stop() == 0

    (entry / "manifest.json").write_text('{"files": ')  # truncated manifest
    rebuilt_and_serving()
    artifact = entry / "model.onnx"
    artifact.write_bytes(b"\0" * artifact.stat().st_size)  # same size, garbage bytes
    rebuilt_and_serving()


def test_source_broken_after_serving_fails_on_reload_and_the_old_build_keeps_serving(tmp_path):
    """As Triton: a reload that fails leaves the loaded build unchanged and serving; the load call
    reports the failure and the index says why. A model's first load that fails is FAILED."""
    repo = tmp_path / "repo"
    add_digits(repo)
    add_faulty(repo, "victim")
    srv = start_server(repo, log_dir=tmp_path)
    try:
        before = httpx.post(srv.url + "/v2/models/victim/infer", content=_faulty_body(1.0))
        assert before.status_code == 200
        src = repo / "victim" / "1" / "model.onnx"
        good = src.read_bytes()
        src.write_bytes(good[:40])  # truncated source
        r = httpx.post(srv.url + "/v2/repository/models/victim/load", timeout=60)
        assert r.status_code == 400 and "victim" in r.json()["error"]
        meta = httpx.get(srv.url + "/v2/models/victim").json()["parameters"]
        assert meta["state"] == "READY", meta
        r = httpx.post(srv.url + "/v2/models/victim/infer", content=_faulty_body(1.0))
        assert r.status_code == 200 and r.json()["outputs"] == before.json()["outputs"]
        index = httpx.post(srv.url + "/v2/repository/index", json={}).json()
        entry = next(m for m in index if m["name"] == "victim")
        assert entry["state"] == "READY" and "the new one FAILED" in entry["reason"], entry
        m = scrape(srv.url)
        assert value(m, "kiln_model_state", model="victim", version="1", state="READY") == 1
        assert value(m, "kiln_parity_verified", model="victim", version="1") == 1  # the old build's series again
        assert httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=digits_body()).status_code == 200

        src.write_bytes(good)  # fixed: the reload replaces the build and the failure note goes
        assert httpx.post(srv.url + "/v2/repository/models/victim/load", timeout=60).status_code == 200
        entry = next(m for m in httpx.post(srv.url + "/v2/repository/index", json={}).json() if m["name"] == "victim")
        assert entry["state"] == "READY" and not entry.get("reason"), entry

        add_faulty(repo, "newcomer")
        (repo / "newcomer" / "1" / "model.onnx").write_bytes(good[:40])
        r = httpx.post(srv.url + "/v2/repository/models/newcomer/load", timeout=60)
        assert r.status_code == 400 and "newcomer" in r.json()["error"]
        meta = httpx.get(srv.url + "/v2/models/newcomer").json()["parameters"]
        assert meta["state"] == "FAILED" and meta["reason"]
        r = httpx.post(srv.url + "/v2/models/newcomer/infer", content=_faulty_body(1.0))
        assert r.status_code == 503 and "FAILED" in r.json()["error"]
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200  # FAILED models do not block readiness
    finally:
        assert srv.stop() == 0


def _make_readonly(path: Path) -> bool:
    """chmod (non-root) or the immutable attribute (root ignores modes); False if neither holds."""
    path.chmod(0o555)
    probe = path / ".probe"
    try:
        probe.touch()
        probe.unlink()
    except OSError:
        return True
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        try:
            probe.touch()
            probe.unlink()
        except OSError:
            return True
    return False


def _undo_readonly(path: Path) -> None:
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


def test_readonly_cache_serves_hits_and_builds_misses_in_a_temporary_cache(tmp_path):
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    add_digits(repo)
    assert start_server(repo, cache, log_dir=tmp_path).stop() == 0  # warm entry for digits-cnn
    add_faulty(repo, "newcomer")  # not in the cache: a miss
    if not _make_readonly(cache):
        pytest.skip("cannot make a directory read-only here")
    try:
        srv = start_server(repo, cache, log_dir=tmp_path)
        try:
            m = scrape(srv.url)
            assert value(m, "kiln_compile_cache_total", result="hit") == 1
            assert value(m, "kiln_compile_cache_total", result="miss") == 1
            assert httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=digits_body()).status_code == 200
            assert httpx.post(srv.url + "/v2/models/newcomer/infer", content=_faulty_body(1.0)).status_code == 200
            log = srv.log()
            assert f"compile cache directory {cache} is not writable" in log and "temporary cache" in log
            config = httpx.get(srv.url + "/v2/models/newcomer/config").json()["kiln"]
            assert not config["artifact"].startswith(str(cache)) and "kiln-cache-fallback-" in config["artifact"]
            fallback = next(p for p in Path(config["artifact"]).parents if p.name.startswith("kiln-cache-fallback-"))
            assert fallback.is_dir()
        finally:
            assert srv.stop() == 0
        assert not fallback.exists(), "the temporary fallback cache outlived the server"
    finally:
        _undo_readonly(cache)
    assert len(cache_entries(cache)) == 1
    assert os.access(cache, os.W_OK)
