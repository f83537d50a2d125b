"""Cost of model monitoring on the request path: throughput and p99 at c=32 with monitoring off,
with drift and the feedback index but no capture, at the default capture rate (0.01), and capturing
every request.

    python -m bench.monitor                   # digits-cnn, JSON and binary, c=32, 3 interleaved rounds of 4 s
    python -m bench.monitor --models mlp --seconds 8
    python -m bench.monitor --no-http         # only the in-process cost of the hand-off and the worker
    python -m bench.monitor --paired          # two servers on one core at once: off vs the default rate
    python -m bench.monitor --paired --paired-a KILN_MONITOR_SAMPLE_RATE=0   # capture off vs the default rate
    python -m bench.monitor --paired --pairs 20 --rounds 3 --seconds 2   # 20 fresh pairs: a 95% interval of about ±2%
    python -m bench.monitor --instructions --seconds 40   # instructions per request under callgrind: off vs default

It runs bench.http (wrk, server pinned to core 0, the variants interleaved round by round) with
one Kiln per setting and prints each setting's req/s and p99 against monitoring off and against
capture off (drift and the feedback index on). Target: at most 3% fewer req/s at the default rate
than with capture off (docs/monitoring.md, "What it costs", has both comparisons).

On a VM whose speed drifts from second to second, rounds run one after the other differ by more
than the target. `--paired` runs two servers AT THE SAME TIME on the same core (core 0), each under
its own wrk (c/2 connections) on core 1: the host's noise hits both at once and the scheduler splits
the core between them, so their req/s ratio in a round is the inverse of their CPU cost per
request; each server's CPU time per request (from the scheduler) is compared as well. A process
keeps a speed of its own for its whole life (a few percent either way), so `--pairs K` starts K
fresh pairs one after the other and takes the interval over the pairs.
`--paired-a KILN_MONITOR_ENABLED=false --paired-b KILN_MONITOR_ENABLED=false` (A/A) shows the
method's own error.
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


def in_process(calls: int = 20000, batch: int = 16) -> dict:
    """What monitoring costs per request, in-process and single-threaded (steadier than wrk on a
    shared machine): the model's observer once per batch of `batch` requests (what the batcher
    calls, service/batcher.py), the worker's CPU per request, and one drift evaluation
    (digits-cnn: 64 features, window 250, 128 reference rows)."""
    import tempfile
    import threading
    import time

    import numpy as np

    from service.batcher import Served
    from service.monitor.drift import DriftDetector
    from service.monitor.hub import Monitor
    from service.repository import ModelRepository
    from service.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-monitor-"))
    repo = ModelRepository(http.ROOT / "model_repo", tmp / "cache", ["digits-cnn"])
    repo.load_all()
    mv = repo.get("digits-cnn")
    xs = np.random.default_rng(0).random((batch, 1, 8, 8), dtype=np.float32)
    logits = np.zeros((batch, 10), np.float32)
    inputs = [{"input": xs[i:i + 1]} for i in range(batch)]
    outputs = [{"logits": logits[i:i + 1]} for i in range(batch)]

    def serve(mon: Monitor, tag: str, start: float) -> None:
        """`calls` requests: an observation per batch, built as the batcher builds it."""
        observer = mon.observer(mv)
        for b in range(calls // batch):
            observer(Served([f"{tag}-{b}-{i}" for i in range(batch)], inputs, outputs,
                            [time.perf_counter() - start] * batch, {"input": xs}, {"logits": logits}))

    result = {}
    try:
        for rate in (0.0, 0.01, 1.0):
            mon = Monitor(Settings(cache_dir=tmp, monitor_dir=tmp / f"store-{rate}", monitor_sample_rate=rate))
            serve(mon, "warm", 0.0)  # warm up: the model's monitor, the drift reference (loaded by the worker)
            mon.flush(120)
            time.sleep(1.5)
            worker = mon._thread
            clock = time.pthread_getcpuclockid(worker.ident)
            observe, work = [], []
            for rep in range(3):  # the best of three: background load only adds
                w0, c0 = time.clock_gettime(clock), time.thread_time()
                serve(mon, f"r{rep}", time.perf_counter())
                observe.append((time.thread_time() - c0) / calls * 1e6)
                mon.flush(120)
                time.sleep(0.1)
                work.append((time.clock_gettime(clock) - w0) / calls * 1e6)
            observe_us, worker_us = min(observe), min(work)
            mon.close()
            result[rate] = {"observe_us": observe_us, "worker_us": worker_us, "batch": batch}
            print(f"  capture {rate:g}: observe (batches of {batch}) {observe_us:.2f} µs CPU per request on "
                  f"the event loop; worker {worker_us:.2f} µs CPU per request", flush=True)
    finally:
        repo.close()
    result.update(index_cost())
    with np.load(http.ROOT / "model_repo" / "digits-cnn" / "data" / "calib.npz") as f:
        ref = f["input"].reshape(len(f["input"]), -1)
    with np.load(http.ROOT / "model_repo" / "digits-cnn" / "data" / "eval.npz") as f:
        live = f["input"].reshape(len(f["input"]), -1)
    rng = np.random.default_rng(0)
    det = DriftDetector(ref, [f"input[{i}]" for i in range(64)], reference_classes=rng.integers(0, 10, len(ref)),
                        n_classes=10, p_value_interval_s=30.0)
    det.add(live[:250], rng.integers(0, 10, 250))
    t = time.thread_time()
    evaluations = sum(len(det.add(live[rng.choice(len(live), 50)], rng.integers(0, 10, 50))) for _ in range(50))
    result["evaluation_ms"] = (time.thread_time() - t) / evaluations * 1e3
    print(f"  one drift evaluation: {result['evaluation_ms']:.2f} ms CPU (at most one a second by default)", flush=True)
    _ = threading  # the worker is a thread: its clock above is per thread
    return result


def index_cost(capacity: int = 100_000) -> dict:
    """The recent-predictions index full (evicting): put() per request, with 4 MB of other memory
    touched every 50 puts as a server's other work would, before any feedback read and after one
    (the id dict then follows every write); what the index adds to a full GC collection; the
    first feedback read (which builds the id dict)."""
    import gc
    import random
    import time

    import numpy as np

    from service.monitor.feedback import RecentPredictions

    batch = np.random.default_rng(0).random((32, 10), dtype=np.float32)
    ids = [f"{random.getrandbits(128):032x}" for _ in range(3 * capacity)]
    other = np.zeros(4 << 20, np.uint8)

    def full_collection_ms() -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            gc.collect()
            best = min(best, time.perf_counter() - t)
        return best * 1e3

    def puts(first: int, n: int) -> float:
        spent = 0.0
        for k in range(first, first + n, 50):
            other[::64] += 1
            t = time.perf_counter()
            for j in range(k, k + 50):
                recent.put(ids[j], batch[j % 32:j % 32 + 1], 0.0)
            spent += time.perf_counter() - t
        return spent / n * 1e6

    without = full_collection_ms()
    recent = RecentPredictions(capacity, "classification")
    puts(0, capacity)
    lazy_us = puts(capacity, capacity // 2)
    gc_ms = max(0.0, full_collection_ms() - without)
    t = time.perf_counter()
    recent.get(ids[0])
    first_read_ms = (time.perf_counter() - t) * 1e3
    kept_us = puts(capacity + capacity // 2, capacity)
    print(f"  recent-predictions index ({capacity:,} entries, full): put {lazy_us:.2f} µs per request before any "
          f"feedback, {kept_us:.2f} µs after; it adds {gc_ms:.2f} ms to a full GC collection; the first feedback "
          f"read {first_read_ms:.1f} ms", flush=True)
    return {"index_put_us": lazy_us, "index_put_kept_us": kept_us, "full_collection_ms": gc_ms,
            "first_read_ms": first_read_ms}


def setting_env(setting: str) -> dict[str, str]:
    """The environment a setting names: "KILN_X=value", or none for "default"."""
    return dict([setting.split("=", 1)]) if "=" in setting else {}


def wrk_at_once(servers: list, path: str, body, conns: int, seconds: float, order=None) -> list[dict]:
    """wrk on every server at the same time, one thread each, started in `order` (default: as
    listed); the results in the servers' order."""
    import threading

    res: list[dict] = [{} for _ in servers]

    def drive(i: int) -> None:
        res[i] = http.wrk(servers[i].url, path, body, conns, seconds)

    threads = [threading.Thread(target=drive, args=(i,)) for i in (order or range(len(servers)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return res


def paired(fmt: str, a: str, b: str, rounds: int, seconds: float, conns: int, model: str = "digits-cnn",
           pairs: int = 1, warmup: float = 6.0) -> dict:
    """Two servers on one core at the same time, each under its own wrk. Per round, two estimates of
    what b costs next to a: the ratio of their req/s, and the ratio of their server CPU time per
    request (every thread, from the scheduler): the second does not depend on how the scheduler
    split the core between them. Which wrk starts first alternates round by round.

    A process has a speed of its own (its memory layout, hash seed, where its threads landed): two
    servers of the same setting differ by a few percent for their whole life. So `pairs` fresh
    pairs of servers are started one after the other, the setting started first alternating, and
    the result is the geometric mean of each pair's mean, its 95% confidence interval (Student t)
    taken over the pairs (over the rounds when there is one pair).

    `warmup` seconds of load on both servers at once before the rounds: long enough that the
    monitor's start-up is over (the drift reference loaded, the first full p-value pass, the drift
    window filled: 5 intervals of 1 s), so the rounds measure a server in its steady state.

    Each server's CPU is also split into its event loop's time per request and its other threads'
    time per second (the monitor's worker). On the half core each server gets here a cost paid per
    second weighs twice what it weighs on a whole core, so a third estimate, "a whole core's req/s",
    is (1 - other threads' share of a core) / the loop's time per request: what each server would
    serve alone on a core, the other threads' work taken as a fixed cost a second."""
    body, path = http.bodies(model)[fmt], f"/v2/models/{model}/infer"
    per_pair: list[dict[str, list]] = []  # per pair: each round's ratios, and its other threads' ms/s
    for k in range(pairs):
        slots = (a, b) if k % 2 == 0 else (b, a)
        started = [http.start_kiln([model], env=setting_env(x) or None) for x in slots]
        servers = started if k % 2 == 0 else started[::-1]  # servers[0] runs a, servers[1] runs b
        pids = [http.all_pids(s.proc.pid) for s in servers]
        rps_ratios, cpu_ratios, loop_ratios, others, batch_ratios = [], [], [], [], []
        try:
            wrk_at_once(servers, path, body, conns, warmup)
            for r in range(rounds):
                cpu0 = [sum(http.cpu_seconds(p) for p in ps) for ps in pids]
                loop0 = [http.loop_seconds(ps[-1]) for ps in pids]
                batches0 = [http.batch_stats(srv.url, model) for srv in servers]
                res = wrk_at_once(servers, path, body, conns, seconds, order=(0, 1) if r % 2 == 0 else (1, 0))
                cpu = [sum(http.cpu_seconds(p) for p in ps) - c for ps, c in zip(pids, cpu0)]
                loop = [http.loop_seconds(ps[-1]) - c for ps, c in zip(pids, loop0)]
                batches = [tuple(x - y for x, y in zip(http.batch_stats(srv.url, model), b0))
                           for srv, b0 in zip(servers, batches0)]
                mean_batch = [rows / max(1, count) for rows, count in batches]
                batch_ratios.append(mean_batch[1] / mean_batch[0])
                rps = [x["requests"] / (x["duration_us"] / 1e6) for x in res]
                per_request = [c / max(1, x["requests"]) * 1e6 for c, x in zip(cpu, res)]
                loop_us = [c / max(1, x["requests"]) * 1e6 for c, x in zip(loop, res)]
                others_ms = [(c - lc) / (x["duration_us"] / 1e6) * 1e3 for c, lc, x in zip(cpu, loop, res)]
                loop_ratios.append(loop_us[0] / loop_us[1])
                others.append(others_ms)
                errors = [x["status"] + x["read"] + x["write"] + x["connect"] + x["timeout"] for x in res]
                rps_ratios.append(rps[1] / rps[0])
                cpu_ratios.append(per_request[0] / per_request[1])  # > 1: b is cheaper
                print(f"  pair {k} round {r}: {a} {rps[0]:,.0f} req/s {per_request[0]:.1f} µs CPU/req | {b} "
                      f"{rps[1]:,.0f} req/s {per_request[1]:.1f} µs CPU/req | ratios {rps_ratios[-1]:.3f} (req/s) "
                      f"{cpu_ratios[-1]:.3f} (CPU) | event loop {loop_us[0]:.1f} / {loop_us[1]:.1f} µs/req, other "
                      f"threads {others_ms[0]:.1f} / {others_ms[1]:.1f} ms/s, mean batch {mean_batch[0]:.2f} / {mean_batch[1]:.2f} "
                      f"| errors {errors}", flush=True)
        finally:
            for srv in servers:
                srv.stop()
        # A whole core's worth of req/s, from this round's split of the CPU: the event loop's time per
        # request and the other threads' time per second (the worker: drift evaluations, writes)
        # taken as a fixed cost a second, which a server on a whole core pays once, not on half of it.
        whole = [(1 - o[1] / 1e3) / (1 - o[0] / 1e3) * lr for o, lr in zip(others, loop_ratios)]
        per_pair.append({"rps": rps_ratios, "cpu": cpu_ratios, "loop": loop_ratios, "whole": whole,
                         "batch": batch_ratios, "others_ms": others})
    est = {key: (mean_ci(per_pair[0][key]) if pairs == 1 else mean_ci([mean_ci(p[key])[0] for p in per_pair]))
           for key in ("rps", "cpu", "loop", "whole", "batch")}
    out = {"model": model, "format": fmt, "a": a, "b": b, "rounds": rounds, "pairs": pairs, **est,
           "per_pair": per_pair}
    print(f"| {model} | {fmt} | {b} vs {a} | {_pct(est['rps'])} | {_pct(est['cpu'])} | {_pct(est['loop'])} | "
          f"{_pct(est['whole'])} | {_pct(est['batch'])} | {pairs} × {rounds} |", flush=True)
    return out


def instructions(settings: list[str], seconds: float, conns: int, model: str = "digits-cnn") -> list[dict]:
    """User-space instructions per request, counted by callgrind: deterministic where timings on
    this VM are not. Each setting's server runs under valgrind on a core of its own, counting only
    while wrk drives it. The event loop's instructions are per request; the other threads' (the
    monitor's worker: drift evaluations, writes) are per second, since valgrind slows the requests
    about 50x but not the worker's once-a-second work — divide by a real server's req/s to get
    their share of a request. KILN_INLINE_MAX_MS keeps the model inline on the loop, as it runs
    at full speed (the slowed warm-up would move it to runner threads)."""
    import re
    import shutil
    import subprocess
    import tempfile

    if not shutil.which("valgrind"):
        raise SystemExit("valgrind not found: apt-get install -y valgrind")
    body, path = http.bodies(model)["binary"], f"/v2/models/{model}/infer"
    out = Path(tempfile.mkdtemp(prefix="callgrind-", dir=WORK))
    servers = []
    try:
        for i, setting in enumerate(settings):
            env = {"KILN_INLINE_MAX_MS": "1000", **setting_env(setting)}
            prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                      f"--callgrind-out-file={out}/s{i}.out"]
            servers.append(http.start_kiln([model], env=env, cpu=i % 2, prefix=prefix))

        for srv in servers:
            http.wrk(srv.url, path, body, conns, 10)  # warm-up, not counted
        before = [http.batch_stats(srv.url, model, timeout=60) for srv in servers]
        for srv in servers:
            subprocess.run(["callgrind_control", "--instr=on", str(srv.proc.pid)], capture_output=True, check=True)
        res = wrk_at_once(servers, path, body, conns, seconds)
        for srv in servers:
            subprocess.run(["callgrind_control", "--instr=off", str(srv.proc.pid)], capture_output=True, check=True)
            subprocess.run(["callgrind_control", "--dump", str(srv.proc.pid)], capture_output=True, check=True)
        after = [http.batch_stats(srv.url, model, timeout=60) for srv in servers]
    finally:
        for srv in servers:
            srv.stop()
    rows_out = []
    for i, setting in enumerate(settings):
        per_thread: dict[int, int] = {}
        for f in out.glob(f"s{i}.out*"):
            m = re.search(r"-(\d+)$", f.name)
            totals = [int(x.split()[1]) for x in f.read_text(errors="replace").splitlines()
                      if x.startswith(("summary:", "totals:"))]
            if m and totals:
                per_thread[int(m.group(1))] = per_thread.get(int(m.group(1)), 0) + max(totals)
        n = max(1, res[i]["requests"])
        rows, count = after[i][0] - before[i][0], after[i][1] - before[i][1]  # batch_stats: (sum, count)
        main = per_thread.pop(1, 0)
        rows_out.append({"setting": setting, "requests": n, "mean_batch": rows / max(count, 1),
                         "loop_per_request": main / n, "other_threads_per_s": sum(per_thread.values()) / seconds})
    base = rows_out[0]["loop_per_request"]
    print("| setting | requests | mean batch | event loop, instructions per request | vs first | "
          "other threads, instructions per second |\n|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['setting']} | {r['requests']:,} | {r['mean_batch']:.1f} | {r['loop_per_request']:,.0f} | "
              f"{r['loop_per_request'] - base:+,.0f} ({100 * (r['loop_per_request'] / base - 1):+.1f}%) | "
              f"{r['other_threads_per_s'] / 1e6:.2f} M |", flush=True)
    return rows_out


def mean_ci(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of ratios and its 95% confidence interval (t on the logs)."""
    import numpy as np
    from scipy import stats

    logs = np.log(ratios)
    mean = float(logs.mean())
    half = float(stats.t.ppf(0.975, len(logs) - 1) * logs.std(ddof=1) / np.sqrt(len(logs))) if len(logs) > 1 else 0.0
    return float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half))


def _pct(m: tuple[float, float, float]) -> str:
    return f"{100 * (m[0] - 1):+.1f}% [{100 * (m[1] - 1):+.1f}, {100 * (m[2] - 1):+.1f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits-cnn")
    ap.add_argument("--formats", default="json,binary")
    ap.add_argument("--concurrency", default="32")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(WORK / "monitor.json"))
    ap.add_argument("--no-http", action="store_true", help="only the in-process figures")
    ap.add_argument("--paired", action="store_true", help="two servers on one core at once (see above)")
    ap.add_argument("--pairs", type=int, default=1, help="--paired: fresh server pairs, one after the other "
                    "(--rounds each); the interval is then over the pairs")
    ap.add_argument("--warmup", type=float, default=6.0, help="--paired: seconds of load on both servers "
                    "before the rounds (the monitor's start-up and its drift window's first fill)")
    ap.add_argument("--paired-a", default=OFF, help="--paired: the baseline server's setting")
    ap.add_argument("--paired-b", default="default", help="--paired: the compared server's setting "
                    "(ENV=VALUE, or 'default')")
    ap.add_argument("--instructions", action="store_true",
                    help="instructions per request under callgrind (valgrind), --paired-a against --paired-b, "
                         "the two servers at once, one core each, --seconds counted (40 is enough)")
    args = ap.parse_args(argv)
    if args.instructions:
        out = instructions([args.paired_a, args.paired_b], args.seconds, int(args.concurrency.split(",")[0]),
                           args.models.split(",")[0])
        Path(args.out).write_text(json.dumps({"instructions": out}, indent=1))
        return 0
    if args.paired:
        conns = max(1, int(args.concurrency.split(",")[0]) // 2)
        print(f"paired: {args.pairs} pair(s) of servers × {args.rounds} rounds of {args.seconds:g} s after "
              f"{args.warmup:g} s of warm-up, {conns} connections per server, both servers on core 0 at once\n")
        print("| model | body | setting | req/s vs baseline [95% CI] | CPU per request, baseline's / its [95% CI] "
              "| event loop per request | a whole core's req/s (other threads per second) | mean batch size "
              "| pairs × rounds |\n|---|---|---|---|---|---|---|---|---|")
        out = [paired(fmt, args.paired_a, args.paired_b, args.rounds, args.seconds, conns, args.models.split(",")[0],
                      args.pairs, args.warmup) for fmt in args.formats.split(",")]
        Path(args.out).write_text(json.dumps({"paired": out}, indent=1))
        return 0
    print("in-process (20,000 requests handed to the monitor back to back):")
    in_process()
    if args.no_http:
        return 0
    rc = http.main(["--models", args.models, "--formats", args.formats, "--concurrency", args.concurrency,
                    "--seconds", str(args.seconds), "--rounds", str(args.rounds), "--out", args.out,
                    "--kiln-variant", OFF, "--kiln-variant", NO_CAPTURE, "--kiln-variant", FULL])
    if rc:
        return rc
    results = json.loads(Path(args.out).read_text())["results"]
    # "vs no capture" is the issue's own baseline (capture off, drift and the index still on).
    print("\n| model | body | c | monitoring | req/s | vs off | vs no capture | p99 ms | rounds req/s |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for fmt in args.formats.split(","):
            for c in (int(x) for x in args.concurrency.split(",")):
                rows = {r["server"]: r for r in results if r["model"] == model and r["format"] == fmt and r["c"] == c}
                off, no_capture = rows.get(SETTINGS[0][0]), rows.get(SETTINGS[1][0])
                for server, label in SETTINGS:
                    r = rows.get(server)
                    if r is None:
                        continue
                    vs = [f"{100 * (r['rps'] / base['rps'] - 1):+.1f}%" if base else "-" for base in (off, no_capture)]
                    print(f"| {model} | {fmt} | {c} | {label} | {r['rps']:,.0f} | {vs[0]} | {vs[1]} | "
                          f"{r['p99_ms']:.2f} | {r['rounds_rps']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
