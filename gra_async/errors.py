"""The one exception tree of gra-async.

    GraError                      anything gra-async raises on purpose
    ├── UserError                 bad input: exit 2, one line, no traceback
    │   ├── ConfigError           a config key, file, flag or environment variable is wrong
    │   ├── SeedError             a seeds file cannot be read (names file:line)
    │   ├── RunDirError           the run directory is unusable (read-only, full, config changed)
    │   └── EndpointError         an endpoint refused us in a way retrying cannot fix
    │       ├── AuthenticationError   401: the key is wrong or missing
    │       ├── PermissionDeniedError 403
    │       ├── NotFoundError         404: wrong URL or model not served
    │       ├── BadRequestError       400 / 422: the server rejected the request itself
    │       └── UnreachableError      the endpoint does not answer at all (probe only)
    ├── TransientError            worth retrying: the same call may succeed later
    │   ├── RateLimitError        429
    │   ├── ServerError           408, 409, 5xx
    │   ├── ConnectionFailed      refused, reset, DNS
    │   ├── RequestTimeout        no complete answer in time
    │   └── MalformedResponse     the body is not the JSON we were promised
    ├── RetriesExhausted          a transient fault outlasted the retry budget
    └── Interrupted               SIGINT/SIGTERM: exit 130, the run is resumable

Messages name the endpoint (its URL and model), never an API key.
"""

from __future__ import annotations

import errno
from pathlib import Path

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConfigError",
    "ConnectionFailed",
    "EndpointError",
    "GraError",
    "Interrupted",
    "MalformedResponse",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeout",
    "RetriesExhausted",
    "RunDirError",
    "SeedError",
    "ServerError",
    "TransientError",
    "UnreachableError",
    "UserError",
]


class GraError(Exception):
    """Root of every error gra-async raises on purpose."""


class UserError(GraError):
    """Something the user can fix; the CLI prints the message alone and exits 2."""


class ConfigError(UserError):
    """A configuration key, file, flag or environment variable is invalid."""


class SeedError(UserError):
    """The seeds file is missing, empty or malformed."""


class RunDirError(UserError):
    """The run directory cannot be used as asked."""

    @classmethod
    def writing(cls, run_dir: Path, exc: BaseException, what: str = "the journal") -> RunDirError:
        """A failed write as one line that says what to do (full disk, read-only, ...)."""
        text = str(exc)
        code = getattr(exc, "errno", None)
        if code == errno.ENOSPC or "full" in text:
            hint = "the disk is full; free space and run the same command again to resume"
        elif code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in text:
            hint = "the run directory is not writable; fix its permissions or pass another --run-dir"
        elif code in (errno.EEXIST, errno.ENOTDIR):
            hint = "it is a file, not a directory; pass another --run-dir"
        else:
            detail = exc.strerror if isinstance(exc, OSError) else text
            hint = f"{detail}; run the same command again to resume"
        return cls(f"{run_dir}: cannot write {what} ({hint})")


class EndpointError(UserError):
    """An endpoint answered in a way that retrying will not change."""

    def __init__(self, message: str, *, endpoint: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status


class AuthenticationError(EndpointError):
    """401: the API key is missing or wrong."""


class PermissionDeniedError(EndpointError):
    """403: the key is valid but not allowed to do this."""


class NotFoundError(EndpointError):
    """404: the URL is wrong or the model is not served there."""


class BadRequestError(EndpointError):
    """400 or 422: the server rejected this request (too long a prompt, bad parameter)."""


class UnreachableError(EndpointError):
    """The endpoint could not be reached when probed."""


class TransientError(GraError):
    """A fault that the same call may not hit again; the retry policy handles it."""

    def __init__(
        self, message: str, *, endpoint: str = "", status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.retry_after = retry_after


class RateLimitError(TransientError):
    """429: the endpoint asks us to slow down."""


class ServerError(TransientError):
    """408, 409 or 5xx."""


class ConnectionFailed(TransientError):
    """The connection was refused, reset or could not be made."""


class RequestTimeout(TransientError):
    """No complete response within the timeout."""


class MalformedResponse(TransientError):
    """The body was not the JSON an OpenAI-compatible server sends."""


class RetriesExhausted(GraError):
    """A call kept failing transiently until its retry budget ran out."""

    def __init__(self, message: str, *, last: TransientError) -> None:
        super().__init__(message)
        self.last = last


class Interrupted(GraError):
    """The run was stopped by a signal; it can be resumed with the same command."""
