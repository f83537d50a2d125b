"""KServe's own InferenceGRPCClient (the `kserve` package) against Kiln's gRPC port: the same outputs
as tritonclient.http for the digits CNN (raw and typed contents) and for all 13 datatypes.

The client lives in a venv of its own (its pins clash with Kiln's constraints.txt):
.ci/install-ops-tools.sh creates it; without it this test creates it first (~40 s, PyPI)."""

from __future__ import annotations

import subprocess
import sys

from bench.peers import setup
from tests.kiln_server import ROOT


def test_kserve_inference_grpc_client_gets_what_tritonclient_http_gets():
    setup.install("kserve")
    r = subprocess.run([sys.executable, "-m", "tests.interop.kserve_grpc"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "identity: 13 datatypes the same as tritonclient.http" in r.stdout
    assert "OK: 15 checks" in r.stdout, r.stdout
