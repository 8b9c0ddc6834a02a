"""The retry policy as pure rules: classification, server wait hints, backoff bounds."""

from __future__ import annotations

import email.utils
import random

import pytest

from gra_async.client.retry import RetryPolicy, error_for_status, parse_duration, retry_after
from gra_async.errors import (
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TransientError,
)

NOW = 1_800_000_000.0


def clock() -> float:
    return NOW


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (408, ServerError),
        (409, ServerError),
        (429, RateLimitError),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (504, ServerError),
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (422, BadRequestError),
    ],
    ids=str,
)
def test_status_classification(status: int, kind: type[Exception]) -> None:
    error = error_for_status(status, {}, b"", label="m@http://h/v1", wall_clock=clock)
    assert type(error) is kind
    assert "m@http://h/v1" in str(error)
    assert isinstance(error, TransientError) == (status in (408, 409, 429) or status >= 500)


def test_server_message_is_kept_and_secret_redacted() -> None:
    body = b'{"error": {"message": "Incorrect API key provided: sk-secret-123"}}'
    error = error_for_status(401, {}, body, label="m@u", wall_clock=clock, secret="sk-secret-123")
    assert "Incorrect API key provided" in str(error)
    assert "sk-secret-123" not in str(error)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "100", "retry-after": "9"}, 0.1),
        ({"retry-after": email.utils.formatdate(NOW + 7, usegmt=True)}, 7.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
    ids=["ms", "seconds", "fraction", "ms-wins", "http-date", "garbage", "absent"],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    got = retry_after(headers, clock)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_429_carries_retry_after() -> None:
    error = error_for_status(429, {"retry-after": "4"}, b"", label="x", wall_clock=clock)
    assert isinstance(error, RateLimitError) and error.retry_after == 4.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("20ms", 0.02), ("6m0s", 360.0), ("1h2m3s", 3723.0), ("2.5", 2.5),
     ("1.5s", 1.5), ("", None), ("abc", None), ("5x", None)],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_backoff_is_full_jitter_and_capped() -> None:
    policy = RetryPolicy(backoff_base=0.5, backoff_max=4.0, rng=random.Random(7))
    plain = TransientError("x")
    for attempt in range(10):
        ceiling = min(4.0, 0.5 * 2**attempt)
        delays = [policy.delay(attempt, plain) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling  # spread over the whole range, not a fixed step
        assert min(delays) < 0.2 * ceiling


def test_server_hint_wins_but_is_capped() -> None:
    policy = RetryPolicy(retry_after_cap=10.0)
    assert policy.delay(0, RateLimitError("x", retry_after=3.0)) == 3.0
    assert policy.delay(5, RateLimitError("x", retry_after=3600.0)) == 10.0


def test_an_exhausted_quota_is_not_a_rate_limit() -> None:
    """OpenAI answers an exhausted quota with 429 `insufficient_quota`: waiting will not
    refill it, so it stops the run like a refused key instead of parking every task."""
    body = (b'{"error": {"message": "You exceeded your current quota.", '
            b'"type": "insufficient_quota", "code": "insufficient_quota"}}')
    error = error_for_status(429, {"retry-after": "20"}, body, label="m@u", wall_clock=clock)
    assert isinstance(error, PermissionDeniedError) and not isinstance(error, TransientError)
    assert "quota is used up" in str(error) and error.status == 429
    plain = error_for_status(429, {}, b'{"error": {"message": "slow down", "code": "rate_limit_exceeded"}}',
                             label="m@u", wall_clock=clock)
    assert isinstance(plain, RateLimitError)
