# syntax=docker/dockerfile:1
#
# Kiln inference server image.
#
#   docker build -t kiln:0.1.0 .                         # default target "runtime": serving core +
#                                                        #   ONNX Runtime + OpenVINO + LiteRT, no torch
#   docker build --target convert -t kiln:0.1.0-convert .   # + torch, litert-torch, coremltools, nncf
#   docker build --build-arg KILN_EXTRAS= -t kiln:slim .    # serving core only (ORT + OpenVINO)
#
#   docker run -p 8000:8000 -v "$PWD/model_repo:/models:ro" -v kiln-cache:/var/cache/kiln kiln:0.1.0
#
# PYTHON_IMAGE must be a Debian-based image with python3.11 on PATH and the venv module
# (python:3.11-slim-bookworm, or a local debootstrap rootfs: see bench/build_image.sh).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------
# builder: a venv at /opt/kiln with the project and its runtime dependencies.
FROM ${PYTHON_IMAGE} AS builder
ARG KILN_EXTRAS=litert
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/kiln/bin:$PATH
RUN python3 -m venv /opt/kiln
WORKDIR /src
# Project metadata first (README.md* : the readme is optional for the build), then the packages.
COPY pyproject.toml README.md* ./
COPY service/ service/
COPY backends/ backends/
COPY optimize/ optimize/
RUN pip install --no-cache-dir "./${KILN_EXTRAS:+[${KILN_EXTRAS}]}" \
    && pip check \
    && python -m compileall -q /opt/kiln/lib

# builder-convert: adds the torch-based compile/convert tools (CPU torch wheels).
FROM builder AS builder-convert
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" "./[convert]" \
    && pip check \
    && python -m compileall -q /opt/kiln/lib

# ---------------------------------------------------------------------------------------
# base: what both final images share. Non-root (uid 10001, gid 0 so arbitrary-uid
# platforms work), model repository and compile cache as volumes, health check by urllib.
FROM ${PYTHON_IMAGE} AS base
ARG KILN_UID=10001
RUN useradd --system --uid "${KILN_UID}" --gid 0 --home-dir /home/kiln --create-home \
        --shell /usr/sbin/nologin kiln \
    && mkdir -p /models /var/cache/kiln \
    && chown "${KILN_UID}:0" /models /var/cache/kiln \
    && chmod 0775 /models /var/cache/kiln
ENV PATH=/opt/kiln/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/kiln \
    KILN_MODEL_REPO=/models \
    KILN_CACHE_DIR=/var/cache/kiln \
    KILN_HTTP_HOST=0.0.0.0 \
    KILN_HTTP_PORT=8000 \
    KILN_GRPC_PORT=8001
LABEL org.opencontainers.image.title="kiln" \
      org.opencontainers.image.description="Inference server for optimized models (Open Inference Protocol / KServe v2)" \
      org.opencontainers.image.licenses="Apache-2.0"
WORKDIR /home/kiln
VOLUME ["/models", "/var/cache/kiln"]
# 8000 HTTP (v2 REST, /metrics), 8001 gRPC (inference.GRPCInferenceService, grpc.health.v1).
EXPOSE 8000 8001
USER ${KILN_UID}:0
# Liveness only: readiness (models compiled and verified) is the orchestrator's business.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('KILN_HTTP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["kiln", "serve"]

# convert: serving + compile tools (torch, litert-torch, coremltools, nncf); build with --target convert.
FROM base AS convert
COPY --from=builder-convert /opt/kiln /opt/kiln

# runtime (default, last stage): the small serving image.
FROM base AS runtime
COPY --from=builder /opt/kiln /opt/kiln
