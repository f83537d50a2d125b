"""Do the seed's technique claims hold on networks big enough to show them? (docs/optimize.md)

ResNet-18-sized and MobileNetV2-sized networks at 3x224x224 (random weights: speed does not depend on
them), given to the toolkit as users would (`tests/byom_models.py:resnet18`, `:mobilenet_v2`), with
unlabeled crops of scikit-learn's two bundled photos as data and `agreement` (top-1 agreement with the
FP32 original) as the metric. Per network and backend, all in one run so the ratios share conditions:
FP32, static INT8 (each backend's recipe, calibrated on the calibration split), FP16, and channel
pruning at 30% and 50% (DepGraph, no fine-tuning: random weights have nothing to recover). p50 at batch
1 and 32 (`backends.timing`, median of the quietest block). The machine is shared: read the ratios.

    python -m bench.optimize_cnn [--nets resnet18,mobilenet_v2] [--backends onnxruntime,openvino,litert]
                                 [--runs 20] [--json bench/.work/optimize_cnn.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NETS = {"resnet18": f"{ROOT}/tests/byom_models.py:resnet18", "mobilenet_v2": f"{ROOT}/tests/byom_models.py:mobilenet_v2"}


def sample_crops(n: int = 160, size: int = 224, seed: int = 0):
    """Random crops (with flips) of scikit-learn's two bundled photos, ImageNet-normalized, NCHW; no labels."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [np.asarray(im, np.float32) / 255.0 for im in load_sample_images().images]
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
        crop = p[y : y + size, x : x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = ((crop - mean) / std).transpose(2, 0, 1)
    return {"image": out}, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="resnet18,mobilenet_v2")
    ap.add_argument("--backends", default="onnxruntime,openvino,litert")
    ap.add_argument("--runs", type=int, default=30, help="timed calls at batch 1")
    ap.add_argument("--runs-batched", type=int, default=15, help="timed calls at batch 32 (3 blocks of at least 5)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / ".work" / "optimize_cnn.json")
    args = ap.parse_args(argv)

    from backends.hw import choose_recipe, detect
    from optimize import prune, workload
    from optimize.bench import available_backends, measure
    from optimize.source import export_module

    here = available_backends()
    backends = [b for b in args.backends.split(",") if b in here]
    cpu = detect()
    print(f"CPU: {cpu.summary()}; backends: {', '.join(backends)}")
    results = {"cpu": cpu.summary(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "nets": {}}
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-opt-"))
    for net in args.nets.split(","):
        t0 = time.perf_counter()
        w = workload.build(NETS[net], data=workload.DataArgs(data=f"{Path(__file__).resolve()}:sample_crops"),
                           metric="agreement", workdir=work / net)
        rows = {"fp32": (w.model.sources, "fp32"), "int8": (w.model.sources, "int8"), "fp16": (w.model.sources, "fp16")}
        example = w.splits.train.head(2).inputs
        for amount in (0.3, 0.5):
            res = prune.prune_workload(w, "channel", amount, finetune_epochs=0, progress=False)
            rows[f"channel-{int(amount * 100)}%"] = (export_module(res.module, example, work / net / f"c{amount}",
                                                                  output_names=[t.name for t in w.outputs]), "fp32")
            print(f"{net}: channel {amount:.0%}: params {res.params_before:,} -> {res.params_after:,}")
        table = {}
        for key, (sources, precision) in rows.items():
            for b in backends:
                m = measure(b, sources, precision=precision, inputs=w.splits.eval.inputs, evaluate=w.evaluate,
                            calibration=w.splits.calib.inputs if precision == "int8" else None, batches=(1, 32),
                            runs=args.runs, runs_batched=args.runs_batched, warmup=3, io=(w.inputs, w.outputs),
                            progress=False,
                            extra=choose_recipe(b, "static", cpu).extra if precision == "int8" else None)
                table[f"{key}/{b}"] = m.as_dict()
                ms = " ".join(f"b{k} {v:.2f} ms" for k, v in m.p50_ms.items()) if m.ok else m.reason[:120]
                print(f"{net} {key:>14} {b:>12}: {ms}" + (f"  agreement {m.accuracy:.4f}" if m.ok else ""), flush=True)
        results["nets"][net] = {"table": table, "seconds": round(time.perf_counter() - t0, 1),
                                "split": w.splits.record()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = []
    for net, data in results["nets"].items():
        t = data["table"]
        lines += [f"### {net} (3x224x224), {results['date']}", "",
                  "| variant | backend | b1 ms | b32 ms | speed-up b1 | speed-up b32 | agreement |", "|---|---|---|---|---|---|---|"]
        for key, m in t.items():
            variant, b = key.split("/")
            base = t.get(f"fp32/{b}", {})
            if not m.get("ok"):
                lines.append(f"| {variant} | {b} | n/a | n/a | | | {m.get('reason', '')[:80]} |")
                continue
            cells = []
            for bs in ("1", "32"):
                ref = base.get("p50_ms", {}).get(bs) if base.get("ok") else None
                cells.append(f"{ref / m['p50_ms'][bs]:.2f}×" if ref and bs in m["p50_ms"] else "")
            lines.append(f"| {variant} | {b} | {m['p50_ms'].get('1', float('nan')):.2f} | {m['p50_ms'].get('32', float('nan')):.1f} | "
                         f"{cells[0]} | {cells[1]} | {m['accuracy']:.4f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
