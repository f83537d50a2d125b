"""Soak test (not in CI): N minutes at concurrency C against the real server; any failed request is
a failure; reports server RSS at start and end (a leak shows as steady growth).

    python -m bench.soak --minutes 10 --concurrency 32             # starts its own server (digits-cnn)
    python -m bench.soak --minutes 60 --url http://host:8000 --pid 1234   # an existing server

Mixes JSON and binary-extension requests, random batch sizes, and a small share of bad requests
(which must get their 4xx, not a 5xx). Exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def requests_for(model: str, rng: random.Random):
    """(body, headers, expected status) generators for the digits-cnn input [-1, 1, 8, 8] FP32."""
    def json_req():
        b = rng.choice((1, 1, 2, 4, 8))
        return orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [b, 1, 8, 8],
                                         "data": np.random.rand(b * 64).astype(np.float32)}]},
                            option=orjson.OPT_SERIALIZE_NUMPY), {}, 200

    def binary_req():
        b = rng.choice((1, 4, 16, 32))
        x = np.random.rand(b, 1, 8, 8).astype(np.float32)
        h = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [b, 1, 8, 8],
                                      "parameters": {"binary_data_size": x.nbytes}}],
                          "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
        return h + x.tobytes(), {"Inference-Header-Content-Length": str(len(h))}, 200

    def bad_req():
        return b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 7], "data": []}]}', {}, 400

    def pick():
        r = rng.random()
        return bad_req() if r < 0.02 else (binary_req() if r < 0.5 else json_req())

    return pick


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--concurrency", "-c", type=int, default=32)
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--pid", type=int, help="its process id, for RSS")
    args = ap.parse_args(argv)

    server = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        from tests.kiln_server import start_server

        log_dir = Path(tempfile.mkdtemp(prefix="kiln-soak-"))
        server = start_server(log_dir=log_dir, args=["--models", args.model])
        url, pid = server.url, server.proc.pid
        print(f"server {url} (pid {pid}, log {server.log_path})")
    path = f"{url}/v2/models/{args.model}/infer"
    try:
        # Warm up, then take the starting RSS.
        with httpx.Client(timeout=30) as c:
            for _ in range(200):
                c.post(path, content=requests_for(args.model, random.Random(0))()[0])
        rss_start = rss_mib(pid) if pid else None
        stop_at = time.monotonic() + args.minutes * 60
        lock = threading.Lock()
        counts = {"ok": 0, "expected_4xx": 0, "failed": 0}
        failures: list[str] = []
        latencies: list[float] = []
        rss_samples: list[float] = []

        def worker(seed: int) -> None:
            pick = requests_for(args.model, random.Random(seed))
            lat = []
            with httpx.Client(timeout=30) as client:
                while time.monotonic() < stop_at:
                    body, headers, want = pick()
                    t = time.perf_counter()
                    try:
                        r = client.post(path, content=body, headers=headers)
                        status, text = r.status_code, r.text[:200] if r.status_code != 200 else ""
                    except httpx.HTTPError as err:
                        status, text = 0, repr(err)
                    lat.append(time.perf_counter() - t)
                    with lock:
                        if status == want:
                            counts["ok" if want == 200 else "expected_4xx"] += 1
                        else:
                            counts["failed"] += 1
                            if len(failures) < 20:
                                failures.append(f"{status} (wanted {want}): {text}")
            with lock:
                latencies.extend(lat)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
        started = time.monotonic()
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            time.sleep(min(10.0, max(0.1, stop_at - time.monotonic())))
            if pid and (r := rss_mib(pid)) is not None:
                rss_samples.append(r)
            done = sum(counts.values())
            print(f"  {time.monotonic() - started:7.1f}s  {done} requests  {counts['failed']} failed  "
                  f"rss {rss_samples[-1] if rss_samples else float('nan'):.1f} MiB", flush=True)
        for th in threads:
            th.join()
        elapsed = time.monotonic() - started
        rss_end = rss_mib(pid) if pid else None
        with httpx.Client(timeout=10) as c:
            healthy = c.get(url + "/v2/health/ready").status_code == 200
        total = sum(counts.values())
        lat = sorted(latencies)
        print(f"soak: {elapsed / 60:.1f} min at c={args.concurrency}: {total} requests ({total / elapsed:.0f}/s), "
              f"{counts['ok']} ok, {counts['expected_4xx']} expected 4xx, {counts['failed']} FAILED")
        if lat:
            print(f"latency p50 {statistics.median(lat) * 1000:.2f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.2f} ms")
        if rss_start is not None and rss_end is not None:
            print(f"server RSS: start {rss_start:.1f} MiB, end {rss_end:.1f} MiB "
                  f"(growth {rss_end - rss_start:+.1f} MiB, max {max(rss_samples or [rss_end]):.1f} MiB)")
        print(f"healthy afterwards: {healthy}")
        for f in failures:
            print("  failure:", f)
        return 0 if counts["failed"] == 0 and healthy else 1
    finally:
        if server is not None:
            rc = server.stop()
            print(f"server exit code after SIGTERM: {rc}")


if __name__ == "__main__":
    raise SystemExit(main())
