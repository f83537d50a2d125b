"""gRPC: Triton's `inference.GRPCInferenceService` (a superset of KServe's v2 gRPC protocol) and the
standard `grpc.health.v1` health service, on the HTTP server's event loop through Kiln's own HTTP/2
transport (service/grpc_wire.py; grpcio provides the generated messages, and is the client in tests).

The transport is only the wire format: `decode_infer` turns a ModelInferRequest (typed `contents` or
`raw_input_contents`) into the InferRequest the HTTP codec also produces, `encode_infer` turns the
outputs into a ModelInferResponse (`raw_output_contents`, as Triton sends them). Everything between
is the shared infer core (service/infer.py `InferCore`: readiness, validation, limits, batcher,
classification, metrics with protocol="grpc"). Admission is the HTTP guard's own steps
(service/guard.py: drain after SIGTERM, KILN_MAX_INFLIGHT, bearer-token auth with the same scopes —
each RPC is checked as the HTTP route it mirrors), so both transports share one in-flight count and
one drain. A client deadline becomes the request's timeout (it may only shorten the model's).

Status codes: INVALID_ARGUMENT (400), NOT_FOUND (404), UNAVAILABLE (not ready, draining),
RESOURCE_EXHAUSTED (queue full, KILN_MAX_INFLIGHT, a message over KILN_MAX_BODY_BYTES),
UNAUTHENTICATED / PERMISSION_DENIED (401 / 403), DEADLINE_EXCEEDED (504), UNIMPLEMENTED (shared memory,
trace, log settings), INTERNAL (500).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import orjson
from google.protobuf import json_format
from grpc_health.v1 import health_pb2

from backends.datatypes import V2_TO_NUMPY, v2_datatype

from . import __version__, grpc_wire, stats
from .errors import InvalidInput, KilnError, NotFound
from .guard import Guard
from .infer import InferCore
from .logs import REQUEST
from .model import ModelVersion
from .protocol import (
    MAX_DIMS,
    InferRequest,
    RequestedOutput,
    decode_bytes_elements,
    encode_bytes_elements,
)
from .protos import grpc_service_pb2 as pb
from .protos import model_config_pb2 as mc
from .repository import ModelRepository
from .settings import HttpLimits

log = logging.getLogger("kiln.grpc")

SERVICE = "inference.GRPCInferenceService"

# The typed `contents` field of each datatype (FP16 has none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}

_HTTP_TO_CODE = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                 403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                 413: grpc.StatusCode.RESOURCE_EXHAUSTED, 501: grpc.StatusCode.UNIMPLEMENTED,
                 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


def status_code(http_status: int, retry_after: bool = False) -> grpc.StatusCode:
    """The gRPC code of a Kiln error: a 503 the client should back off from (a full queue, the
    in-flight bound: Retry-After) is RESOURCE_EXHAUSTED; one of state (not ready, draining) UNAVAILABLE."""
    if http_status == 503 and retry_after:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return _HTTP_TO_CODE.get(http_status, grpc.StatusCode.INTERNAL)


class RpcError(Exception):
    """An error to answer with a gRPC status (raised inside a handler, worded by `_guarded`)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _kiln_to_rpc(exc: KilnError) -> RpcError:
    return RpcError(status_code(exc.status, bool(getattr(exc, "retry_after", None))), exc.message)


# -- the codec --------------------------------------------------------------------------------------
def _param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _params(m) -> dict[str, Any]:
    return {k: _param_value(v) for k, v in m.items()}


def _set_param(target, key: str, value: Any) -> None:
    p = target[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def _shape(raw, name: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in raw)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape {list(shape)} has a negative dimension")
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"input '{name}': {len(shape)} dimensions (at most {MAX_DIMS})")
    return shape


