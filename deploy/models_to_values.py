#!/usr/bin/env python3
"""Turn a (small) model repository into Helm values for `modelRepository.source=configMap`.

    python3 deploy/models_to_values.py model_repo > models-values.yaml
    helm install kiln helm/kiln -f models-values.yaml

Every file under the repository goes in: UTF-8 text files as `configMap.files`, anything else
(ONNX, .pt2, .npz) base64 in `configMap.binaryFiles`, keyed by its path inside the repository;
the chart mounts each at that path. Kubernetes caps a ConfigMap at 1 MiB: bigger repositories
belong on a PVC or behind an init container (this script refuses them).
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

import yaml

LIMIT = 1 << 20  # a ConfigMap (data + binaryData + metadata) must stay under 1 MiB
SKIP = {"__pycache__", ".git"}


def build(repo: Path, exclude: tuple[str, ...] = ()) -> dict:
    files: dict[str, str] = {}
    binary: dict[str, str] = {}
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo).as_posix()
        if not path.is_file() or SKIP & set(path.relative_to(repo).parts) or any(path.match(p) for p in exclude):
            continue
        data = path.read_bytes()
        try:
            files[rel] = data.decode("utf-8")
        except UnicodeDecodeError:
            binary[rel] = base64.b64encode(data).decode("ascii")
    size = sum(len(v.encode()) for v in files.values()) + sum(len(v) for v in binary.values())
    if size > LIMIT - 16 * 1024:
        raise SystemExit(f"{repo}: {size} bytes encoded; a ConfigMap holds at most 1 MiB. Use a PVC or an init container.")
    return {"modelRepository": {"source": "configMap", "configMap": {"files": files, "binaryFiles": binary}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo", type=Path, help="model repository (model_repo/)")
    ap.add_argument("--exclude", action="append", default=[], help="glob to leave out (repeatable), e.g. '*.pt2'")
    args = ap.parse_args()
    yaml.safe_dump(build(args.repo, tuple(args.exclude)), sys.stdout, sort_keys=True, width=1 << 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
