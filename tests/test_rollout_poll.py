"""`--model-control-mode poll` against the real server on a temporary repository, under continuous
load from real clients (tritonclient.http in threads): new, broken, changed and removed versions."""

from __future__ import annotations

import os
import shutil
import time

import httpx
import numpy as np
import pytest

from service.poll import ContentHasher, scan_model
from tests.kiln_server import http_status, start_server
from tests.metrics_util import scrape, value
from tests.rollout_util import (CONFIG, SOURCE, Load, eval_inputs, index, make_model, offline_logits,
                                perturbed_model, states, wait_for, write_version)

POLL = ["--model-control-mode", "poll", "--repository-poll-secs", "0.3"]


@pytest.fixture(scope="module")
def expected():
    x, _ = eval_inputs()
    return {"1": offline_logits(SOURCE / "1" / "model.onnx", x), "2": offline_logits(perturbed_model(), x)}


def test_scan_hashes_only_changed_files(tmp_path):
    folder = make_model(tmp_path, versions={1: "v1", 2: "v2"})
    hasher = ContentHasher()
    first = scan_model(folder, hasher)
    assert hasher.files_hashed == 5  # config.yaml, two data files, one model per version
    again = scan_model(folder, hasher)
    assert hasher.files_hashed == 5, "an unchanged folder is only stat'ed"
    assert again.versions == first.versions and again.config_digest == first.config_digest
    # Same size, new mtime, same content: hashed again, digest unchanged (content, not mtime).
    model = folder / "2" / "model.onnx"
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = scan_model(folder, hasher)
    assert hasher.files_hashed == 6 and touched.versions == first.versions
    # The configuration is compared by its settings: a comment or a default spelled out is no change,
    # and neither is `rollout:` (it re-routes, it rebuilds nothing).
    (folder / "config.yaml").write_text("# tuned\n" + CONFIG + "instances: 1\nrollout: {shadow: {version: 2}}\n")
    same = scan_model(folder, hasher)
    assert same.config_digest == first.config_digest and same.config.rollout.shadow.version == 2
    (folder / "config.yaml").write_text(CONFIG + "instances: 2\n")
    changed = scan_model(folder, hasher)
    assert changed.config_digest != first.config_digest and changed.versions == first.versions
    (folder / "data" / "eval.npz").write_bytes(b"other data")
    assert scan_model(folder, hasher).config_digest != changed.config_digest, "data files count too"


def test_new_version_takes_over_with_no_failed_request_then_a_broken_one_never_serves(tmp_path, expected):
    repo = tmp_path / "repo"
    make_model(repo)
    srv = start_server(repo, log_dir=tmp_path, args=POLL)
    try:
        before = scrape(srv.url)
        time.sleep(1.0)  # polls of an unchanged repository: nothing rebuilt, nothing settled
        idle = scrape(srv.url)
        assert value(idle, "kiln_repository_polls_total") >= value(before, "kiln_repository_polls_total") + 2
        assert value(idle, "kiln_repository_changes_total") == 0
        assert value(idle, "kiln_compile_cache_total") == value(before, "kiln_compile_cache_total")

        with Load(srv.address, "digits", expected) as load:
            time.sleep(0.5)
            switch = time.perf_counter()
            write_version(repo / "digits", 2, "v2")
            probes = []  # the server stays ready (in its Service) while v2 builds
            wait_for(lambda: probes.append(http_status(srv.url + "/v2/health/ready")) or
                     sum(1 for r in load.results[-20:] if r[2] == "2") == 20, 60, 0.02, what="v2 serving")
            ready = time.perf_counter()
            time.sleep(0.5)
        assert not load.failures(), load.failures()[:5]
        assert len(probes) > 5 and set(probes) == {200}, probes
        assert set(load.versions()) == {"1", "2"}
        during = [r[1] for r in load.results if switch <= r[0] <= ready]
        print(f"\nswitch-over v1 -> v2: {len(load.results)} requests, {len(load.failures())} failed; "
              f"{len(during)} during the switch ({ready - switch:.2f} s), latency p50 "
              f"{np.percentile(during, 50) * 1000:.2f} ms, p99 {np.percentile(during, 99) * 1000:.2f} ms, "
              f"max {max(during) * 1000:.2f} ms")
        # Once v2 answers, v1 answers no more (it drained and unloaded: version_policy latest 1).
        first_v2 = next(i for i, r in enumerate(load.results) if r[2] == "2")
        late_v1 = [r for r in load.results[first_v2:] if r[2] == "1" and r[0] > ready]
        assert not late_v1
        wait_for(lambda: states(srv.url, "digits") == {"2": "READY"}, 30, what="v1 unloaded")

        with Load(srv.address, "digits", expected) as load:
            write_version(repo / "digits", 3, "broken")
            wait_for(lambda: states(srv.url, "digits").get("3") == "FAILED", 60, what="v3 FAILED")
            time.sleep(0.5)
        assert not load.failures(), load.failures()[:5]
        assert load.versions() == {"2": len(load.results)}, "traffic stays on v2"
        entry = next(e for e in index(srv.url) if e.get("version") == "3")
        assert "cannot read model source" in entry["reason"]
        r = httpx.get(srv.url + "/v2/models/digits/versions/3/ready")
        assert r.status_code == 503 and "FAILED" in r.json()["error"]
        assert states(srv.url, "digits") == {"2": "READY", "3": "FAILED"}
        # A failed version is not retried while its files stay the same.
        time.sleep(1.0)
        assert srv.log().count("digits v3 added") == 1
        # ... and load/unload are refused in poll mode, as in Triton.
        r = httpx.post(srv.url + "/v2/repository/models/digits/unload")
        assert r.status_code == 503 and "explicit model load / unload is not allowed" in r.json()["error"]
    finally:
        srv.stop()


