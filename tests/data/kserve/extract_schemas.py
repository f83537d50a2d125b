"""Extract each KServe CRD's openAPIV3Schema (served version) into <Kind>.schema.json.gz.

    python tests/data/kserve/extract_schemas.py [/work/shared/kserve]

Source: kserve/kserve config/crd/full/, commit aaac4e2 (Apache-2.0, LICENSE beside this file). The
schemas are kept verbatim; tests/test_kserve.py turns them into strict JSON schemas.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = ["serving.kserve.io_servingruntimes.yaml", "serving.kserve.io_clusterservingruntimes.yaml",
        "serving.kserve.io_inferenceservices.yaml"]


def main(source: Path) -> None:
    for name in CRDS:
        crd = yaml.safe_load((source / name).read_text())
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served") and version.get("storage"):
                out = {"group": crd["spec"]["group"], "version": version["name"], "kind": kind,
                       "schema": version["schema"]["openAPIV3Schema"]}
                data = json.dumps(out, sort_keys=True, separators=(",", ":")).encode()
                (HERE / f"{kind}.schema.json.gz").write_bytes(gzip.compress(data, 9, mtime=0))
                print(f"{kind} {version['name']}: {len(data)} bytes of schema")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[4] / "shared" / "kserve")