def decode_infer(request: pb.ModelInferRequest, deadline_s: float | None = None) -> InferRequest:
    """A ModelInferRequest as the InferRequest every transport hands the infer core."""
    if not request.inputs:
        raise InvalidInput("request needs at least one input")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs "
                           "(one per input, in the order of 'inputs')")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, t in enumerate(request.inputs):
        name, datatype = t.name, t.datatype
        if not name:
            raise InvalidInput("each input needs a 'name'")
        if name in inputs:
            raise InvalidInput(f"input '{name}' given twice")
        if datatype not in V2_TO_NUMPY:
            raise InvalidInput(f"input '{name}': unknown datatype '{datatype}'")
        shape = _shape(t.shape, name)
        count = math.prod(shape)
        has_contents = t.HasField("contents")
        if raw:
            if has_contents:
                raise InvalidInput(f"input '{name}': 'contents' is set while the request uses raw_input_contents "
                                   "(use one or the other for all inputs)")
            arr = _raw_tensor(raw[i], datatype, shape, count, name)
        else:
            if not has_contents:
                raise InvalidInput(f"input '{name}' has neither 'contents' nor raw_input_contents")
            arr = _typed_tensor(t.contents, datatype, shape, count, name)
        inputs[name] = arr
        datatypes[name] = datatype
    params = _params(request.parameters)
    if deadline_s is not None:  # the client's deadline, as the OIP `timeout` parameter (µs) the limits read
        deadline_us = max(1, int(deadline_s * 1e6))
        asked = params.get("timeout")
        if asked is None or asked == 0 or (type(asked) is int and asked > deadline_us):
            params["timeout"] = deadline_us  # a malformed `timeout` is left for the limits to refuse
    outputs = None
    if request.outputs:
        outputs = []
        for o in request.outputs:
            if not o.name:
                raise InvalidInput("each requested output needs a 'name'")
            k = _param_value(o.parameters["classification"]) if "classification" in o.parameters else 0
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise InvalidInput(f"output '{o.name}': classification must be a non-negative integer")
            outputs.append(RequestedOutput(o.name, True, k))
    return InferRequest(request.id or None, inputs, datatypes, outputs, True, params)


