"""Server settings from `KILN_*` environment variables (and CLI flags, which override them)."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_repo() -> Path:
    """`./model_repo` when there is one, else the repository shipped beside the package."""
    here = Path.cwd() / "model_repo"
    return here if here.is_dir() else PROJECT_ROOT / "model_repo"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiln"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    model_repo: Path = Field(default_factory=default_repo)
    cache_dir: Path = Field(default_factory=default_cache)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    # gRPC (inference.GRPCInferenceService + grpc.health.v1) on the same host; 0 = off. Triton's port.
    grpc_port: int = Field(8001, ge=0, le=65535)
    log_level: str = "info"
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Only these models (comma-separated) are loaded; empty = all.
    models: str = ""
    # Freeze the heap that startup and model loads leave out of Python's cyclic GC, whose full
    # collections would otherwise stall the event loop ~25 ms each under load (service/heap.py).
    gc_freeze: bool = True
    # Seconds without a model change before the heap is settled again (one full collection per burst
    # of loads/unloads, not one per load; service/heap.py Settler).
    gc_settle_delay_s: float = Field(1.0, ge=0)

    # -- hardening (docs/hardening.md) ------------------------------------------------------------
    # Log lines as text (humans) or one JSON object per line (log shippers); both carry the request id.
    log_format: str = Field("text", pattern="^(text|json)$")
    # Server default per-request timeout (seconds; 0 = none). A request's own OIP `parameters.timeout`
    # (microseconds) may only shorten it. Expired → 504, and a request still queued never runs.
    request_timeout_s: float = Field(60.0, ge=0)
    # Requests being served at once, server-wide; beyond it 503 + Retry-After (0 = unbounded).
    max_inflight: int = Field(2048, ge=0)
    # SIGTERM/SIGINT: readiness false and new requests 503 at once; in-flight requests get up to this
    # long to finish; then the process exits 0.
    shutdown_grace_s: float = Field(30.0, ge=0)
    # Bearer tokens (`<token> <scope>[,<scope>...]` per line; scopes infer, repository, metrics,
    # health, *); re-read when the file changes. Unset = no auth.
    auth_tokens_file: Path | None = None
    # Route groups that stay open without a token when auth is on (health, metrics, docs, metadata).
    auth_open: str = "health,metrics,docs"
    # TLS: both set = HTTPS.
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    # -- the HTTP front (service/http_front.py, docs/hardening.md) ---------------------------------
    # Request line + headers of one request, in bytes: beyond it 431 and the connection closes.
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    # The request target (path and query), in bytes: beyond it 414.
    max_url_bytes: int = Field(8 * 1024, ge=256)
    # From a request's first byte to the end of its headers (s): beyond it 408.
    header_timeout_s: float = Field(10.0, gt=0)
    # Longest pause between two reads of a request body (s): beyond it 408.
    body_timeout_s: float = Field(30.0, gt=0)
    # An open connection with no request on it (fresh, or between requests) is closed after this (s).
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    # A response the client does not read: the connection is dropped once its writes have stayed
    # blocked this long (s).
    send_timeout_s: float = Field(30.0, gt=0)
    # Open connections per worker process. At the bound a new connection closes the longest-idle
    # one; when none is idle the newcomer gets 503. 0 = what RLIMIT_NOFILE leaves at startup.
    max_connections: int = Field(0, ge=0)

    # -- monitoring (docs/monitoring.md) ------------------------------------------------------------
    # Share of each model's requests captured (a model's monitor.sample_rate overrides it).
    monitor_sample_rate: float = Field(0.01, ge=0, le=1)
    # Off = no capture, feedback, drift for any model.
    monitor_enabled: bool = True
    # Capture store (SQLite); default <cache_dir>/monitor. Bounded on disk by monitor_max_bytes.
    monitor_dir: Path | None = None
    monitor_max_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024)
    # Requests waiting for the background worker; beyond it samples are dropped (and counted).
    monitor_queue_size: int = Field(8192, ge=1)
    # Recent predictions kept (any request, sampled or not) for joining feedback by request id.
    monitor_recent_predictions: int = Field(100_000, ge=1)
    # CloudEvents (KServe payload-logger format) of captured requests and responses to this URL.
    monitor_sink_url: str | None = None
    monitor_sink_buffer: int = Field(1024, ge=1)
    monitor_sink_retries: int = Field(3, ge=0, le=20)

    # -- model updates (docs/deploy.md "Model updates") -----------------------------------------------
    # Triton's names. explicit: load everything at startup, POST …/load and …/unload allowed.
    # poll: the repository is rescanned every repository_poll_secs and what changed is rebuilt
    # (load/unload refused). none: load once, load/unload refused.
    model_control_mode: str = Field("explicit", pattern="^(none|poll|explicit)$")
    repository_poll_secs: float = Field(15.0, gt=0)


# File descriptors kept free under RLIMIT_NOFILE for what the server opens after startup (model
# files, the metrics directory, a repository reload) when KILN_MAX_CONNECTIONS is automatic.
_FD_RESERVE = 32


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP front's bounds (service/http_front.py), taken from Settings: a plain value, so it
    travels to worker processes (and imports nothing that creates metrics)."""

    max_header_bytes: int
    max_url_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_timeout_s: float
    send_timeout_s: float
    max_connections: int  # 0: from RLIMIT_NOFILE (see `connection_bound`)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> HttpLimits:
        settings = settings if settings is not None else Settings()
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})

    def connection_bound(self) -> int:
        """The connection bound of this process: KILN_MAX_CONNECTIONS, or the descriptors that
        RLIMIT_NOFILE leaves once those open now and a small reserve are taken out."""
        if self.max_connections:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 1 << 20
        try:
            open_now = len(os.listdir("/proc/self/fd"))
        except OSError:
            open_now = 64
        return max(16, soft - open_now - _FD_RESERVE)
