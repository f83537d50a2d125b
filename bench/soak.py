"""Soak test (not in CI): N minutes at concurrency C against the real server; any failed request is
a failure; reports server RSS at start and end (a leak shows as steady growth).

    python -m bench.soak --minutes 10 --concurrency 32             # starts its own server (digits-cnn)
    python -m bench.soak --minutes 60 --url http://host:8000 --pid 1234   # an existing server

Mixes JSON and binary-extension requests, random batch sizes, and a small share of bad requests
(which must get their 4xx, not a 5xx). Exit status 1 when any request failed.

    python -m bench.soak --minutes 0.5 --concurrency 8 --adversarial   # normal clients alone, then beside
                                                                        # hostile ones: p99 and errors of each

--adversarial runs the soak twice, the second time beside hostile clients (issue 17's HTTP-front
attacks, each reconnecting whenever the server closes it): slow headers (one header value streamed
without end), half-sent bodies, non-reading pipeliners, silent sockets, and with --churn a reload
of the model every second. It reports the normal clients' p50/p99 and failures in both phases.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import select
import socket
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


class Adversaries:
    """Hostile clients beside the normal ones, each kind on its own thread, reconnecting whenever the
    server closes them; `stop` returns how many connections of each kind were opened."""

    def __init__(self, host: str, port: int, model: str, url: str, *, slow_headers: int = 2, half_bodies: int = 64,
                 pipeliners: int = 2, silent: int = 64, churn: bool = False) -> None:
        self.addr, self.model, self.url = (host, port), model, url
        self.plan = {"slow_header": slow_headers, "half_body": half_bodies, "pipeliner": pipeliners, "silent": silent}
        self.churn = churn
        self.opened = dict.fromkeys([*self.plan, "reload"], 0)
        self.stopping = threading.Event()
        body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                         "data": [0.5] * 64}]})
        head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.infer = head + body
        self.half = head + body[: len(body) // 2]

    def _connect(self, kind: str) -> socket.socket | None:
        try:
            s = socket.create_connection(self.addr, timeout=5)
        except OSError:
            time.sleep(0.05)
            return None
        self.opened[kind] += 1
        return s

    def _streamer(self, kind: str, first: bytes, more: bytes) -> None:
        """Send `first`, then `more` for ever (never reading) until the server drops the connection."""
        while not self.stopping.is_set():
            s = self._connect(kind)
            if s is None:
                continue
            try:
                s.settimeout(None)  # held until the server drops it
                s.sendall(first)
                while not self.stopping.is_set():
                    s.sendall(more)
            except OSError:
                pass
            finally:
                s.close()

    def _holder(self, kind: str, n: int, payload: bytes) -> None:
        """Keep `n` connections open that sent `payload` (maybe nothing) and then went quiet."""
        socks: list[socket.socket] = []
        while not self.stopping.is_set():
            while len(socks) < n and not self.stopping.is_set():
                s = self._connect(kind)
                if s is None:
                    break
                try:
                    if payload:
                        s.sendall(payload)
                    socks.append(s)
                except OSError:
                    s.close()
            readable = select.select(socks, [], [], 0.2)[0] if socks else []
            for s in readable:  # answered (408) or closed by the server: open another
                try:
                    s.recv(1 << 16)
                except OSError:
                    pass
                socks.remove(s)
                s.close()
        for s in socks:
            s.close()

    def _reloader(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self.stopping.wait(1.0):
                try:
                    c.post(f"{self.url}/v2/repository/models/{self.model}/load")
                    self.opened["reload"] += 1
                except httpx.HTTPError:
                    pass

    def run(self, stop, report) -> None:
        """In the adversaries' own process (their threads must not take the normal clients' GIL)."""
        targets = []
        for _ in range(self.plan["slow_header"]):
            start = f"GET /v2/models/{self.model} HTTP/1.1\r\nHost: soak\r\nX-Pad: ".encode()
            targets.append((self._streamer, ("slow_header", start, b"a" * 16384)))
        for _ in range(self.plan["pipeliner"]):
            targets.append((self._streamer, ("pipeliner", self.infer, self.infer * 64)))
        if self.plan["half_body"]:
            targets.append((self._holder, ("half_body", self.plan["half_body"], self.half)))
        if self.plan["silent"]:
            targets.append((self._holder, ("silent", self.plan["silent"], b"")))
        if self.churn:
            targets.append((self._reloader, ()))
        for fn, fargs in targets:
            threading.Thread(target=fn, args=fargs, daemon=True).start()
        stop.wait()
        self.stopping.set()
        report.put(dict(self.opened))

    def start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._stop, self._report = ctx.Event(), ctx.Queue()
        self._proc = ctx.Process(target=self.run, args=(self._stop, self._report), daemon=True)
        self._proc.start()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        try:
            opened = self._report.get(timeout=10)
        finally:
            self._proc.terminate()  # threads blocked in a send the server never reads
            self._proc.join(10)
        return opened


def soak_phase(args, url: str, pid: int | None, label: str) -> dict:
    """`args.minutes` of normal clients at `args.concurrency`: counts, latency, RSS, health after."""
    path = f"{url}/v2/models/{args.model}/infer"
    print(f"-- {label}", flush=True)
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
    p50 = statistics.median(lat) * 1000 if lat else float("nan")
    p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else float("nan")
    print(f"soak: {elapsed / 60:.1f} min at c={args.concurrency}: {total} requests ({total / elapsed:.0f}/s), "
          f"{counts['ok']} ok, {counts['expected_4xx']} expected 4xx, {counts['failed']} FAILED")
    print(f"latency p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    if rss_start is not None and rss_end is not None:
        print(f"server RSS: start {rss_start:.1f} MiB, end {rss_end:.1f} MiB "
              f"(growth {rss_end - rss_start:+.1f} MiB, max {max(rss_samples or [rss_end]):.1f} MiB)")
    print(f"healthy afterwards: {healthy}")
    for f in failures:
        print("  failure:", f)
    return {"requests": total, "failed": counts["failed"], "p50_ms": p50, "p99_ms": p99,
            "passed": counts["failed"] == 0 and healthy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--concurrency", "-c", type=int, default=32)
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--pid", type=int, help="its process id, for RSS")
    ap.add_argument("--adversarial", action="store_true",
                    help="soak twice: alone, then beside slow-header, half-body, non-reading and silent clients")
    ap.add_argument("--churn", action="store_true", help="with --adversarial: also reload the model every second")
    ap.add_argument("--hostile", default="slow_headers=2,half_bodies=64,pipeliners=2,silent=64",
                    help="with --adversarial: how many of each hostile client (kind=n,...; default %(default)s)")
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
        if not args.adversarial:
            return 0 if soak_phase(args, url, pid, "soak")["passed"] else 1
        alone = soak_phase(args, url, pid, "normal clients alone")
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        plan = {k: int(v) for k, v in (item.split("=") for item in args.hostile.split(",") if item)}
        adversaries = Adversaries(host, int(port), args.model, url, churn=args.churn,
                                  **{k: plan.get(k, 0) for k in ("slow_headers", "half_bodies", "pipeliners", "silent")})
        adversaries.start()
        try:
            beside = soak_phase(args, url, pid, "beside hostile clients")
        finally:
            opened = adversaries.stop()
        print("\nnormal clients          requests  failed   p50 ms   p99 ms")
        for label, r in (("alone", alone), ("beside hostile", beside)):
            print(f"{label:22s} {r['requests']:9d} {r['failed']:7d} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")
        print("hostile connections opened: " + ", ".join(f"{k} {v}" for k, v in opened.items()))
        return 0 if alone["passed"] and beside["passed"] else 1
    finally:
        if server is not None:
            rc = server.stop()
            print(f"server exit code after SIGTERM: {rc}")


if __name__ == "__main__":
    raise SystemExit(main())
