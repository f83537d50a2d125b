"""Issue 17, batcher and repository items, against the real server over real sockets:

- a batch of 0 rows is refused with 400 (as Triton) and never wedges the model (JSON and binary);
- a batcher that breaks (a fault injected into the server process) reports the model and the server
  not ready, answers 503 with the reason at once, and a reload recovers it;
- concurrent loads of one model leave exactly one live set of runners (thread count back where it
  started), and load/unload races always end loaded-and-READY or unloaded, never FAILED;
- refused loads do not settle the heap; a burst of changing loads settles it once.

Every test ends with a normal infer whose logits match ONNX Runtime on the model's source.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.hardening_util import DIGITS, add_digits, digits_body
from tests.kiln_server import DEFAULT_REPO, start_server

SOURCE = DEFAULT_REPO / "digits-cnn" / "1" / "model.onnx"
INFER = "/v2/models/digits-cnn/infer"
SETTLE_DELAY_S = 2.0


def expected_logits() -> np.ndarray:
    x = np.asarray(DIGITS["inputs"][0]["data"], np.float32).reshape(1, 1, 8, 8)
    sess = ort.InferenceSession(str(SOURCE), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def assert_serves_digits(url: str) -> None:
    """A normal infer answers 200 with ONNX Runtime's logits, and the model and server are ready."""
    r = httpx.post(url + INFER, content=digits_body(), timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), expected_logits(),
                               rtol=1e-4, atol=1e-4)
    assert httpx.get(url + "/v2/models/digits-cnn/ready").status_code == 200
    assert httpx.get(url + "/v2/health/ready").status_code == 200


def server_threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))


@pytest.fixture(scope="module")
def digits_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("batcher-repo")
    add_digits(root / "repo")
    # Heap settles 2 s after the last model change: wider than one reload on a loaded CI machine.
    srv = start_server(root / "repo", log_dir=root, env={"KILN_GC_SETTLE_DELAY_S": str(SETTLE_DELAY_S)})
    yield srv
    assert srv.stop() == 0


