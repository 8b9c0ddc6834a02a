"""The one exception tree of gra-async: what happened, never what to do about it.

    GraError                      anything gra-async raises on purpose
    ├── UserError                 the user's input is wrong
    │   ├── ConfigError           a config key, file, flag or environment variable
    │   ├── SeedError             a seeds file cannot be read (names file:line)
    │   ├── RunDirError           the run directory is unusable (read-only, full, config changed)
    │   └── MissingDependency     an optional dependency (an extra) is not installed
    ├── UsageError                the Python API was called where it cannot work
    ├── EndpointError             an endpoint gave no usable answer (.endpoint .status .message .request_id)
    │   ├── AuthenticationError       401: the key is wrong or missing
    │   ├── PermissionDeniedError     403
    │   ├── NotFoundError             404: wrong URL or model not served
    │   ├── BadRequestError           400 / 422 / other 4xx: the server rejected the request
    │   ├── UnreachableError          the endpoint does not answer at all (start-up probe)
    │   ├── EndpointsRefusing         every endpoint of a model refuses every call alike
    │   └── TransientError            the same call may succeed later
    │       ├── RateLimitError        429
    │       ├── ServerError           408, 409, 5xx
    │       ├── ConnectionFailed      refused, reset, DNS
    │       ├── RequestTimeout        no complete answer in time
    │       └── MalformedResponse     the body is not the JSON we were promised
    ├── RetriesExhausted          a transient fault outlasted the retry budget (.last)
    ├── InvalidReply              a model reply does not hold what was asked (.reason)
    ├── TaskFailed                one task cannot produce a sample (recorded, the run goes on)
    ├── TaskParked                a task lost a call to its endpoint: it runs again later
    ├── Stalled                   no call completed for `run.stall_timeout` s; resumable
    └── Interrupted               SIGINT/SIGTERM stopped the run; it is resumable

Which of these end a run, and with which exit code, is decided by the caller: the CLI
maps them in `gra_async/cli.py` alone. Messages name the endpoint (its model and URL),
never an API key.
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
    "EndpointsRefusing",
    "GraError",
    "Interrupted",
    "InvalidReply",
    "MalformedResponse",
    "MissingDependency",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeout",
    "RetriesExhausted",
    "RunDirError",
    "SeedError",
    "ServerError",
    "Stalled",
    "TaskFailed",
    "TaskParked",
    "TransientError",
    "UnreachableError",
    "UsageError",
    "UserError",
]


class GraError(Exception):
    """Root of every error gra-async raises on purpose."""


class UserError(GraError):
    """The user's input is wrong; the message says which input and what to change."""


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


class MissingDependency(UserError):
    """An optional dependency (a `pip install 'gra-async[extra]'`) is not installed."""


class UsageError(GraError):
    """The Python API was used where it cannot work (e.g. `run()` inside a running loop)."""


class EndpointError(GraError):
    """An endpoint answered (or failed to answer) in a way that gives no usable reply.

    `status` is the HTTP status (None for transport failures), `message` the server's own
    error text as parsed from its body (keys redacted), `request_id` the id the server
    sent in `x-request-id`, if any.
    """

    def __init__(
        self, text: str, *, endpoint: str = "", status: int | None = None, message: str = "",
        request_id: str | None = None,
    ) -> None:
        super().__init__(text)
        self.endpoint = endpoint
        self.status = status
        self.message = message
        self.request_id = request_id


class AuthenticationError(EndpointError):
    """401: the API key is missing or wrong."""


class PermissionDeniedError(EndpointError):
    """403: the key is valid but not allowed to do this."""


class NotFoundError(EndpointError):
    """404: the URL is wrong or the model is not served there."""


class BadRequestError(EndpointError):
    """400, 422 or another 4xx: the server rejected this request."""


class UnreachableError(EndpointError):
    """The endpoint could not be reached when probed."""


class EndpointsRefusing(EndpointError):
    """Every endpoint serving a model answers every call with the same 4xx error (a rotated
    key or a removed model behind a gateway): the run cannot go on."""


class TransientError(EndpointError):
    """A fault that the same call may not hit again; the retry policy handles it."""

    def __init__(
        self, text: str, *, endpoint: str = "", status: int | None = None, message: str = "",
        request_id: str | None = None, retry_after: float | None = None,
    ) -> None:
        super().__init__(text, endpoint=endpoint, status=status, message=message,
                         request_id=request_id)
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


class InvalidReply(GraError):
    """A model reply that does not hold what was asked; `.reason` says what, briefly."""

    def __init__(self, reason: str, text: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.excerpt = text[:200]


class TaskFailed(GraError):
    """One task cannot produce a sample; it is recorded as failed with the reason."""


class TaskParked(GraError):
    """A task lost a call to the endpoint, not to its own fault: it is run again later,
    never counted as failed and never decided on a partial panel."""


class Stalled(GraError):
    """No call completed for `run.stall_timeout` seconds; the run stopped, resumable."""


class Interrupted(GraError):
    """The run was stopped by a signal; it can be resumed with the same command."""
