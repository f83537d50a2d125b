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

from . import __version__, metrics, stats
from . import openapi as _openapi
from .errors import InvalidInput, KilnError, NotFound, PayloadTooLarge, error_reply
from .infer import InferRoute, match_infer_path, too_large
from .monitor.hub import Monitor
from .repository import ModelRepository
from .rollout import Rollouts
from .settings import Settings

log = logging.getLogger("kiln.http")

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "model_configuration", "parameters",
              "statistics"]


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    _, _, body = error_reply(status, message)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes the limit (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and (exc := too_large(int(declared), limit, True)) is not None:
        raise exc
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if (exc := too_large(size, limit, False)) is not None:
            raise exc
        chunks.append(chunk)
    return b"".join(chunks)


class KilnApp(FastAPI):
    """FastAPI for every route but infer. `POST /v2/models/{m}[/versions/{v}]/infer` is answered by
    Kiln's HTTP protocol before any ASGI work (service/http_protocol.py); under another server it takes the
    raw ASGI path below (no middleware stack, routing, dependency injection or pydantic). The FastAPI
    route of the same path stays declared for the OpenAPI schema and is never reached."""

    infer_route: InferRoute | None = None  # set by create_app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and self.infer_route is not None:
            target = match_infer_path(scope["path"])
            if target is not None:
                return await _asgi_infer(self.infer_route, scope, receive, send, *target)
        return await super().__call__(scope, receive, send)


async def _asgi_infer(route: InferRoute, scope, receive, send, model: str, version: str | None) -> None:
    start = time.perf_counter()
    headers = scope["headers"]
    declared = next((int(v) for k, v in headers if k == b"content-length" and v.isdigit()), 0)
    try:
        body = await _receive_body(receive, route.body_limit, declared)
    except PayloadTooLarge as exc:
        reply = route.refuse(model, version, exc)
    except _ClientGone:
        route.refuse(model, version, None)
        return
    else:
        reply = await route(model, version, headers, body, start)
    status, out_headers, payload = reply
    await send({"type": "http.response.start", "status": status,
                "headers": [*out_headers, (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class _ClientGone(Exception):
    pass


async def _receive_body(receive, limit: int, declared: int) -> bytes:
    if (exc := too_large(declared, limit, True)) is not None:
        raise exc
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if (exc := too_large(len(body), limit, False)) is not None:
            raise exc
        return body
    chunks, size = [body], len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if (exc := too_large(size, limit, False)) is not None:
            raise exc
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings, repository: ModelRepository | None = None) -> FastAPI:
    repo = repository or ModelRepository(
        settings.model_repo, settings.cache_dir, [m for m in settings.models.split(",") if m],
        freeze_heap=settings.gc_freeze, settle_quiet_s=settings.gc_settle_delay_s,
    )

    repo.drain_timeout_s = settings.request_timeout_s or settings.shutdown_grace_s
    repo.control_mode = settings.model_control_mode  # load/unload refused in none and poll (HTTP and gRPC)
    poller = None
    if settings.model_control_mode == "poll":
        from .poll import RepositoryPoller

        poller = RepositoryPoller(repo, settings.repository_poll_secs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Build models in the background: liveness answers at once, readiness when models are READY.
        if poller is not None:
            poller.baseline()  # what the startup load reads: the first poll rebuilds what changed since
        loader = threading.Thread(target=repo.load_all, name="kiln-loader", daemon=True)
        loader.start()
        if poller is not None:
            poller.start()
        grpc_server = None
        if settings.grpc_port:  # gRPC on this loop, behind the same infer core and guard (service/grpc_server.py)
            from . import grpc_server as _grpc
            from .guard import wrap

            grpc_server = await _grpc.start(settings, repo, app.infer_route.core, wrap(None, settings), EXTENSIONS)
        yield
        if poller is not None:
            poller.stop()
        if grpc_server is not None:  # after the drain (service/lifecycle.py): what is left gets the grace
            await grpc_server.stop(max(1.0, min(5.0, settings.shutdown_grace_s)))
        # Bounded by the shutdown grace: a SIGTERM during a long compile must not hang the pod.
        await asyncio.to_thread(repo.loading_done.wait, max(1.0, settings.shutdown_grace_s))
        repo.close()
        if monitor is not None:
            await asyncio.to_thread(monitor.close)
        metrics.mark_process_dead()

    monitor = Monitor(settings) if settings.monitor_enabled else None  # service/monitor (docs/monitoring.md)
    # min_live_accuracy of a rollout guard reads the monitor's live accuracy (feedback labels).
    rollouts = Rollouts(repo, monitor.live_accuracy) if monitor is not None else Rollouts(repo)

    app = KilnApp(title="Kiln", version=__version__, lifespan=lifespan,
                  description="Open Inference Protocol (KServe v2) server for compiled, verified models.")
    _openapi.install(app)  # the infer / repository request bodies (read raw) in /openapi.json
    app.state.repository = repo
    app.state.settings = settings
    app.state.rollouts = rollouts
    app.state.poller = poller

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

    @app.get("/v2/models/stats")
    @app.get("/v2/models/{model}/stats")
    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def model_statistics(model: str | None = None, version: str | None = None):
        return json_response(stats.statistics(repo, model, version))

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
    app.infer_route = InferRoute(repo, settings.max_body_bytes, settings.request_timeout_s, monitor,
                                 rollouts=rollouts)
    app.state.monitor = monitor

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(request: Request, model: str, version: str | None = None):
        """Declared for /openapi.json only: every infer request is answered by `InferRoute`."""
        raise NotFound(f"no such endpoint: POST {request.url.path}")

    # -- feedback (service/monitor) --------------------------------------------------------------
    @app.post("/v2/models/{model}/feedback")
    @app.post("/v2/models/{model}/versions/{version}/feedback")
    async def feedback(request: Request, model: str, version: str | None = None):
        """Ground truth for served predictions, joined by request id: `{"id": ..., "label": ...}` or a
        list of them (docs/monitoring.md). Updates kiln_live_accuracy / kiln_live_mae."""
        mv = repo.get(model, version)
        body = await read_body(request, settings.max_body_bytes)
        if monitor is None:
            raise InvalidInput("monitoring is off on this server (KILN_MONITOR_ENABLED=false)")
        return json_response(await monitor.feedback(mv, body))

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

    @app.get("/v2/repository/models/{model}/rollout")
    async def rollout_state(model: str):
        """The model's rollout: stable version, canary weight, status and reason, live windows."""
        return json_response(rollouts.describe(model))

    @app.post("/v2/repository/models/{model}/rollout")
    async def rollout_change(request: Request, model: str):
        """Set (`{"canary": {"version": 2, "weight": 0.1}, "guard": {...}}`), promote (`{"action":
        "promote"}`) or cancel (`{"action": "cancel"}`) the model's rollout (repository scope)."""
        body = await read_body(request, 1 << 16)
        try:
            parsed = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as err:
            raise InvalidInput(f"malformed JSON in request body: {err}") from None
        if not isinstance(parsed, dict):
            raise InvalidInput("the rollout request body must be a JSON object")
        return json_response(rollouts.apply(model, parsed))

    # -- metrics ---------------------------------------------------------------------------------
    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def create_app_from_env() -> FastAPI:
    """App factory for `kiln serve --workers N` (uvicorn imports it in each worker process)."""
    from . import logs
    from .guard import wrap

    settings = Settings()
    logs.setup(settings.log_level, settings.log_format)
    return wrap(create_app(settings), settings)  # auth, drain, request ids, logs (service/guard.py)
