"""Errors that map to an HTTP status and a v2 `{"error": ...}` body."""

import orjson


class KilnError(Exception):
    status = 500
    outcome = "server_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(KilnError):
    status = 400
    outcome = "client_error"


class NotFound(KilnError):
    status = 404
    outcome = "client_error"


class PayloadTooLarge(KilnError):
    status = 413
    outcome = "client_error"


class Unavailable(KilnError):
    """Model not ready, server draining, or queue full: the client may retry."""

    status = 503
    outcome = "rejected"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(Exception):
    """A config file that does not validate; the message names the file and the field."""


def error_reply(status: int, message: str, extra: list[tuple[bytes, bytes]] | tuple = ()) -> tuple[
        int, list[tuple[bytes, bytes]], bytes]:
    """The one builder of a v2 error answer: (status, headers, `{"error": message}` body). Every
    layer that answers an error — the HTTP protocol, the guard, the infer route, the FastAPI
    handlers — goes through it, so the body and its content type are the same everywhere."""
    return status, [(b"content-type", b"application/json"), *extra], orjson.dumps({"error": message})