def _lifecycle(log: str, model: str) -> list[str]:
    """The log lines about building, verifying or serving `model` v1. Not the monitor's: a model's
    monitor reads its drift reference once the model's first traffic arrives, which is no rebuild."""
    return [line for line in log.splitlines() if f"model {model} v1" in line and "kiln.monitor" not in line]


def test_changed_config_rebuilds_only_that_model(tmp_path, expected):
    repo = tmp_path / "repo"
    make_model(repo, "digits")
    make_model(repo, "other")
    srv = start_server(repo, log_dir=tmp_path, args=POLL)
    try:
        with Load(srv.address, "digits", expected, threads=2) as a, Load(srv.address, "other", expected, threads=1) as b:
            time.sleep(0.3)
            mark = len(srv.log())
            (repo / "digits" / "config.yaml").write_text(CONFIG.replace("max_queue_delay_ms: 1", "max_queue_delay_ms: 2"))
            wait_for(lambda: "digits v1 configuration changed" in srv.log()[mark:] and
                     "digits v1 READY" in srv.log()[mark:], 60, what="digits rebuilt")
            time.sleep(0.5)
        log = srv.log()[mark:]
        assert not a.failures() and not b.failures(), (a.failures()[:3], b.failures()[:3])
        touched = _lifecycle(log, "other")
        assert not touched and "poll: other" not in log, touched
        cfg = httpx.get(srv.url + "/v2/models/digits/config").json()
        assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
        # A change of `rollout:` alone re-routes at once and rebuilds nothing.
        mark = len(srv.log())
        (repo / "digits" / "config.yaml").write_text(CONFIG.replace("max_queue_delay_ms: 1", "max_queue_delay_ms: 2")
                                                     + "rollout: {shadow: {version: 2}, stable: 1}\n")
        wait_for(lambda: "digits: rollout changed in config.yaml" in srv.log()[mark:], 30, what="rollout applied")
        state = httpx.get(srv.url + "/v2/repository/models/digits/rollout").json()
        assert state["origin"] == "config" and state["rollout"]["stable"] == 1
        time.sleep(1.0)
        assert not _lifecycle(srv.log()[mark:], "digits"), "no rebuild for a rollout edit"
        # A torn write (the file truncated, written a moment later, as an editor saving in place does)
        # builds nothing from the empty file (a valid, all-defaults config): only the whole file acts.
        mark = len(srv.log())
        with open(repo / "digits" / "config.yaml", "w") as f:
            f.flush()
            time.sleep(0.1)  # under one poll interval: at most one scan sees it empty
            f.write(CONFIG.replace("max_queue_delay_ms: 1", "max_queue_delay_ms: 2") + "rollout: {stable: 1}\n")
        wait_for(lambda: "digits: rollout changed in config.yaml" in srv.log()[mark:], 30, what="torn rollout")
        time.sleep(1.0)
        assert not _lifecycle(srv.log()[mark:], "digits"), srv.log()[mark:]
        assert httpx.get(srv.url + "/v2/repository/models/digits/rollout").json()["rollout"].get("shadow") is None
        # An invalid config is refused: the model keeps serving as it was.
        (repo / "other" / "config.yaml").write_text(CONFIG + "max_batch_size: -3\n")
        wait_for(lambda: "other: the new configuration is refused" in srv.log(), 30, what="refusal")
        assert states(srv.url, "other") == {"1": "READY"}
    finally:
        srv.stop()


def test_removed_version_finishes_its_inflight_requests(tmp_path, expected):
    repo = tmp_path / "repo"
    make_model(repo, config=CONFIG + "version_policy: {all: true}\n", versions={1: "v1", 2: "v2"})
    srv = start_server(repo, log_dir=tmp_path, args=POLL)
    try:
        with Load(srv.address, "digits", expected, threads=3, version="1", rows=8) as pinned, \
                Load(srv.address, "digits", expected, threads=1) as plain:
            time.sleep(0.5)
            removed_at = time.perf_counter()
            shutil.rmtree(repo / "digits" / "1")
            wait_for(lambda: states(srv.url, "digits") == {"2": "READY"}, 30, what="v1 unloaded")
            unloaded_at = time.perf_counter()
            time.sleep(0.3)
        assert not plain.failures(), plain.failures()[:3]
        # Requests for v1 that started before it was unloaded were answered (by v1); after that,
        # v1 is unknown (404) — never a request cut off in flight.
        before = [r for r in pinned.results if r[0] < removed_at]
        assert before and all(not r[3] and r[2] == "1" for r in before)
        for start, _, version, error in pinned.results:
            if error:
                assert "unknown version '1'" in error and start > removed_at, error
        assert not [r for r in pinned.results if r[3] and "unloaded" in r[3]]
        assert any(r[3] for r in pinned.results if r[0] > unloaded_at), "v1 requests after the unload get 404"
        assert "closed with" not in srv.log()
    finally:
        srv.stop()


def test_cli_refuses_an_unknown_mode():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model-control-mode", "watch"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2 and "not one of none, poll, explicit" in proc.stderr
