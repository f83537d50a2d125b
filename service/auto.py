"""`backend: auto`: compile every candidate that runs on this machine, gate it, time it, serve the fastest.

Candidates: `auto.candidates` from the config ("onnxruntime", "openvino:int8", ...), or by default every
registered backend at fp32, plus its fp16/int8 builds when the config has an accuracy gate (a lossy
build is never chosen without one). Compile-only backends (Core ML off macOS) and unavailable ones are
rejected with their reason, without compiling.

Timing: each candidate that passes the gates is warmed (`auto.warmup` calls), then timed for
`auto.runs` calls at each of `auto.batch_sizes` (default 1 and max_batch_size) on the golden inputs;
per batch size the median is kept; the score is the geometric mean of those medians (so batch 1 and
batch 32 weigh the same, whatever their absolute scale). Lowest score wins.

The decision is cached in the compile cache (`<cache>/auto/<key>.json`), the key built like an
artifact key: source bytes, the config, the CPU fingerprint, the cache format and every candidate
backend's name + version. A restart with the same key reuses the decision without re-measuring (the
artifacts come from the compile cache as usual); any change re-measures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backends import backend_names, get_backend, timing

from .cache import FORMAT, cpu_fingerprint, file_sha256

if TYPE_CHECKING:
    from .model import ModelVersion

log = logging.getLogger("kiln.auto")

DECISION_FORMAT = 1


def candidates(mv: ModelVersion) -> list[tuple[str, str]]:
    spec = mv.config.auto
    out: list[tuple[str, str]] = []
    if spec.candidates:
        for entry in spec.candidates:
            head, _, precision = entry.partition(":")
            out.append((head, precision or "fp32"))
    else:
        lossy_ok = mv.config.accuracy is not None
        for name in backend_names():
            try:
                precisions = get_backend(name).precisions
            except Exception:  # a backend module that cannot even import is rejected later
                precisions = ("fp32",)
            for p in precisions:
                if p == "fp32" or (lossy_ok and (p != "int8" or mv.config.verify.samples)):
                    out.append((name, p))
    seen: list[tuple[str, str]] = []
    return [c for c in out if not (c in seen or seen.append(c))]


def _backend_version(name: str) -> str:
    try:
        return get_backend(name).version()
    except Exception as err:
        return f"unknown ({type(err).__name__})"


def decision_key(mv: ModelVersion, cands: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    h.update(f"kiln-auto-v{DECISION_FORMAT}\0cache-v{FORMAT}\0{cpu_fingerprint()}\0".encode())
    for fmt in sorted(mv.sources):
        h.update(f"{fmt}:{file_sha256(mv.sources[fmt])}\0".encode())
    h.update(mv.config.model_dump_json().encode())
    for name in sorted({b for b, _ in cands}):
        h.update(f"{name}={_backend_version(name)}\0".encode())
    for path in (mv.config.verify.samples, mv.config.accuracy.dataset if mv.config.accuracy else None):
        if path:
            p = Path(path) if Path(path).is_absolute() else mv.model_dir / path
            h.update((file_sha256(p) if p.is_file() else "missing").encode())
    return h.hexdigest()


def _decision_path(mv: ModelVersion, key: str) -> Path:
    return mv.cache.root / "auto" / f"{key}.json"


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".auto-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def time_runner(runner, inputs: dict[str, np.ndarray], batch_sizes: list[int], runs: int,
                warmup: int) -> dict[str, float]:
    """Median ms per batch size, keyed by the size as a string (the decision file's format); size 0
    times the golden inputs as they are (a model that does not batch)."""
    return {str(b): round(timing.time_runner(runner, inputs, b, runs, warmup).median_ms, 5) for b in batch_sizes}


def score(latency_ms: dict[str, float]) -> float:
    values = [max(v, 1e-6) for v in latency_ms.values()]
    return round(math.exp(sum(math.log(v) for v in values) / len(values)), 5)


def batch_sizes(mv: ModelVersion) -> list[int]:
    if mv.config.auto.batch_sizes:
        return [b for b in mv.config.auto.batch_sizes if mv.config.max_batch_size <= 0 or b <= mv.config.max_batch_size]
    if mv.config.max_batch_size <= 0:
        return [0]  # no batch dimension to vary: the golden inputs as they are
    return [1, mv.config.max_batch_size] if mv.config.max_batch_size > 1 else [1]


def build_auto(mv: ModelVersion) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Measure (or reuse the cached decision) and return the serving order: the winner first, then the
    other passing candidates by score as fallbacks, and the decision (candidates, timings, choice)."""
    cands = candidates(mv)
    key = decision_key(mv, cands)
    path = _decision_path(mv, key)
    try:
        decision = json.loads(path.read_text())
        if decision.get("format") != DECISION_FORMAT:
            decision = None
    except (OSError, ValueError):
        decision = None
    if decision is not None:
        decision["reused"] = True
        log.info("model %s v%s: auto: reused cached decision %s (measured %s): %s/%s, score %.4f ms; "
                 "not re-measuring", mv.name, mv.version, key[:12], decision.get("measured_at"),
                 decision["choice"]["backend"], decision["choice"]["precision"], decision["choice"]["score_ms"])
        return [tuple(c) for c in decision["order"]], decision

    sizes = batch_sizes(mv)
    log.info("model %s v%s: auto: measuring %d candidate(s) at batch sizes %s: %s", mv.name, mv.version,
             len(cands), sizes, ", ".join(f"{b}/{p}" for b, p in cands))
    shared = mv.pipeline.ctx.golden  # the reference-checked golden sets every candidate is gated on
    golden = shared.sets[0].inputs if shared is not None and shared.sets else None
    results: list[dict[str, Any]] = []
    for name, precision in cands:
        row: dict[str, Any] = {"backend": name, "precision": precision}
        results.append(row)
        _measure(mv, row, golden, sizes)
        log.info("model %s v%s: auto: %s/%s %s%s", mv.name, mv.version, name, precision, row["status"],
                 f" score {row['score_ms']:.4f} ms {row['latency_ms']}" if "score_ms" in row else f": {row['reason']}")
    passed = sorted((r for r in results if r["status"] == "ok"), key=lambda r: r["score_ms"])
    for r in results:
        if r["status"] == "ok" and passed and r is not passed[0]:
            r["rejected"] = f"slower: score {r['score_ms']:.4f} ms vs {passed[0]['score_ms']:.4f} ms"
    for r in results:
        if passed and r is passed[0]:
            continue
        log.info("model %s v%s: auto: rejected %s/%s: %s", mv.name, mv.version, r["backend"], r["precision"],
                 r.get("rejected") or f"{r['status']}: {r.get('reason', '')}")
    decision = {
        "format": DECISION_FORMAT,
        "key": key,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "batch_sizes": sizes,
        "runs": mv.config.auto.runs,
        "score": "geometric mean of median latency (ms) over batch_sizes",
        "candidates": results,
        "order": [[r["backend"], r["precision"]] for r in passed],
        "choice": passed[0] if passed else None,
        "reused": False,
    }
    if not passed:
        return [], decision
    _write_atomic(path, decision)
    log.info("model %s v%s: auto: chose %s/%s (score %.4f ms); decision cached in %s", mv.name, mv.version,
             passed[0]["backend"], passed[0]["precision"], passed[0]["score_ms"], path)
    return [(r["backend"], r["precision"]) for r in passed], decision


def _measure(mv: ModelVersion, row: dict[str, Any], golden: dict[str, np.ndarray] | None,
             sizes: list[int]) -> None:
    """Availability, compile + gates (an attempt that is not served), timing; fills row."""
    name, precision = row["backend"], row["precision"]
    try:
        backend = get_backend(name)
    except KeyError as err:
        row.update(status="failed", reason=str(err.args[0]))
        return
    skip, why = backend.compile_only()  # cheap platform check first (Core ML off macOS)
    if skip:
        row.update(status="unavailable", reason=f"compile-only here: {why}")
        return
    ok, why = backend.available()
    if not ok:
        row.update(status="unavailable", reason=why)
        return
    attempt = mv.pipeline.run(name, precision, serve=False)
    row.update(status=attempt.status, reason=attempt.reason, cache=attempt.cache,
               compile_seconds=attempt.compile_seconds, parity_max_abs_error=attempt.parity_max_abs_error,
               accuracy=attempt.accuracy["compiled"] if attempt.accuracy else None, parity=attempt.parity_verdict)
    if not attempt.ok:
        return
    try:
        if golden is None:  # nothing the reference runs: only the reference build passed, untimed
            row.update(latency_ms={}, score_ms=float("inf"))
            return
        row["latency_ms"] = time_runner(attempt.runners[0], golden, sizes, mv.config.auto.runs, mv.config.auto.warmup)
        row["score_ms"] = score(row["latency_ms"])
    except Exception as err:
        row.update(status="failed", reason=f"timing failed: {type(err).__name__}: {err}")
    finally:
        attempt.close()
