"""KServe's InferenceGRPCClient against Kiln, compared with tritonclient.http on the same server.

    python -m bench.peers.setup kserve     # once: bench/.peers-venv/kserve (kserve 0.21, pinned)
    python -m tests.interop.kserve_grpc

The `kserve` package does not install next to Kiln's pinned dependencies (constraints.txt), so its
client runs from a venv of its own (.ci/install-ops-tools.sh creates it); tests/test_kserve_client.py
runs this in the suite.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from bench.peers import setup
from tests.kiln_server import DEFAULT_REPO, start_server
from tests.test_datatypes import TYPES, sample
from tests.test_grpc import build_repo


def main() -> int:
    if not setup.ready("kserve"):
        print("run `python -m bench.peers.setup kserve` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_repo(root / "repo")
        srv = start_server(root / "repo", log_dir=root, grpc=True)
        try:
            http = httpclient.InferenceServerClient(srv.address)
            cases = {}
            x = np.load(DEFAULT_REPO / "digits-cnn" / "data" / "eval.npz")["input"][:16]
            hin = httpclient.InferInput("input", list(x.shape), "FP32")
            hin.set_data_from_numpy(x, binary_data=True)
            cases["digits_input"], cases["digits_logits"] = x, http.infer("digits-cnn", [hin]).as_numpy("logits")
            hinputs = []
            for name, (_, dtype) in TYPES.items():
                arr = sample(name, dtype)
                key = name.lower()
                cases[f"in_{key}"], cases[f"dtype_{key}"] = arr, np.array(name)
                h = httpclient.InferInput(f"in_{key}", list(arr.shape), name)
                h.set_data_from_numpy(arr, binary_data=True)
                hinputs.append(h)
            res = http.infer("identity", hinputs)
            for name in TYPES:
                out = res.as_numpy(f"out_{name.lower()}")
                if out.dtype == object:
                    out = np.array([o if isinstance(o, bytes) else o.encode() for o in out.reshape(-1)],
                                   dtype=object).reshape(out.shape)
                cases[f"out_{name.lower()}"] = out
            http.close()
            data = root / "cases.npz"
            np.savez(data, **cases)
            script = Path(__file__).with_name("kserve_grpc_client.py")
            return subprocess.run([str(setup.python("kserve")), str(script), srv.grpc_address, str(data)], check=False).returncode
        finally:
            srv.stop()


if __name__ == "__main__":
    sys.exit(main())
