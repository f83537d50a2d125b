"""Profile the server under load: `python -m bench.profile [--model mlp] [--format json|binary|grpc] [--seconds 8]`.

Starts Kiln pinned to core 0, drives it with wrk (core 1, c=32; h2load for --format grpc, see
bench/grpc.py) and records it with py-spy (`pip install py-spy`; needs ptrace), then prints the top
entries (bench/profile_top.py).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import http
from bench.profile_top import top


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--format", default="json")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--out", default=str(http.WORK / "profile.txt"))
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    grpc = args.format == "grpc"
    srv = http.start_kiln([args.model], grpc=grpc)
    try:
        if grpc:
            from bench import grpc as bgrpc

            grpc_body = bgrpc.grpc_body(args.model)[0]

            def drive(seconds):
                r = bgrpc.h2load(srv.grpc_address, grpc_body, args.concurrency, seconds)
                return {"requests": r["requests"], "duration_us": r["duration_s"] * 1e6}
        else:
            body = http.bodies(args.model)[args.format]

            def drive(seconds):
                return http.wrk(srv.url, f"/v2/models/{args.model}/infer", body, args.concurrency, seconds)
        drive(2)
        spy_bin = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        spy = subprocess.Popen([spy_bin, "record", "-r", "200", "-f", "raw", "-o", args.out, "-d",
                                str(args.seconds), "-p", str(srv.proc.pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        r = drive(args.seconds)
        spy.wait()
        print(f"{r['requests'] / (r['duration_us'] / 1e6):,.0f} req/s under the profiler")
        print(top(args.out, args.top))
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
