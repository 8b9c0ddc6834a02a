"""The client layer against the real fake server on 127.0.0.1: every retry, limit, cooldown
and balancing rule, each asserted so that breaking the rule fails the test."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import FrozenInstanceError
from typing import Any

import pytest

from gra_async.client import (
    AiohttpTransport,
    ChatRequest,
    Endpoint,
    EndpointPool,
    RetryPolicy,
    probe,
)
from gra_async.config import EndpointConfig
from gra_async.errors import (
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    RetriesExhausted,
    UnreachableError,
)
from gra_async.testing.fake_server import FakeServerProcess

pytestmark = pytest.mark.anyio

REQUEST = ChatRequest(messages=[{"role": "user", "content": "Say hi."}], max_tokens=16)
FAST = RetryPolicy(max_retries=4, backoff_base=0.01, backoff_max=0.05, rng=random.Random(1))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    transport = AiohttpTransport()
    yield transport
    await transport.aclose()


@pytest.fixture
def server() -> Iterator[FakeServerProcess]:
    server = FakeServerProcess.start(models=["m"], latency=0.0)
    yield server
    server.close()


def endpoint(server: FakeServerProcess, transport: AiohttpTransport, **fields: Any) -> Endpoint:
    config = EndpointConfig.model_validate({"base_url": server.base_url, "model": "m", **fields})
    return Endpoint(config, transport)


def chat_calls(server: FakeServerProcess) -> int:
    return int(server.stats()["models"].get("m", 0))


class TestRetries:
    @pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
    async def test_retryable_status_is_retried(
        self, server: FakeServerProcess, transport: AiohttpTransport, status: int
    ) -> None:
        server.control(status_script=[status, status], retry_after=0)
        ep = endpoint(server, transport)
        reply = await EndpointPool([ep], policy=FAST).chat(REQUEST)
        assert reply.attempts == 3
        assert chat_calls(server) == 3
        assert ep.stats().retries == 2 and ep.stats().succeeded == 1

    @pytest.mark.parametrize(
        ("status", "kind"),
        [(400, BadRequestError), (401, AuthenticationError), (403, PermissionDeniedError),
         (404, NotFoundError), (422, BadRequestError)],
    )
    async def test_fatal_status_fails_fast(
        self, server: FakeServerProcess, transport: AiohttpTransport, status: int, kind: type
    ) -> None:
        server.control(status_script=[status])
        with pytest.raises(kind) as info:
            await EndpointPool([endpoint(server, transport)], policy=FAST).chat(REQUEST)
        assert chat_calls(server) == 1  # sent once, never again
        assert server.base_url in str(info.value)

    async def test_wrong_key_names_endpoint_never_key(
        self, transport: AiohttpTransport, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CLIENT_KEY", "wrong-key-9999")
        server = FakeServerProcess.start(models=["m"], api_key="right-key-0001")
        try:
            ep = endpoint(server, transport, api_key_env="CLIENT_KEY")
            with pytest.raises(AuthenticationError) as info:
                await EndpointPool([ep], policy=FAST).chat(REQUEST)
            assert server.base_url in str(info.value)
            assert "wrong-key-9999" not in str(info.value) and "right-key" not in str(info.value)
            monkeypatch.setenv("CLIENT_KEY", "right-key-0001")
            good = endpoint(server, transport, api_key_env="CLIENT_KEY")
            assert (await EndpointPool([good]).chat(REQUEST)).content
        finally:
            server.close()

    async def test_retry_after_is_honoured(
        self, server: FakeServerProcess, transport: AiohttpTransport
    ) -> None:
        server.control(status_script=[429], retry_after=0.6)
        started = time.monotonic()
        reply = await EndpointPool([endpoint(server, transport)], policy=FAST).chat(REQUEST)
        assert reply.attempts == 2
        assert time.monotonic() - started >= 0.6  # backoff alone would be <= 0.01 s

    async def test_exhausted_budget(self, server: FakeServerProcess, transport: AiohttpTransport) -> None:
        server.control(error_rate=1.0)
        policy = RetryPolicy(max_retries=3, backoff_base=0.001, backoff_max=0.001)
        with pytest.raises(RetriesExhausted) as info:
            await EndpointPool([endpoint(server, transport)], policy=policy).chat(REQUEST)
        assert chat_calls(server) == 4
        assert "gave up after 4 attempts" in str(info.value)

    @pytest.mark.parametrize("knob", ["reset_rate", "malformed_rate"])
    async def test_resets_and_malformed_bodies_are_retried(
        self, server: FakeServerProcess, transport: AiohttpTransport, knob: str
    ) -> None:
        server.control(**{knob: 0.5, "seed": 3})
        pool = EndpointPool([endpoint(server, transport)],
                            policy=RetryPolicy(max_retries=20, backoff_base=0.001, backoff_max=0.002))
        replies = await asyncio.gather(*(pool.chat(REQUEST) for _ in range(20)))
        assert all(r.content for r in replies)
        assert sum(r.attempts for r in replies) > 20  # some needed a retry

    async def test_timeout_is_retried_then_exhausted(
        self, server: FakeServerProcess, transport: AiohttpTransport
    ) -> None:
        server.control(hang_rate=1.0)
        ep = endpoint(server, transport, read_timeout=0.2, connect_timeout=1)
        policy = RetryPolicy(max_retries=1, backoff_base=0.001, backoff_max=0.001)
        with pytest.raises(RetriesExhausted, match=r"no complete reply within 0\.2s"):
            await EndpointPool([ep], policy=policy).chat(REQUEST)

    async def test_one_backoff_does_not_pause_others(
        self, server: FakeServerProcess, transport: AiohttpTransport
    ) -> None:
        server.control(status_script=[429], retry_after=1.5)
        pool = EndpointPool([endpoint(server, transport)], policy=FAST)
        slow = asyncio.create_task(pool.chat(REQUEST))
        await asyncio.sleep(0.1)  # the first call has had its 429
        done_at: list[float] = []

        async def quick() -> None:
            await pool.chat(REQUEST)
            done_at.append(time.monotonic())

        await asyncio.gather(*(quick() for _ in range(20)))
        assert not slow.done()  # all 20 finished while the first still waits out its 1.5 s
        assert (await slow).attempts == 2


class TestLimits:
    async def test_concurrency_cap(self, server: FakeServerProcess, transport: AiohttpTransport) -> None:
        server.control(latency=0.05)
        pool = EndpointPool([endpoint(server, transport, max_concurrency=3)])
        await asyncio.gather(*(pool.chat(REQUEST) for _ in range(24)))
        assert server.stats()["in_flight_peak"] == 3

    async def test_rpm_limit_paces_requests(
        self, server: FakeServerProcess, transport: AiohttpTransport
    ) -> None:
        # 1,200 rpm = 20/s, refilled every second rather than a minute's budget at once.
        pool = EndpointPool([endpoint(server, transport, rpm=1200, max_concurrency=1000)])
        started = time.monotonic()
        await asyncio.gather(*(pool.chat(REQUEST) for _ in range(60)))
        elapsed = time.monotonic() - started
        assert elapsed >= 1.8  # 20 at once, then 40 more at 20/s
        assert elapsed < 30  # not a minute's wait: the bucket refills continuously

    async def test_tpm_limit_counts_estimated_tokens(
        self, server: FakeServerProcess, transport: AiohttpTransport
    ) -> None:
        request = ChatRequest(messages=[{"role": "user", "content": "x" * 40}], max_tokens=90)
        assert request.estimated_tokens() == 100
        # 6,000 tpm = 100 tokens/s in a 10 s bucket: 10 such calls at once, then one a second.
        pool = EndpointPool([endpoint(server, transport, tpm=6000, max_concurrency=1000)])
        started = time.monotonic()
        await asyncio.gather(*(pool.chat(request) for _ in range(13)))
        assert time.monotonic() - started >= 2.5

    async def test_429_halves_window_and_successes_grow_it_back(
        self, server: FakeServerProcess, transport: AiohttpTransport
    ) -> None:
        ep = endpoint(server, transport, max_concurrency=8)
        server.control(status_script=[429], retry_after=0)
        pool = EndpointPool([ep], policy=FAST)
        await pool.chat(REQUEST)
        assert ep.stats().window < 5 and ep.stats().rate_limited == 1
        for _ in range(5):  # one at a time: the window never holds a call back, so it stays
            await pool.chat(REQUEST)
        assert ep.stats().window < 5
        # 16 at once: held back, with latency flat, it grows to the cap. 50 ms of latency:
        # at ~1 ms a scheduling hiccup of the shared machine would read as a queue.
        server.control(latency=0.05)
        for _ in range(40):
            await asyncio.gather(*(pool.chat(REQUEST) for _ in range(16)))
        assert ep.stats().window == 8

    async def test_ratelimit_headers_hold_new_calls(
        self, server: FakeServerProcess, transport: AiohttpTransport
    ) -> None:
        server.control(rpm=3)
        pool = EndpointPool([endpoint(server, transport)], policy=FAST)
        for _ in range(3):
            await pool.chat(REQUEST)  # the third answer says: remaining 0, reset in ~60 s
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.chat(REQUEST), 0.5)
        stats = server.stats()
        assert stats["status"].get("429", 0) == 0  # we waited instead of hammering
        assert chat_calls(server) == 3


class TestBalancing:
    async def test_least_loaded_weighted(self, transport: AiohttpTransport) -> None:
        a = FakeServerProcess.start(models=["m"], latency=0.05)
        b = FakeServerProcess.start(models=["m"], latency=0.05)
        try:
            ea = endpoint(a, transport, weight=1, max_concurrency=1000)
            eb = endpoint(b, transport, weight=3, max_concurrency=1000)
            pool = EndpointPool([ea, eb])

            async def worker() -> None:  # 40 calls in flight at any time, below both caps
                for _ in range(10):
                    await pool.chat(REQUEST)

            await asyncio.gather(*(worker() for _ in range(40)))
            na, nb = chat_calls(a), chat_calls(b)
            assert na + nb == 400
            assert 2.0 <= nb / na <= 4.5
        finally:
            a.close()
            b.close()

    async def test_cooldown_then_probe_back(self, transport: AiohttpTransport) -> None:
        a = FakeServerProcess.start(models=["m"])
        b = FakeServerProcess.start(models=["m"])
        try:
            a.control(down=True)
            ea = endpoint(a, transport, cooldown_after=3, cooldown=0.5)
            eb = endpoint(b, transport)
            pool = EndpointPool([ea, eb], policy=FAST)
            for _ in range(30):
                await pool.chat(REQUEST)
            assert chat_calls(a) + a.stats()["status"].get("503", 0) <= 4
            assert not ea.stats().healthy
            a.control(down=False)
            await asyncio.sleep(0.6)
            for _ in range(10):
                await pool.chat(REQUEST)
            assert ea.stats().healthy and ea.stats().succeeded >= 1
        finally:
            a.close()
            b.close()

    async def test_all_down_waits_for_cooldown_not_forever(self, transport: AiohttpTransport) -> None:
        a = FakeServerProcess.start(models=["m"])
        try:
            a.control(down=True)
            ep = endpoint(a, transport, cooldown_after=2, cooldown=0.3)
            pool = EndpointPool([ep], policy=RetryPolicy(max_retries=50, backoff_base=0.001, backoff_max=0.001))
            call = asyncio.create_task(pool.chat(REQUEST))
            await asyncio.sleep(0.2)
            a.control(down=False)
            reply = await asyncio.wait_for(call, 5)
            assert reply.attempts >= 3
        finally:
            a.close()


class TestStatsAndProbe:
    async def test_stats_snapshot_is_frozen_and_counts_tokens(
        self, server: FakeServerProcess, transport: AiohttpTransport
    ) -> None:
        ep = endpoint(server, transport)
        reply = await EndpointPool([ep]).chat(REQUEST)
        stats = ep.stats()
        assert stats.tokens_in == reply.prompt_tokens > 0
        assert stats.tokens_out == reply.completion_tokens > 0
        assert stats.requests == stats.succeeded == 1 and stats.in_flight == 0
        with pytest.raises(FrozenInstanceError):
            stats.in_flight = 5  # type: ignore[misc]

    async def test_probe_resolves_first_model(self, transport: AiohttpTransport) -> None:
        server = FakeServerProcess.start(models=["first", "second"])
        try:
            config = EndpointConfig(base_url=server.base_url)
            ep = Endpoint(config, transport)
            assert await probe(ep, transport) == ("first", "second")
            assert ep.model == "first"
        finally:
            server.close()

    async def test_probe_model_not_served(self, server: FakeServerProcess, transport: AiohttpTransport) -> None:
        ep = Endpoint(EndpointConfig(base_url=server.base_url, model="nope"), transport)
        with pytest.raises(NotFoundError, match=r"'nope' is not served there \(it serves: m\)"):
            await probe(ep, transport)

    async def test_probe_unreachable(self, transport: AiohttpTransport) -> None:
        ep = Endpoint(EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m"), transport)
        with pytest.raises(UnreachableError, match=r"127\.0\.0\.1:9"):
            await probe(ep, transport)
