"""Create one virtual environment per peer server under bench/.peers-venv (once; reused after).

    python -m bench.peers.setup            # both
    python -m bench.peers.setup mlserver   # one

MLServer's default parallel_workers crash-loops with uvloop >= 0.22, hence the pin. A peer with a
`constraints-<peer>.txt` beside this file installs exactly those versions (the kserve client venv
that tests/test_kserve_client.py runs KServe's InferenceGRPCClient from).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / "bench" / ".peers-venv"

PEERS = {
    "mlserver": ["mlserver==1.7.1", "uvloop<0.22", "onnxruntime", "numpy<2.5"],
    "kserve": ["kserve==0.21.0", "onnxruntime", "numpy<2.5"],
}


def python(peer: str) -> Path:
    return VENVS / peer / "bin" / "python"


def ready(peer: str) -> bool:
    return (VENVS / peer / ".installed").exists()


def install(peer: str) -> Path:
    venv = VENVS / peer
    if ready(peer):
        return python(peer)
    VENVS.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python(peer)), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    pins = Path(__file__).with_name(f"constraints-{peer}.txt")
    constraints = ["-c", str(pins)] if pins.is_file() else []
    subprocess.run([str(python(peer)), "-m", "pip", "install", "-q", *constraints, *PEERS[peer]], check=True)
    (venv / ".installed").write_text(" ".join(PEERS[peer]) + "\n")
    return python(peer)


if __name__ == "__main__":
    for name in sys.argv[1:] or list(PEERS):
        print(name, install(name))
