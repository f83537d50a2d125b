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
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, metrics
from . import limits as _limits
from . import openapi as _openapi
from .errors import InvalidInput, KilnError, NotFound, PayloadTooLarge
from .model import ModelVersion
from .protocol import classify, decode_request, decompress, encode_response
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


_JSON_HEADERS = [(b"content-type", b"application/json")]


class _ClientGone(Exception):
    pass


class KilnApp(FastAPI):
    """FastAPI for every route but infer: `POST /v2/models/{m}[/versions/{v}]/infer` takes a raw ASGI
    path (no middleware stack, routing, dependency injection or pydantic on the hot path). The
    FastAPI route of the same path stays declared for the OpenAPI schema and is never reached."""

    fast_infer = None  # set by create_app: async (scope, receive, send, model, version) -> None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and self.fast_infer is not None:
            path = scope["path"]
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                parts = path[11:-6].split("/")
                if len(parts) == 1 and parts[0]:
                    return await self.fast_infer(scope, receive, send, parts[0], None)
                if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
                    return await self.fast_infer(scope, receive, send, parts[0], parts[2])
        return await super().__call__(scope, receive, send)


async def _send(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send, exc: KilnError) -> None:
    headers = list(_JSON_HEADERS)
    retry = getattr(exc, "retry_after", None)
    if retry:
        headers.append((b"retry-after", str(max(1, int(retry))).encode()))
    await _send(send, exc.status, orjson.dumps({"error": exc.message}), headers)


async def _receive_body(receive, limit: int, declared: int) -> bytes:
    if declared > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        return body
    chunks, size = [body], len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
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
        # Bounded by the shutdown grace: a SIGTERM during a long compile must not hang the pod.
        await asyncio.to_thread(repo.loading_done.wait, max(1.0, settings.shutdown_grace_s))
        repo.close()
        metrics.mark_process_dead()

    app = KilnApp(title="Kiln", version=__version__, lifespan=lifespan,
                  description="Open Inference Protocol (KServe v2) server for compiled, verified models.")
    _openapi.install(app)  # the infer / repository request bodies (read raw) in /openapi.json
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
    limit = settings.max_body_bytes

    async def fast_infer(scope, receive, send, model: str, version: str | None) -> None:
        """The hot path, raw ASGI: body → decode (orjson / frombuffer) → batcher → encode (orjson)."""
        start = time.perf_counter()
        try:
            mv = repo.get(model, version)
        except KilnError as exc:
            return await _send_error(send, exc)
        m = metrics.for_model(mv.name, mv.version)
        m.inflight.inc()
        outcome = "server_error"
        try:
            declared, encoding, hlen = 0, None, None
            for k, v in scope["headers"]:
                if k == b"content-length":
                    declared = int(v) if v.isdigit() else 0
                elif k == b"inference-header-content-length":
                    hlen = v.decode("latin-1")
                elif k == b"content-encoding":
                    encoding = v.decode("latin-1").strip().lower()
            mv.check_ready()
            body = await _receive_body(receive, limit, declared)
            if encoding:
                body = decompress(body, encoding, limit)
            req = decode_request(body, hlen, _single_input(mv))
            mv.validate(req.inputs, req.datatypes)
            outputs_wanted = _requested_outputs(mv, req)
            decoded = time.perf_counter()
            result, queue_s, compute_s = await _limits.infer(mv, req, settings.request_timeout_s)
            computed = time.perf_counter()
            payload, headers = encode_response(mv.name, mv.version, req.id, [
                (name, classify(result[name], k, mv.labels) if k else result[name], binary)
                for name, binary, k in outputs_wanted
            ])
            await _send(send, 200, payload, [(k.encode(), v.encode()) for k, v in headers.items()])
            end = time.perf_counter()
            outcome = "success"
            m.decode.observe(decoded - start)
            m.queue.observe(queue_s)
            m.compute.observe(compute_s)
            m.encode.observe(end - computed)
            m.total.observe(end - start)
            m.samples.inc(_batch(mv, req.inputs))
        except KilnError as exc:
            outcome = exc.outcome
            await _send_error(send, exc)
        except _ClientGone:
            outcome = "client_error"  # the client went away mid-body: nothing to answer
        except Exception as exc:  # never leak a traceback page: a v2 error body
            log.exception("infer %s failed", model)
            await _send_error(send, KilnError(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            m.inflight.dec()
            m.request(outcome).inc()

    app.fast_infer = fast_infer

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(request: Request, model: str, version: str | None = None):
        """Declared for /openapi.json only: KilnApp sends every infer request to `fast_infer`."""
        raise NotFound(f"no such endpoint: POST {request.url.path}")

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
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

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


def create_app_from_env() -> FastAPI:
    """App factory for `kiln serve --workers N` (uvicorn imports it in each worker process)."""
    from . import logs
    from .guard import wrap

    settings = Settings()
    logs.setup(settings.log_level, settings.log_format)
    return wrap(create_app(settings), settings)  # auth, drain, request ids, logs (service/guard.py)
