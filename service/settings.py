"""Server settings from `KILN_*` environment variables (and CLI flags, which override them)."""

from __future__ import annotations

import os
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
