"""HTTP surface: the Open Inference Protocol (KServe v2) plus the Triton extensions clients rely on."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, metrics
from .errors import InvalidInput, KilnError, PayloadTooLarge
from .model import ModelVersion
from .protocol import HEADER, classify, decode_request, decompress, encode_response
from .repository import ModelRepository
from .settings import Settings

log = logging.getLogger("kiln.http")

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "model_configuration", "parameters"]


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json",
                    headers=headers)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes the limit (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings, repository: ModelRepository | None = None) -> FastAPI:
    repo = repository or ModelRepository(
        settings.model_repo, settings.cache_dir, [m for m in settings.models.split(",") if m]
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Build models in the background: liveness answers at once, readiness when models are READY.
        loader = threading.Thread(target=repo.load_all, name="kiln-loader", daemon=True)
        loader.start()
        yield
        await asyncio.to_thread(repo.loading_done.wait, 600)
        repo.close()

    app = FastAPI(title="Kiln", version=__version__, lifespan=lifespan,
                  description="Open Inference Protocol (KServe v2) server for compiled, verified models.")
    app.state.repository = repo
    app.state.settings = settings

    @app.exception_handler(KilnError)
    async def _kiln_error(request: Request, exc: KilnError):
        headers = {"Retry-After": str(max(1, int(exc.retry_after)))} if getattr(exc, "retry_after", None) else None
        return error(exc.status, exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        return error(400, f"invalid request: {'.'.join(map(str, first.get('loc', [])))}: {first.get('msg', '')}")

    # -- health and metadata -------------------------------------------------------------------
    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        if repo.ready():
            return Response(status_code=200)
        return error(503, "server is not ready: models are still loading")

    @app.get("/v2")
    async def server_metadata():
        return json_response({"name": "kiln", "version": __version__, "extensions": EXTENSIONS})

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str | None = None):
        mv = repo.get(model, version)
        return json_response(mv.metadata(repo.versions(model)))

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str | None = None):
        mv = repo.get(model, version)
        if mv.ready:
            return Response(status_code=200)
        reason = f": {mv.reason}" if mv.reason else ""
        return error(503, f"model '{model}' version {mv.version} is {mv.state}{reason}")

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str | None = None):
        return json_response(repo.get(model, version).triton_config())

    # -- inference -----------------------------------------------------------------------------
    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(request: Request, model: str, version: str | None = None):
        start = time.perf_counter()
        mv = repo.get(model, version)
        labels = (mv.name, mv.version)
        metrics.INFLIGHT.labels(mv.name).inc()
        outcome = "server_error"
        try:
            mv.check_ready()
            body = await read_body(request, settings.max_body_bytes)
            body = decompress(body, request.headers.get("content-encoding"))
            req = decode_request(body, request.headers.get(HEADER), _single_input(mv))
            mv.validate(req.inputs, req.datatypes)
            outputs_wanted = _requested_outputs(mv, req)
            decoded = time.perf_counter()
            result, queue_s, compute_s = await mv.infer(req.inputs)
            computed = time.perf_counter()
            payload, headers = encode_response(mv.name, mv.version, req.id, [
                (name, classify(result[name], k, mv.labels) if k else result[name], binary)
                for name, binary, k in outputs_wanted
            ])
            end = time.perf_counter()
            outcome = "success"
            d = metrics.DURATION
            d.labels(*labels, "decode").observe(decoded - start)
            d.labels(*labels, "queue").observe(queue_s)
            d.labels(*labels, "compute").observe(compute_s)
            d.labels(*labels, "encode").observe(end - computed)
            d.labels(*labels, "total").observe(end - start)
            metrics.SAMPLES.labels(*labels).inc(_batch(mv, req.inputs))
            return Response(payload, headers=headers)
        except KilnError as exc:
            outcome = exc.outcome
            raise
        finally:
            metrics.INFLIGHT.labels(mv.name).dec()
            metrics.REQUESTS.labels(*labels, outcome).inc()

    # -- repository extension ------------------------------------------------------------------
    @app.post("/v2/repository/index")
    async def repository_index(request: Request):
        body = await read_body(request, 1 << 16)
        ready_only = False
        if body.strip():
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError as err:
                raise InvalidInput(f"malformed JSON in request body: {err}") from None
            ready_only = bool(parsed.get("ready", False)) if isinstance(parsed, dict) else False
        return json_response(await asyncio.to_thread(repo.index, ready_only))

    @app.post("/v2/repository/models/{model}/load")
    async def repository_load(model: str):
        versions = await asyncio.to_thread(repo.load, model)
        failed = [mv for mv in versions if mv.state == "FAILED"]
        if failed:
            return error(400, f"failed to load '{model}' version {failed[0].version}: {failed[0].reason}")
        return Response(status_code=200)

    @app.post("/v2/repository/models/{model}/unload")
    async def repository_unload(model: str):
        await asyncio.to_thread(repo.unload, model)
        return Response(status_code=200)

    # -- metrics ---------------------------------------------------------------------------------
    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


def _single_input(mv: ModelVersion) -> tuple[str, str, tuple[int, ...]] | None:
    if len(mv.inputs) != 1:
        return None
    t = mv.inputs[0]
    return t.name, t.datatype, t.shape


def _requested_outputs(mv: ModelVersion, req) -> list[tuple[str, bool, int]]:
    names = mv.output_names()
    if req.outputs is None:
        return [(n, req.binary_output_default, 0) for n in names]
    out = []
    for o in req.outputs:
        if o.name not in names:
            raise InvalidInput(f"unknown output '{o.name}' for model '{mv.name}' (outputs: {', '.join(names)})")
        out.append((o.name, o.binary, o.classification))
    return out


def _batch(mv: ModelVersion, inputs) -> int:
    if mv.config.max_batch_size > 0 and inputs:
        return int(next(iter(inputs.values())).shape[0])
    return 1