def _raw_tensor(data: bytes, datatype: str, shape: tuple[int, ...], count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        return decode_bytes_elements(memoryview(data), count, name).reshape(shape)
    dtype = V2_TO_NUMPY[datatype]
    if len(data) != count * dtype.itemsize:
        raise InvalidInput(f"input '{name}': shape {list(shape)} of {datatype} needs {count * dtype.itemsize} "
                           f"bytes, raw_input_contents has {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _typed_tensor(contents: pb.InferTensorContents, datatype: str, shape: tuple[int, ...], count: int,
                  name: str) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {datatype} has no typed contents field: send it in raw_input_contents")
    for other in set(CONTENTS_FIELD.values()) - {field}:
        if len(getattr(contents, other)):
            raise InvalidInput(f"input '{name}': datatype {datatype} takes '{field}', the request sets '{other}'")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(f"input '{name}': shape {list(shape)} needs {count} elements, {field} has {len(values)}")
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    dtype = V2_TO_NUMPY[datatype]
    try:
        wide = np.array(values, dtype=np.float64 if dtype.kind == "f" else (np.bool_ if dtype.kind == "b" else
                                                                           np.int64 if dtype.kind == "i" else np.uint64))
        arr = wide.astype(dtype, casting="unsafe")
        if dtype.kind in "iu" and not np.array_equal(arr.astype(wide.dtype), wide):
            raise ValueError(f"values outside the {datatype} range")
    except (ValueError, OverflowError) as err:
        raise InvalidInput(f"input '{name}': data is not valid {datatype}: {err}") from None
    return arr.reshape(shape)


def encode_infer(mv: ModelVersion, req: InferRequest, outputs: list[tuple[str, np.ndarray, bool]]
                 ) -> pb.ModelInferResponse:
    """Outputs as `raw_output_contents` (what Triton sends; both tritonclient and KServe read it)."""
    resp = pb.ModelInferResponse(model_name=mv.name, model_version=mv.version, id=req.id or "")
    raw = resp.raw_output_contents
    for name, arr, _binary in outputs:
        datatype = v2_datatype(arr.dtype)
        resp.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        raw.append(encode_bytes_elements(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes())
    return resp


# -- the service ------------------------------------------------------------------------------------
def _http_path(rpc: str, model: str = "") -> str:
    """The HTTP route an RPC mirrors, for the guard's drain rules and auth scopes."""
    if rpc == "ServerLive":
        return "/v2/health/live"
    if rpc == "ServerReady":
        return "/v2/health/ready"
    if rpc in ("ModelInfer", "ModelStreamInfer"):
        return f"/v2/models/{model}/infer"
    if rpc.startswith("Repository"):
        return "/v2/repository/index"
    if rpc == "ServerMetadata":
        return "/v2"
    return f"/v2/models/{model}"


class InferenceService:
    """One async method per RPC of inference.GRPCInferenceService (the method table is built from
    the generated descriptor, service/grpc_wire.py MethodTable)."""

    def __init__(self, repo: ModelRepository, core: InferCore, guard: Guard, extensions: list[str]):
        self.repo = repo
        self.core = core
        self.guard = guard
        self.extensions = extensions

    async def _guarded(self, context, rpc: str, model: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Request id, admission (drain, in-flight bound, auth), error → status, log line; then `call`."""
        start = time.perf_counter()
        ctx, auth = self.guard.context(context.headers)
        token = REQUEST.set(ctx)
        path = _http_path(rpc, model)
        error: RpcError | None = None
        try:
            rejection = self.guard.admit("POST", path, auth)
            if rejection is not None:
                status, headers, body = rejection
                error = RpcError(status_code(status, (b"retry-after", b"1") in headers), orjson.loads(body)["error"])
            else:
                try:
                    return await call()
                except RpcError as exc:
                    error = exc
                except KilnError as exc:
                    error = _kiln_to_rpc(exc)
                finally:
                    self.guard.release()
        finally:
            if error is not None or log.isEnabledFor(logging.DEBUG):
                self.guard.log("gRPC", f"/{SERVICE}/{rpc}", _http_status(error), orjson.dumps(
                    {"error": error.message if error else ""}), start)
            REQUEST.reset(token)
        context.set_trailing_metadata((("x-request-id", ctx[0]),))
        await context.abort(error.code, error.message)

    # -- health and metadata ---------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return await self._guarded(context, "ServerLive", "", _const(pb.ServerLiveResponse(live=True)))

    async def ServerReady(self, request, context):
        if self.guard.drain.draining:  # Triton answers ready=false, not an error
            return pb.ServerReadyResponse(ready=False)

        async def call():
            return pb.ServerReadyResponse(ready=self.repo.ready())
        return await self._guarded(context, "ServerReady", "", call)

    async def ModelReady(self, request, context):
        async def call():
            return pb.ModelReadyResponse(ready=self.repo.get(request.name, request.version or None).ready)
        return await self._guarded(context, "ModelReady", request.name, call)

    async def ServerMetadata(self, request, context):
        return await self._guarded(context, "ServerMetadata", "", _const(pb.ServerMetadataResponse(
            name="kiln", version=__version__, extensions=self.extensions)))

    async def ModelMetadata(self, request, context):
        async def call():
            mv = self.repo.get(request.name, request.version or None)
            meta = mv.metadata(self.repo.versions(request.name))
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])
        return await self._guarded(context, "ModelMetadata", request.name, call)

    async def ModelConfig(self, request, context):
        async def call():
            cfg = self.repo.get(request.name, request.version or None).triton_config()
            # Kiln's own `kiln` block (state, parity, attempts) has no field in Triton's message.
            return pb.ModelConfigResponse(config=json_format.ParseDict(cfg, mc.ModelConfig(), ignore_unknown_fields=True))
        return await self._guarded(context, "ModelConfig", request.name, call)

    async def ModelStatistics(self, request, context):
        async def call():
            out = stats.statistics(self.repo, request.name or None, request.version or None)
            return json_format.ParseDict(out, pb.ModelStatisticsResponse())
        return await self._guarded(context, "ModelStatistics", request.name, call)

    # -- repository ------------------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        async def call():
            _check_repository(request.repository_name)
            index = await asyncio.to_thread(self.repo.index, request.ready)
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in index])
        return await self._guarded(context, "RepositoryIndex", "", call)

    async def RepositoryModelLoad(self, request, context):
        async def call():
            _check_repository(request.repository_name)
            if request.parameters:
                raise RpcError(grpc.StatusCode.UNIMPLEMENTED, "load parameters ("
                               f"{', '.join(sorted(request.parameters))}) are not supported: Kiln loads the model's "
                               "config.yaml and files from the repository on disk")
            versions = await asyncio.to_thread(self.repo.load, request.model_name)
            failed = [mv for mv in versions if mv.state == "FAILED"]
            if failed:
                raise InvalidInput(f"failed to load '{request.model_name}' version {failed[0].version}: "
                                   f"{failed[0].reason}")
            return pb.RepositoryModelLoadResponse()
        return await self._guarded(context, "RepositoryModelLoad", request.model_name, call)

    async def RepositoryModelUnload(self, request, context):
        async def call():
            _check_repository(request.repository_name)
            await asyncio.to_thread(self.repo.unload, request.model_name)
            return pb.RepositoryModelUnloadResponse()
        return await self._guarded(context, "RepositoryModelUnload", request.model_name, call)

    # -- inference -------------------------------------------------------------------------------
    async def _infer(self, request: pb.ModelInferRequest, deadline_s: float | None) -> pb.ModelInferResponse:
        start = time.perf_counter()
        mv, router = self.core.pick(request.model_name, request.model_version or None)  # rollouts: service/rollout.py
        return await self.core.run(mv, "grpc", lambda _mv: decode_infer(request, deadline_s), encode_infer, start,
                                   router)

    async def ModelInfer(self, request, context):
        return await self._guarded(context, "ModelInfer", request.model_name,
                                   lambda: self._infer(request, context.time_remaining()))

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request is answered on the stream as soon as it is done (requests run concurrently,
        so they batch together); an error answers that request in `error_message`, as Triton does,
        refusals by the guard (draining, overload, a missing or unknown token) included: each request
        is admitted on its own, with the stream's metadata."""
        lock = asyncio.Lock()
        tasks: set[asyncio.Task] = set()
        headers = context.headers

        async def one(request: pb.ModelInferRequest) -> None:
            start = time.perf_counter()
            ctx, auth = self.guard.context(headers)
            token = REQUEST.set(ctx)
            try:
                rejection = self.guard.admit("POST", _http_path("ModelStreamInfer", request.model_name), auth)
                if rejection is not None:
                    status, _headers, body = rejection
                    reply = pb.ModelStreamInferResponse(error_message=orjson.loads(body)["error"])
                else:
                    try:
                        reply = pb.ModelStreamInferResponse(infer_response=await self._infer(request, None))
                    except KilnError as exc:
                        status, reply = exc.status, pb.ModelStreamInferResponse(error_message=exc.message)
                    finally:
                        self.guard.release()
                if reply.error_message:
                    self.guard.log("gRPC", f"/{SERVICE}/ModelStreamInfer", status,
                                   orjson.dumps({"error": reply.error_message}), start)
                async with lock:
                    await context.write(reply)
            finally:
                REQUEST.reset(token)

        try:
            async for request in request_iterator:
                task = asyncio.get_running_loop().create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*tasks)
        finally:  # the client went away (or the server stops): nothing is left running for it
            for t in tasks:
                t.cancel()

    # -- not supported ---------------------------------------------------------------------------
    async def _unimplemented(self, context, what: str):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, what)

    async def SystemSharedMemoryStatus(self, request, context):
        await self._unimplemented(context, _NO_SHM)

    async def SystemSharedMemoryRegister(self, request, context):
        await self._unimplemented(context, _NO_SHM)

    async def SystemSharedMemoryUnregister(self, request, context):
        await self._unimplemented(context, _NO_SHM)

    async def CudaSharedMemoryStatus(self, request, context):
        await self._unimplemented(context, _NO_SHM)

    async def CudaSharedMemoryRegister(self, request, context):
        await self._unimplemented(context, _NO_SHM)

    async def CudaSharedMemoryUnregister(self, request, context):
        await self._unimplemented(context, _NO_SHM)

    async def TraceSetting(self, request, context):
        await self._unimplemented(context, "trace settings are not supported by Kiln: it logs W3C traceparent "
                                  "ids with each request instead")

    async def LogSettings(self, request, context):
        await self._unimplemented(context, "log settings are not supported over gRPC: use --log-level / KILN_LOG_LEVEL")


_NO_SHM = ("shared memory is not supported by Kiln: send tensors in raw_input_contents (system and CUDA "
           "shared-memory regions cannot be registered)")


def _const(value):
    async def call():
        return value
    return call


def _check_repository(name: str) -> None:
    if name:
        raise NotFound(f"unknown repository '{name}': Kiln serves one model repository (leave repository_name empty)")


def _http_status(error: RpcError | None) -> int:
    if error is None:
        return 200
    for status, code in _HTTP_TO_CODE.items():
        if code == error.code:
            return status
    return 429 if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED else 500


class HealthService:
    """grpc.health.v1 for Kubernetes gRPC probes: service "live" is SERVING while the process answers;
    "" (the server), "ready" and "inference.GRPCInferenceService" are SERVING when every model is ready
    and the server is not draining (the HTTP readiness rule)."""

    READY = ("", "ready", SERVICE)

    def __init__(self, repo: ModelRepository, guard: Guard):
        self.repo = repo
        self.guard = guard

    def _status(self, service: str) -> int:
        if service == "live":
            return health_pb2.HealthCheckResponse.SERVING
        if service in self.READY:
            ok = self.repo.ready() and not self.guard.drain.draining
            return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

    async def Check(self, request, context):
        status = self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}' "
                                f"(live, ready, {SERVICE})")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request, context):
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=self._status(name)) for name in ("live", *self.READY)})

    async def Watch(self, request, context):
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(0.5)


async def start(settings, repo: ModelRepository, core: InferCore, guard: Guard, extensions: list[str]
                ) -> grpc_wire.Server:
    """Bind and start the gRPC server on the running loop (same TLS files, body limit, connection and
    time limits and host as HTTP). With `--workers N` every worker binds the same port (SO_REUSEPORT)."""
    methods = grpc_wire.MethodTable()
    methods.add(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], InferenceService(repo, core, guard, extensions))
    methods.add(health_pb2.DESCRIPTOR.services_by_name["Health"], HealthService(repo, guard))
    server = grpc_wire.Server(methods, HttpLimits.from_settings(settings), settings.max_body_bytes)
    tls = None
    if settings.ssl_certfile and settings.ssl_keyfile:
        tls = grpc_wire.server_ssl_context(settings.ssl_certfile, settings.ssl_keyfile)
    try:
        await server.listen(settings.http_host, settings.grpc_port, tls)
    except OSError as err:
        raise RuntimeError(f"gRPC: cannot bind {settings.http_host}:{settings.grpc_port}: {err}") from err
    log.info("gRPC (%s + grpc.health.v1) on %s:%d%s", SERVICE, settings.http_host, settings.grpc_port,
             " with TLS" if tls else "")
    return server
