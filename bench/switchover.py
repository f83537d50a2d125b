"""What a model update costs the clients: `python -m bench.switchover [--threads 4] [--runs 3]`.

A real server in poll mode (`--repository-poll-secs 0.2`) on a temporary repository holding
digits-cnn v1, under continuous load from tritonclient.http clients (one per thread, binary tensors,
batch 1). A v2 folder is moved in; the table shows, before / during (folder moved in → every client
answered by v2) / after, the requests sent, the failed or wrong ones (each answer is compared with
the offline ONNX Runtime output of the version that says it answered) and the latency percentiles.
Then the same for a config change (v2 rebuilt) and a broken v3 (traffic must stay on v2).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.kiln_server import start_server
from tests.rollout_util import CONFIG, SOURCE, Load, eval_inputs, make_model, offline_logits, perturbed_model, \
    states, wait_for, write_version


def _row(label: str, results: list) -> str:
    if not results:
        return f"| {label} | 0 | 0 | | | |"
    lat = np.array([r[1] for r in results]) * 1000
    failed = sum(1 for r in results if r[3])
    return (f"| {label} | {len(results)} | {failed} | {np.percentile(lat, 50):.2f} | {np.percentile(lat, 99):.2f} "
            f"| {lat.max():.2f} |")


def phase(load: Load, change, done, label: str) -> list[str]:
    time.sleep(1.0)
    t0 = time.perf_counter()
    change()
    wait_for(done, 120, 0.02, what=label)
    t1 = time.perf_counter()
    time.sleep(1.0)
    t2 = time.perf_counter()
    res = list(load.results)
    return [f"| **{label}**: {t1 - t0:.2f} s from the change to its end | | | | | |",
            _row("before", [r for r in res if r[0] < t0 and r[0] > t0 - 1.0]),
            _row("during", [r for r in res if t0 <= r[0] < t1]),
            _row("after", [r for r in res if t1 <= r[0] < t2])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--log", action="store_true", help="print the server's log to stderr")
    args = ap.parse_args(argv)
    x, _ = eval_inputs()
    expected = {"1": offline_logits(SOURCE / "1" / "model.onnx", x), "2": offline_logits(perturbed_model(), x)}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        folder = make_model(repo)
        srv = start_server(repo, log_dir=Path(tmp), args=["--model-control-mode", "poll", "--repository-poll-secs", "0.2"])
        lines = ["| window | requests | failed or wrong | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
        try:
            with Load(srv.address, "digits", expected, threads=args.threads) as load:
                lines += phase(load, lambda: write_version(folder, 2, "v2"),
                               lambda: len(load.results) > 20 and all(r[2] == "2" for r in load.results[-args.threads * 5:]),
                               "new version v2 (v1 → v2)")
                mark = len(srv.log())
                lines += phase(load, lambda: (folder / "config.yaml").write_text(CONFIG.replace("delay_ms: 1", "delay_ms: 2")),
                               lambda: "digits v2 READY" in srv.log()[mark:], "config change (v2 rebuilt)")
                lines += phase(load, lambda: write_version(folder, 3, "broken"),
                               lambda: states(srv.url, "digits").get("3") == "FAILED", "broken version v3 (stays on v2)")
            total = load.results
            lines.append(f"\nall: {len(total)} requests, {len(load.failures())} failed or wrong; answered by "
                         f"{load.versions()}; {args.threads} client threads")
        finally:
            srv.stop()
            if args.log:
                print(srv.log(), file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
