"""The one HTTP stack: a pooled aiohttp session, behind a two-method transport interface.

aiohttp was chosen by measurement (bench/client_bench.py, numbers in README): on 2 cores
it spends a fraction of the CPU per request of httpx or the openai SDK, which decides how
close a single process gets to the Little's-law ideal at hundreds of calls in flight.

Every transport-level failure is turned into our exception tree here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from gra_async.errors import ConnectionFailed, RequestTimeout

__all__ = ["AiohttpTransport", "HttpResponse", "Timeouts", "Transport", "timed_out"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float  # opening a connection (TCP and TLS)
    read: float  # the whole call, sent to last byte of the reply; a connect counts within it


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # case-insensitive for the aiohttp transport
    body: bytes


def timed_out(label: str, timeouts: Timeouts) -> RequestTimeout:
    """What every transport raises when a call's `read` limit passes."""
    return RequestTimeout(f"{label}: no complete reply within {timeouts.read:g}s", endpoint=label)


class Transport(Protocol):
    """What the client layer needs from HTTP; inject another one to change stacks."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeouts: Timeouts,
        label: str,
    ) -> HttpResponse: ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """One `aiohttp.ClientSession` per process; connection caps are enforced per endpoint above."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # limit=0: the endpoint semaphores bound connections; a second cap here would
            # only queue requests invisibly to the limiter and the stats.
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
            )
        return self._session

    def _timeout(self, timeouts: Timeouts) -> aiohttp.ClientTimeout:
        cached = self._timeouts.get(timeouts)
        if cached is None:
            # total = read: the limit a user sets is the limit a call gets (connect + read
            # let a 5 s read_timeout run 15 s and the message say 5).
            cached = aiohttp.ClientTimeout(total=timeouts.read, sock_connect=timeouts.connect)
            self._timeouts[timeouts] = cached
        return cached

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeouts: Timeouts,
        label: str,
    ) -> HttpResponse:
        try:
            async with self._client().request(
                method, url, data=body, headers=headers, timeout=self._timeout(timeouts)
            ) as response:
                payload = await response.read()
                return HttpResponse(response.status, response.headers, payload)
        except TimeoutError:
            raise timed_out(label, timeouts) from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectionFailed(
                f"{label}: cannot connect ({exc.os_error.strerror or exc.os_error})",
                endpoint=label,
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            reason = type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
            raise ConnectionFailed(f"{label}: connection failed ({reason})", endpoint=label) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
