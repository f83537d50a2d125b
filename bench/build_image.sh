#!/usr/bin/env bash
# Build the Kiln image without a Docker daemon and without pulling a base image:
# debootstrap a Debian 12 rootfs with python3 + venv, import it as the base, and build the
# Dockerfile with buildah (chroot isolation) on top of it. Optional; not part of CI.
#
#   sudo bash bench/build_image.sh                    # target runtime -> localhost/kiln:dev
#   sudo TARGET=convert TAG=localhost/kiln:dev-convert bash bench/build_image.sh
#   sudo SMOKE=0 bash bench/build_image.sh            # skip the run/health-check smoke test
#   sudo HOST_CA_BUNDLE= bash bench/build_image.sh    # do not copy the host's CA bundle into the base
#
# Needs root, Debian packages buildah podman debootstrap (installed when missing), and the
# network to reach the Debian mirror and PyPI (pip runs inside the build).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${TARGET:-runtime}"
TAG="${TAG:-localhost/kiln:dev}"
BASE="${BASE:-localhost/kiln-base:bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SMOKE="${SMOKE:-1}"
WORK="${WORK:-/var/tmp/kiln-image}"
# Default: the CA bundle pip uses on this host, if it is configured (PIP_CERT / pip.conf).
HOST_CA_BUNDLE="${HOST_CA_BUNDLE-${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}}"
mkdir -p "$WORK"

log() { printf '[build_image %5ss] %s\n' "$SECONDS" "$*"; }

missing=()
for bin in buildah podman debootstrap; do command -v "$bin" >/dev/null || missing+=("$bin"); done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

# 1. Base image: a minimal Debian 12 with python3.11 and venv (stands in for python:3.11-slim).
if ! podman image exists "$BASE"; then
    log "debootstrap bookworm -> $BASE"
    rootfs="$WORK/rootfs"
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    changes=(--change 'CMD ["python3"]')
    # Behind a TLS-intercepting proxy the host's CA bundle holds the proxy's CA: give it to the
    # base image, and point pip (which otherwise trusts only its bundled certifi) at it.
    if [ -n "${HOST_CA_BUNDLE:-}" ]; then
        cp "$HOST_CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
        changes+=(--change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
    fi
    tar -C "$rootfs" -c . | podman import "${changes[@]}" - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi
log "base $BASE: $(podman image inspect "$BASE" --format '{{.Size}}') bytes"

# 2. The image, exactly as `docker build` would build it, on that base.
log "buildah build --target $TARGET -> $TAG"
buildah build --isolation chroot --layers --force-rm --format docker \
    --build-arg "PYTHON_IMAGE=$BASE" \
    --target "$TARGET" -t "$TAG" -f "$ROOT/Dockerfile" "$ROOT"
log "built $TAG: $(podman image inspect "$TAG" --format '{{.Size}}') bytes"

# 3. Smoke test of the built image without a container runtime (sandboxes that forbid
#    setrlimit make `podman run` fail with "crun: setrlimit ... Operation not permitted"):
#    mount a container's rootfs, put the repo's models in /models, and run the image's own
#    ENTRYPOINT with its ENV as its USER under chroot; wait for /v2/health/ready, infer once,
#    then run the image's HEALTHCHECK command the same way.
if [ "$SMOKE" = 1 ]; then
    port="${PORT:-18000}"
    cid="$(podman create "$TAG")"
    rootfs="$(podman mount "$cid")"
    pid=""
    cleanup() {
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
        for m in proc sys dev; do umount "$rootfs/$m" 2>/dev/null || true; done
        podman umount "$cid" >/dev/null 2>&1 || true
        podman rm -f "$cid" >/dev/null 2>&1 || true
    }
    trap cleanup EXIT
    cp -r "$ROOT/model_repo/." "$rootfs/models/"
    mount -t proc proc "$rootfs/proc" && mount --bind /sys "$rootfs/sys" && mount --bind /dev "$rootfs/dev"
    mapfile -t img_env < <(podman image inspect "$TAG" --format '{{range .Config.Env}}{{println .}}{{end}}' | sed '/^$/d')
    user="$(podman image inspect "$TAG" --format '{{.Config.User}}')"
    entry="$(podman image inspect "$TAG" --format '{{json .Config.Entrypoint}}')"
    health="$(podman image inspect "$TAG" --format '{{json .Config.Healthcheck.Test}}')"
    chown -R "$user" "$rootfs/models"
    log "smoke: $entry as $user on 127.0.0.1:$port"
    # shellcheck disable=SC2046
    env -i "${img_env[@]}" KILN_HTTP_HOST=127.0.0.1 KILN_HTTP_PORT="$port" \
        chroot --userspec="$user" "$rootfs" $(python3 -c 'import json,sys; print(" ".join(json.loads(sys.argv[1])))' "$entry") \
        >"$WORK/smoke.log" 2>&1 &
    pid=$!
    t0=$SECONDS
    until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/v2/health/ready', timeout=2)" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null || [ $((SECONDS - t0)) -gt 300 ]; then tail -30 "$WORK/smoke.log"; exit 1; fi
        sleep 0.5
    done
    log "smoke: ready after $((SECONDS - t0)) s"
    python3 - "$port" <<'PY'
import json, sys, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}"
print(urllib.request.urlopen(url + "/v2/repository/index", data=b"{}").read().decode())
body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [1.0] * 64}]}).encode()
print(json.loads(urllib.request.urlopen(url + "/v2/models/digits-cnn/infer", data=body).read())["outputs"][0]["shape"])
PY
    # HEALTHCHECK ["CMD", ...] run inside the image as its user.
    mapfile -t hc < <(python3 -c 'import json,sys; [print(a) for a in json.loads(sys.argv[1])[1:]]' "$health")
    env -i "${img_env[@]}" KILN_HTTP_PORT="$port" chroot --userspec="$user" "$rootfs" "${hc[@]}"
    log "smoke: HEALTHCHECK passed; cache entries written as $user: $(find "$rootfs/var/cache/kiln" -mindepth 1 -maxdepth 1 | wc -l)"
fi
log "done in ${SECONDS}s"
