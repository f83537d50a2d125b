"""HTTP throughput benchmark: Kiln (and optionally its peers) under wrk, against in-process calls.

    python -m bench.http                       # MLP, digits-cnn, ResNet-style CNN; JSON and binary; c=1,8,32
    python -m bench.http --models mlp --peers  # plus MLServer and KServe on the same ONNX file
    python -m bench.http --quick               # shorter runs

The server is pinned to core 0 (tests/kiln_server.start_server(cpu=0)), wrk to core 1 (Debian's wrk,
bench/post.lua). For each run: req/s, p50/p99 latency, server CPU µs per request (utime+stime of the
server process from /proc/<pid>/stat over the run) and the ratio to in-process backend calls measured
in the same invocation on the same core (ONNX Runtime, 1 intra-op thread, as the server's runners).
Generated models and logs go to bench/.work (ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from bench import models
from tests.kiln_server import start_server

ROOT = Path(__file__).resolve().parent.parent
WORK = models.WORK
LUA = ROOT / "bench" / "post.lua"
SERVER_CPU, CLIENT_CPU = 0, 1


# -- request bodies -------------------------------------------------------------------------------
def bodies(model: str, rows: int = 1) -> dict[str, tuple[Path, str | None, str]]:
    """name -> (body file, Inference-Header-Content-Length or None, content type)."""
    shape = (rows, *models.INPUT_SHAPES[model])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = {}
    d = WORK / "bodies"
    d.mkdir(parents=True, exist_ok=True)
    js = orjson.dumps({"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]})
    (d / f"{model}.json").write_bytes(js)
    out["json"] = (d / f"{model}.json", None, "application/json")
    header = orjson.dumps({"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    (d / f"{model}.bin").write_bytes(header + x.tobytes())
    out["binary"] = (d / f"{model}.bin", str(len(header)), "application/octet-stream")
    return out


# -- measurement ----------------------------------------------------------------------------------
def cpu_ticks(pid: int) -> int:
    """utime + stime of the process and its threads (and of children it waited for)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15])


def cpu_seconds(pid: int) -> float:
    """Time on CPU of every thread of the process, from the scheduler (/proc/<pid>/task/*/schedstat, ns).

    /proc/<pid>/stat's utime+stime are tick samples; with a tickless idle kernel they over-charge a
    process that wakes from idle for every request (c=1 read 2-3x high here), so the per-request
    figure uses the scheduler's exact runtime; the tick figure is kept in the JSON as cpu_us_ticks."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def loop_seconds(pid: int) -> float:
    """Time on CPU of the process's main thread (the event loop in Kiln), from its schedstat."""
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def switches(pid: int) -> tuple[int, int]:
    """Context switches of the main (event-loop) thread that were waits (voluntary: each one a
    wake-up later), and of every other thread that were preemptions (nonvoluntary)."""
    loop_waits = preempted = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (t / "status").read_text()
        except OSError:
            continue
        if t.name == str(pid):
            loop_waits += int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        else:
            preempted += int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
    return loop_waits, preempted


def all_pids(pid: int) -> list[int]:
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for c in children:
        out += all_pids(int(c))
    return out