# -- item 1: a batch of 0 rows ---------------------------------------------------------------------
def test_zero_row_batch_is_400_and_the_model_keeps_serving(digits_server):
    url = digits_server.url
    json_body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 1, 8, 8], "data": []}]})
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 1, 8, 8],
                                       "parameters": {"binary_data_size": 0}}]})
    for body, headers in [(json_body, {}), (header, {"Inference-Header-Content-Length": str(len(header))})] * 3:
        r = httpx.post(url + INFER, content=body, headers=headers, timeout=10)
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"error"}
        assert "batch-size must be >= 1" in r.json()["error"] and "input 'input'" in r.json()["error"]
    # The binary form as tritonclient sends it.
    client = triton.InferenceServerClient(digits_server.address)
    empty = triton.InferInput("input", [0, 1, 8, 8], "FP32")
    empty.set_data_from_numpy(np.zeros((0, 1, 8, 8), np.float32), binary_data=True)
    with pytest.raises(InferenceServerException) as err:
        client.infer("digits-cnn", [empty])
    assert err.value.status() == "400" and "batch-size must be >= 1" in err.value.message()
    # Nothing wedged: later requests are answered at once and right, including batched ones.
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    full = triton.InferInput("input", list(x.shape), "FP32")
    full.set_data_from_numpy(x, binary_data=True)
    sess = ort.InferenceSession(str(SOURCE), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    for _ in range(20):
        got = client.infer("digits-cnn", [full]).as_numpy(client.get_model_metadata("digits-cnn")["outputs"][0]["name"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    client.close()
    assert_serves_digits(url)


# -- item 2: concurrent loads, load/unload races ---------------------------------------------------------
def _post(url: str, path: str) -> int:
    return httpx.post(url + path, timeout=120).status_code


def test_concurrent_loads_keep_one_live_set_of_runners(digits_server):
    url, pid = digits_server.url, digits_server.proc.pid
    load = "/v2/repository/models/digits-cnn/load"
    assert _post(url, load) == 200  # one reload first: what a steady reload leaves behind
    start = server_threads(pid)
    with cf.ThreadPoolExecutor(2) as pool:
        for _ in range(20):
            assert list(pool.map(lambda _: _post(url, load), range(2))) == [200, 200]
    deadline = time.monotonic() + 10
    while server_threads(pid) > start + 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # closed runners' threads finish
    end = server_threads(pid)
    assert end <= start + 2, f"threads {start} -> {end} after 20 rounds of two concurrent loads"
    assert_serves_digits(url)


def _wait_registered(url: str, timeout: float = 30.0) -> None:
    """Until a first load has registered the model (it holds the model's turn while it builds)."""
    deadline = time.monotonic() + timeout
    while httpx.get(url + "/v2/models/digits-cnn").status_code == 404:
        assert time.monotonic() < deadline, "the load never registered the model"
        time.sleep(0.005)


def test_load_unload_races_end_consistent(digits_server):
    """30 races of a load and an unload, four kinds in turn: from loaded, load then unload and unload
    then load, the second 0-420 ms after the first (into every phase of the build); from unloaded, a
    first load with an unload sent once the load has registered the model (so it must run after the
    load: the model ends unloaded), and an unload then a load. Never FAILED; always consistent."""
    url = digits_server.url
    load, unload = "/v2/repository/models/digits-cnn/load", "/v2/repository/models/digits-cnn/unload"
    outcomes = {"loaded": 0, "unloaded": 0}
    with cf.ThreadPoolExecutor(2) as pool:
        for race in range(30):
            kind, delay = race % 4, (race // 4 % 8) * 0.06
            start_loaded = kind < 2
            if start_loaded and httpx.get(url + "/v2/models/digits-cnn/ready").status_code != 200:
                assert _post(url, load) == 200
            if not start_loaded and httpx.get(url + "/v2/models/digits-cnn").status_code != 404:
                assert _post(url, unload) == 200
            first, second = (load, unload) if kind in (0, 2) else (unload, load)
            a = pool.submit(_post, url, first)
            if kind == 2:
                _wait_registered(url)
            else:
                time.sleep(delay)
            b = pool.submit(_post, url, second)
            status = dict(zip((first, second), (a.result(), b.result())))
            assert status[load] == 200, (race, status)
            # Unloading a model that is not loaded (unloaded at the start, and its turn came first) is 404.
            assert status[unload] == 200 or (kind == 3 and status[unload] == 404), (race, status)
            meta = httpx.get(url + "/v2/models/digits-cnn")
            if kind == 2:
                assert meta.status_code == 404, f"race {race}: an unload sent during the load ran before it"
            if meta.status_code == 404:  # unloaded last: gone, and said so in the index
                index = httpx.post(url + "/v2/repository/index", timeout=10).json()
                assert {"name": "digits-cnn", "state": "UNAVAILABLE", "reason": "unloaded"} in index
                outcomes["unloaded"] += 1
            else:
                params = meta.json()["parameters"]
                assert params["state"] == "READY", (race, params)
                assert httpx.post(url + INFER, content=digits_body(), timeout=30).status_code == 200
                outcomes["loaded"] += 1
            assert httpx.get(url + "/v2/health/ready").status_code == 200
    assert sum(outcomes.values()) == 30
    if httpx.get(url + "/v2/models/digits-cnn/ready").status_code != 200:
        assert _post(url, load) == 200
    assert_serves_digits(url)
    assert "FAILED" not in digits_server.log()


# -- item 11: heap settling --------------------------------------------------------------------------------
def _settles(server) -> int:
    return server.log().count("heap settled:")


def test_refused_loads_do_not_settle_the_heap_and_bursts_settle_once(digits_server, tmp_path):
    url = digits_server.url
    time.sleep(SETTLE_DELAY_S + 0.5)  # any settle of earlier tests' changes has run
    before = _settles(digits_server)
    for i in range(30):
        r = httpx.post(url + f"/v2/repository/models/no-such-model-{i}/load", timeout=10)
        assert r.status_code == 404 and "not in the repository" in r.json()["error"]
        r = httpx.post(url + "/v2/repository/models/bad%20name/load", timeout=10)
        assert r.status_code == 400 and "invalid model name" in r.json()["error"]
    time.sleep(SETTLE_DELAY_S + 0.5)  # longer than the settle delay
    assert _settles(digits_server) == before, "a refused load settled the heap"
    # Ten reloads in a row change the models each time: one settle after the burst (another at most
    # every 10 s while it lasts), not ten.
    t0 = time.monotonic()
    for _ in range(10):
        assert _post(url, "/v2/repository/models/digits-cnn/load") == 200
    burst = time.monotonic() - t0
    deadline = time.monotonic() + 15
    while _settles(digits_server) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(SETTLE_DELAY_S + 0.5)
    settles = _settles(digits_server) - before
    assert 1 <= settles <= 1 + int(burst // 10), (settles, burst, digits_server.log()[-3000:])
    assert_serves_digits(url)


# -- a broken batcher reports not ready ------------------------------------------------------------------
FAULT = '''
import os, sys
sys.path.insert(0, os.getcwd())
import service.batcher as _b
_real = _b.batch_limit
def batch_limit(*args, **kwargs):
    if os.path.exists(os.environ["KILN_TEST_FAULT_FILE"]):
        raise ZeroDivisionError("injected fault in the batch policy")
    return _real(*args, **kwargs)
_b.batch_limit = batch_limit
'''


@pytest.mark.parametrize("mode", ["inline", "threads"])
def test_broken_batcher_is_not_ready_and_answers_503_at_once(tmp_path, mode):
    """A fault in the batch policy, injected into the server process (sitecustomize), breaks the
    batcher: inline in the event-loop callback, or in the runner thread (KILN_INLINE_MAX_MS=0)."""
    add_digits(tmp_path / "repo")
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAULT)
    fault = tmp_path / "fault"
    env = {"PYTHONPATH": str(tmp_path / "inject"), "KILN_TEST_FAULT_FILE": str(fault)}
    if mode == "threads":
        env["KILN_INLINE_MAX_MS"] = "0"
    srv = start_server(tmp_path / "repo", log_dir=tmp_path, env=env)
    try:
        assert_serves_digits(srv.url)
        expected_mode = "inline on the event loop" if mode == "inline" else "1 runner thread(s)"
        assert expected_mode in srv.log()
        fault.touch()
        for _ in range(3):
            t0 = time.monotonic()
            r = httpx.post(srv.url + INFER, content=digits_body(), timeout=30)
            assert r.status_code == 503, r.text
            assert time.monotonic() - t0 < 2.0
            assert "not ready" in r.json()["error"] and "ZeroDivisionError" in r.json()["error"], r.text
        r = httpx.get(srv.url + "/v2/models/digits-cnn/ready")
        assert r.status_code == 503 and "UNAVAILABLE" in r.json()["error"] and "injected fault" in r.json()["error"]
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 503
        assert httpx.get(srv.url + "/v2/models/digits-cnn").json()["parameters"]["state"] == "UNAVAILABLE"
        log = srv.log()
        assert "batcher broken" in log and "Traceback" in log and "injected fault" in log
        fault.unlink()
        assert _post(srv.url, "/v2/repository/models/digits-cnn/load") == 200  # a reload recovers it
        assert_serves_digits(srv.url)
    finally:
        fault.unlink(missing_ok=True)
        assert srv.stop() == 0
