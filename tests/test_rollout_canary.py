"""Canary, shadow and the rollout guard against the real server (tritonclient.http clients), and
rollout calls racing load/unload on one model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from service.config import RolloutGuardSpec
from service.rollout import WindowSummary, disagreements, guard_verdict, split_point
from tests.kiln_server import start_server
from tests.metrics_util import scrape, value
from tests.rollout_util import (CONFIG, SOURCE, Load, eval_inputs, make_model, offline_logits, perturbed_model,
                                states, wait_for)

BOTH = CONFIG + "version_policy: {all: true}\n"


@pytest.fixture(scope="module")
def expected():
    x, _ = eval_inputs()
    return {"1": offline_logits(SOURCE / "1" / "model.onnx", x), "2": offline_logits(perturbed_model(), x)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rollout")
    make_model(tmp / "repo", config=BOTH, versions={1: "v1", 2: "v2"})
    srv = start_server(tmp / "repo", log_dir=tmp, args=["--model-control-mode", "none"], grpc=True)
    yield srv
    srv.stop()


def rollout(srv, body: dict | None = None, expect: int = 200) -> dict:
    path = srv.url + "/v2/repository/models/digits/rollout"
    r = httpx.get(path, timeout=10) if body is None else httpx.post(path, json=body, timeout=10)
    assert r.status_code == expect, r.text
    return r.json()


def infer_many(srv, ids: list[str], rows: list[int], version: str = "", threads: int = 4) -> list[tuple[str, np.ndarray]]:
    """(answering version, logits) per request, sent by `threads` tritonclient clients."""
    x, _ = eval_inputs()
    out: list = [None] * len(ids)
    local = threading.local()

    def one(k: int):
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(srv.address)
        client = local.client
        inp = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x[rows[k]:rows[k] + 1], binary_data=True)
        res = client.infer("digits", [inp], model_version=version, request_id=ids[k])
        out[k] = (res.get_response()["model_version"], res.as_numpy("logits"))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(ids))))
    return out


def test_none_mode_refuses_load_and_unload(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    for action in ("load", "unload"):
        r = httpx.post(f"{server.url}/v2/repository/models/digits/{action}")
        assert r.status_code == 503 and "explicit model load / unload is not allowed" in r.json()["error"]
    client = grpcclient.InferenceServerClient(server.grpc_address)
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as err:
            call("digits")
        assert err.value.status() == "StatusCode.UNAVAILABLE" and "not allowed" in err.value.message()
    assert states(server.url, "digits") == {"1": "READY", "2": "READY"}


def test_canary_split_by_request_id_and_retries_stick(server, expected):
    assert rollout(server)["status"] == "none"
    state = rollout(server, {"canary": {"version": 2, "weight": 0.1, "compare": 0}})
    assert state["stable_version"] == "1" and state["canary_weight"] == 0.1
    n = 5000
    ids = [f"client-request-{i}" for i in range(n)]
    rows = [i % 360 for i in range(n)]
    answers = infer_many(server, ids, rows)
    share = sum(v == "2" for v, _ in answers) / n
    assert 0.08 <= share <= 0.12, share
    assert all(np.allclose(out, expected[v][r], atol=1e-4) for (v, out), r in zip(answers, rows[:n]))
    # The split is the hash of the id: the server's choice is the documented one, and retries agree.
    assert [v for v, _ in answers] == ["2" if split_point(i) < 0.1 else "1" for i in ids]
    retries = infer_many(server, ids[:500], rows[:500])
    assert [v for v, _ in retries] == [v for v, _ in answers[:500]]
    # gRPC requests are split the same way (one infer core behind both transports).
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_address)
    x, _ = eval_inputs()
    for rid in ids[:100]:
        inp = grpcclient.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x[:1])
        version = client.infer("digits", [inp], request_id=rid).get_response().model_version
        assert version == ("2" if split_point(rid) < 0.1 else "1"), rid
    # Without an id the split is random: both versions answer at weight 0.5.
    rollout(server, {"canary": {"version": 2, "weight": 0.5, "compare": 0}})
    assert {v for v, _ in infer_many(server, [""] * 200, rows[:200])} == {"1", "2"}
    # Versioned requests go where they say, whatever the weight.
    rollout(server, {"canary": {"version": 2, "weight": 1.0, "compare": 0}})
    assert {v for v, _ in infer_many(server, ids[:50], rows[:50], version="1")} == {"1"}
    assert {v for v, _ in infer_many(server, ids[:50], rows[:50])} == {"2"}
    samples = scrape(server.url)
    assert value(samples, "kiln_rollout_weight", model="digits", version="2", role="canary") == 1.0
    assert value(samples, "kiln_rollout_weight", model="digits", version="1", role="stable") == 0.0
    cancelled = rollout(server, {"action": "cancel"})
    assert cancelled["status"] == "cancelled" and cancelled["stable_version"] == "1"
    assert {v for v, _ in infer_many(server, ids[:50], rows[:50])} == {"1"}, "cancel: the stable version serves"


def test_rollout_api_refuses_bad_requests(server):
    err = rollout(server, {"canary": {"version": 7, "weight": 0.1}}, expect=400)["error"]
    assert "canary version 7 is not loaded" in err
    err = rollout(server, {"canary": {"version": 2, "weight": 1.5}}, expect=400)["error"]
    assert "canary.weight" in err
    assert "unknown rollout action" in rollout(server, {"action": "explode"}, expect=400)["error"]
    r = httpx.post(server.url + "/v2/repository/models/nope/rollout", json={"action": "cancel"})
    assert r.status_code == 404 and "error" in r.json()


def test_shadow_disagreement_equals_offline_comparison(server, expected):
    rollout(server, {"shadow": {"version": 2}})
    before = scrape(server.url)
    n = 300
    rows = [int(r) for r in np.random.default_rng(3).integers(0, 360, n)]
    answers = infer_many(server, [f"shadow-{i}" for i in range(n)], rows)
    assert {v for v, _ in answers} == {"1"}, "a shadow's answer is never returned"
    assert all(np.allclose(out, expected["1"][r], atol=1e-4) for (_, out), r in zip(answers, rows))

    def delta(name):
        return (value(scrape(server.url), name, model="digits", version="2", baseline="1")
                - value(before, name, model="digits", version="2", baseline="1"))

    wait_for(lambda: delta("kiln_version_compared_rows_total") == n, 30, what="every shadow copy compared")
    offline = int(sum(expected["1"][r].argmax() != expected["2"][r].argmax() for r in rows))
    assert offline > 0
    assert delta("kiln_version_disagreeing_rows_total") == offline
    state = rollout(server)
    assert state["versions"]["2"]["compared_rows"] >= n
    rollout(server, {"action": "cancel"})


@pytest.mark.parametrize(("bound", "canary", "guard"), [
    # v2 answers a different top-1 class than v1 on ~28 % of the eval rows.
    ("max_disagreement", {"compare": 1.0}, {"max_disagreement": 0.1, "max_error_rate": 0.01}),
    # No request is answered in a microsecond: every canary breaks this latency bound.
    ("max_p99_ms", {"compare": 0.0}, {"max_p99_ms": 0.001, "max_error_rate": 0.01}),
])
def test_guard_rolls_a_failing_canary_back_within_its_window(server, expected, bound, canary, guard):
    before = scrape(server.url)
    window = 20.0
    set_at = time.monotonic()
    rollout(server, {"canary": {"version": 2, "weight": 0.5, **canary},
                     "guard": {**guard, "window": window, "min_requests": 20}})
    with Load(server.address, "digits", expected, threads=3) as load:
        state = wait_for(lambda: (s := rollout(server))["status"] == "rolled_back" and s, window, 0.05,
                         what="rollback")
        rolled_at, rolled_pc = time.monotonic(), time.perf_counter()
        time.sleep(0.5)
    assert rolled_at - set_at < window
    assert bound in state["reason"] and state["canary_weight"] == 0.0
    assert not load.failures(), load.failures()[:3]
    after_rollback = [r for r in load.results if r[0] > rolled_pc]
    assert after_rollback and {r[2] for r in after_rollback} == {"1"}
    samples = scrape(server.url)
    assert value(samples, "kiln_rollout_rollbacks_total", model="digits", version="2", bound=bound) \
        == value(before, "kiln_rollout_rollbacks_total", model="digits", version="2", bound=bound) + 1
    assert value(samples, "kiln_rollout_weight", model="digits", version="2", role="canary") == 0.0
    if bound == "max_disagreement":
        assert value(samples, "kiln_version_disagreement", model="digits", version="2", baseline="1") > 0.1
    else:
        assert state["versions"]["2"]["p99_ms"] > 0.001
    assert "rolled back by the guard" in server.log()
    rollout(server, {"action": "cancel"})


def test_guard_verdicts():
    guard = RolloutGuardSpec(max_error_rate=0.05, max_p99_ms=50, max_disagreement=0.2, min_live_accuracy=0.9,
                             window=30, min_requests=10)
    calm = WindowSummary(100, 1, 2.0, 20.0, 50, 50, 5)
    assert guard_verdict(guard, calm, 0.95) is None
    assert guard_verdict(guard, WindowSummary(100, 10, 2.0, 20.0, 0, 0, 0), None)[0] == "max_error_rate"
    assert guard_verdict(guard, WindowSummary(100, 0, 2.0, 80.0, 0, 0, 0), None)[0] == "max_p99_ms"
    assert guard_verdict(guard, WindowSummary(100, 0, 2.0, 20.0, 50, 50, 20), None)[0] == "max_disagreement"
    assert guard_verdict(guard, calm, 0.5)[0] == "min_live_accuracy"
    assert guard_verdict(guard, calm, None) is None, "no live accuracy: not judged"
    assert guard_verdict(guard, WindowSummary(5, 5, 2.0, 80.0, 0, 0, 0), None) is None, "too few requests"


def test_disagreement_rules():
    a = {"y": np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.4]], np.float32)}
    b = {"y": np.array([[0.2, 0.8], [0.1, 0.9], [0.5, 0.4]], np.float32)}
    assert disagreements(a, b, "top1", 1e-3, batched=True) == (3, 1)
    assert disagreements(a, b, "relative", 1e-3, batched=True) == (3, 2)
    assert disagreements(a, {"y": b["y"][:2]}, "top1", 1e-3, batched=True) == (3, 3)


def threads_of(pid: int) -> int:
    """The process's thread count once it has held still for two seconds (short-lived helper threads,
    a heap settle, a drain, have ended)."""
    def now() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise AssertionError("no Threads line")

    readings = [now()]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (len(readings) < 10 or len(set(readings[-10:])) > 1):
        time.sleep(0.2)
        readings.append(now())
    return readings[-1]


def test_rollout_calls_racing_load_and_unload_leave_one_set_of_runners(tmp_path, expected):
    # Quick loads: parity gate only (the accuracy gate is not what this test is about).
    quick = "\n".join(line for line in BOTH.splitlines() if not line.startswith("accuracy:")) + "\n"
    make_model(tmp_path / "repo", config=quick, versions={1: "v1", 2: "v2"})
    # Closed runners' threads end when the heap settle collects them: settle right after each change.
    srv = start_server(tmp_path / "repo", log_dir=tmp_path, args=["--model-control-mode", "explicit"],
                       env={"KILN_GC_SETTLE_DELAY_S": "0.1"})
    url = srv.url + "/v2/repository/models/digits"
    try:
        def call(action: str):
            if action in ("load", "unload"):
                return httpx.post(f"{url}/{action}", timeout=60).status_code
            body = {"canary": {"version": 2, "weight": 0.3}} if action == "set" else {"action": action}
            return httpx.post(f"{url}/rollout", json=body, timeout=60).status_code

        actions = ["load", "unload", "set", "cancel", "promote", "load", "set", "unload"] * 2
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(call, actions))
        assert set(codes) <= {200, 400, 404}, codes
        assert call("load") == 200
        wait_for(lambda: states(srv.url, "digits") == {"1": "READY", "2": "READY"}, 60, what="loaded")
        after_race = threads_of(srv.proc.pid)
        # The same model loaded once, calmly: what one live set of runners costs in threads.
        assert call("unload") == 200 and call("load") == 200
        assert threads_of(srv.proc.pid) == after_race, "one live set of runners per model"
        with Load(srv.address, "digits", expected, threads=2) as load:
            time.sleep(0.5)
        assert load.results and not load.failures()
    finally:
        srv.stop()


def test_window_percentiles_and_expiry():
    from service.rollout import VersionWindow

    rng = np.random.default_rng(0)
    lat = rng.lognormal(np.log(0.004), 0.6, 20_000)
    w = VersionWindow(10.0)
    for i, x in enumerate(lat):
        w.add_request(100.0 + i * 1e-4, i % 50 == 0, float(x))
    w.add_comparison(101.0, 8, 2)
    s = w.summary(102.0)
    assert s.requests == 20_000 and s.errors == 400 and (s.compared_rows, s.disagreeing_rows) == (8, 2)
    for got, q in ((s.p50_ms, 50), (s.p99_ms, 99)):
        true = float(np.percentile(lat, q)) * 1000
        assert true <= got <= true * 1.051, (q, got, true)
    assert w.summary(113.0).requests == 0, "requests older than the window no longer count"
