"""A lean HTTP/1.1 transport: asyncio protocols, httptools' parser, keep-alive pools.

Why not aiohttp: at 10,000 calls in flight the orchestrator is CPU-bound on one core,
and aiohttp's per-request machinery (a request and a response object, a stream reader,
timers, tracing signals, a multidict of headers) was ~31% of the main thread in py-spy
(bench/pipeline_bench.py --scale), and ~11 KB of RSS per call in flight on a bare loop
(254 MB against this module's 140 MB at 10,000 in flight). What an
OpenAI-compatible JSON API needs is narrower: one POST or GET, a Content-Length or
chunked reply, keep-alive. That is all this module speaks.

What it leaves out, on purpose: proxies from the environment (aiohttp's default ignores
them too), redirects (an API that redirects a POST is misconfigured; the 3xx reaches the
caller as an error), cookies, HTTP/2. Replies are asked for uncompressed; a server that
compresses anyway (gzip, deflate) is decoded.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import os
import socket
import ssl
import time
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

from gra_async.client._http import HttpResponse, Timeouts, timed_out
from gra_async.errors import ConfigError, ConnectionFailed

__all__ = ["H1Transport"]

_DNS_TTL = 300.0  # seconds a host's resolved addresses are reused
# An idle connection older than this is closed rather than reused: uvicorn (under vLLM
# and LiteLLM) closes one after 5 s idle, and a request sent as its FIN is in flight
# fails. A new connection on a LAN costs one round trip.
_IDLE_TTL = 4.0


def _user_agent() -> str:
    try:
        return f"gra-async/{importlib.metadata.version('gra-async')}"
    except importlib.metadata.PackageNotFoundError:  # imported from a checkout, not installed
        return "gra-async"


_FIXED_HEADERS = f"\r\nUser-Agent: {_user_agent()}\r\nAccept-Encoding: identity\r\n".encode()


@functools.lru_cache(maxsize=1024)  # an endpoint sends the same few headers every call
def _header(name: str, value: str, label: str) -> bytes:
    line = f"{name}: {value}\r\n"
    if "\n" in line[:-1] or "\r" in line[:-2]:
        # The value is not shown: it may be a key. A user error, so no retry repeats it.
        raise ConfigError(f"{label}: header {name!r} contains a line break (check the key "
                          "or header the config gives it)")
    try:
        return line.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError(f"{label}: header {name!r} is not Latin-1 text (check the key or "
                          "header the config gives it)") from None


class _Broken(Exception):
    """The connection failed before a whole reply arrived."""


class _Expired(Exception):
    """No whole reply within the read timeout."""


def _expire(reply: asyncio.Future[HttpResponse]) -> None:
    if not reply.done():
        reply.set_exception(_Expired())


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    __slots__ = (
        "_body",
        "_done",
        "_headers",
        "_parser",
        "_reply",
        "_status",
        "_transport",
        "closed",
        "idle_since",
    )

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reply: asyncio.Future[HttpResponse] | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._done = False
        self.closed = False
        self.idle_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the server switched protocols")
        except httptools.HttpParserError as exc:
            self._fail(f"malformed reply ({exc})")

    def eof_received(self) -> bool | None:
        self._ended("the server closed the connection")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection")

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            # An interim reply (100 Continue): the real one follows on the same connection.
            self._reset_reply()
            return
        self._done = True
        if not self._parser.should_keep_alive():
            self.close()
        self._resolve()

    # ours

    def send(self, data: bytes, reply: asyncio.Future[HttpResponse]) -> None:
        assert self._transport is not None
        self._reset_reply()
        self._reply = reply
        self._done = False
        self._transport.write(data)

    @property
    def done(self) -> bool:
        return self._done

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def _reset_reply(self) -> None:
        self._status = 0
        self._headers = {}
        self._body = []

    def _resolve(self) -> None:
        reply, self._reply = self._reply, None
        if reply is None or reply.done():
            return
        body = b"".join(self._body)
        encoding = self._headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            try:
                # wbits 47: gzip or zlib headers; a raw deflate stream needs -15.
                body = zlib.decompress(body, 47) if encoding != "deflate" else _inflate(body)
            except zlib.error as exc:
                reply.set_exception(_Broken(f"undecodable {encoding} body ({exc})"))
                return
        elif encoding not in ("identity", ""):
            reply.set_exception(_Broken(f"unsupported Content-Encoding {encoding!r}"))
            return
        reply.set_result(HttpResponse(self._status, self._headers, body))

    def _ended(self, reason: str) -> None:
        self.closed = True
        if self._reply is None or self._done:
            return
        framed = "content-length" in self._headers or "transfer-encoding" in self._headers
        if self._status >= 200 and not framed:
            # A reply without Content-Length or chunking ends when the connection does.
            self._done = True
            self._resolve()
            return
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        self.abort()
        reply, self._reply = self._reply, None
        if reply is not None and not reply.done():
            reply.set_exception(_Broken(reason))


def _inflate(body: bytes) -> bytes:
    try:
        return zlib.decompress(body)
    except zlib.error:
        return zlib.decompress(body, -15)


@dataclass(slots=True)
class _Origin:
    """Where requests for one scheme://host:port go, and its idle connections."""

    host: str
    port: int
    tls: bool
    authority: bytes  # the Host header
    idle: deque[_Connection] = field(default_factory=deque)
    addresses: list[tuple[str, int]] = field(default_factory=list)
    resolved_at: float = -_DNS_TTL