def wrk(url: str, path: str, body: tuple[Path, str | None, str], conns: int, seconds: float) -> dict:
    env = {**os.environ, "BENCH_BODY": str(body[0]), "BENCH_PATH": path, "BENCH_HCL": body[1] or "",
           "BENCH_CTYPE": body[2]}
    cmd = ["taskset", "-c", str(CLIENT_CPU), "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(LUA), url]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    if "BENCH_JSON" not in r.stdout:
        raise RuntimeError(f"wrk failed: {r.stdout}\n{r.stderr}")
    return json.loads(r.stdout.split("BENCH_JSON", 1)[1].strip().splitlines()[0])


def load(url: str, path: str, body, conns: int, seconds: float, pid: int, warmup: float = 1.0) -> dict:
    wrk(url, path, body, conns, warmup)
    pids = all_pids(pid)
    t0, s0, l0 = sum(cpu_ticks(p) for p in pids), sum(cpu_seconds(p) for p in pids), loop_seconds(pid)
    w0 = switches(pid)
    res = wrk(url, path, body, conns, seconds)
    t1, s1, l1 = sum(cpu_ticks(p) for p in pids), sum(cpu_seconds(p) for p in pids), loop_seconds(pid)
    w1 = switches(pid)
    n = max(res["requests"], 1)
    errors = res["status"] + res["read"] + res["write"] + res["connect"] + res["timeout"]
    return {
        "server_cores": (s1 - s0) / (res["duration_us"] / 1e6),
        "rps": res["requests"] / (res["duration_us"] / 1e6),
        "p50_ms": res["p50_us"] / 1000, "p99_ms": res["p99_us"] / 1000,
        "cpu_us": (s1 - s0) * 1e6 / n,
        "loop_cpu_us": (l1 - l0) * 1e6 / n,  # of which the main (event-loop) thread
        "loop_wakeups": (w1[0] - w0[0]) / n,  # per request: how often the loop slept and woke
        "threads_preempted": (w1[1] - w0[1]) / n,  # per request: runner threads put off the core
        "cpu_us_ticks": (t1 - t0) / os.sysconf("SC_CLK_TCK") * 1e6 / n,
        "errors": errors, "requests": res["requests"],
    }


def in_process(model: str, batch: int, seconds: float = 2.0) -> float:
    """Backend calls per second in this process, pinned to the server's core (batch rows per call)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {SERVER_CPU})
    try:
        sess = ort.InferenceSession(str(models.source_path(model)), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((batch, *models.INPUT_SHAPES[model]), dtype=np.float32)
        name = sess.get_inputs()[0].name
        for _ in range(3):
            sess.run(None, {name: x})
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            sess.run(None, {name: x})
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        os.sched_setaffinity(0, before)


def batch_stats(url: str, model: str, timeout: float = 10.0) -> tuple[float, float]:
    """(sum, count) of kiln_batch_size for the model, from /metrics (prometheus-client's parser)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=timeout).read().decode()
    total = count = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "kiln_batch_size":
            for x in fam.samples:
                if x.labels.get("model") == model:
                    if x.name.endswith("_sum"):
                        total += x.value
                    elif x.name.endswith("_count"):
                        count += x.value
    return total, count


# -- runs -------------------------------------------------------------------------------------------
def fmt_row(r: dict) -> str:
    ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else "-"
    return (f"| {r['server']} | {r['model']} | {r['format']} | {r['c']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['cpu_us']:.0f} | {ratio} | {r.get('mean_batch', '-')} | {r['errors']} |")


HEADER = ("| server | model | body | c | req/s | p50 ms | p99 ms | server CPU µs/req | ratio to in-process | "
          "mean batch | errors |\n|---|---|---|---|---|---|---|---|---|---|---|")


class Target:
    def __init__(self, label: str, url: str, pid: int, model: str, formats: list[str], kiln: bool):
        self.label, self.url, self.pid, self.model, self.formats, self.kiln = label, url, pid, model, formats, kiln


def run_group(base: str, targets: list[Target], formats: list[str], conc: list[int], seconds: float, rounds: int,
              inproc: dict, results: list) -> None:
    """Every target under the same load, interleaved round by round (so background noise hits all
    of them alike); the reported run of each target is its median-req/s round."""
    b = bodies(base)
    for fmt in formats:
        for c in conc:
            runs: dict[str, list[dict]] = {t.label: [] for t in targets}
            for _ in range(rounds):
                for t in targets:
                    if fmt not in t.formats:
                        continue
                    before = batch_stats(t.url, t.model) if t.kiln else None
                    r = load(t.url, f"/v2/models/{t.model}/infer", b[fmt], c, seconds, t.pid)
                    if before:
                        after = batch_stats(t.url, t.model)
                        r["mean_batch"] = (f"{(after[0] - before[0]) / (after[1] - before[1]):.1f}"
                                           if after[1] > before[1] else "-")
                    runs[t.label].append(r)
            for t in targets:
                if not runs[t.label]:
                    continue
                ordered = sorted(runs[t.label], key=lambda r: r["rps"])
                r = dict(ordered[len(ordered) // 2])
                r["rounds_rps"] = [round(x["rps"]) for x in runs[t.label]]
                r["rounds_p99_ms"] = [round(x["p99_ms"], 2) for x in runs[t.label]]
                r.update(server=t.label, model=t.model, format=fmt, c=c)
                r["ratio"] = r["rps"] / inproc[base] if inproc.get(base) else None
                results.append(r)
                print(fmt_row(r), flush=True)


def start_kiln(model_names: list[str], env: dict[str, str] | None = None, grpc: bool = False,
               cpu: int = SERVER_CPU, prefix: list[str] = ()):
    repo = models.build_repo(model_names)
    log_dir = WORK / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Each server its own, empty capture store (the compile cache is shared): servers sharing one
    # SQLite file would measure each other's writes and its size, not one server's monitoring.
    (WORK / "monitor").mkdir(parents=True, exist_ok=True)
    env = {"KILN_MONITOR_DIR": tempfile.mkdtemp(prefix="kiln-", dir=WORK / "monitor"), **(env or {})}
    return start_server(repo, WORK / "cache", log_dir=log_dir,
                        args=["--models", ",".join(model_names), "--log-level", "warning"],
                        cpu=cpu, timeout=1800 if prefix else 900, env=env, grpc=grpc, prefix=prefix)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,digits-cnn,resnet")  # resnet also runs resnet-nobatch
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--formats", default="json,binary")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting; the median is reported")
    ap.add_argument("--quick", action="store_true", help="2 s runs")
    ap.add_argument("--peers", action="store_true", help="also MLServer and KServe (JSON, MLP)")
    ap.add_argument("--peer-list", default="mlserver,kserve")
    ap.add_argument("--no-kiln", action="store_true")
    ap.add_argument("--kiln-variant", action="append", default=[], metavar="NAME=VALUE",
                    help="also run Kiln with this environment variable, interleaved with the others "
                         "(repeatable), e.g. KILN_GC_FREEZE=false")
    ap.add_argument("--out", default=str(WORK / "results.json"))
    args = ap.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    if len(os.sched_getaffinity(0)) < 2 and os.cpu_count() < 2:
        print("needs 2 cores (server on 0, wrk on 1)", file=sys.stderr)
        return 2
    seconds = 2.0 if args.quick else args.seconds
    if args.quick:
        args.rounds = 1
    conc = [int(c) for c in args.concurrency.split(",")]
    names = [m for m in args.models.split(",") if m]
    formats = args.formats.split(",")
    results: list[dict] = []
    shutil.rmtree(WORK / "monitor", ignore_errors=True)  # the capture stores of earlier runs (start_kiln)

    # The in-process baseline reads the sources build_repo writes: build them first on a fresh checkout.
    models.build_repo(sorted({n.replace("-nobatch", "") for n in names}))
    inproc: dict[str, float] = {}
    print("in-process ONNX Runtime on core 0 (1 intra-op thread):")
    for m in {n.replace("-nobatch", "") for n in names}:
        inproc[m] = in_process(m, 1)
        line = f"  {m}: batch 1 {inproc[m]:,.0f} calls/s"
        if m == "resnet":
            b32 = in_process(m, 32, seconds=4.0)
            inproc["resnet@32"] = b32 * 32
            line += f"; batch 32 {b32 * 32:,.1f} rows/s"
        print(line, flush=True)

    print()
    print(HEADER, flush=True)
    peers = [p for p in args.peer_list.split(",") if p] if args.peers else []
    for base in names:
        if base.endswith("-nobatch"):
            continue
        kiln_models = [base] + ([f"{base}-nobatch"] if base == "resnet" else [])
        fm = formats
        procs, targets = [], []
        try:
            if not args.no_kiln:
                srv = start_kiln(kiln_models)
                procs.append(srv)
                targets.append(Target("kiln", srv.url, srv.proc.pid, base, fm, True))
                if base == "resnet":
                    # The no-batching comparison is about the batcher, not the encoding: binary only.
                    targets.append(Target("kiln (no batching)", srv.url, srv.proc.pid, "resnet-nobatch",
                                          ["binary"], True))
                for variant in args.kiln_variant:
                    name, _, value = variant.partition("=")
                    vs = start_kiln(kiln_models, env={name: value})
                    procs.append(vs)
                    targets.append(Target(f"kiln ({variant})", vs.url, vs.proc.pid, base, fm, True))
            if base != "resnet":
                from bench.peers import servers

                for peer in peers:
                    try:
                        ps = servers.start(peer, base, models.source_path(base), WORK / "peers" / peer / base,
                                           cpu=SERVER_CPU)
                    except Exception as err:  # a peer that does not start must not lose Kiln's numbers
                        print(f"{peer} did not start: {err!s:.300}", flush=True)
                        continue
                    procs.append(ps)
                    targets.append(Target(peer, ps.url, ps.proc.pid, base, ["json"], False))
            run_group(base, targets, fm, conc, seconds, args.rounds, inproc, results)
        finally:
            for p in procs:
                p.stop()
        # In-process again after the group: the larger of the two (the backend's best case) is the
        # reference, so background load on the machine can only lower the ratios, never inflate them.
        again = in_process(base, 1)
        if base == "resnet":
            inproc["resnet@32"] = max(inproc["resnet@32"], in_process(base, 32, seconds=4.0) * 32)
        inproc[base] = max(inproc[base], again)
        for r in results:
            if r["model"].replace("-nobatch", "") == base:
                r["ratio"] = r["rps"] / inproc[base]
        print(f"  (in-process {base} re-measured: batch 1 {again:,.0f} calls/s; reference now "
              f"{inproc[base]:,.0f}{'; batch 32 %.1f rows/s' % inproc['resnet@32'] if base == 'resnet' else ''})",
              flush=True)

    # Summary ratios
    print()

    def get(server, model, fmt, c):
        return next((r for r in results if r["server"] == server and r["model"] == model and r["format"] == fmt
                     and r["c"] == c), None)

    k = get("kiln", "mlp", "json", 32)
    if k:
        for peer in ("mlserver", "kserve"):
            p = get(peer, "mlp", "json", 32)
            if p:
                print(f"MLP JSON c=32: kiln/{peer} = {k['rps'] / p['rps']:.2f}x")
        print(f"MLP JSON c=32: server CPU {k['cpu_us']:.0f} µs/request")
    for model, label in (("mlp", "MLP (784 floats)"), ("digits-cnn", "digits-cnn (64 floats)"),
                         ("resnet", "ResNet (150,528 floats)")):
        kj, kb = get("kiln", model, "json", 32), get("kiln", model, "binary", 32)
        if kj and kb:
            print(f"{label} c=32: binary/JSON = {kb['rps'] / kj['rps']:.2f}x "
                  f"({kb['rps']:,.0f} vs {kj['rps']:,.0f} req/s)")
    r32 = get("kiln", "resnet", "binary", 32)
    if r32 and inproc.get("resnet@32"):
        print(f"ResNet 224² binary c=32: {r32['rps']:.1f} req/s = {r32['rps'] / inproc['resnet@32']:.2f}x "
              f"in-process batch-32 throughput ({inproc['resnet@32']:.1f} rows/s); server CPU per request: "
              f"event loop {r32['loop_cpu_us']:.0f} µs, runner {r32['cpu_us'] - r32['loop_cpu_us']:.0f} µs "
              f"(in-process {1e6 / inproc['resnet@32']:.0f} µs per row); per request the loop woke "
              f"{r32['loop_wakeups']:.2f} times and the runner was preempted {r32['threads_preempted']:.2f} times")
    for variant in args.kiln_variant:
        for r in results:
            if r["server"] == f"kiln ({variant})" and (k := get("kiln", r["model"], r["format"], r["c"])):
                print(f"{r['model']} {r['format']} c={r['c']}: kiln ({variant}) / kiln = {r['rps'] / k['rps']:.2f}x "
                      f"req/s; p99 ms per round: kiln {k['rounds_p99_ms']}, kiln ({variant}) {r['rounds_p99_ms']}")
    r1, r1nb = get("kiln", "resnet", "binary", 1), get("kiln (no batching)", "resnet-nobatch", "binary", 1)
    if r1 and r1nb:
        print(f"ResNet c=1 p50: batching {r1['p50_ms']:.2f} ms vs no batching {r1nb['p50_ms']:.2f} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"inproc": inproc, "results": results}, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
