"""Why a ResNet runner in the server costs more per row than ONNX Runtime in-process:
`python -m bench.runner_gap`.

In-process ONNX Runtime (1 thread, core 0, the server's settings) under the conditions the server
differs in, one at a time, each as CPU µs per row of the ONNX Runtime thread:

- the compiled artifact Kiln serves (ONNX Runtime's optimized graph) against the source graph;
- a fixed batch of 8 against random batch sizes 5-14 taken from random offsets of a slab (what
  staged batches are), and each half of that apart: batch 8 from random offsets, batch sizes 5-14
  from one buffer; and the varying batches with ONNX Runtime's memory pattern off (it is planned
  per input shape);
- the main thread against a long-lived worker thread fed by a queue (the runner);
- core 1 idle, copying memory, or spinning (the load generator's core);
- a thread on the same core copying a 600 KB image every 2.8 ms, as the event loop receives them at
  ~350 requests/s (cache pollution of the model's working set).
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench import models

ROW = 3 * 224 * 224
_CORE1_COPY = r"""
import numpy as np, os, time
os.sched_setaffinity(0, {1})
src = np.ones(150528, np.float32); dst = [np.empty_like(src) for _ in range(32)]
i = 0
while True:
    np.copyto(dst[i % 32], src); i += 1
    if i % 4 == 0: time.sleep(0.0005)
"""


def _session(path: Path, mem_pattern: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_mem_pattern = mem_pattern
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _per_row(sess, seconds: float, batches) -> float:
    name = sess.get_inputs()[0].name
    rows, c0, t0 = 0, time.thread_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = next(batches)
        sess.run(None, {name: x})
        rows += len(x)
    return (time.thread_time() - c0) / rows * 1e6


def _fixed(x):
    while True:
        yield x


def _varying(slab, seed=0, sizes=(5, 14), offsets=True):
    rng = random.Random(seed)
    while True:
        b = rng.randint(*sizes)
        off = rng.randint(0, 32 - b) if offsets else 0
        yield slab[off * ROW:(off + b) * ROW].reshape(b, 3, 224, 224)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.sched_setaffinity(0, {0})
    source = models.source_path("resnet")
    if not source.exists():
        models.build_repo(["resnet"])

    from backends.base import CompileOptions
    from backends.ort import OnnxRuntimeBackend

    work = Path(tempfile.mkdtemp(prefix="kiln-gap-"))
    artifact = OnnxRuntimeBackend().compile(source, CompileOptions(), work)
    src_sess, art_sess, flat_sess = _session(source), _session(artifact), _session(source, mem_pattern=False)
    x8 = np.random.default_rng(0).random((8, 3, 224, 224), dtype=np.float32)
    slab = np.random.default_rng(1).random(ROW * 32, dtype=np.float32)
    for sess in (src_sess, art_sess, flat_sess):  # warm-up, every batch size once
        _per_row(sess, 1.0, _fixed(x8))
        for b in range(5, 15):
            sess.run(None, {sess.get_inputs()[0].name: slab[:b * ROW].reshape(b, 3, 224, 224)})

    def polluted() -> float:
        stop = threading.Event()
        src = np.random.default_rng(2).random(ROW, dtype=np.float32)
        pool = [np.empty(ROW, np.float32) for _ in range(64)]

        def receive():
            i = 0
            while not stop.is_set():
                np.copyto(pool[i % 64], src)
                i += 1
                time.sleep(0.0028)

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        try:
            return _per_row(src_sess, args.seconds, _fixed(x8))
        finally:
            stop.set()
            t.join()

    # The server's runner is a long-lived thread fed by a queue, not the main thread.
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()

    def runner() -> None:
        while (job := jobs.get()) is not None:
            done.put(job())

    worker = threading.Thread(target=runner, daemon=True)
    worker.start()

    def on_worker_thread() -> float:
        jobs.put(lambda: _per_row(src_sess, args.seconds, _fixed(x8)))
        return done.get()

    def with_core1(code: list[str]) -> float:
        p = subprocess.Popen(code)
        time.sleep(0.5)
        try:
            return _per_row(src_sess, args.seconds, _fixed(x8))
        finally:
            p.kill()
            p.wait()

    cases = {
        "source graph, batch 8": lambda: _per_row(src_sess, args.seconds, _fixed(x8)),
        "Kiln's compiled artifact, batch 8": lambda: _per_row(art_sess, args.seconds, _fixed(x8)),
        "batch 5-14 from slab offsets": lambda: _per_row(src_sess, args.seconds, _varying(slab)),
        "batch 8 from slab offsets": lambda: _per_row(src_sess, args.seconds, _varying(slab, sizes=(8, 8))),
        "batch 5-14 from one buffer": lambda: _per_row(src_sess, args.seconds, _varying(slab, offsets=False)),
        "batch 5-14 from slab offsets, no memory pattern":
            lambda: _per_row(flat_sess, args.seconds, _varying(slab)),
        "batch 8 on a long-lived worker thread": on_worker_thread,
        "core 1 copying memory": lambda: with_core1([sys.executable, "-c", _CORE1_COPY]),
        "core 1 spinning": lambda: with_core1(["taskset", "-c", "1", sys.executable, "-c", "while True: pass"]),
        "same core: 600 KB copy every 2.8 ms": polluted,
    }
    print("ONNX Runtime thread CPU per row (µs), core 0, ResNet-style CNN 3x224x224:")
    print("| condition | " + " | ".join(f"run {i + 1}" for i in range(args.repeats)) + " | mean | vs first |")
    print("|---|" + "---|" * (args.repeats + 2))
    results = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved, so drift hits every condition alike
        for name, fn in cases.items():
            results[name].append(fn())
    jobs.put(None)
    base = None
    for name, vals in results.items():
        mean = sum(vals) / len(vals)
        base = base or mean
        print(f"| {name} | " + " | ".join(f"{v:,.0f}" for v in vals) + f" | {mean:,.0f} | {mean / base - 1:+.1%} |")


if __name__ == "__main__":
    main()
