"""Regenerate the Python code for Triton's gRPC service from the .proto files in this folder.

    python -m service.protos.generate

The generated modules are committed (no protoc step at install or in CI). protoc writes
`import model_config_pb2` (a top-level module); inside this package it must be a relative import.
health.proto is kept for reference only: the standard grpc.health.v1 service comes from
grpcio-health-checking, and generating it again would register the same proto package twice.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ["grpc_service.proto", "model_config.proto"]


def main() -> int:
    from grpc_tools import protoc

    args = ["protoc", f"-I{HERE}", f"--python_out={HERE}", f"--pyi_out={HERE}", f"--grpc_python_out={HERE}",
            *[str(HERE / p) for p in PROTOS]]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for path in HERE.glob("*_pb2*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        fixed = re.sub(r"^import (\w+_pb2)$", r"from . import \1", fixed, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
