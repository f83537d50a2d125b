"""The infer core, transport-free, and its HTTP route: (model, version, headers, body) → (status, headers, body).

`InferCore` is everything after decode, shared by HTTP (`InferRoute` here) and gRPC
(service/grpc_server.py). Two HTTP front ends call `InferRoute`: the HTTP protocol's fast path
(service/http_protocol.py), which answers `POST …/infer` straight from httptools' callbacks, and the
raw ASGI route in service/app.py (for any server other than Kiln's own protocol). One implementation,
so every transport gives the same answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from . import limits as _limits
from . import metrics
from .errors import InvalidInput, KilnError, PayloadTooLarge
from .errors import error_reply as _error_reply
from .logs import REQUEST, request_id
from .model import ModelVersion
from .protocol import (
    InferRequest,
    classify,
    decode_request,
    decompress,
    encode_response,
)
from .repository import ModelRepository

log = logging.getLogger("kiln.http")

Reply = tuple[int, list[tuple[bytes, bytes]], bytes]
T = TypeVar("T")


def match_infer_path(path: str) -> tuple[str, str | None] | None:
    """(model, version) of `/v2/models/{m}/infer` or `/v2/models/{m}/versions/{v}/infer`, else None."""
    if not (path.startswith("/v2/models/") and path.endswith("/infer")):
        return None
    parts = path[11:-6].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


def too_large(size: int, limit: int, declared: bool) -> PayloadTooLarge | None:
    if size <= limit:
        return None
    if declared:
        return PayloadTooLarge(f"request body of {size} bytes exceeds the limit of {limit} bytes")
    return PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")


def error_reply(exc: KilnError) -> Reply:
    retry = getattr(exc, "retry_after", None)
    return _error_reply(exc.status, exc.message, [(b"retry-after", str(max(1, int(retry))).encode())] if retry else ())


class InferCore:
    """Everything after a transport has read its request, one implementation behind HTTP and gRPC:
    readiness, validation against the model, output selection, the limits and the batcher
    (service/limits.py), classification, and the per-protocol metrics. The transport supplies
    `decode` (its wire format → InferRequest, given the model) and `encode` (outputs → its reply);
    errors come back as KilnError for the transport to word (an HTTP status, a gRPC code)."""

    def __init__(self, repo: ModelRepository, timeout_s: float, monitor=None, rollouts=None):
        self.repo = repo
        self.timeout_s = timeout_s
        self.monitor = monitor  # service/monitor: capture, feedback index, drift (None = off)
        self.rollouts = rollouts  # service/rollout.py: canary / shadow routing of unversioned requests

    def pick(self, model: str, version: str | None):
        """(the version a request starts with, the model's rollout router or None). An unversioned
        request of a model with a rollout starts on its stable version; `run` routes it by its id."""
        router = self.rollouts.router(model) if self.rollouts is not None and not version else None
        return (self.repo.get(model, version) if router is None else router.stable()), router

    async def run(self, mv: ModelVersion, protocol: str, decode: Callable[[ModelVersion], InferRequest],
                  encode: Callable[[ModelVersion, InferRequest, list[tuple[str, Any, bool]]], T], start: float,
                  router=None) -> T:
        stable = mv
        m = metrics.for_model(mv.name, mv.version, protocol)
        m.enter()
        mv.inflight += 1  # a version being removed drains until this is 0 (service/repository.py)
        outcome, rows, phases = "server_error", 0, None
        try:
            mv.check_ready()
            req = decode(mv)
            if router is not None and (routed := router.route(req.id, mv)) is not mv:
                m.leave()
                mv.inflight -= 1
                mv, m = routed, metrics.for_model(routed.name, routed.version, protocol)
                m.enter()
                mv.inflight += 1
                mv.check_ready()
            mv.validate(req.inputs, req.datatypes)
            outputs_wanted = _requested_outputs(mv, req)
            decoded = time.perf_counter()
            # The monitor sees the request with its batch (service/monitor/hub.py): one call per batch,
            # by the v2 request's id, else the x-request-id Kiln assigned (gRPC sends "" for none).
            if mv.monitor is not self.monitor and self.monitor is not None:
                self.monitor.attach(mv)  # once per version: its observer (None: not monitored) into its batcher
            rid = None
            if mv.observer is not None and not (rid := req.id):
                ctx = REQUEST.get()  # inline: a call per request is a measurable share of monitoring's cost
                rid = ctx[0] if ctx is not None else request_id(None)
            result, queue_s, compute_s = await _limits.infer(mv, req, self.timeout_s, rid, start)
            computed = time.perf_counter()
            reply = encode(mv, req, [
                (name, classify(result[name], k, mv.labels) if k else result[name], binary)
                for name, binary, k in outputs_wanted
            ])
            end = time.perf_counter()
            outcome, rows = "success", _batch(mv, req.inputs)
            phases = (decoded - start, queue_s, compute_s, end - computed, end - start)
            if router is not None:  # shadow / comparison copies, off the request path
                router.after(mv, stable, req.inputs, result)
            return reply
        except KilnError as exc:
            outcome = exc.outcome
            raise
        except asyncio.CancelledError:  # the client gave up (a gRPC deadline, a reset) or shutdown ran out
            outcome = "cancelled"
            raise
        except Exception as exc:  # never leak a traceback: a KilnError the transport can word
            log.exception("infer %s failed", mv.name)
            raise KilnError(f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            m.leave()
            mv.inflight -= 1
            m.record(outcome, rows, phases, None if phases else time.perf_counter() - start)
            if router is not None:
                router.observe(mv, outcome, time.perf_counter() - start)


class InferRoute:
    """The HTTP transport of the infer core: body → decode (orjson / frombuffer) → InferCore → encode (orjson)."""

    def __init__(self, repo: ModelRepository, body_limit: int, timeout_s: float, monitor=None, rollouts=None):
        self.repo = repo
        self.body_limit = body_limit
        self.timeout_s = timeout_s
        self.core = InferCore(repo, timeout_s, monitor, rollouts)

    def refuse(self, model: str, version: str | None, exc: KilnError | None) -> Reply | None:
        """Count a request refused before it reached the route (body too large → its reply; client
        gone mid-body → None), under its model's outcome counter when the model exists."""
        try:
            mv = self.repo.get(model, version)
            metrics.for_model(mv.name, mv.version, "http").record("client_error")
        except KilnError:
            pass
        return error_reply(exc) if exc is not None else None

    def staging(self, model: str, version: str | None, nbytes: int):
        """Where to receive a request's binary tensor (see ModelVersion.staging), or None."""
        try:
            return self.core.pick(model, version)[0].staging(nbytes)
        except KilnError:
            return None

    async def __call__(self, model: str, version: str | None, headers: list[tuple[bytes, bytes]],
                       body: bytes, start: float | None = None, binary: memoryview | None = None) -> Reply:
        if start is None:
            start = time.perf_counter()
        try:
            mv, router = self.core.pick(model, version)
        except KilnError as exc:
            return error_reply(exc)
        encoding = hlen = None
        for k, v in headers:
            if k == b"inference-header-content-length":
                hlen = v.decode("latin-1")
            elif k == b"content-encoding":
                encoding = v.decode("latin-1").strip().lower()

        def decode(mv: ModelVersion) -> InferRequest:
            raw = decompress(body, encoding, self.body_limit) if encoding else body
            return decode_request(raw, hlen, _single_input(mv), binary)

        try:
            return await self.core.run(mv, "http", decode, _encode_http, start, router)
        except KilnError as exc:
            return error_reply(exc)


def _encode_http(mv: ModelVersion, req: InferRequest, outputs: list[tuple[str, Any, bool]]) -> Reply:
    payload, out_headers = encode_response(mv.name, mv.version, req.id, outputs)
    return 200, [(k.encode(), v.encode()) for k, v in out_headers.items()], payload


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
