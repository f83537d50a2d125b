"""Logging: text or one-JSON-object-per-line, every record tagged with the request it belongs to.

The request context (request id, W3C trace id and parent span id) lives in a ContextVar that the
HTTP middleware (service/guard.py) sets for each request, so any log call made while serving that
request — the infer route, the batcher on the event loop, a backend error — carries the same ids.
OpenTelemetry is not required: `traceparent` is parsed here (W3C Trace Context, version 00).
"""

from __future__ import annotations

import contextvars
import logging
import random
import re
import sys
import time
import urllib.parse
from typing import Any

import orjson

# (request_id, trace_id, parent_span_id) of the request being served, or None.
REQUEST: contextvars.ContextVar[tuple[str, str | None, str | None] | None] = contextvars.ContextVar(
    "kiln_request", default=None)

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def parse_traceparent(value: str | None) -> tuple[str | None, str | None]:
    """(trace_id, parent_span_id) of a valid W3C traceparent header, else (None, None)."""
    if not value:
        return None, None
    m = _TRACEPARENT.match(value.strip().lower())
    if not m or m.group(1) == "ff" or m.group(2) == "0" * 32 or m.group(3) == "0" * 16:
        return None, None
    if m.group(1) == "00" and m.group(5):  # version 00 has exactly four fields
        return None, None
    return m.group(2), m.group(3)


def request_id(header: str | None) -> str:
    """The client's X-Request-ID when it is a sane token, else a fresh one."""
    if header and _REQUEST_ID.match(header):
        return header
    # 128 random bits from Python's PRNG: ids only need to be unique, not unguessable, and uuid4's
    # getrandom() syscall per request was a measurable share of the infer path (docs/throughput.md).
    return f"{random.getrandbits(128):032x}"


# Characters that end or rewrite a line in a log file or a terminal: C0 and C1 controls, DEL, and
# the Unicode line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def safe(text: str) -> str:
    """`text` with every line-breaking or control character written as an escape (`\\n`, `\\x1b`),
    so a value a client chose (a path, a model name inside an error message) stays on its line."""
    if not _UNSAFE.search(text):
        return text
    return _UNSAFE.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                                              else f"\\u{ord(m.group()):04x}"), text)


# What stays literal when a (percent-decoded) request path is written back into a log line.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def quote_path(path: str) -> str:
    """A request path as it goes into a log line: percent-encoded again (`%0A`, `%20`), so the line
    shows what was asked for and a path can never forge a line of its own."""
    return urllib.parse.quote(path, safe=_PATH_SAFE)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = REQUEST.get()
        if ctx is not None:
            record.request_id, record.trace_id, record.span_id = ctx
        elif not hasattr(record, "request_id"):
            record.request_id = record.trace_id = record.span_id = None
        return True


_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id",
                                                                          "trace_id", "span_id"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id/trace_id/span_id when serving a
    request, any `extra={...}` fields, and exc (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "trace_id", "span_id"):
            value = getattr(record, key, None)
            if value:
                out[key] = value
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The message only: a traceback (appended after it by Formatter.format) keeps its lines.
        message = safe(record.message)
        if message is not record.message:
            record = logging.makeLogRecord({**record.__dict__, "message": message})
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid:
            trace = getattr(record, "trace_id", None)
            line += f" [request_id={rid}" + (f" trace_id={trace}]" if trace else "]")
        return line


def setup(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger (stderr); uvicorn's loggers propagate into it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    # service/guard.py logs requests (errors at warning, all at debug): no second access log.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def uvicorn_log_config(level: str) -> dict[str, Any]:
    """A uvicorn log_config that adds no handlers of its own (everything goes through `setup`)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            "uvicorn": {"level": level.upper(), "propagate": True},
            "uvicorn.error": {"level": level.upper(), "propagate": True},
            "uvicorn.access": {"level": "WARNING", "propagate": True},
        },
    }