class H1Transport:
    """HTTP/1.1 with keep-alive, one connection per call in flight; caps live above it
    (the endpoint windows), so it never queues a request where the limiter can't see it."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, *,
                 idle_ttl: float = _IDLE_TTL) -> None:
        """`ssl_context`: how to verify servers (default: the system's CAs, which
        SSL_CERT_FILE overrides). `idle_ttl`: seconds an idle connection may be reused."""
        self._ssl = ssl_context
        self._idle_ttl = idle_ttl
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._paths: dict[str, tuple[_Origin, bytes]] = {}
        self._open: set[_Connection] = set()

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
        origin, target = self._route(url, label)
        head = [f"{method} ".encode(), target, b" HTTP/1.1\r\nHost: ", origin.authority,
                _FIXED_HEADERS]
        for name, value in headers.items():
            head.append(_header(name, value, label))
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head.append(b"Content-Length: %d\r\n" % len(body or b""))
        head.append(b"\r\n")
        if body:
            head.append(body)
        data = b"".join(head)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeouts.read
        # No silent resend on a reused connection that fails: the server may have run the
        # call, and the retry layer above counts every attempt (tests/test_faults.py).
        connection = self._idle(origin)
        if connection is None:
            try:
                async with asyncio.timeout_at(deadline):
                    connection = await self._connect(origin, timeouts, label)
            except TimeoutError:
                raise timed_out(label, timeouts) from None
        reply: asyncio.Future[HttpResponse] = loop.create_future()
        # A timer on the reply, not `asyncio.timeout` around the await: its enter, exit
        # and reschedule were ~4% of the main thread at 0 ms latency (py-spy,
        # bench/pipeline_bench.py --latency 0), for what one TimerHandle does.
        timer = loop.call_at(deadline, _expire, reply)
        try:
            connection.send(data, reply)
            response = await reply
        except _Expired:
            raise timed_out(label, timeouts) from None
        except _Broken as exc:
            raise ConnectionFailed(f"{label}: connection failed ({exc})", endpoint=label) from None
        finally:
            timer.cancel()
            if not connection.done:
                # Cancelled, timed out or broken mid-reply: the rest of it would arrive on
                # a connection someone else is using.
                connection.abort()
            if connection.closed:
                self._open.discard(connection)
        if not connection.closed:
            connection.idle_since = time.monotonic()
            origin.idle.append(connection)
        return response

    def _idle(self, origin: _Origin) -> _Connection | None:
        now = time.monotonic()
        idle = origin.idle
        # Oldest first from the left: after a burst the calls that follow reuse only the
        # newest few, and the rest would sit there closed by their server.
        while idle and (idle[0].closed or now - idle[0].idle_since >= self._idle_ttl):
            self._drop(idle.popleft())
        while idle:
            # Most recently used first: its peer is the least likely to have timed it out.
            connection = idle.pop()
            if not connection.closed:
                return connection
            self._drop(connection)
        return None

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def _connect(self, origin: _Origin, timeouts: Timeouts, label: str) -> _Connection:
        loop = asyncio.get_running_loop()
        addresses = await self._resolve(origin, timeouts, label)
        reason = "no address"
        for host, port in addresses:
            try:
                async with asyncio.timeout(timeouts.connect):
                    _, connection = await loop.create_connection(
                        _Connection, host, port,
                        ssl=self._tls() if origin.tls else None,
                        server_hostname=origin.host if origin.tls else None,
                    )
            except TimeoutError:
                reason = f"no connection within {timeouts.connect:g}s"
                continue
            except ssl.SSLError as exc:
                raise ConnectionFailed(f"{label}: TLS failed ({exc.reason or exc})",
                                       endpoint=label) from None
            except OSError as exc:
                # The stdlib loop's strerror is "Connect call failed (addr)", uvloop's the
                # errno's text: say the errno's text either way.
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                continue
            self._open.add(connection)
            return connection
        raise ConnectionFailed(f"{label}: cannot connect ({reason})", endpoint=label)

    async def _resolve(self, origin: _Origin, timeouts: Timeouts,
                       label: str) -> list[tuple[str, int]]:
        now = time.monotonic()
        if now - origin.resolved_at < _DNS_TTL and origin.addresses:
            return origin.addresses
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeouts.connect):
                infos = await loop.getaddrinfo(origin.host, origin.port,
                                               type=socket.SOCK_STREAM)
        except TimeoutError:
            raise ConnectionFailed(f"{label}: cannot connect (no DNS answer for "
                                   f"{origin.host} within {timeouts.connect:g}s)",
                                   endpoint=label) from None
        except OSError as exc:
            raise ConnectionFailed(f"{label}: cannot connect ({exc.strerror or exc})",
                                   endpoint=label) from None
        origin.addresses = list(dict.fromkeys((str(i[4][0]), int(i[4][1])) for i in infos))
        origin.resolved_at = now
        return origin.addresses

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _route(self, url: str, label: str) -> tuple[_Origin, bytes]:
        cached = self._paths.get(url)
        if cached is not None:
            return cached
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConnectionFailed(f"{label}: cannot connect (not an http(s) URL: {url})",
                                   endpoint=label)
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        key = (parts.scheme, parts.hostname, port)
        origin = self._origins.get(key)
        if origin is None:
            host = parts.hostname
            shown = f"[{host}]" if ":" in host else host
            default = (tls and port == 443) or (not tls and port == 80)
            authority = (shown if default else f"{shown}:{port}").encode("idna")
            origin = self._origins[key] = _Origin(host, port, tls, authority)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        routed = (origin, target.encode("ascii"))
        if len(self._paths) < 1024:
            self._paths[url] = routed
        return routed

    async def aclose(self) -> None:
        for connection in self._open:
            connection.close()
        self._open.clear()
        for origin in self._origins.values():
            origin.idle.clear()
        # Let the transports' close callbacks run before the loop goes away.
        await asyncio.sleep(0)
