"""Cost of model monitoring on the request path: throughput and p99 at c=32 with monitoring off,
with drift and the feedback index but no capture, at the default capture rate (0.01), and capturing
every request.

    python -m bench.monitor                   # digits-cnn, JSON and binary, c=32, 3 interleaved rounds of 4 s
    python -m bench.monitor --models mlp --seconds 8

It runs bench.http (wrk, server pinned to core 0, the variants interleaved round by round) with
one Kiln per setting and prints each setting's req/s and p99 against monitoring off. Target: at
most 3% fewer req/s at the default rate (docs/monitoring.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import http
from bench.models import WORK

OFF = "KILN_MONITOR_ENABLED=false"
NO_CAPTURE = "KILN_MONITOR_SAMPLE_RATE=0"
FULL = "KILN_MONITOR_SAMPLE_RATE=1.0"
SETTINGS = [(f"kiln ({OFF})", "off"), (f"kiln ({NO_CAPTURE})", "drift + feedback index, no capture"),
            ("kiln", "default (capture 0.01)"), (f"kiln ({FULL})", "capture 1.0")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits-cnn")
    ap.add_argument("--formats", default="json,binary")
    ap.add_argument("--concurrency", default="32")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(WORK / "monitor.json"))
    args = ap.parse_args(argv)
    rc = http.main(["--models", args.models, "--formats", args.formats, "--concurrency", args.concurrency,
                    "--seconds", str(args.seconds), "--rounds", str(args.rounds), "--out", args.out,
                    "--kiln-variant", OFF, "--kiln-variant", NO_CAPTURE, "--kiln-variant", FULL])
    if rc:
        return rc
    results = json.loads(Path(args.out).read_text())["results"]
    print("\n| model | body | c | monitoring | req/s | vs off | p99 ms | rounds req/s |\n|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for fmt in args.formats.split(","):
            for c in (int(x) for x in args.concurrency.split(",")):
                rows = {r["server"]: r for r in results if r["model"] == model and r["format"] == fmt and r["c"] == c}
                off = rows.get(SETTINGS[0][0])
                for server, label in SETTINGS:
                    r = rows.get(server)
                    if r is None:
                        continue
                    vs = f"{100 * (r['rps'] / off['rps'] - 1):+.1f}%" if off else "-"
                    print(f"| {model} | {fmt} | {c} | {label} | {r['rps']:,.0f} | {vs} | {r['p99_ms']:.2f} | "
                          f"{r['rounds_rps']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
