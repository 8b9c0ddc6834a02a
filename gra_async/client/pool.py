"""A set of endpoints (replicas, several models) behind one `chat()` call that retries.

Each attempt goes to the admissible endpoint with the least in-flight work per unit of
weight; a call that must wait parks on a future that a finishing call of the same model
resolves, so waiting costs nothing while it waits. Retries happen here, one call at a time:
the failed call sleeps its own backoff and may land on another replica next time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from gra_async.client._types import ChatReply, ChatRequest, EmbedReply, EmbedRequest, EndpointStats
from gra_async.client.endpoint import Endpoint
from gra_async.client.retry import RetryPolicy
from gra_async.errors import EndpointError, EndpointsRefusing, RetriesExhausted, TransientError

__all__ = ["EndpointPool"]

R = TypeVar("R", ChatReply, EmbedReply)


class EndpointPool:
    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not endpoints:
            raise ValueError("an EndpointPool needs at least one endpoint")
        self._endpoints = tuple(endpoints)
        # Read for every task (`Team.assign`): rebuilt each time, it was 10% of the CPU
        # with 16 replicas per model (bench/pipeline_bench.py --scale --replicas 16).
        self._models = tuple(dict.fromkeys(e.model for e in self._endpoints))
        self._policy = policy or RetryPolicy()
        self._clock = clock
        self._by_model: dict[str | None, tuple[Endpoint, ...]] = {None: self._endpoints}
        for endpoint in self._endpoints:
            self._by_model[endpoint.model] = (*self._by_model.get(endpoint.model, ()), endpoint)
        self._waiters: dict[str | None, deque[asyncio.Future[None]]] = {
            key: deque() for key in self._by_model
        }
        self._refused: dict[str | None, EndpointsRefusing] = {}

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    @property
    def models(self) -> tuple[str, ...]:
        """Distinct models, in configuration order."""
        return self._models

    def stats(self) -> tuple[EndpointStats, ...]:
        return tuple(e.stats() for e in self._endpoints)

    async def chat(self, request: ChatRequest, *, model: str | None = None) -> ChatReply:
        """One model call, retried on transient faults; `model=None` takes any endpoint.

        Raises `EndpointError` subclasses at once (400/401/403/404/422),
        `EndpointsRefusing` once every endpoint of the model refuses every call alike, and
        `RetriesExhausted` when transient faults outlast the retry budget. While every
        endpoint of the model is failing, a call waits for a probe to get through instead
        of spending its retries.
        """
        return await self._call(model, request, lambda e, attempt: e.send(request, attempt))

    async def embed(self, request: EmbedRequest, *, model: str | None = None) -> EmbedReply:
        """One `/v1/embeddings` call of several texts, with the retries and errors of `chat`."""
        return await self._call(model, request, lambda e, attempt: e.embed(request, attempt))

    async def _call(
        self, model: str | None, request: ChatRequest | EmbedRequest,
        send: Callable[[Endpoint, int], Awaitable[R]],
    ) -> R:
        if model not in self._by_model:
            raise ValueError(f"no endpoint serves model {model!r} (have {', '.join(self.models)})")
        attempt = 0
        while True:
            endpoint = await self._acquire(model)
            try:
                reply = await send(endpoint, attempt + 1)
            except TransientError as error:
                endpoint.failed(error)
                self._release(endpoint)
                if attempt >= self._policy.max_retries:
                    raise RetriesExhausted(
                        f"{error} (gave up after {attempt + 1} attempts)", last=error
                    ) from None
                endpoint.retried(error)
                await asyncio.sleep(self._policy.delay(attempt, error))
                attempt += 1
                continue
            except EndpointError as error:
                endpoint.failed(error)
                self._release(endpoint)
                self._check_refusing(model, endpoint)
                raise
            except BaseException:
                # Cancelled in flight: the slot goes back, nothing is learned about health,
                # but the server (or a gateway in front of it) may finish and bill the call;
                # not when the endpoint was failing every call anyway.
                if endpoint.open_error is None:
                    endpoint.abandoned(request)
                self._release(endpoint)
                raise
            endpoint.succeeded()
            self._release(endpoint)
            return reply

    def _check_refusing(self, model: str | None, failed: Endpoint) -> None:
        """When every endpoint of a model refuses alike, every waiting call learns it."""
        for key in {model, failed.model, None}:
            candidates = self._by_model.get(key, ())
            if key in self._refused or not candidates:
                continue
            if all(e.health == "refusing" for e in candidates):
                error = failed.open_error
                assert error is not None
                self._refused[key] = EndpointsRefusing(
                    f"every endpoint serving {key or 'this role'} refuses every call: {error} "
                    "(the same answer to every call: fix what it names, or check the key, the "
                    "model name and any gateway in between)",
                    endpoint=failed.label, status=error.status, message=error.message,
                    request_id=error.request_id)
                for future in self._waiters.get(key, ()):
                    if not future.done():
                        future.set_result(None)

    async def _acquire(self, model: str | None) -> Endpoint:
        candidates = self._by_model[model]
        waiters = self._waiters[model]
        while True:
            refused = self._refused.get(model)
            if refused is not None:
                raise refused
            now = self._clock()
            best: Endpoint | None = None
            for endpoint in candidates:
                if endpoint.admissible(now) and (best is None or endpoint.load() < best.load()):
                    best = endpoint
            if best is not None:
                best.admitted(now)
                return best
            wake = [t for e in candidates if (t := e.wake_time(now)) is not None]
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()
            waiters.append(future)
            # A timer resolves the same future when a hold ends or a probe is due. Not
            # asyncio.wait_for: on 3.11, a cancellation that lands as the future is resolved
            # is swallowed, and a stopped run then waited ~50 s for such a call to finish.
            timer = loop.call_later(min(wake) - now, _resolve, future) if wake else None
            try:
                await future
            except BaseException:
                if future.done() and not future.cancelled():
                    self._wake(model)  # handed a slot we will not use: pass it on
                raise
            finally:
                if timer is not None:
                    timer.cancel()

    def _release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        # Usually one slot came free; after the window grew, as many as it grew by.
        free = max(1, endpoint.window.limit - endpoint.in_flight)
        self._wake(None, max(1, self._wake(endpoint.model, free)))

    def _wake(self, model: str | None, count: int = 1) -> int:
        """Wake up to `count` waiting calls; return how many of the count are left over."""
        waiters = self._waiters.get(model)
        while waiters and count:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                count -= 1
        return count


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
