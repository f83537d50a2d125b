"""Per-request limits on the infer path: elements per input, NaN/Inf policy, timeout.

Called from the infer route after the request is decoded and validated against the model
(service/infer.py `InferRoute`). The body limit (KILN_MAX_BODY_BYTES → 413), the shape / datatype /
batch checks (service/model.py `validate`) and the binary-length checks (service/protocol.py,
before any allocation) live where the data is read.

Timeout: the model's `limits.timeout_ms`, else KILN_REQUEST_TIMEOUT_S (0 = none); the OIP request
parameter `timeout` (microseconds, Triton's meaning; 0 = use the default) may shorten it, never
extend it. On expiry the request gets 504 and its batcher future is failed: a request still
queued is dropped by the batcher without running; one already on a runner finishes there (a
runner call cannot be interrupted) and its result is discarded.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from .errors import InvalidInput, KilnError


class Timeout(KilnError):
    status = 504
    outcome = "timeout"


def request_timeout(mv, params: dict[str, Any], server_default_s: float) -> float | None:
    """Seconds this request may take, or None (no limit)."""
    model_ms = mv.config.limits.timeout_ms
    base = model_ms / 1000.0 if model_ms else (server_default_s or None)
    raw = params.get("timeout") if params else None
    if raw is None:
        return base
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
        raise InvalidInput("parameters.timeout must be a non-negative integer (microseconds)")
    if raw == 0:
        return base
    asked = raw / 1e6
    return min(asked, base) if base else asked


def check_inputs(mv, inputs: dict[str, np.ndarray]) -> None:
    lim = mv.config.limits
    if lim.max_elements is not None:
        for name, arr in inputs.items():
            if arr.size > lim.max_elements:
                raise InvalidInput(f"input '{name}': {arr.size} elements exceed the model's limits.max_elements "
                                   f"{lim.max_elements}")
    if lim.nonfinite == "reject":
        for name, arr in inputs.items():
            if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
                raise InvalidInput(f"input '{name}': NaN or Inf values are not accepted by model '{mv.name}' "
                                   f"(limits.nonfinite: reject)")


async def infer(mv, req, server_default_s: float, request_id: str | None = None, start: float = 0.0):
    """The request through the model's batcher under its limits: (outputs, queue s, compute s).
    `request_id`, `start`: for the model's monitor (service/batcher.py, "Observing")."""
    check_inputs(mv, req.inputs)
    timeout = request_timeout(mv, req.parameters, server_default_s)
    fut = mv.enqueue(req.inputs, request_id, start)
    if timeout is None:
        return await fut
    # A bare loop timer that fails the future (asyncio.timeout costs ~3 µs more per request).
    timer = asyncio.get_running_loop().call_later(timeout, _expire, fut, mv, timeout)
    try:
        return await fut
    finally:
        timer.cancel()


def _expire(fut: asyncio.Future, mv, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(Timeout(f"model '{mv.name}' version {mv.version}: request timed out after "
                                  f"{timeout * 1000:.3g} ms"))
