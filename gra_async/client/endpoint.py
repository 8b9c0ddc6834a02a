"""One OpenAI-compatible endpoint: its limits, its health, its statistics, and one attempt of a call.

An `Endpoint` never retries and never sleeps on behalf of other calls: the pool picks it,
it sends one attempt, and it learns from the answer: latency sets its concurrency window
(`_window.py`: queueing at the server shows as latency, 429s and 503s halve it),
rate-limit headers (plain or a gateway's `llm_provider-` copies) hold new admissions for
one request's worth of refill, and a circuit breaker opens after `cooldown_after`
consecutive failures (transient ones, or the same 4xx error): then one probe call every
`cooldown` seconds, until one succeeds.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from aiolimiter import AsyncLimiter

from gra_async import defaults
from gra_async.client._http import HttpResponse, Timeouts, Transport
from gra_async.client._lag import loop_lag
from gra_async.client._types import ChatReply, ChatRequest, EmbedReply, EmbedRequest, EndpointStats
from gra_async.client._window import ConcurrencyWindow
from gra_async.client.retry import GATEWAY_PREFIXES, error_for_status, parse_duration, retry_reason
from gra_async.config import EndpointConfig
from gra_async.errors import (
    EndpointError,
    GraError,
    MalformedResponse,
    RateLimitError,
    RequestTimeout,
    TransientError,
)

__all__ = ["Endpoint"]

log = logging.getLogger("gra_async")

Clock = Callable[[], float]
_HOLD_CAP = 60.0
# A token bucket of 10 s: one request may need more than a second's worth of tokens.
_TPM_BUCKET = 10.0
# `remaining: 0` with no reset (LiteLLM's own limiter sends that): hold this long when the
# limit is not known either; with a known limit, one request's worth of a per-minute budget.
_BLIND_HOLD = 1.0
_DIGITS = re.compile(r"\d+")
# A timeout warning once an endpoint has this many and more timeouts than replies.
_TIMEOUT_WARN_AFTER = 3

Health = Literal["ok", "open", "refusing"]


def _signature(error: EndpointError) -> tuple[str, int | None, str]:
    """What makes two errors "the same": class, status and the server's message with its
    numbers dropped ("max context 2048, you asked 2100" and "... 2300" are one error)."""
    return type(error).__name__, error.status, _DIGITS.sub("#", error.message)[:120]


def _per_second(per_minute: int, bucket: float) -> AsyncLimiter:
    """A limiter that refills continuously instead of granting a minute's budget at once.

    `AsyncLimiter(rpm, 60)` lets all `rpm` requests through in the first instant; a server
    counting over a sliding minute then answers 429 to everything in flight when its
    window fills, every minute (measured: 2.1% of requests at 1,200 rpm).
    """
    period = max(bucket, 60.0 / per_minute)
    return AsyncLimiter(per_minute * period / 60.0, period)


class Endpoint:
    """Per-endpoint state. Not thread-safe: it lives on the one event loop."""

    def __init__(
        self,
        config: EndpointConfig,
        transport: Transport,
        *,
        model: str | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        uncapped: int = defaults.RUN_CONCURRENCY,
        lag: Clock = loop_lag,
    ) -> None:
        self.config = config
        # The most calls in flight here: the endpoint's own cap, else the run's concurrency.
        self.cap = config.max_concurrency or uncapped
        self.model = model or config.model or ""
        self._transport = transport
        self._clock = clock
        self._wall_clock = wall_clock
        self._lag = lag  # how late our own event loop runs (`_lag.py`), for the window
        self._key = config.api_key()
        self._url = f"{config.base_url}/chat/completions"
        self._embed_url = f"{config.base_url}/embeddings"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            self._headers["Authorization"] = f"Bearer {self._key}"
        self._timeouts = Timeouts(connect=config.connect_timeout, read=config.read_timeout)
        self._rpm = _per_second(config.rpm, 1.0) if config.rpm else None
        self._tpm = _per_second(config.tpm, _TPM_BUCKET) if config.tpm else None
        self._token_debt = 0  # estimate error carried into the next TPM acquisition
        self.window = ConcurrencyWindow(self.cap, adaptive=config.adaptive)
        self.hold_until = 0.0  # no new admissions before this (rate-limit headers said so)
        # Health (the circuit breaker): open after `cooldown_after` consecutive transient
        # failures or the same 4xx error that often; open, one probe call per `cooldown` s.
        self.consecutive_failures = 0
        self._same_errors = 0
        self._last_signature: tuple[str, int | None, str] | None = None
        self.open_error: EndpointError | None = None  # the error that opened the breaker
        self.next_probe = 0.0
        self._timed_out = 0
        self._last_error = ""  # the latest failure, until a success
        self._abandoned = self._abandoned_tokens = 0
        self._timeout_warned = False
        # Counters behind `stats()`.
        self.in_flight = 0
        self._requests = self._succeeded = self._failed = 0
        self.retries = 0
        self.retry_reasons: dict[str, int] = {}  # retries by `retry.retry_reason`, for metrics
        self._rate_limited = 0
        self._tokens_in = self._tokens_out = 0
        self._latency_total = 0.0

    @property
    def label(self) -> str:
        return f"{self.model or '?'}@{self.config.base_url}"

    @property
    def api_key(self) -> str | None:
        return self._key

    def headers(self) -> Mapping[str, str]:
        return self._headers

    # --- admission -------------------------------------------------------------------

    def load(self) -> float:
        """In-flight work relative to weight: the pool sends the next call to the lowest."""
        return self.in_flight / self.config.weight

    @property
    def health(self) -> Health:
        if self.open_error is None:
            return "ok"
        return "open" if isinstance(self.open_error, TransientError) else "refusing"

    def admissible(self, now: float) -> bool:
        if now < self.hold_until:
            return False
        if self.open_error is not None:
            return self.in_flight == 0 and now >= self.next_probe  # one probe at a time
        if self.in_flight < self.window.limit:
            return True
        self.window.blocked()
        return False

    def admitted(self, now: float) -> None:
        """A call was given this endpoint; with the breaker open, it is the probe."""
        self.in_flight += 1
        if self.open_error is not None:
            self.next_probe = now + self.config.cooldown

    def wake_time(self, now: float) -> float | None:
        """When a timed block (hold or the next probe) ends, if one is what keeps us closed."""
        blocked = self.hold_until
        if self.open_error is not None:
            blocked = max(blocked, self.next_probe)
        return blocked if blocked > now else None

    # --- one attempt -----------------------------------------------------------------

    async def send(self, request: ChatRequest, attempts: int) -> ChatReply:
        """Send one attempt; raise a `TransientError` or `EndpointError` on failure."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.response_format is not None:
            body["response_format"] = request.response_format
        if request.seed is not None:
            body["seed"] = request.seed
        estimate = request.estimated_tokens()
        response, latency, sent_with = await self._exchange(self._url, body, estimate)
        reply = self._parse(response, latency, attempts)
        self._replied(latency, sent_with, reply.prompt_tokens + reply.completion_tokens, estimate)
        self._tokens_out += reply.completion_tokens
        self._tokens_in += reply.prompt_tokens
        return reply

    async def embed(self, request: EmbedRequest, attempts: int) -> EmbedReply:
        """One attempt of a `/v1/embeddings` call, under the same limits as `send`."""
        estimate = request.estimated_tokens()
        body = {"model": self.model, "input": list(request.texts), "encoding_format": "float"}
        response, latency, sent_with = await self._exchange(self._embed_url, body, estimate)
        vectors, tokens = self._parse_embeddings(response, len(request.texts))
        self._replied(latency, sent_with, tokens, estimate)
        self._tokens_in += tokens
        return EmbedReply(vectors, self.model, self.label, tokens, latency, attempts)

    async def _exchange(
        self, url: str, body: dict[str, Any], estimate: int,
    ) -> tuple[HttpResponse, float, int]:
        """The rate limits, then one POST; a non-2xx answer raised as our error.

        Returns the response, its latency and the calls in flight here when it was sent.
        """
        if self._rpm is not None:
            await self._rpm.acquire(1)
        if self._tpm is not None:
            await self._tpm.acquire(min(max(estimate + self._token_debt, 1), self._tpm.max_rate))
            self._token_debt = 0
        self._requests += 1
        sent_with = self.in_flight
        started = self._clock()
        response = await self._transport.request(
            "POST",
            url,
            headers=self._headers,
            body=orjson.dumps(body),
            timeouts=self._timeouts,
            label=self.label,
        )
        latency = self._clock() - started
        self._observe_headers(response.headers)
        if response.status >= 300:
            raise self.error_for(response)
        return response, latency, sent_with

    def _replied(self, latency: float, sent_with: int, tokens: int, estimate: int) -> None:
        self.window.replied(latency, self._clock(), self.in_flight - 1, sent_with=sent_with,
                            lag=self._lag())
        if self._tpm is not None:
            self._token_debt = tokens - estimate
        self._latency_total += latency

    def error_for(self, response: HttpResponse) -> GraError:
        """Our exception for this endpoint's non-2xx answer, its key redacted."""
        return error_for_status(
            response.status, response.headers, response.body,
            label=self.label, wall_clock=self._wall_clock, secret=self._key,
        )

    def _parse(self, response: HttpResponse, latency: float, attempts: int) -> ChatReply:
        try:
            data = orjson.loads(response.body)
            choice = data["choices"][0]
            content = choice["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise MalformedResponse(
                f"{self.label}: reply is not an OpenAI chat completion ({type(exc).__name__})",
                endpoint=self.label,
                status=response.status,
            ) from None
        usage = data.get("usage") or {}
        return ChatReply(
            content=content,
            finish_reason=str(choice.get("finish_reason") or ""),
            model=self.model,
            endpoint=self.label,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency=latency,
            attempts=attempts,
        )

    def _parse_embeddings(
        self, response: HttpResponse, count: int,
    ) -> tuple[npt.NDArray[np.float32], int]:
        """The vectors in request order (by `index`, which servers may not sort), unit length."""
        try:
            data = orjson.loads(response.body)
            rows = sorted(data["data"], key=lambda item: int(item["index"]))
            vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != count or not vectors.shape[1]:
                raise ValueError(f"{len(rows)} embeddings for {count} texts")
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise MalformedResponse(
                f"{self.label}: reply is not an OpenAI embeddings list ({exc})",
                endpoint=self.label,
                status=response.status,
            ) from None
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        # Cosine is a dot product of unit vectors; a zero vector stays zero (matches nothing).
        vectors /= np.where(norms > 0, norms, 1.0)
        usage = data.get("usage") or {}
        return vectors, int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)

    def _observe_headers(self, headers: Mapping[str, str]) -> None:
        """Hold new admissions while the server says its budget is spent.

        A budget refills continuously (a token bucket): `reset` is the time until it is
        full again, so one more request's worth is back after `reset / limit` of it, not
        after all of it (holding the whole 60 s let through 757 calls a minute against
        ~1,200 allowed). With no reset, hold for one request's worth at the known limit.
        """
        for prefix in GATEWAY_PREFIXES:
            for kind in ("requests", "tokens"):
                remaining = _number(headers.get(f"{prefix}x-ratelimit-remaining-{kind}"))
                if remaining is None or remaining > 0:
                    continue
                limit = _number(headers.get(f"{prefix}x-ratelimit-limit-{kind}"))
                reset = parse_duration(headers.get(f"{prefix}x-ratelimit-reset-{kind}", ""))
                unit = 1.0 if kind == "requests" else max(self._tokens_per_call(), 1.0)
                if reset is not None and limit:
                    hold = reset * min(unit / limit, 1.0)
                elif reset is not None:
                    hold = reset
                elif limit:
                    hold = 60.0 * min(unit / limit, 1.0)
                else:
                    hold = _BLIND_HOLD
                self.hold_until = max(self.hold_until, self._clock() + min(hold, _HOLD_CAP))

    def _tokens_per_call(self) -> float:
        return (self._tokens_in + self._tokens_out) / self._succeeded if self._succeeded else 0.0

    # --- outcomes --------------------------------------------------------------------

    def succeeded(self) -> None:
        self._succeeded += 1
        self.consecutive_failures = self._same_errors = 0
        self._last_signature = None
        self._last_error = ""
        if self.open_error is not None:
            log.info("%s answers again", self.label)
            self.open_error = None

    def failed(self, error: Exception) -> None:
        self._failed += 1
        if isinstance(error, RateLimitError):
            self._rate_limited += 1
            self.window.overloaded(self._clock())
            return  # a busy server is healthy: slow down, don't cool down
        if not isinstance(error, EndpointError):
            return
        if error.status == 503:  # vLLM and gateways say "overloaded" this way too
            self.window.overloaded(self._clock())
        if isinstance(error, RequestTimeout):
            self._timed_out += 1
            if (not self._timeout_warned and self._timed_out >= _TIMEOUT_WARN_AFTER
                    and self._timed_out > self._succeeded):
                self._timeout_warned = True
                log.warning("calls to %s time out after %g s: raise its read_timeout",
                            self.label, self.config.read_timeout)
        self._last_error = str(error)
        signature = _signature(error)
        self._same_errors = self._same_errors + 1 if signature == self._last_signature else 1
        self._last_signature = signature
        if isinstance(error, TransientError):
            self.consecutive_failures += 1
        threshold = self.config.cooldown_after
        if self.open_error is None and (self.consecutive_failures >= threshold
                                        or self._same_errors >= threshold):
            # INFO: the display shows the state; a run that stops for it says why in one line.
            log.info("%s: %d calls in a row failed (%s); one probe call every %g s until it "
                     "answers", self.label, threshold, error, self.config.cooldown)
            self.open_error = error
            self.next_probe = self._clock() + self.config.cooldown
        elif self.open_error is not None:
            self.open_error = error  # the probe failed: the latest reason is the one to show

    def retried(self, error: TransientError) -> None:
        """A failed attempt is tried again (the pool's decision): counted by its reason."""
        self.retries += 1
        reason = retry_reason(error)
        self.retry_reasons[reason] = self.retry_reasons.get(reason, 0) + 1

    def abandoned(self, request: ChatRequest | EmbedRequest) -> None:
        self._abandoned += 1
        self._abandoned_tokens += request.estimated_tokens()

    def stats(self) -> EndpointStats:
        return EndpointStats(
            label=self.label,
            model=self.model,
            in_flight=self.in_flight,
            window=self.window.value,
            requests=self._requests,
            succeeded=self._succeeded,
            failed=self._failed,
            retries=self.retries,
            rate_limited=self._rate_limited,
            tokens_in=self._tokens_in,
            tokens_out=self._tokens_out,
            latency_mean=self._latency_total / self._succeeded if self._succeeded else 0.0,
            health=self.health,
            timeouts=self._timed_out,
            abandoned=self._abandoned,
            abandoned_tokens=self._abandoned_tokens,
            last_error=self._last_error,
        )


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None
