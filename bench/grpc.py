"""gRPC throughput next to HTTP: Kiln gRPC, Kiln HTTP JSON and binary, and MLServer's gRPC, one model.

    python -m bench.grpc                     # MLP, c = 1, 8, 32, MLServer included (bench/peers)
    python -m bench.grpc --no-peers --quick  # Kiln only, short runs
    python -m bench.grpc --floor             # Kiln's gRPC transport with a ModelInfer that does nothing
    python -m bench.profile --format grpc    # py-spy of Kiln's gRPC path

Servers are pinned to core 0, the load generators to core 1: wrk for HTTP (bench/post.lua), h2load
(Debian's nghttp2-client) for gRPC: one pre-serialized ModelInferRequest (raw_input_contents, what
tritonclient.grpc sends) posted as a gRPC unary call on `c` HTTP/2 connections with one stream each.
h2load counts HTTP statuses only and gRPC errors travel in trailers, so every target is first checked
with a real grpc client call on the same bytes, and Kiln's own gRPC success count must grow by what
h2load reports. Targets run interleaved round by round; the median-req/s round is reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import http as bhttp
from bench import models
from tests.kiln_server import start_server
from tests.metrics_util import scrape, value

WORK = models.WORK
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def grpc_body(model: str, rows: int = 1) -> tuple[Path, bytes]:
    """(file with the length-prefixed gRPC message, the serialized ModelInferRequest)."""
    from service.protos import grpc_service_pb2 as pb

    x = np.random.default_rng(0).random((rows, *models.INPUT_SHAPES[model]), dtype=np.float32)
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    msg = req.SerializeToString()
    d = WORK / "bodies"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{model}.grpc"
    path.write_bytes(b"\x00" + struct.pack(">I", len(msg)) + msg)
    return path, msg


def check_grpc(address: str, msg: bytes, model: str, empty: bool = False) -> None:
    """One real call on the exact bytes h2load sends: it must succeed with the model's output
    (`empty`: with the floor's empty response for the model)."""
    import grpc

    from service.protos import grpc_service_pb2 as pb

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, request_serializer=lambda b: b,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        resp = call(msg, timeout=30)
    if empty:
        assert resp.model_name == model and not resp.outputs, resp
        return
    assert resp.outputs and resp.outputs[0].name, resp
    if resp.raw_output_contents:
        n = len(np.frombuffer(resp.raw_output_contents[0], np.float32))
    else:
        n = len(resp.outputs[0].contents.fp32_contents)
    assert n == int(np.prod(resp.outputs[0].shape)) > 0, (model, resp)


def h2load(address: str, body: Path, conns: int, seconds: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".log", delete=False) as f:
        log = Path(f.name)
    cmd = ["taskset", "-c", str(bhttp.CLIENT_CPU), "h2load", "-t1", f"-c{conns}", "-m1",
           f"-D{max(1, round(seconds))}", "-d", str(body), "-H", "content-type: application/grpc",
           "-H", "te: trailers", "--log-file", str(log), f"http://{address}{METHOD}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    out = r.stdout
    if r.returncode != 0 or "requests:" not in out:
        raise RuntimeError(f"h2load failed: {out}\n{r.stderr}")
    # "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    line = next(line for line in out.splitlines() if line.startswith("requests:"))
    counts = {k: int(v) for v, k in (p.strip().split(" ", 1) for p in line.split(":", 1)[1].split(","))}
    finished = next(line for line in out.splitlines() if line.startswith("finished in"))
    duration = float(finished.split()[2].rstrip("s,"))
    times = sorted(int(row.split("\t")[2]) for row in log.read_text().splitlines() if row.count("\t") >= 2)
    log.unlink()
    # log rows: start time (µs), status, duration (µs)
    return {"requests": counts["succeeded"], "failed": counts["failed"] + counts["errored"] + counts["timeout"],
            "duration_s": duration,
            "p50_us": times[len(times) // 2] if times else 0, "p99_us": times[int(len(times) * 0.99)] if times else 0}


def grpc_load(address: str, body: Path, conns: int, seconds: float, pid: int, warmup: float = 1.0) -> dict:
    h2load(address, body, conns, warmup)
    pids = bhttp.all_pids(pid)
    s0 = sum(bhttp.cpu_seconds(p) for p in pids)
    res = h2load(address, body, conns, seconds)
    s1 = sum(bhttp.cpu_seconds(p) for p in pids)
    n = max(res["requests"], 1)
    return {"rps": res["requests"] / res["duration_s"], "p50_ms": res["p50_us"] / 1000, "p99_ms": res["p99_us"] / 1000,
            "cpu_us": (s1 - s0) * 1e6 / n, "errors": res["failed"], "requests": res["requests"]}


class Target:
    def __init__(self, label: str, kind: str, address: str, pid: int, body, kiln_url: str | None = None):
        self.label, self.kind, self.address, self.pid, self.body, self.kiln_url = label, kind, address, pid, body, kiln_url


def run(targets: list[Target], model: str, conc: list[int], seconds: float, rounds: int, inproc: float) -> list[dict]:
    results = []
    for c in conc:
        runs: dict[str, list[dict]] = {t.label: [] for t in targets}
        for _ in range(rounds):
            for t in targets:
                if t.kind == "grpc":
                    before = scrape(t.kiln_url) if t.kiln_url else None
                    r = grpc_load(t.address, t.body, c, seconds, t.pid)
                    if before is not None:  # every request h2load counted was a gRPC success in Kiln
                        after = scrape(t.kiln_url)
                        ok = (value(after, "kiln_inference_requests_total", protocol="grpc", outcome="success")
                              - value(before, "kiln_inference_requests_total", protocol="grpc", outcome="success"))
                        if ok < r["requests"]:
                            raise RuntimeError(f"{t.label}: h2load counted {r['requests']}, Kiln {ok} successes")
                else:
                    r = bhttp.load(t.address, f"/v2/models/{model}/infer", t.body, c, seconds, t.pid)
                runs[t.label].append(r)
        for t in targets:
            ordered = sorted(runs[t.label], key=lambda r: r["rps"])
            r = dict(ordered[len(ordered) // 2])
            r.update(server=t.label, model=model, c=c, rounds_rps=[round(x["rps"]) for x in runs[t.label]],
                     ratio=r["rps"] / inproc if inproc else None)
            results.append(r)
            print(f"| {t.label} | {c} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_us']:.0f} | "
                  f"{r['ratio']:.3f} | {r['errors']} |", flush=True)
    return results


FLOOR_SERVER = """
import asyncio, sys
import uvloop
from service import grpc_wire
from service.protos import grpc_service_pb2 as pb
from service.settings import HttpLimits, Settings

class Empty:
    async def ModelInfer(self, request, context):
        return pb.ModelInferResponse(model_name=request.model_name)

async def main():
    methods = grpc_wire.MethodTable()
    methods.add(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], Empty())
    settings = Settings()
    server = grpc_wire.Server(methods, HttpLimits.from_settings(settings), settings.max_body_bytes)
    await server.listen("127.0.0.1", int(sys.argv[1]), None)
    print("ready", flush=True)
    await asyncio.Event().wait()

uvloop.install()
asyncio.run(main())
"""


def floor(conc: list[int], seconds: float, model: str) -> int:
    """The transport's own cost: Kiln's gRPC server (service/grpc_wire.py) on uvloop whose
    ModelInfer parses the request and returns an empty response, under the same h2load load."""
    from tests.kiln_server import ROOT, free_port

    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", str(bhttp.SERVER_CPU), sys.executable, "-c", FLOOR_SERVER, str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        body, msg = grpc_body(model)
        check_grpc(f"127.0.0.1:{port}", msg, model, empty=True)
        print("| Kiln gRPC transport, empty handler | c | req/s | p50 ms | p99 ms | server CPU µs/req |\n"
              "|---|---|---|---|---|---|")
        for c in conc:
            r = grpc_load(f"127.0.0.1:{port}", body, c, seconds, proc.pid)
            print(f"| empty | {c} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_us']:.0f} |")
    finally:
        proc.kill()
        proc.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 s runs, one round")
    ap.add_argument("--no-peers", action="store_true", help="without MLServer")
    ap.add_argument("--floor", action="store_true", help="only Kiln's gRPC transport with an empty handler (its own cost)")
    ap.add_argument("--out", default=str(WORK / "grpc-results.json"))
    args = ap.parse_args(argv)
    for tool, pkg in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if not shutil.which(tool):
            print(f"{tool} not found: apt-get install -y {pkg}", file=sys.stderr)
            return 2
    seconds, rounds = (2.0, 1) if args.quick else (args.seconds, args.rounds)
    conc = [int(c) for c in args.concurrency.split(",")]
    model = args.model
    if args.floor:
        models.build_repo([model])
        return floor(conc, seconds, model)
    repo = models.build_repo([model])  # writes the model's source too
    inproc = bhttp.in_process(model, 1)
    print(f"in-process ONNX Runtime on core {bhttp.SERVER_CPU}: {inproc:,.0f} calls/s (batch 1)")
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        srv = start_server(repo, WORK / "cache", log_dir=WORK / "logs", grpc=True, cpu=bhttp.SERVER_CPU, timeout=900,
                           args=["--models", model, "--log-level", "warning"])
        procs.append(srv)
        body_path, msg = grpc_body(model)
        check_grpc(srv.grpc_address, msg, model)
        http_bodies = bhttp.bodies(model)
        targets = [Target("kiln gRPC", "grpc", srv.grpc_address, srv.proc.pid, body_path, srv.url),
                   Target("kiln HTTP binary", "http", srv.url, srv.proc.pid, http_bodies["binary"]),
                   Target("kiln HTTP JSON", "http", srv.url, srv.proc.pid, http_bodies["json"])]
        if not args.no_peers:
            from bench.peers import servers

            try:
                peer = servers.start("mlserver", model, models.source_path(model), WORK / "peers" / "mlserver" / model,
                                     cpu=bhttp.SERVER_CPU)
                procs.append(peer)
                address = f"127.0.0.1:{peer.grpc_port}"
                check_grpc(address, msg, model)
                targets.append(Target("MLServer gRPC", "grpc", address, peer.proc.pid, body_path))
            except Exception as err:  # noqa: BLE001 - a peer that does not start must not lose Kiln's numbers
                print(f"mlserver did not start: {err!s:.300}", flush=True)
        print(f"\n{model}, single-sample requests; server on core {bhttp.SERVER_CPU}, load generator on core "
              f"{bhttp.CLIENT_CPU}\n")
        print("| server | c | req/s | p50 ms | p99 ms | server CPU µs/req | ratio to in-process | errors |\n"
              "|---|---|---|---|---|---|---|---|", flush=True)
        results = run(targets, model, conc, seconds, rounds, inproc)
    finally:
        for p in procs:
            p.stop()

    def rps(label, c):
        return next((r["rps"] for r in results if r["server"] == label and r["c"] == c), None)

    print()
    for c in conc:
        g, b, j, m = (rps("kiln gRPC", c), rps("kiln HTTP binary", c), rps("kiln HTTP JSON", c),
                      rps("MLServer gRPC", c))
        line = f"c={c}: kiln gRPC / HTTP binary = {g / b:.2f}x, / HTTP JSON = {g / j:.2f}x"
        if m:
            line += f", / MLServer gRPC = {g / m:.2f}x"
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"inproc": inproc, "results": results}, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
