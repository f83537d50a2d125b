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
    log_level: str = "info"
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Only these models (comma-separated) are loaded; empty = all.
    models: str = ""
