"""The Dockerfile: hadolint-clean at the strictest threshold, and what the image promises
(non-root, health check by urllib, volumes, KILN_* settings, `kiln serve`, targets) read from
the file itself. Building the image needs a container engine; see bench/build_image.sh.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path


from tests.ops_tools import tool

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"




def instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out, stage = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            stage = args.split(" AS ")[-1].strip() if " AS " in args else args
        out.append((stage, op, args.strip()))
    return out


def test_hadolint_clean():
    proc = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


def test_stages_and_targets():
    ins = instructions()
    froms = [(stage, args) for stage, op, args in ins if op == "FROM"]
    stages = [stage for stage, _ in froms]
    assert stages == ["builder", "builder-convert", "base", "convert", "runtime"]
    assert stages[-1] == "runtime", "the default target (last stage) is the small serving image"
    # The serving image copies the venv from the light builder only: no torch in it.
    copies = {stage: args for stage, op, args in ins if op == "COPY" and "--from=" in args}
    assert copies["runtime"].startswith("--from=builder ") and copies["convert"].startswith("--from=builder-convert ")
    pip = {stage: args for stage, op, args in ins if op == "RUN" and "pip install" in args}
    assert "[${KILN_EXTRAS}]" in pip["builder"] and "[convert]" in pip["builder-convert"]
    assert ("builder", "ARG", "KILN_EXTRAS=litert") in ins


def test_runtime_contract():
    ins = instructions()
    base = [(op, args) for stage, op, args in ins if stage == "base"]
    env = " ".join(args for op, args in base if op == "ENV")
    for setting in ("KILN_MODEL_REPO=/models", "KILN_CACHE_DIR=/var/cache/kiln", "KILN_HTTP_HOST=0.0.0.0",
                    "KILN_HTTP_PORT=8000", "KILN_GRPC_PORT=8001"):
        assert setting in env, setting
    (user,) = [args for op, args in base if op == "USER"]
    uid = user.split(":")[0]
    assert uid == "${KILN_UID}" and ("base", "ARG", "KILN_UID=10001") in ins, "numeric non-root uid"
    (volume,) = [args for op, args in base if op == "VOLUME"]
    assert "/models" in volume and "/var/cache/kiln" in volume
    (health,) = [args for op, args in base if op == "HEALTHCHECK"]
    assert "urllib.request" in health and "/v2/health/live" in health and "curl" not in health
    (entry,) = [args for op, args in base if op == "ENTRYPOINT"]
    assert entry == '["kiln", "serve"]'
    assert ("base", "EXPOSE", "8000 8001") in ins  # HTTP, gRPC


def test_build_context_has_what_pip_install_needs():
    """The .dockerignore allow-list and the COPY lines cover every package pyproject installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({p.rstrip("*").rstrip(".") for p in includes})
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    copied = [args.split()[0] for stage, op, args in instructions() if stage == "builder" and op == "COPY"]
    for pkg in packages:
        assert f"!{pkg}/" in ignore, f".dockerignore drops {pkg}/"
        assert f"{pkg}/" in copied, f"Dockerfile does not COPY {pkg}/"
    readme = project["project"].get("readme")
    for f in ("pyproject.toml", readme):
        if f:
            assert f"!{f}" in ignore, f
    extras = project["project"]["optional-dependencies"]
    assert "litert" in extras and "convert" in extras
    assert not any("torch" in dep for dep in project["project"]["dependencies"]), "serving core stays torch-free"
