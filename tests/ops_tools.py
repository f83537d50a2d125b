"""Find the ops tools the deployment tests run for real (installed by .ci/install-ops-tools.sh)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

INSTALL = ".ci/install-ops-tools.sh"


def tool(name: str) -> str:
    """A tool from KILN_<NAME>, PATH, the venv's bin, /usr/local/bin or /usr/bin; fail (not skip) when missing."""
    override = os.environ.get(f"KILN_{name.upper().replace('-', '_')}")
    for candidate in (override, shutil.which(name), str(Path(sys.executable).parent / name), f"/usr/local/bin/{name}",
                      f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"`{name}` not found on PATH: run `bash {INSTALL}` (CI installs it)", pytrace=False)
