"""The infer route, transport-free: (model, version, headers, body) → (status, headers, body).

Two transports call it: the HTTP protocol's fast path (service/http_protocol.py), which answers
`POST …/infer` straight from httptools' callbacks, and the raw ASGI route in service/app.py (for any
server other than Kiln's own protocol). One implementation, so both give the same answers.
"""

from __future__ import annotations

import logging
import time

import orjson

from . import limits as _limits
from . import metrics
from .errors import InvalidInput, KilnError, PayloadTooLarge
from .model import ModelVersion
from .protocol import classify, decode_request, decompress, encode_response
from .repository import ModelRepository

log = logging.getLogger("kiln.http")

Reply = tuple[int, list[tuple[bytes, bytes]], bytes]

_JSON = (b"content-type", b"application/json")


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
    headers = [_JSON]
    retry = getattr(exc, "retry_after", None)
    if retry:
        headers.append((b"retry-after", str(max(1, int(retry))).encode()))
    return exc.status, headers, orjson.dumps({"error": exc.message})


class InferRoute:
    """Body → decode (orjson / frombuffer) → validate → batcher → encode (orjson), with metrics."""

    def __init__(self, repo: ModelRepository, body_limit: int, timeout_s: float):
        self.repo = repo
        self.body_limit = body_limit
        self.timeout_s = timeout_s

    def refuse(self, model: str, version: str | None, exc: KilnError | None) -> Reply | None:
        """Count a request refused before it reached the route (body too large → its reply; client
        gone mid-body → None), under its model's outcome counter when the model exists."""
        try:
            mv = self.repo.get(model, version)
            metrics.for_model(mv.name, mv.version).record("client_error")
        except KilnError:
            pass
        return error_reply(exc) if exc is not None else None

    def staging(self, model: str, version: str | None, nbytes: int):
        """Where to receive a request's binary tensor (see ModelVersion.staging), or None."""
        try:
            return self.repo.get(model, version).staging(nbytes)
        except KilnError:
            return None

    async def __call__(self, model: str, version: str | None, headers: list[tuple[bytes, bytes]],
                       body: bytes, start: float | None = None, binary: memoryview | None = None) -> Reply:
        if start is None:
            start = time.perf_counter()
        try:
            mv = self.repo.get(model, version)
        except KilnError as exc:
            return error_reply(exc)
        m = metrics.for_model(mv.name, mv.version)
        m.enter()
        outcome, rows, phases = "server_error", 0, None
        try:
            encoding = hlen = None
            for k, v in headers:
                if k == b"inference-header-content-length":
                    hlen = v.decode("latin-1")
                elif k == b"content-encoding":
                    encoding = v.decode("latin-1").strip().lower()
            mv.check_ready()
            if encoding:
                body = decompress(body, encoding, self.body_limit)
            req = decode_request(body, hlen, _single_input(mv), binary)
            mv.validate(req.inputs, req.datatypes)
            outputs_wanted = _requested_outputs(mv, req)
            decoded = time.perf_counter()
            result, queue_s, compute_s = await _limits.infer(mv, req, self.timeout_s)
            computed = time.perf_counter()
            payload, out_headers = encode_response(mv.name, mv.version, req.id, [
                (name, classify(result[name], k, mv.labels) if k else result[name], binary)
                for name, binary, k in outputs_wanted
            ])
            end = time.perf_counter()
            outcome, rows = "success", _batch(mv, req.inputs)
            phases = (decoded - start, queue_s, compute_s, end - computed, end - start)
            return 200, [(k.encode(), v.encode()) for k, v in out_headers.items()], payload
        except KilnError as exc:
            outcome = exc.outcome
            return error_reply(exc)
        except Exception as exc:  # never leak a traceback page: a v2 error body
            log.exception("infer %s failed", model)
            return error_reply(KilnError(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            m.leave()
            m.record(outcome, rows, phases)


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
