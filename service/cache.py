"""Content-addressed compile cache.

key = sha256(source bytes, compile options, backend name + version, CPU ISA, calibration data).
An entry is `<cache>/<key>/` holding the artifact and `manifest.json` with a sha256 per file, so a
truncated or corrupted artifact is detected and rebuilt instead of served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from backends.hw import cpu_flags

log = logging.getLogger("kiln.cache")

FORMAT = 1  # bump when the layout or the compile recipe of any backend changes meaning
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16", "asimddp")


def cpu_fingerprint() -> str:
    flags = cpu_flags()
    return platform.machine() + ":" + ",".join(f for f in ISA_FLAGS if f in flags)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def compile_key(source: Path, backend: str, backend_version: str, options: dict[str, Any],
                calibration: dict[str, np.ndarray] | None = None) -> str:
    h = hashlib.sha256()
    h.update(f"kiln-cache-v{FORMAT}\0{backend}\0{backend_version}\0{cpu_fingerprint()}\0".encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    h.update(file_sha256(source).encode())
    for name in sorted(calibration or {}):
        arr = np.ascontiguousarray(calibration[name])
        h.update(f"{name}{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


@dataclass
class CacheResult:
    artifact: Path
    result: str  # hit | miss | corrupt (corrupt entries are rebuilt)
    seconds: float  # compile time (0 on a hit)
    manifest: dict[str, Any]


class CompileCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        # Where builds go when `root` cannot be written (read-only volume, wrong owner): see get_or_build.
        self.fallback: CompileCache | None = None

    def entry(self, key: str) -> Path:
        return self.root / key

    def check(self, key: str) -> tuple[str, dict[str, Any] | None]:
        """'hit' with the manifest, 'miss', or 'corrupt' (files missing or changed)."""
        manifest_path = self.entry(key) / "manifest.json"
        if not manifest_path.exists():
            return ("corrupt" if self.entry(key).exists() else "miss"), None
        try:
            manifest = json.loads(manifest_path.read_text())
            if _tree_hashes(self.entry(key)) != manifest["files"]:
                return "corrupt", None
        except (OSError, ValueError, KeyError):
            return "corrupt", None
        return "hit", manifest

    def get_or_build(self, key: str, build: Callable[[Path], Path], info: dict[str, Any]) -> CacheResult:
        status, manifest = self.check(key)
        entry = self.entry(key)
        if status == "hit":
            return CacheResult(entry / manifest["artifact"], "hit", 0.0, manifest)
        if status == "corrupt":
            log.warning("cache entry %s is corrupted (files missing or changed): rebuilding", key[:12])
            shutil.rmtree(entry, ignore_errors=True)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            workdir = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=self.root))
        except OSError as err:
            # A read-only cache still serves its hits; a miss is built into a per-process temporary
            # cache (removed at shutdown, `close`) rather than failing the model. docs/hardening.md.
            if self.fallback is None:
                tmp = Path(tempfile.mkdtemp(prefix="kiln-cache-fallback-"))
                log.warning("compile cache directory %s is not writable (%s): building into the temporary "
                            "cache %s instead (not reused after a restart)", self.root, err, tmp)
                self.fallback = CompileCache(tmp)
            return self.fallback.get_or_build(key, build, info)
        try:
            start = time.perf_counter()
            artifact = build(workdir)
            seconds = time.perf_counter() - start
            manifest = {
                **info,
                "key": key,
                "artifact": str(artifact.relative_to(workdir)),
                "compile_seconds": round(seconds, 4),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": _tree_hashes(workdir),
            }
            (workdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
            try:
                os.rename(workdir, entry)  # atomic: readers never see a half-written entry
            except OSError:
                if self.check(key)[0] != "hit":  # lost a race to a broken entry: replace it
                    shutil.rmtree(entry, ignore_errors=True)
                    os.rename(workdir, entry)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return CacheResult(entry / manifest["artifact"], status, seconds, manifest)

    def close(self) -> None:
        """Remove the temporary fallback cache, if one was made: it is never reused after exit."""
        if self.fallback is not None:
            shutil.rmtree(self.fallback.root, ignore_errors=True)
            self.fallback = None

    def update_manifest(self, key: str, **fields: Any) -> None:
        """Record facts learned after the build (e.g. gate results) next to the artifact."""
        path = self.entry(key) / "manifest.json"
        if self.fallback is not None and not path.exists():
            return self.fallback.update_manifest(key, **fields)
        try:
            manifest = json.loads(path.read_text())
            manifest.setdefault("notes", {}).update(fields)
            path.write_text(json.dumps(manifest, indent=2, default=str))
        except (OSError, ValueError):
            log.warning("could not update cache manifest %s", path)
