"""One OpenAI-compatible endpoint: its limits, its health, its statistics, and one attempt of a call.

An `Endpoint` never retries and never sleeps on behalf of other calls: the pool picks it,
it sends one attempt, and it learns from the answer (429s shrink its concurrency window,
`x-ratelimit-*` headers hold new admissions until the reset, consecutive failures cool it down).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiolimiter import AsyncLimiter

from gra_async import defaults
from gra_async.client._http import HttpResponse, Timeouts, Transport
from gra_async.client._types import ChatReply, ChatRequest, EndpointStats
from gra_async.client.retry import error_for_status, parse_duration
from gra_async.config import EndpointConfig
from gra_async.errors import GraError, MalformedResponse, RateLimitError, TransientError

__all__ = ["Endpoint"]

Clock = Callable[[], float]
# A 429 storm arrives as a burst from one window of in-flight calls; cutting once per
# interval keeps one burst from collapsing the window to 1.
_CUT_INTERVAL = 1.0
_HOLD_CAP = 60.0
# A token bucket of 10 s: one request may need more than a second's worth of tokens.
_TPM_BUCKET = 10.0


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
    ) -> None:
        self.config = config
        self.model = model or config.model or ""
        self._transport = transport
        self._clock = clock
        self._wall_clock = wall_clock
        self._key = config.api_key()
        self._url = f"{config.base_url}/chat/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            self._headers["Authorization"] = f"Bearer {self._key}"
        self._timeouts = Timeouts(connect=config.connect_timeout, read=config.read_timeout)
        self._rpm = _per_second(config.rpm, 1.0) if config.rpm else None
        self._tpm = _per_second(config.tpm, _TPM_BUCKET) if config.tpm else None
        self._token_debt = 0  # estimate error carried into the next TPM acquisition
        # Adaptive concurrency (AIMD): starts at the configured cap, halves on 429.
        self.window = float(config.max_concurrency)
        self._last_cut = -_CUT_INTERVAL
        self.hold_until = 0.0  # no new admissions before this (rate-limit headers said so)
        # Health: consecutive failures cool the endpoint down; one probe call may pass after.
        self.consecutive_failures = 0
        self.cooldown = config.cooldown
        self.cool_until = 0.0
        self.probing = False
        # Counters behind `stats()`.
        self.in_flight = 0
        self._requests = self._succeeded = self._failed = 0
        self.retries = 0
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

    def admissible(self, now: float) -> bool:
        if now < self.hold_until or now < self.cool_until:
            return False
        if self.cool_until and self.probing:
            return self.in_flight == 0  # one probe call at a time after a cooldown
        return self.in_flight < max(1, int(self.window))

    def wake_time(self, now: float) -> float | None:
        """When a timed block (hold or cooldown) ends, if one is what keeps us closed."""
        blocked = max(self.hold_until, self.cool_until)
        return blocked if blocked > now else None

    # --- one attempt -----------------------------------------------------------------

    async def send(self, request: ChatRequest, attempts: int) -> ChatReply:
        """Send one attempt; raise a `TransientError` or `EndpointError` on failure."""
        estimate = request.estimated_tokens()
        if self._rpm is not None:
            await self._rpm.acquire(1)
        if self._tpm is not None:
            await self._tpm.acquire(min(max(estimate + self._token_debt, 1), self._tpm.max_rate))
            self._token_debt = 0
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
        self._requests += 1
        started = self._clock()
        response = await self._transport.request(
            "POST",
            self._url,
            headers=self._headers,
            body=orjson.dumps(body),
            timeouts=self._timeouts,
            label=self.label,
        )
        latency = self._clock() - started
        self._observe_headers(response.headers)
        if response.status >= 300:
            raise self.error_for(response)
        reply = self._parse(response, latency, attempts)
        if self._tpm is not None:
            self._token_debt = reply.prompt_tokens + reply.completion_tokens - estimate
        self._tokens_in += reply.prompt_tokens
        self._tokens_out += reply.completion_tokens
        self._latency_total += latency
        return reply

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

    def _observe_headers(self, headers: Mapping[str, str]) -> None:
        """Hold new admissions when the server says its budget is spent until a reset."""
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining is None:
                continue
            try:
                spent = float(remaining) <= 0
            except ValueError:
                continue
            reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}", ""))
            if spent and reset:
                self.hold_until = max(self.hold_until, self._clock() + min(reset, _HOLD_CAP))

    # --- outcomes --------------------------------------------------------------------

    def succeeded(self) -> None:
        self._succeeded += 1
        self.consecutive_failures = 0
        if self.cool_until:
            self.cool_until = 0.0
            self.probing = False
            self.cooldown = self.config.cooldown
        if self.window < self.config.max_concurrency:
            self.window = min(float(self.config.max_concurrency), self.window + 1.0 / self.window)

    def failed(self, error: Exception) -> None:
        self._failed += 1
        if isinstance(error, RateLimitError):
            self._rate_limited += 1
            now = self._clock()
            if now - self._last_cut >= _CUT_INTERVAL:
                self.window = max(1.0, self.window / 2.0)
                self._last_cut = now
            return  # a busy server is healthy: slow down, don't cool down
        if not isinstance(error, TransientError):
            return
        self.consecutive_failures += 1
        if self.probing or self.consecutive_failures >= self.config.cooldown_after:
            if self.probing:
                self.cooldown = min(self.cooldown * 2.0, defaults.COOLDOWN_MAX)
            self.cool_until = self._clock() + self.cooldown
            self.probing = True

    def stats(self) -> EndpointStats:
        return EndpointStats(
            label=self.label,
            model=self.model,
            in_flight=self.in_flight,
            window=self.window,
            requests=self._requests,
            succeeded=self._succeeded,
            failed=self._failed,
            retries=self.retries,
            rate_limited=self._rate_limited,
            tokens_in=self._tokens_in,
            tokens_out=self._tokens_out,
            latency_mean=self._latency_total / self._succeeded if self._succeeded else 0.0,
            healthy=self.cool_until == 0.0,
        )
