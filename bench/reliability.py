"""Issue 17's batcher and repository probes, as numbers: run from any checkout to compare two.

    python -m bench.reliability            # starts `kiln serve` from this checkout on digits-cnn

1. zero-row: a 0-row infer (JSON, then binary), then three normal infers: their statuses and
   seconds, and what /v2/health/ready says.
2. concurrent loads: server threads before and after 20 rounds of two concurrent loads.
3. load/unload races: 30 races of a load and an unload (the second 0-420 ms after the first; half
   from loaded, half from unloaded); how many ended FAILED, READY, unloaded.
4. heap settles: "heap settled" log lines after 60 refused loads (404/400), then after 10 reloads.
5. infer req/s (8 closed-loop clients, 3 s) alone, and while another client sends refused loads
   back to back.

The server gets KILN_REQUEST_TIMEOUT_S=3, so a wedged model shows as 504s within seconds.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import re
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from tests.hardening_util import digits_body
from tests.kiln_server import DEFAULT_REPO, start_server

INFER = "/v2/models/digits-cnn/infer"
LOAD = "/v2/repository/models/digits-cnn/load"
UNLOAD = "/v2/repository/models/digits-cnn/unload"


def threads(pid: int) -> int:
    return int(re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE).group(1))


def timed(method, url: str, **kw) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        status = str(method(url, timeout=10, **kw).status_code)
    except httpx.TimeoutException:
        status = "timeout"
    return status, time.monotonic() - t0


def zero_row(url: str, binary: bool) -> str:
    if binary:
        header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 1, 8, 8],
                                           "parameters": {"binary_data_size": 0}}]})
        first, _ = timed(httpx.post, url + INFER, content=header,
                         headers={"Inference-Header-Content-Length": str(len(header))})
    else:
        body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 1, 8, 8], "data": []}]})
        first, _ = timed(httpx.post, url + INFER, content=body)
    later = [timed(httpx.post, url + INFER, content=digits_body()) for _ in range(3)]
    ready = httpx.get(url + "/v2/health/ready").status_code
    return (f"0-row {first}; next infers " + ", ".join(f"{s} in {t:.2f}s" for s, t in later)
            + f"; /v2/health/ready {ready}")


def infer_rate(url: str, seconds: float = 3.0, refused_loads: bool = False) -> tuple[float, int]:
    """(infer req/s of 8 closed-loop clients, refused loads sent meanwhile)."""
    stop = time.monotonic() + seconds
    done, loads = [0] * 8, [0]

    def client(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < stop:
                assert c.post(url + INFER, content=digits_body()).status_code == 200
                done[i] += 1

    def loader() -> None:
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < stop:
                c.post(url + "/v2/repository/models/no-such-model/load")
                loads[0] += 1

    with cf.ThreadPoolExecutor(9) as pool:
        jobs = [pool.submit(client, i) for i in range(8)] + ([pool.submit(loader)] if refused_loads else [])
        for j in jobs:
            j.result()
    return sum(done) / seconds, loads[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-reliability-"))
    repo = work / "repo"
    shutil.copytree(DEFAULT_REPO / "digits-cnn", repo / "digits-cnn", ignore=shutil.ignore_patterns("*.pt2"))

    def serve():
        return start_server(repo, work / "cache", log_dir=work, env={"KILN_REQUEST_TIMEOUT_S": "3"})

    try:
        for binary in (False, True):
            srv = serve()
            try:
                print(f"1. zero-row ({'binary' if binary else 'JSON'}): {zero_row(srv.url, binary)}", flush=True)
            finally:
                srv.stop()
        srv = serve()
        try:
            url, pid = srv.url, srv.proc.pid
            post = lambda path: httpx.post(url + path, timeout=120).status_code
            post(LOAD)
            start = threads(pid)
            with cf.ThreadPoolExecutor(2) as pool:
                for _ in range(20):
                    list(pool.map(post, [LOAD, LOAD]))
                time.sleep(2)
                print(f"2. concurrent loads: threads {start} -> {threads(pid)} after 20 rounds of 2", flush=True)
                ended = {"FAILED": 0, "READY": 0, "unloaded": 0, "other": 0}
                for race in range(30):
                    if race % 4 < 2:  # half the races start loaded (a reload races the unload)
                        if httpx.get(url + "/v2/models/digits-cnn/ready").status_code != 200:
                            post(LOAD)
                    elif httpx.get(url + "/v2/models/digits-cnn").status_code != 404:
                        post(UNLOAD)  # half unloaded (a first load races it)
                    first, second = (LOAD, UNLOAD) if race % 2 else (UNLOAD, LOAD)
                    a = pool.submit(post, first)
                    time.sleep((race // 2 % 8) * 0.06)  # into every phase of the load's build
                    b = pool.submit(post, second)
                    a.result(), b.result()
                    meta = httpx.get(url + "/v2/models/digits-cnn")
                    if meta.status_code == 404:
                        ended["unloaded"] += 1
                    else:
                        state = meta.json()["parameters"]["state"]
                        ended[state if state in ended else "other"] += 1
                print(f"3. load/unload races (30): {ended}", flush=True)
            post(LOAD)
            time.sleep(2)
            before = srv.log().count("heap settled:")
            for i in range(30):
                httpx.post(url + f"/v2/repository/models/no-such-model-{i}/load", timeout=10)
                httpx.post(url + "/v2/repository/models/bad%20name/load", timeout=10)
            time.sleep(2)
            refused = srv.log().count("heap settled:") - before
            for _ in range(10):
                post(LOAD)
            time.sleep(3)
            reloads = srv.log().count("heap settled:") - before - refused
            print(f"4. heap settles: {refused} for 60 refused loads, {reloads} for 10 reloads in a row", flush=True)
            alone, _ = infer_rate(url)
            during, loads = infer_rate(url, refused_loads=True)
            print(f"5. infer: {alone:,.0f} req/s alone, {during:,.0f} req/s during {loads} refused loads in 3 s",
                  flush=True)
        finally:
            srv.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
