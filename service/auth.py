"""Optional bearer-token auth, with scopes, from a token file that is re-read when it changes.

Token file (KILN_AUTH_TOKENS_FILE), one token per line, `#` starts a comment:

    s3cr3t-client-token   infer
    ops-token             repository,infer
    prom-token            metrics
    root-token            *

Scopes: `infer` (inference and model metadata), `repository` (index, load, unload), `metrics`,
`health`, `docs`, `*` (all). A line without scopes means `infer`. Route groups named in
KILN_AUTH_OPEN (default health, metrics, docs) need no token at all.

No token (or an unknown one) → 401 with `WWW-Authenticate: Bearer`; a valid token without the
route's scope → 403. The file is checked for changes at most once a second (stat only); when it
cannot be read the last good tokens stay in force and a warning is logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("kiln.auth")

SCOPES = {"infer", "repository", "metrics", "health", "docs", "*"}
RELOAD_INTERVAL_S = 1.0


def route_group(method: str, path: str) -> str:
    """health | metrics | docs | repository | infer | metadata | other."""
    if path.startswith("/v2/health/"):
        return "health"
    if path == "/metrics":
        return "metrics"
    if path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
        return "docs"
    if path.startswith("/v2/repository/"):
        return "repository"
    if path.startswith("/v2/models/") and path.endswith(("/infer", "/feedback")):  # feedback: infer's scope
        return "infer"
    if path == "/v2" or path.startswith("/v2/models"):
        return "metadata"
    return "other"


# The scope a token needs per group; metadata and unknown routes are readable by infer tokens too.
GROUP_SCOPE = {"health": "health", "metrics": "metrics", "docs": "docs", "repository": "repository",
               "infer": "infer", "metadata": "infer", "other": "infer"}


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str = "tokens file") -> dict[bytes, frozenset[str]]:
    tokens: dict[bytes, frozenset[str]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        scopes = frozenset(s.strip() for s in (parts[1] if len(parts) > 1 else "infer").split(",") if s.strip())
        unknown = scopes - SCOPES
        if unknown:
            raise ValueError(f"{source} line {n}: unknown scope(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(SCOPES))})")
        tokens[_digest(parts[0])] = scopes
    return tokens


class TokenAuth:
    def __init__(self, path: Path, open_groups: str = "health,metrics,docs"):
        self.path = Path(path)
        self.open = {g.strip() for g in open_groups.split(",") if g.strip()}
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = 0.0
        self.tokens: dict[bytes, frozenset[str]] = {}
        self._load(initial=True)

    def _stat(self) -> tuple:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, initial: bool = False) -> None:
        try:
            stamp = self._stat()
            tokens = parse_tokens(self.path.read_text(), str(self.path))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            if initial:
                raise ValueError(f"auth tokens file {self.path}: {err}") from err
            log.warning("auth tokens file %s not reloaded (keeping %d token(s)): %s", self.path, len(self.tokens), err)
            return
        self.tokens, self._stamp = tokens, stamp
        log.info("auth: %d token(s) from %s", len(tokens), self.path)

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_INTERVAL_S:
            return
        with self._lock:
            if now - self._checked < RELOAD_INTERVAL_S:
                return
            self._checked = now
            try:
                stamp = self._stat()
            except OSError as err:
                log.warning("auth tokens file %s: %s (keeping %d token(s))", self.path, err, len(self.tokens))
                return
            if stamp != self._stamp:
                self._load()

    def check(self, method: str, path: str, authorization: str | None) -> None:
        """Raise AuthError (401/403) unless the request may go on."""
        group = route_group(method, path)
        if group in self.open:
            return
        self.maybe_reload()
        if not authorization:
            raise AuthError(401, "authentication required: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "authentication required: only 'Authorization: Bearer <token>' is accepted")
        scopes = self.tokens.get(_digest(token.strip()))
        if scopes is None:
            raise AuthError(401, "invalid bearer token")
        need = GROUP_SCOPE[group]
        if "*" in scopes or need in scopes or (group in ("metadata", "other") and "repository" in scopes):
            return
        raise AuthError(403, f"this token lacks the '{need}' scope needed for {method} {path}")
