"""`kiln serve --workers 2`: several processes on one port, /metrics merged across them."""

from __future__ import annotations

import time

import httpx
import orjson

from tests.kiln_server import DEFAULT_REPO, start_server
from tests.metrics_util import scrape, value

GOOD = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 1, 8, 8], "data": [0.5] * 192}]})


def test_two_workers_share_the_port_and_merge_metrics(tmp_path):
    srv = start_server(DEFAULT_REPO, tmp_path / "cache", log_dir=tmp_path,
                       args=["--workers", "2", "--models", "digits-cnn"],
                       env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}, timeout=300)
    try:
        ok, deadline = 0, time.monotonic() + 120
        while ok < 40 and time.monotonic() < deadline:
            # A new connection per request: the kernel spreads them over both workers.
            r = httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=GOOD, timeout=30)
            if r.status_code == 200:
                ok += 1
                assert r.json()["outputs"][0]["shape"] == [3, 10]
            else:  # the other worker may still be warming up
                assert r.status_code == 503 and "error" in r.json()
                time.sleep(0.2)
        assert ok == 40
        files = list((tmp_path / "prom").glob("*.db"))
        pids = {f.stem.rsplit("_", 1)[-1] for f in files}
        assert len(pids) >= 2, f"metrics from one process only: {sorted(f.name for f in files)}"
        for _ in range(6):  # whichever worker answers /metrics, the totals are the merged ones
            m = scrape(srv.url)
            assert value(m, "kiln_inference_requests_total", model="digits-cnn", outcome="success") == 40
            assert value(m, "kiln_inference_samples_total", model="digits-cnn") == 120
            assert value(m, "kiln_request_duration_seconds_count", model="digits-cnn", phase="total") == 40
    finally:
        srv.stop()
