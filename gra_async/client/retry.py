"""The retry policy, whole: which HTTP answers are errors of which kind, and how long to wait.

Retried: 408, 409, 429, 5xx, connection failures, timeouts, unparsable bodies.
Not retried: 400, 401, 403, 404, 422 and any other 4xx: the same request gets the same answer.
Waits: a server's `retry-after-ms`, else `Retry-After` (seconds or an HTTP date), capped
at `retry_after_cap`; otherwise exponential backoff with full jitter. The wait is slept by
the failing call alone, so one call's backoff never pauses another.
"""

from __future__ import annotations

import email.utils
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import orjson

from gra_async import defaults
from gra_async.errors import (
    AuthenticationError,
    BadRequestError,
    ConnectionFailed,
    EndpointError,
    GraError,
    MalformedResponse,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeout,
    ServerError,
    TransientError,
)

__all__ = ["GATEWAY_PREFIXES", "RetryPolicy", "error_for_status", "parse_duration", "retry_after",
           "retry_reason"]

# Gateways forward their upstream's wait and rate-limit headers under a prefix
# (LiteLLM: `llm_provider-retry-after`, `llm_provider-x-ratelimit-reset-requests`).
GATEWAY_PREFIXES = ("", "llm_provider-")

_RETRY_STATUSES = frozenset({408, 409, 429})
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = defaults.MAX_RETRIES
    backoff_base: float = defaults.BACKOFF_BASE
    backoff_max: float = defaults.BACKOFF_MAX
    retry_after_cap: float = defaults.RETRY_AFTER_CAP
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay(self, attempt: int, error: TransientError) -> float:
        """Seconds to wait before retry number `attempt + 1` (attempt counts from 0)."""
        if error.retry_after is not None:
            return min(max(error.retry_after, 0.0), self.retry_after_cap)
        ceiling = min(self.backoff_max, self.backoff_base * (2.0**attempt))
        return self.rng.uniform(0.0, ceiling)


def retry_reason(error: TransientError) -> str:
    """Why a call was retried, as the metrics label it (`gra_retries_total{reason}`)."""
    for kind, reason in ((RateLimitError, "rate_limited"), (RequestTimeout, "timeout"),
                         (ServerError, "server_error"), (ConnectionFailed, "connection"),
                         (MalformedResponse, "malformed")):
        if isinstance(error, kind):
            return reason
    return "other"


def parse_duration(value: str) -> float | None:
    """Rate-limit reset values: "1.5" (seconds), "20ms", "1s", "6m0s", "1h2m3s"."""
    text = value.strip().lower()
    if not text:
        return None
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    total, end = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != end:
            return None
        total += float(match.group(1)) * _UNIT[match.group(2)]
        end = match.end()
    return total if end == len(text) else None


def retry_after(headers: Mapping[str, str], wall_clock: Callable[[], float]) -> float | None:
    """Seconds the server asks us to wait, from `retry-after-ms` or `Retry-After`, or
    their copies a gateway forwards from its upstream (LiteLLM: `llm_provider-retry-after`)."""
    for prefix in GATEWAY_PREFIXES:
        wait = _retry_after(headers, prefix, wall_clock)
        if wait is not None:
            return wait
    return None


def _retry_after(
    headers: Mapping[str, str], prefix: str, wall_clock: Callable[[], float],
) -> float | None:
    millis = headers.get(f"{prefix}retry-after-ms")
    if millis is not None:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get(f"{prefix}retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - wall_clock(), 0.0)


def _error_code(body: bytes) -> str | None:
    """The `code` (or `type`) of an OpenAI-style error body, if it has one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None
    code = error.get("code") or error.get("type")
    return code if isinstance(code, str) else None


def _server_message(body: bytes, secret: str | None) -> str:
    """The error text an OpenAI-compatible server put in its body, shortened for one line.

    Some hosted APIs echo part of a refused key; the key is cut out before anyone sees it.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
    else:
        error = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(error, dict):
            text = str(error.get("message") or error.get("detail") or error)
        else:
            text = str(error)
    text = " ".join(text.split())
    if secret:
        text = text.replace(secret, "[redacted]")
    return text[:200] + ("…" if len(text) > 200 else "")


def error_for_status(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    label: str,
    wall_clock: Callable[[], float],
    secret: str | None = None,
) -> GraError:
    """The exception for a non-2xx answer, carrying the server's wait hint when it sent one."""
    said = _server_message(body, secret)
    detail = f": {said}" if said else ""
    request_id = headers.get("x-request-id") or headers.get("request-id")
    if status == 429 and _error_code(body) == "insufficient_quota":
        # OpenAI's "quota exhausted" is a 429 too, but waiting does not refill a quota.
        return PermissionDeniedError(
            f"{label}: HTTP 429, the account's quota is used up (add credit or use another "
            f"key){detail}", endpoint=label, status=status, message=said,
            request_id=request_id)
    if status == 429 or status in _RETRY_STATUSES or status >= 500:
        cls = RateLimitError if status == 429 else ServerError
        return cls(
            f"{label}: HTTP {status}{detail}",
            endpoint=label,
            status=status,
            message=said,
            request_id=request_id,
            retry_after=retry_after(headers, wall_clock),
        )
    fatal: dict[int, tuple[type[EndpointError], str]] = {
        401: (AuthenticationError, "the API key was refused (check the key's environment variable)"),
        403: (PermissionDeniedError, "access denied for this key"),
        404: (NotFoundError, "not found (check the base URL ends in /v1 and the model is served)"),
    }
    cls_fatal, hint = fatal.get(status, (BadRequestError, "the server rejected the request"))
    return cls_fatal(f"{label}: HTTP {status}, {hint}{detail}", endpoint=label, status=status,
                     message=said, request_id=request_id)
